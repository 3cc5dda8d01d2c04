"""The output file of a batch job: one JSON line per request, appended as requests finish, so
that a killed job can resume (`--resume`) without losing or duplicating a line.

Every line is written with a single write() on a file opened with O_APPEND: lines from
several DP replicas never interleave, and a crash can only leave an incomplete *last* line,
which resume cuts off. With DP replicas on several nodes the output must be on a file system
they share.
"""
from __future__ import annotations

import json
import os
from typing import Set

from seesaw_mc.errors import SeesawError


def request_key(request_id) -> str:
    """A request id as compared between the input and the output (1 and "1" differ)."""
    return json.dumps(request_id, sort_keys=True)


def line_key(line: int) -> str:
    """Error records are keyed by their input line (an invalid line may repeat a valid id)."""
    return f"line:{line}"


def record_key(rec: dict) -> str:
    err = rec.get("error")
    if isinstance(err, dict) and "line" in err:
        return line_key(err["line"])
    return request_key(rec["custom_id"] if "custom_id" in rec else rec["id"])


def scan_for_resume(path: str) -> Set[str]:
    """Keys of the requests already in `path`; an incomplete last line (a crash mid-write)
    is cut off. Missing file: nothing done."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    done: Set[str] = set()
    for n, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(record_key(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            raise SeesawError(f"--resume: line {n} of {path} is not an output record of this tool; "
                              f"move the file away to start over") from None
    return done


class AppendWriter:
    def __init__(self, path: str, truncate: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)

    def write(self, rec: dict) -> None:
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        n = os.write(self.fd, data)
        while n < len(data):  # only on odd file systems; keeps the line whole if it happens
            n += os.write(self.fd, data[n:])

    def close(self) -> None:
        os.close(self.fd)

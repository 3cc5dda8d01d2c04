"""The output file of a batch job: one JSON line per request, so that a killed job can resume
(`--resume`) without losing or duplicating a request.

One writer per file. Replica 0's leader (global rank 0) appends to the output itself, the
leader of DP replica r > 0 to `<output>.part-<r>`, each line with one write() as it finishes.
Several writers appending to one file are safe on a local file system only: on NFS, which
multi-node DP needs, O_APPEND is emulated by the client (it writes at the size it last saw),
so two nodes' lines can overwrite or interleave each other, and a line longer than a page can
be torn by a SIGKILL in the middle of the file. With one writer per file, a crash can only
tear a file's last line. When every replica is done, rank 0 merges the parts into the output
(a temporary file, fsync, rename) and deletes them: the finished output holds one line per
input line, in input order, the same bytes whatever the DP size or the resumes. The merge
checks that each part holds every line its replica wrote: where the nodes do not share the
output's folder it stops with one line and keeps the parts, rather than lose lines.

Resume reads the output and every part file left behind (of any DP size). A line that is not
JSON (torn by a crash, or the zeros an NFS client crash can leave) is dropped wherever it is,
and its request runs again; a JSON line that is not a record of this tool stops the job (the
output path is probably wrong). Each request's first complete record is kept, and all of them
are merged into the output before the new run starts.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

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


def part_path(output: str, replica: int) -> str:
    """Where replica `replica` writes; replica 0 writes the output itself."""
    return output if replica == 0 else f"{output}.part-{replica}"


def part_files(output: str) -> List[str]:
    """The part files next to `output`, of any replica count (left by a killed job)."""
    folder, name = os.path.split(os.path.abspath(output))
    pattern = re.compile(re.escape(name) + r"\.part-(\d+)")
    found = sorted((int(m.group(1)), n) for n in os.listdir(folder) if (m := pattern.fullmatch(n)))
    return [os.path.join(folder, n) for _, n in found]


Index = List[Tuple[str, int, int]]  # (key, offset, length) of each record of a file, in file order


def scan(path: str) -> Tuple[Index, int]:
    """The records of `path` and how many torn lines it holds (dropped). Missing: none."""
    records: Index = []
    torn = offset = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return records, 0
    with f:
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw) if raw.endswith(b"\n") else None  # no newline: cut by a crash
            except ValueError:  # not JSON (UnicodeDecodeError included): torn
                rec = None
            if rec is None:
                torn += 1
                continue
            try:
                records.append((record_key(rec), start, len(raw)))
            except (KeyError, TypeError, AttributeError):
                raise SeesawError(f"--resume: line {n} of {path} is not an output record of this tool; "
                                  f"move the file away to start over") from None
    return records, torn


def merge(output: str, parts: Sequence[str], order: Dict[str, int],
          expect: Optional[Sequence[int]] = None) -> Tuple[Set[str], int]:
    """Rewrite `output` with the records of itself and `parts`, each request once (its first
    record), in input order (`order`: key -> input line; unknown keys last), then delete the
    parts. `expect[i]`: the records parts[i] must hold. Returns (keys kept, torn lines dropped)."""
    sources = [output, *parts]
    scans = [scan(p) for p in sources]
    for i, want in enumerate(expect or ()):
        if len(scans[i + 1][0]) != want:
            raise SeesawError(f"{parts[i]} holds {len(scans[i + 1][0])} of the {want} lines its replica wrote: "
                              f"with DP replicas on several nodes the output's folder must be on a file system they "
                              f"all share; the part files are kept, rerun with --resume where they can be read")
    kept: Dict[str, Tuple[int, int, int, int]] = {}
    for s, (records, _) in enumerate(scans):
        for key, off, size in records:
            if key not in kept:
                kept[key] = (order.get(key, len(order) + 1), s, off, size)
    tmp = output + ".merging"
    files = [open(p, "rb") if scans[s][0] else None for s, p in enumerate(sources)]
    try:
        with open(tmp, "wb") as out:
            for _, s, off, size in sorted(kept.values()):
                out.write(os.pread(files[s].fileno(), size, off))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in files:
            if f is not None:
                f.close()
    os.replace(tmp, output)  # a kill before this keeps the old files; after it, resume de-duplicates
    for p in parts:
        try:
            os.unlink(p)
        except FileNotFoundError:  # a replica that wrote nothing, on a node that does not share the folder
            pass
    return set(kept), sum(t for _, t in scans)


def start_output(output: str, resume: bool, order: Dict[str, int]) -> Tuple[Set[str], int]:
    """Rank 0, before the run: with `resume`, merge what the output and its part files hold and
    return (keys done, torn lines dropped); without, start from an empty output."""
    if resume:
        return merge(output, part_files(output), order)
    AppendWriter(output, truncate=True).close()
    for p in part_files(output):
        os.unlink(p)
    return set(), 0


class AppendWriter:
    """One writer's file: each line with a single write() (a crash can only tear the last)."""

    def __init__(self, path: str, truncate: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)
        self.lines = 0

    def write(self, rec: dict) -> None:
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        n = os.write(self.fd, data)
        while n < len(data):  # only on odd file systems; keeps the line whole if it happens
            n += os.write(self.fd, data[n:])
        self.lines += 1

    def close(self) -> None:
        """Flush to storage: on NFS, another node's rank reads the file next (the merge)."""
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

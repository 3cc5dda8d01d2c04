"""What setup.py promises users."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_floor_has_sdpa_enable_gqa():
    """Issue 15 item 8: model/attention.py calls SDPA with enable_gqa, which torch 2.5 added;
    setup.py must not accept an older torch."""
    text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    floor = re.search(r'"torch>=([0-9.]+)', text)
    assert floor, "setup.py names no torch floor"
    assert tuple(int(x) for x in floor.group(1).split(".")[:2]) >= (2, 5), floor.group(0)

"""Megatron <-> HF conversion: `python checkpoints_tools/convert.py --input SRC --output DST [...]`,
the same as `seesaw-mc convert` (see checkpoints_tools/README.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seesaw_mc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

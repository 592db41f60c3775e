"""Prepare a dataset: conversations -> token ids and roles in data/NAME/ (data/prepare.py says
how; --help lists the flags)."""
import sys

from data.prepare import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

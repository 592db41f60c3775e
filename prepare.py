"""Prepare a dataset: conversations -> token ids and roles in data/NAME/ (how: data/prepare.py)."""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while imports run ends quietly)

import sys

from cli.flags import run
from data.prepare import main


def prepare_command():
    if status := main(sys.argv[1:]):  # 1: bad data, 2: a bad flag (said on stderr already)
        raise SystemExit(status)


if __name__ == "__main__":
    run(prepare_command)

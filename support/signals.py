"""Stopping a training run cleanly on Ctrl-C or SIGTERM."""
import signal
import sys

from cli.flags import say


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to stop at a step boundary (every: the steps it looks at),
    so that its checkpoint is consistent; a second Ctrl-C aborts at once."""

    def __init__(self, every=1):
        self.when = "after this step" if every == 1 else \
            f"at the next step that is a multiple of {every}, where every rank stops together"

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True  # first: the message may meet a closed pipe; the save must not care
        say(f"\nstopping {self.when} to save a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

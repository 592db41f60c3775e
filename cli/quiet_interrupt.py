"""Imported first by every script, before torch (seconds to import): a Ctrl-C meanwhile ends the
program quietly, not with a traceback, until flags.run makes it a KeyboardInterrupt. Only when one
of this repository's scripts is the program: a test that imports a script keeps its own handler."""
import os
import signal
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRAM = getattr(sys.modules.get("__main__"), "__file__", None)
if _PROGRAM and os.path.abspath(_PROGRAM).startswith(_ROOT + os.sep):
    signal.signal(signal.SIGINT, signal.SIG_DFL)

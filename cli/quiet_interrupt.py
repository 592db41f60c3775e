"""
Imported first by every script, before torch (which takes seconds to import): a Ctrl-C in that time ends the program
quietly, as the default signal action does, instead of with a KeyboardInterrupt traceback. flags.run gives Ctrl-C
back to Python (a KeyboardInterrupt) once main() runs. Only when one of this repository's scripts is the program:
a test that imports a script keeps its own handler.
"""
import os
import signal
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROGRAM = getattr(sys.modules.get("__main__"), "__file__", None)
if _PROGRAM and os.path.abspath(_PROGRAM).startswith(_ROOT + os.sep):
    signal.signal(signal.SIGINT, signal.SIG_DFL)

"""What a newcomer meets first: `python mask.py --help` and `python engine.py --help` say what they do (exit 0)
instead of running, and an argument they do not take is one line (exit 2)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script, says", [("mask.py", "Draw the three masks"), ("engine.py", "A random model")])
def test_help_says_what_a_script_does_and_an_unknown_argument_is_one_line(script, says):
    helped = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith(f"usage: python {script}\n") and says in helped.stdout
    assert "SSSUUUAAUUUAA" not in helped.stdout and "prefilled" not in helped.stdout  # nor drew, nor chatted
    wrong = subprocess.run([sys.executable, script, "--mask=ism"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr == f"error: python {script} takes no arguments, not '--mask=ism' (--help says what it does)\n"


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(ROOT) if f.endswith(".py")))
def test_every_python_file_at_the_root_answers_help(script):
    """A script lists what it does and its flags; a module says what runs it: none is silent."""
    helped = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and len(helped.stdout.strip()) > 40, helped.stderr[-500:]

"""--key=value parsing: typed conversion, --help, config files, one-line errors."""
import errno
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from cli import flags
from cli.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL = "/dev/full"  # every write to it fails with ENOSPC, as on a full disk
needs_dev_full = pytest.mark.skipif(not os.path.exists(FULL), reason="needs /dev/full (Linux)")


@dataclass
class Settings:
    learning_rate: float = 6e-4
    max_iters: int = 100
    mask: str = "ism"
    compile: bool = False
    out_dir: str = field(default="out", metadata={"help": "where checkpoints go"})


def test_values_are_converted_by_the_field_type():
    s = flags.parse(Settings(), ["--learning_rate=1", "--max_iters=2e3", "--mask=causal", "--compile=true"])
    assert s == Settings(learning_rate=1.0, max_iters=2000, mask="causal", compile=True)
    assert isinstance(s.learning_rate, float)
    assert flags.parse(Settings(), ["--compile"]).compile is True


@pytest.mark.parametrize("argv,message", [
    (["--learing_rate=1"], "unknown flag --learing_rate (did you mean --learning_rate?)"),
    (["--bogus=1"], "unknown flag --bogus (--help lists them)"),
    (["--max_iters=ten"], "--max_iters=ten: expected int"),
    (["--max_iters=2.5"], "--max_iters=2.5: expected int"),
    (["--compile=maybe"], "--compile=maybe: expected bool"),
    (["--learning_rate=nan"], "--learning_rate=nan: expected float"),
    (["--max_iters=1e400"], "--max_iters=1e400: expected int"),
    (["--mask"], "--mask needs a value: --mask=VALUE"),
])
def test_mistakes_raise_one_line_errors(argv, message):
    with pytest.raises(UserError) as e:
        flags.parse(Settings(), argv)
    assert str(e.value) == message


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        flags.parse(Settings(), ["--help"], "Train it.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Train it.")
    for name, default in [("learning_rate", "0.0006"), ("max_iters", "100"), ("mask", "ism"), ("out_dir", "out")]:
        assert f"--{name}={default}" in out
    assert "where checkpoints go" in out


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "small.conf"
    path.write_text("# a small run\nmax_iters = 50\nmask = 'causal'  # inline comment\n")
    s = flags.parse(Settings(), [str(path), "--max_iters=70"])
    assert (s.max_iters, s.mask) == (70, "causal")
    path.write_text("max_iters 50\n")
    with pytest.raises(UserError, match=r"small.conf:1: expected key = value"):
        flags.parse(Settings(), [str(path)])
    with pytest.raises(UserError, match="cannot read config file"):
        flags.parse(Settings(), [str(tmp_path / "missing.conf")])


@dataclass
class Texts:
    system: str = ""
    out_dir: str = "out"


def test_a_hash_inside_a_quoted_value_is_text_not_a_comment(tmp_path):
    path = tmp_path / "chat.conf"
    path.write_text("system = \"use # signs\"  # a comment\nout_dir = 'runs/#3'\n")
    assert flags.parse(Texts(), [str(path)]) == Texts(system="use # signs", out_dir="runs/#3")
    path.write_text("system = 'not closed # here\n")
    with pytest.raises(UserError, match=r"chat.conf:1: expected key = value"):
        flags.parse(Texts(), [str(path)])


def test_a_config_file_may_start_with_a_utf8_bom(tmp_path):
    path = tmp_path / "windows.conf"
    path.write_bytes(b"\xef\xbb\xbf" + "system = 'caf\u00e9'\r\nout_dir = 'x'\r\n".encode("utf-8"))
    assert flags.parse(Texts(), [str(path)]) == Texts(system="caf\u00e9", out_dir="x")


def test_run_prints_one_line_and_exits_2(capsys):
    def main():
        raise UserError("no checkpoint at out/ckpt.pt: run python train.py first")
    with pytest.raises(SystemExit) as e:
        flags.run(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: no checkpoint at out/ckpt.pt: run python train.py first\n"


@dataclass
class Checked:
    mask: str = flags.setting("ism", "attention mask", choices=("causal", "ism"))
    steps: int = flags.setting(10, "steps", min=0)
    dropout: float = flags.setting(0.0, "dropout", min=0, below=1)
    rate: float = flags.setting(0.1, "rate", above=0, max=1)


@pytest.mark.parametrize("argv,message", [
    (["--mask=full"], "--mask=full: choose one of causal | ism"),
    (["--steps=-1"], "--steps=-1: must be at least 0"),
    (["--dropout=1"], "--dropout=1: must be below 1"),
    (["--rate=0"], "--rate=0: must be above 0"),
    (["--rate=2"], "--rate=2: must be at most 1"),
])
def test_values_out_of_range_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as e:
        flags.parse(Checked(), argv)
    assert str(e.value) == message
    assert flags.parse(Checked(), ["--steps=0", "--dropout=0.5", "--rate=1", "--mask=causal"]).rate == 1.0


def test_ranges_hold_for_config_files_too(tmp_path):
    path = tmp_path / "run.conf"
    path.write_text("steps = -3\n")
    with pytest.raises(UserError, match="--steps=-3: must be at least 0"):
        flags.parse(Checked(), [str(path)])


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.conf"
    path.write_bytes("mask = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.conf is not UTF-8 text"):
        flags.parse(Checked(), [str(path)])


def test_shared_config_files_skip_other_scripts_keys(tmp_path):
    path = tmp_path / "train.conf"
    path.write_text("steps = 5\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match="unknown flag --learning_rate"):
        flags.parse(Checked(), [str(path)])
    assert flags.parse(Checked(), [str(path)], shared_files=True).steps == 5
    with pytest.raises(UserError, match="unknown flag --learning_rate"):  # on the command line: still refused
        flags.parse(Checked(), ["--learning_rate=0.1"], shared_files=True)


def test_run_turns_ctrl_c_and_a_closed_pipe_into_quiet_exits(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        flags.run(interrupted)
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err



def run_writing(body, stdout=None, stderr=subprocess.PIPE):
    """python -c 'flags.run(main)' with main's body, stdout and stderr as given -> the finished process."""
    code = f"import sys\nfrom cli import flags\ndef main():\n    {body}\nflags.run(main)\n"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=stdout, stderr=stderr, timeout=60)


@needs_dev_full
@pytest.mark.parametrize("body", ["print('x' * 100_000)",  # fails inside print
                                  "print('a short reply')"])  # fails when the buffer is flushed at the end
def test_run_turns_a_failed_write_to_stdout_into_one_line(body):
    with open(FULL, "w") as full:
        proc = run_writing(body, stdout=full)
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"error: cannot write to stdout: {os.strerror(errno.ENOSPC)}\n"


@needs_dev_full
def test_run_exits_non_zero_when_stderr_cannot_be_written():
    with open(FULL, "w") as full:
        proc = run_writing("print('a warning', file=sys.stderr, flush=True); print('never')", stdout=subprocess.PIPE,
                           stderr=full)
    assert proc.returncode == 1 and proc.stdout == b""


@needs_dev_full
def test_a_warning_that_stderr_cannot_take_is_dropped_as_before(tmp_path):
    with open(FULL, "w") as full:
        proc = run_writing("import warnings; warnings.warn('lost'); print('goes on')", stdout=subprocess.PIPE,
                           stderr=full)
    assert proc.returncode == 0 and proc.stdout == b"goes on\n"


def test_an_os_error_of_the_program_itself_still_raises(tmp_path):
    def main():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "checkpoint.pt"))

    with pytest.raises(OSError) as error:
        flags.run(main)
    assert error.value.errno == errno.ENOSPC
    proc = run_writing("open('/nonexistent/folder/file', 'w')")
    assert proc.returncode == 1 and b"Traceback" in proc.stderr and b"FileNotFoundError" in proc.stderr

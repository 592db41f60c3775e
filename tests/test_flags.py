"""--key=value parsing: typed conversion, --help, config files, one-line errors."""
from dataclasses import dataclass, field

import pytest

import flags
from flags import UserError


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


def test_run_prints_one_line_and_exits_2(capsys):
    def main():
        raise UserError("no checkpoint at out/ckpt.pt: run python train.py first")
    with pytest.raises(SystemExit) as e:
        flags.run(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: no checkpoint at out/ckpt.pt: run python train.py first\n"

"""
Command-line settings, nanoGPT style: every setting is a field of a dataclass, overridden as --key=value.

Unlike nanoGPT's exec'd configurator, `--help` lists every flag with its default, values are converted by the
field's type (`--learning_rate=1` is a float, `--max_iters=2e3` an int), and a config file holds plain
`key = value` lines read with ast.literal_eval, never executed. Mistakes raise UserError, which `run` prints as one
line (no traceback) before exiting with status 2.
"""
import ast
import dataclasses
import difflib
import math
import sys


def setting(default, help):
    """A config dataclass field with its --help text: `max_iters: int = setting(700, "optimizer steps")`."""
    return dataclasses.field(default=default, metadata={"help": help})


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file, missing checkpoint): shown as one line, no traceback."""


def _convert(text, kind, key):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        value = float(text) if kind in (int, float) else kind(text)
        if kind in (int, float) and not math.isfinite(value):
            raise ValueError  # nan and inf pass every range check, then train to NaN
        if kind is int:
            if value != int(value):
                raise ValueError
            return int(value)
        return value
    except ValueError:
        raise UserError(f"--{key}={text}: expected {kind.__name__}") from None


def _read_config_file(path):
    """`key = value` lines (Python literals), # comments allowed."""
    settings = {}
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        try:
            if not sep:
                raise ValueError
            settings[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"{path}:{n}: expected key = value (a Python literal), got {line!r}") from None
    return settings


def usage(defaults, doc):
    lines = [doc.strip(), "", "flags (--key=value; a positional FILE holds key = value lines):"]
    for f in dataclasses.fields(defaults):
        help_text = f.metadata.get("help", "")
        flag = f"--{f.name}={getattr(defaults, f.name)}"
        lines.append(f"  {flag:<32} {help_text}")
    return "\n".join(lines)


def parse(defaults, argv, doc=""):
    """Return a copy of the dataclass `defaults` with config-file values, then --key=value flags, applied."""
    fields = {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}
    settings = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage(defaults, doc))
            sys.exit(0)
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg).items():
                if key not in fields:
                    _unknown(key, fields)
                settings[key] = _convert(str(value), fields[key], key)
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in fields:
            _unknown(key, fields)
        if not sep:
            if fields[key] is not bool:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            text = "true"
        settings[key] = _convert(text, fields[key], key)
    return dataclasses.replace(defaults, **settings)


def _unknown(key, fields):
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else " (--help lists them)"
    raise UserError(f"unknown flag --{key}{hint}")


def run(main):
    """Call main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""Command-line settings, nanoGPT style: each setting a dataclass field, overridden as --key=value.
Unlike nanoGPT's exec'd configurator, --help lists every flag with its default; values convert by
the field's type (--max_iters=2e3 is an int) and are checked against the allowed values and ranges;
a config file holds `key = value` lines read by ast.literal_eval."""
import ast
import dataclasses
import difflib
import math
import os
import signal
import sys

from cli.errors import UserError, reason

_BOUNDS = {"min": (lambda v, b: v >= b, "at least"), "max": (lambda v, b: v <= b, "at most"),
           "above": (lambda v, b: v > b, "above"), "below": (lambda v, b: v < b, "below")}
_WORDS = {**dict.fromkeys(("1", "true", "yes", "on"), True),
          **dict.fromkeys(("0", "false", "no", "off"), False)}


def setting(default, help, choices=None, **bounds):
    """A field with its --help text and what it allows: `steps: int = setting(100, "...", min=0)`.
    Bounds: min and max (inclusive), above and below (exclusive)."""
    assert set(bounds) <= set(_BOUNDS), bounds
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "bounds": bounds})


def _value(text, defaults, field):
    """The typed, checked value of --key=text for a field of the dataclass `defaults`."""
    key, kind = field.name, type(getattr(defaults, field.name))
    try:
        if kind is bool:
            value = _WORDS.get(text.lower())  # None: not a yes/no word
        else:
            value = float(text) if kind in (int, float) else kind(text)
        # nan and inf pass every range check, then train to NaN
        if value is None or kind in (int, float) and not math.isfinite(value) or \
                kind is int and value != int(value):
            raise ValueError
    except ValueError:
        raise UserError(f"--{key}={text}: expected {kind.__name__}") from None
    value = int(value) if kind is int else value
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        named = [str(c) for c in choices if c != ""] + (["empty"] if "" in choices else [])
        raise UserError(f"--{key}={text}: choose one of {' | '.join(named)}")
    for bound, limit in field.metadata.get("bounds", {}).items():
        holds, words = _BOUNDS[bound]
        if not holds(value, limit):
            raise UserError(f"--{key}={text}: must be {words} {limit}")
    return value


def _read_config_file(path):
    """`key = value` lines (Python literals: a # comment after one is Python's), # comment lines,
    a UTF-8 BOM skipped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {reason(e)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    settings = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        try:
            if not sep or "#" in key:
                raise ValueError
            settings[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise UserError(f"{path}:{n}: expected key = value (a Python literal), got "
                            f"{line!r}") from None
    return settings


def parse(defaults, argv=None, doc="", shared_files=False):
    """A copy of the dataclass `defaults`, argv's (None: sys.argv[1:]) files and flags applied in
    order. shared_files: keys a file holds for another script (bench.py: train.py's) are skipped."""
    fields = {f.name: f for f in dataclasses.fields(defaults)}
    settings = {}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print(f"{doc.strip()}\n\nflags (--key=value; a FILE argument holds key = value lines):")
            for f in dataclasses.fields(defaults):
                flag = f"--{f.name}={getattr(defaults, f.name)}"
                print(f"  {flag:<32} {f.metadata.get('help', '')}")
            sys.exit(0)
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg).items():
                if key in fields:
                    settings[key] = _value(str(value), defaults, fields[key])
                elif not shared_files:
                    _unknown(key, fields, f"{arg}: ")
            continue
        key, sep, text = arg[2:].partition("=")
        if key not in fields:
            _unknown(key, fields)
        if not sep and type(getattr(defaults, key)) is not bool:
            raise UserError(f"--{key} needs a value: --{key}=VALUE")
        settings[key] = _value(text if sep else "true", defaults, fields[key])
    return dataclasses.replace(defaults, **settings)


def _unknown(key, fields, where=""):
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else " (--help lists them)"
    raise UserError(f"{where}unknown flag --{key}{hint}")


class OutputError(OSError):
    """Writing stdout or stderr failed (a full disk): the environment's doing, not a bug's. An
    OSError still, for code that catches those around its writes (warnings drops a warning)."""

    def __init__(self, name, stream, error):
        super().__init__(error.errno, error.strerror)
        self.name, self.stream, self.reason = name, stream, reason(error)


class _Watched:
    """stdout or stderr, whose failed writes raise OutputError, so that run() tells them from an
    OSError of the program's own files (a bug). A closed pipe stays a BrokenPipeError."""

    def __init__(self, stream, name):
        self._stream, self._name = stream, name

    def write(self, text):
        return self._guarded(self._stream.write, text)

    def flush(self):
        return self._guarded(self._stream.flush)

    def _guarded(self, method, *args):
        try:
            return method(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(self._name, self._stream, e) from e

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)


def say(*parts, file=None):
    """print(*parts) on stdout (or file) in one write (ranks sharing a terminal never interleave),
    flushed. Output that cannot be written, a reader gone included (`train.py | tee log`), drops the
    message and points the stream at /dev/null: a training run's messages never end it."""
    stream = file or sys.stdout
    try:
        stream.write(" ".join(map(str, parts)) + "\n")
        stream.flush()
    except (AttributeError, OSError):  # AttributeError: no stream (None)
        _silence(stream)


def _silence(stream):
    """Point stream's file at /dev/null, so that Python's flush at exit does not fail again."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # None, or not a file: nothing to flush at exit
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def run(main):
    """Call main() as a script's user expects: a UserError is one line on stderr and exit status 2;
    Ctrl-C exits 130 without a traceback; a closed pipe (`| head -1`) ends the output quietly;
    output that cannot be written (`> /dev/full`) is one line on stderr and exit status 1."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C: KeyboardInterrupt
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (None if stream is None else _Watched(stream, name)
                              for stream, name in zip(streams, ("stdout", "stderr")))
    try:
        main()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()  # here, where a failure is caught, not in Python's flush at exit
    except UserError as e:
        say(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        say(file=sys.stderr)
        sys.exit(130)
    except OutputError as e:
        say(f"error: cannot write to {e.name}: {e.reason}", file=sys.stderr)
        _silence(e.stream)
        sys.exit(1)
    except BrokenPipeError:  # the reader went away (`| head`)
        _silence(sys.__stdout__)
        sys.exit(1)
    finally:
        sys.stdout, sys.stderr = streams

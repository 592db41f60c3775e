"""A training run's files in out_dir: ckpt.pt, best.pt, log.jsonl, adapter/ and train.lock. One run
per out_dir at a time; no file is ever written through a symbolic link planted there."""
import contextlib
import fcntl
import glob
import json
import os
import pathlib
import sys
import tempfile
import time

from cli.errors import UserError, reason
from support.checkpoint import CHECKPOINT_PREFIX, LOG_PREFIX, TEMPORARY_PREFIX, usual_mode

RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl")  # what a new run writes: never silently replaced


def planted_link(path, what):
    return UserError(f"{path} is a symbolic link: remove it (a run never writes {what} through a "
                     "link it did not make)")


class RunLock:
    """Hold out_dir/train.lock (flock: a killed run releases it) while a run trains: a second run
    is refused. Holding it, the run clears the temporary files killed writes left behind."""

    def __init__(self, out_dir):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, "train.lock"), None

    def __enter__(self):
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to {self.out_dir} ({reason(e)}): pick another "
                            "--out_dir") from None
        while not self._locked():  # the file we locked was removed by a run ending: lock anew
            os.close(self.fd)
        with contextlib.suppress(OSError):  # the pid only names the owner in another run's error
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}".encode())
        # what killed writes left: save_checkpoint's, TrainingLog's and the adapter's (atomic's)
        for pattern in (f"{CHECKPOINT_PREFIX}*.tmp", f"{LOG_PREFIX}*.tmp",
                        os.path.join("adapter", f"{TEMPORARY_PREFIX}*")):
            for leftover in glob.glob(os.path.join(self.out_dir, pattern)):
                if os.path.isfile(leftover) and not os.path.islink(leftover):
                    os.remove(leftover)
        return self

    def _locked(self):
        """Open and lock train.lock -> whether the file locked is still the one at its path."""
        try:  # O_NOFOLLOW: a planted link is refused, never followed
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if os.path.islink(self.path):
                raise planted_link(self.path, "its lock") from None
            raise UserError(f"cannot write {self.path} ({reason(e)}): pick another "
                            "--out_dir") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 100).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"another training run ({owner}) is using {self.out_dir}: wait for it "
                            "to finish or pick another --out_dir") from None
        return same_file(self.fd, self.path)

    def __exit__(self, *exc):
        # Removed while still locked, then released: a run that opened the file before it went
        # finds, once it holds the lock, that the path names another file or none, and locks anew.
        try:
            with contextlib.suppress(OSError):  # a file left behind blocks nothing: flock locks
                if same_file(self.fd, self.path):
                    os.remove(self.path)
        finally:
            os.close(self.fd)


def same_file(fd, path):
    """Whether path still names the file open as fd (no file there: False)."""
    try:
        here, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


class TrainingLog:
    """out_dir/log.jsonl: a JSON object per evaluation and logged step (resumed: those up to its
    step). A log that cannot be written is reported once; training goes on without it."""

    def __init__(self, out_dir, resumed_at=None, enabled=True):
        self.path, self.fd = os.path.join(out_dir, "log.jsonl"), None
        if not enabled:
            return
        if os.path.islink(self.path):
            raise planted_link(self.path, "its log")
        tmp = None
        try:  # kept records go to a new file that takes the log's name: a kill leaves one or other
            kept = self._records_before(resumed_at) if resumed_at is not None else []
            self.fd, tmp = tempfile.mkstemp(prefix=LOG_PREFIX, suffix=".tmp", dir=out_dir)
            os.fchmod(self.fd, usual_mode())  # mkstemp's file is private; a log is not
            os.write(self.fd, "".join(line + "\n" for line in kept).encode())
            os.replace(tmp, self.path)  # replaces a name, never writes through what it points to
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            self.stop_logging(e)

    def stop_logging(self, error):
        print(f"warning: cannot write {self.path} ({reason(error)}): training goes on "
              "without it", file=sys.stderr, flush=True)
        self.__exit__()

    def _records_before(self, step):
        """The log's records of earlier steps, and the step record of `step` (written before the
        evaluation the resumed run repeats)."""
        try:
            lines = pathlib.Path(self.path).read_text("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("iter"), int) and (
                    record["iter"] < step or (record["iter"] == step and "val_loss" not in record)):
                kept.append(line)
        return kept

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, **record):
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(record) + "\n").encode())
        except OSError as e:
            self.stop_logging(e)


class StepTimer:
    """Mean wall time per optimizer step since the last restart (evaluations left out)."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.t0, self.steps = time.time(), 0

    def seconds_per_step(self):
        return (time.time() - self.t0) / max(self.steps, 1)


def fmt_duration(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"

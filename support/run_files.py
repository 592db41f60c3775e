"""
A training run's files in out_dir: ckpt.pt (the latest state, to resume), best.pt (--keep_best), log.jsonl and
train.lock. One run per out_dir at a time (RunLock), none of the files ever written through a symbolic link (a link
planted there is refused, never followed), and what a killed run's save left behind cleared.
"""
import fcntl
import glob
import json
import os
import sys
import tempfile

from cli.errors import UserError

RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl")  # what a new run writes, so what it must not silently replace


def planted_link(path, what):
    return UserError(f"{path} is a symbolic link: remove it (a run never writes {what} through a link it did not make)")


def open_no_follow(path, flags, what):
    """os.open that refuses a symbolic link at path (O_NOFOLLOW) with a one-line UserError."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise planted_link(path, what) from None
        raise UserError(f"cannot write {path} ({e.strerror or e}): pick another --out_dir") from None


class RunLock:
    """Hold out_dir/train.lock while a run trains, so that a second run on the same out_dir is refused instead of
    both writing one ckpt.pt. The lock is the kernel's (flock): a killed run releases it with its process. Holding
    it, the run clears the temporary files a killed run's save left behind (no live run can be writing them)."""

    def __init__(self, out_dir):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, "train.lock"), None

    def __enter__(self):
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to {self.out_dir} ({e.strerror}): pick another --out_dir") from None
        self.fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "its lock")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 100).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"another training run ({owner}) is using {self.out_dir}: wait for it to finish or pick "
                            "another --out_dir") from None
        try:  # the pid only names the owner in another run's error: a full disk must not stop this run here
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}".encode())
        except OSError:
            pass
        for pattern in (".ckpt-*.tmp", ".log-*.tmp"):  # checkpoint.save_checkpoint's and TrainingLog's
            for leftover in glob.glob(os.path.join(self.out_dir, pattern)):
                if os.path.isfile(leftover) and not os.path.islink(leftover):
                    os.remove(leftover)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock; the file stays (removing it would race with a new run)


def jsonl(lines):
    return "".join(line + "\n" for line in lines).encode("utf-8")


class TrainingLog:
    """out_dir/log.jsonl: one JSON object per evaluation and per logged step, for plots (experiments/plot_training.py).
    A new run starts it afresh. A resumed one keeps what the run had logged up to the step it resumes at and goes on
    from there, so the log is the one an uninterrupted run writes (no step or evaluation twice, even after a kill).
    It is a record, not the run: a log that cannot be read or written (a full disk, a folder in its place) is
    reported once and logging stops, while training and its checkpoints go on. Only a planted link is refused."""

    def __init__(self, out_dir, resumed_at=None, enabled=True):
        self.path, self.fd = os.path.join(out_dir, "log.jsonl"), None
        if not enabled:
            return
        if os.path.islink(self.path):
            raise planted_link(self.path, "its log")
        tmp = None
        try:  # the kept records go to a new file that then takes the log's name: a kill leaves one log or the other
            kept = self._records_before(resumed_at) if resumed_at is not None else []
            self.fd, tmp = tempfile.mkstemp(prefix=".log-", suffix=".tmp", dir=out_dir)
            os.write(self.fd, jsonl(kept))
            os.replace(tmp, self.path)  # replaces a name, never writes through what the name points to
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            self.stop_logging(e)

    def stop_logging(self, error):
        print(f"warning: cannot write {self.path} ({error.strerror or error}): training goes on without it",
              file=sys.stderr, flush=True)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def _records_before(self, step):
        """The lines of an earlier log up to `step`: every record of the steps before it, and the step record of
        `step` itself (written after that step, before the evaluation the resumed run now repeats)."""
        try:
            with open(self.path, "rb") as f:
                lines = f.read().decode("utf-8", errors="replace").splitlines()
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
        self.write_lines([json.dumps(record)])

    def write_lines(self, lines):
        if self.fd is None or not lines:
            return
        try:
            os.write(self.fd, jsonl(lines))
        except OSError as e:
            self.stop_logging(e)

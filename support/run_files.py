"""
A training run's files in out_dir: ckpt.pt, best.pt (--keep_best), log.jsonl and train.lock. One
run per out_dir at a time (RunLock); no file is ever written through a symbolic link planted there.
"""
import fcntl
import glob
import json
import os
import sys
import tempfile

from cli.errors import UserError

RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl")  # what a new run writes: never silently replaced


def planted_link(path, what):
    return UserError(f"{path} is a symbolic link: remove it (a run never writes {what} through a "
                     "link it did not make)")


class RunLock:
    """Hold out_dir/train.lock while a run trains, so that a second run on the same out_dir is
    refused. The lock is the kernel's (flock): a killed run releases it with its process. Holding
    it, the run clears the temporary files a killed run's save left behind."""

    def __init__(self, out_dir):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, "train.lock"), None

    def __enter__(self):
        try:
            os.makedirs(self.out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to {self.out_dir} ({e.strerror}): pick another "
                            "--out_dir") from None
        try:  # O_NOFOLLOW: a planted link is refused, never followed
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if os.path.islink(self.path):
                raise planted_link(self.path, "its lock") from None
            raise UserError(f"cannot write {self.path} ({e.strerror or e}): pick another "
                            "--out_dir") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 100).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UserError(f"another training run ({owner}) is using {self.out_dir}: wait for it "
                            "to finish or pick another --out_dir") from None
        try:  # the pid only names the owner in another run's error: a full disk must not stop this
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}".encode())
        except OSError:
            pass
        for pattern in (".ckpt-*.tmp", ".log-*.tmp"):  # save_checkpoint's and TrainingLog's
            for leftover in glob.glob(os.path.join(self.out_dir, pattern)):
                if os.path.isfile(leftover) and not os.path.islink(leftover):
                    os.remove(leftover)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock; the file stays (removing it would race a new run)


def jsonl(lines):
    return "".join(line + "\n" for line in lines).encode("utf-8")


class TrainingLog:
    """out_dir/log.jsonl: one JSON object per evaluation and logged step, for plots. A resumed run
    keeps the records up to its step, so the log is the one an uninterrupted run writes. A record,
    not the run: a log that cannot be read or written is reported once and logging stops, while
    training goes on. Only a planted link is refused."""

    def __init__(self, out_dir, resumed_at=None, enabled=True):
        self.path, self.fd = os.path.join(out_dir, "log.jsonl"), None
        if not enabled:
            return
        if os.path.islink(self.path):
            raise planted_link(self.path, "its log")
        tmp = None
        try:  # kept records go to a new file that takes the log's name: a kill leaves one or other
            kept = self._records_before(resumed_at) if resumed_at is not None else []
            self.fd, tmp = tempfile.mkstemp(prefix=".log-", suffix=".tmp", dir=out_dir)
            os.write(self.fd, jsonl(kept))
            os.replace(tmp, self.path)  # replaces a name, never writes through what it points to
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            self.stop_logging(e)

    def stop_logging(self, error):
        print(f"warning: cannot write {self.path} ({error.strerror or error}): training goes on "
              "without it", file=sys.stderr, flush=True)
        self.__exit__()

    def _records_before(self, step):
        """An earlier log's lines up to `step`: every record of earlier steps, and the step record
        of `step` itself (written before the evaluation the resumed run repeats)."""
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

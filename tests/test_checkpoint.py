"""checkpoint.py: saving never loses the previous checkpoint (a full disk, a planted symlink), loading refuses what
train.py did not write, and one training run holds an out_dir at a time."""
import errno
import os

import pytest
import torch

from support import checkpoint
from support.checkpoint import load_checkpoint, save_checkpoint
from support.run_files import RunLock, same_file
from cli.errors import UserError


def ckpt(value):
    return {"model": {"w": torch.full((3,), float(value))}, "model_args": {}, "tokenizer": {"name": "byte"},
            "mask": "ism"}


def test_a_failed_save_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt(1), path)
    before = open(path, "rb").read()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(UserError, match=r"could not write .*ckpt.pt \(No space left on device\); the previous"):
        save_checkpoint(ckpt(2), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_planted_symlink_is_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("ckpt.pt.tmp", ".ckpt.tmp"):  # where a fixed temporary name would have written
        os.symlink(victim, tmp_path / name)
    save_checkpoint(ckpt(1), str(tmp_path / "ckpt.pt"))
    assert victim.read_text() == "precious"
    assert torch.equal(load_checkpoint(str(tmp_path / "ckpt.pt"))["model"]["w"], torch.ones(3))
    assert oct(os.stat(tmp_path / "ckpt.pt").st_mode & 0o777) != oct(0o600)  # readable as files normally are


def test_loading_refuses_foreign_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="is not an ismGPT checkpoint"):
        load_checkpoint(str(path))
    path.write_bytes(b"\x00" * 50)
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        load_checkpoint(str(path))


def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path):
    with RunLock(str(tmp_path)):
        # flock locks belong to open files: a second open, even in this process, is another holder
        with pytest.raises(UserError, match=f"another training run \\(pid {os.getpid()}\\) is using {tmp_path}"):
            RunLock(str(tmp_path)).__enter__()
    with RunLock(str(tmp_path)):  # released with the first one
        pass


def test_a_run_removes_its_lock_file_and_a_removed_one_is_never_trusted(tmp_path):
    path = tmp_path / "train.lock"
    with RunLock(str(tmp_path)):
        assert path.exists()
    assert not path.exists()  # gone with its run: a finished run leaves nothing behind
    # A run that opened the file before its holder removed it would lock a file no path names, and
    # so would a third run creating a new one: the lock must be taken on the file the path names.
    path.write_text("pid 1")
    stale = os.open(path, os.O_RDONLY)
    path.unlink()
    assert not same_file(stale, str(path))
    path.write_text("pid 2")
    assert not same_file(stale, str(path))  # another file at the same path
    os.close(stale)
    with RunLock(str(tmp_path)) as lock:
        assert same_file(lock.fd, str(path))
        with pytest.raises(UserError, match="another training run"):
            RunLock(str(tmp_path)).__enter__()


def test_an_out_dir_that_cannot_be_written_is_refused_at_once(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to .*file/out .*pick another --out_dir"):
        RunLock(str(tmp_path / "file" / "out")).__enter__()

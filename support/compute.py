"""
Where the scripts compute: compute_init sets up threads, ranks, device, precision and attention in one call and
returns them as one Runtime value; plus a description of the machine for reports, and the memory a model needs.
"""
import math
import os
import platform
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli.errors import UserError

THREADS_HELP = ("torch CPU threads (0: auto: on a CPU, one per core, or on a machine busy with other work as many "
                "as the load average leaves free cores, at least 1: torch's threads wait for each other on busy "
                "cores)")
TORCH_THREADS = torch.get_num_threads()  # torch's default, one per core: the most auto ever takes
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: cuda when available)"
CHAT_DTYPE_HELP = "auto | float32 | bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)"
DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(name):
    """'auto' -> cuda if available else cpu; otherwise check that the device exists."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name}: not a device (try cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available here; use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                        f"cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device={name}: only cpu and cuda are supported")
    return name


@dataclass(frozen=True)
class Runtime:
    """Where and how a script computes: device ("cpu", "cuda:0"); dtype, a training step's autocast ("float32":
    none) or a chat model's weights; the attention backend ("sdpa": dense mask, any device; "flex": FlexAttention's
    BlockMask, CUDA); and this process's rank among world_size (torchrun), with its local_rank on its node."""
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdpa"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def device_type(self):
        return torch.device(self.device).type

    @property
    def is_master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return nullcontext()

    def to_device(self, batch):
        """A dict of CPU tensors on this device (pinned and asynchronous on CUDA)."""
        if self.device_type == "cpu":
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}


def compute_init(device="auto", dtype="auto", attention="auto", threads=None, training=False):
    """Set up where a script computes, in one call: torch's CPU threads, the process group when torchrun started
    this process (nccl on CUDA, gloo on CPU), this rank's device, the precision and the attention backend.
    -> Runtime; UserError (one line) for what this machine cannot do. auto: CUDA when available, with TF32
    matmuls, bfloat16 (a training step's autocast, or a chat model's weights: half the memory traffic a decode step
    is bound by) and, to train, FlexAttention; on a CPU float32 and SDPA. threads: as set_threads takes them."""
    device = resolve_device(device)
    set_threads(threads, device)
    rank, local_rank, world_size = init_process_group(device) if training else (0, 0, 1)
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}" if device == "cuda" else device
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if attention == "auto":
        attention = "flex" if training and torch.device(device).type == "cuda" else "sdpa"
    rt = Runtime(device, dtype, attention, rank, local_rank, world_size)
    if training:
        check_training(rt)
    return rt


def check_training(rt):
    if rt.dtype == "bfloat16" and rt.device_type == "cpu":
        raise UserError("--dtype=bfloat16 autocasts on CUDA only: use --dtype=float32 (or auto) on CPU")
    if rt.attention == "flex" and rt.device_type == "cpu":
        raise UserError("--attention=flex cannot train on CPU (FlexAttention has no CPU backward): use "
                        "--attention=sdpa (or auto)")


def init_process_group(device):
    """-> (rank, local_rank, world_size): a process group (nccl on CUDA, gloo on CPU) when torchrun launched this
    process (it sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address), else (0, 0, 1)."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()


def all_ranks_sum(values, device):
    """Element-wise sum of a list of numbers over the ranks (the list itself in a single process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def set_threads(n, device="cpu"):
    """torch's intra-op CPU threads: n; 0 (auto): torch's default, one per core, or on a CPU device as many as
    auto_threads leaves, with one line on stderr saying why when that is fewer; None leaves them as they are (a
    caller that set them itself)."""
    if n is None:
        return
    if n == 0 and torch.device(resolve_device(device)).type == "cpu":
        n, note = auto_threads(TORCH_THREADS)
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
    torch.set_num_threads(n or TORCH_THREADS)


def auto_threads(most):
    """-> (threads, why or None): `most` threads (torch's default), or on a machine that other work keeps busy as
    many as the 1-minute load average leaves free cores, at least 1: beside busy cores torch's threads wait for the
    slowest (the README has the numbers). Below a load of 1 the machine counts as idle: the average still counts
    the command that ran just before."""
    if not hasattr(os, "getloadavg"):
        return most, None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    threads = most if load < 1 else max(1, min(most, math.floor(cpus - load + 0.5)))
    if threads == most:
        return most, None
    return threads, (f"{threads} torch thread(s), not {most}: the load average is {load:.1f} on {cpus} CPUs, and "
                     f"torch's threads wait for each other on busy cores (--threads={most} takes them all anyway)")


@contextmanager
def cpu_threads(n, device="cpu"):
    """Run the block with n torch threads on a CPU device (0 or a GPU device: unchanged), then restore."""
    before = torch.get_num_threads()
    if n and torch.device(device).type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine(device):
    """{device, name, torch, threads, cpus, python, load_average}: what a timing or a score was measured on."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    info = {"device": str(device), "name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)  # > cpus: other work shares the machine, timings noisy
    return info


def parameter_count(config):
    """Parameters of a GPT of this config, from its shape alone (tied embeddings counted once)."""
    h, kv, m = config.n_embd, config.n_kv_head * config.head_dim, config.mlp_hidden
    per_layer = h * (h + 2 * kv) + h * h + h * m * (3 if config.family == "llama" else 2)
    embeddings = config.vocab_size * h * (1 if config.tie_embeddings else 2)
    return config.n_layer * per_layer + embeddings + (config.block_size * h if config.family == "gpt2" else 0)


def memory_plan(config, trainable, rows, block_size, shards=1, compute_bytes=4, checkpointing=False):
    """Bytes one rank needs to train, by kind: weights (float32, 1/shards of them under FSDP), gradients and
    AdamW's two moments (float32, of the `trainable` parameters, sharded alike), and the activations a backward
    pass keeps for `rows` rows of block_size tokens (compute_bytes per value: 2 in bfloat16): per layer and
    token, the block's input, both norms' in/outputs, q/k/v, attention's output and the MLP's three widths (only
    the block's input with activation checkpointing, plus one block recomputed)."""
    h, kv, m = config.n_embd, config.n_kv_head * config.head_dim, config.mlp_hidden
    per_token_layer = (6 * h + 2 * kv + 3 * m) * compute_bytes
    tokens = rows * block_size
    layers = (config.n_layer * h * compute_bytes + per_token_layer) if checkpointing else \
        config.n_layer * per_token_layer
    plan = {"weights": 4 * parameter_count(config) // shards, "gradients": 4 * trainable // shards,
            "optimizer": 8 * trainable // shards, "activations": tokens * layers}
    return {**plan, "total": sum(plan.values())}


def check_fits(config, batch_size, block_size, device):
    """UserError, before anything is allocated, when a model of this shape cannot train in this machine's memory
    (memory_plan, every parameter trained)."""
    plan = memory_plan(config, parameter_count(config), batch_size, block_size)
    have = available_memory(device)
    if have is not None and plan["total"] > have:
        raise UserError(f"this model ({parameter_count(config) / 1e6:,.0f}M parameters) and batch ({batch_size} x "
                        f"{block_size} tokens) need about {plan['total'] / 2**30:,.1f} GiB to train; {device} has "
                        f"{have / 2**30:,.1f} GiB free: make --n_layer, --n_embd, --batch_size or --block_size smaller")


def available_memory(device):
    """Bytes free on device (MemAvailable on a CPU), or None when it cannot be told."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None

"""Where the scripts compute (compute_init -> Runtime), on what, and the memory training needs."""
import math
import os
import platform
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli.errors import UserError

THREADS_HELP = "torch CPU threads (0: one per core, fewer on a busy CPU: what the load leaves free)"
TORCH_THREADS = torch.get_num_threads()  # torch's default, one per core: the most auto ever takes
DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: cuda when available)"
CHAT_DTYPE_HELP = "auto | float32 | bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)"
DTYPES = ("auto", "float32", "bfloat16")


def is_cuda(device):
    return torch.device(device).type == "cuda"


def resolve_device(name):
    """'auto' -> cuda if available else cpu; otherwise check that the device exists."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name}: not a device (try cpu, cuda, cuda:1, auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device={name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available here; use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


@dataclass(frozen=True)
class Runtime:
    """dtype: a training step's autocast or a chat model's weights; attention: sdpa or flex."""
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdpa"
    rank: int = 0
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


def compute_init(device="auto", dtype="auto", attention="auto", threads=None, training=False,
                 fsdp=False):
    """Threads, torchrun's process group, device, precision, attention -> Runtime. auto on CUDA:
    TF32, bfloat16 (half a decode step's memory traffic), Flex to train; on CPU: float32, SDPA."""
    if fsdp and "RANK" not in os.environ:
        raise UserError("--fsdp shards over the ranks torchrun starts: launch with torchrun "
                        "--nproc_per_node=N train.py ... (or drop --fsdp)")
    device = resolve_device(device)
    set_threads(threads, device)
    rank, local_rank, world_size = 0, 0, 1
    if training and "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if is_cuda(device) else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if is_cuda(device):
        device = f"cuda:{local_rank}" if device == "cuda" else device
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dtype == "auto":
        dtype = "bfloat16" if is_cuda(device) and torch.cuda.is_bf16_supported() else "float32"
    if attention == "auto":
        attention = "flex" if training and is_cuda(device) else "sdpa"
    if training and not is_cuda(device) and dtype == "bfloat16":
        raise UserError("--dtype=bfloat16 autocasts on CUDA only: use --dtype=float32 (or auto) "
                        "on CPU")
    if training and not is_cuda(device) and attention == "flex":
        raise UserError("--attention=flex cannot train on CPU (FlexAttention has no CPU backward): "
                        "use --attention=sdpa (or auto)")
    return Runtime(device, dtype, attention, rank, world_size)


def all_ranks_sum(values, device):
    """Element-wise sum of a list of numbers over the ranks (the list itself in one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def set_threads(n, device="cpu"):
    """torch's CPU threads: n; 0: auto_threads on a CPU, else all; None: left as they are."""
    if n is None:
        return
    if n == 0 and torch.device(resolve_device(device)).type == "cpu":
        n, note = auto_threads(TORCH_THREADS)
        if note:
            print(f"note: {note}", file=sys.stderr, flush=True)
    torch.set_num_threads(n or TORCH_THREADS)


def auto_threads(most):
    """-> (threads, why or None): `most`, or as many as the load average leaves free, at least 1:
    beside busy cores torch's threads wait for the slowest. Below 1 (the last command) is idle."""
    if not hasattr(os, "getloadavg"):
        return most, None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    threads = most if load < 1 else max(1, min(most, math.floor(cpus - load + 0.5)))
    if threads == most:
        return most, None
    return threads, (f"{threads} torch thread(s), not {most}: the load average is {load:.1f} on "
                     f"{cpus} CPUs, and torch's threads wait for each other on busy cores "
                     f"(--threads={most} takes them all anyway)")


@contextmanager
def cpu_threads(n, device="cpu"):
    """Run the block with n torch threads on a CPU device (0 or a GPU: unchanged), then restore."""
    before = torch.get_num_threads()
    if n and torch.device(device).type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _proc(path, key):
    """The value of a `key: value` line of a /proc file, or None."""
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def machine(device):
    """{device, name, torch, threads, cpus, python, load_average}: what a result was measured on."""
    name = torch.cuda.get_device_name(torch.device(device)) if is_cuda(device) else \
        (_proc("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU")
    info = {"device": str(device), "name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # above cpus: other work shares the machine
        info["load_average"] = round(os.getloadavg()[0], 2)
    return info


def parameter_count(config):
    """Parameters of a GPT of this config, from its shape alone (tied embeddings counted once)."""
    h, kv, m = config.n_embd, config.n_kv_head * config.head_dim, config.mlp_hidden
    per_layer = h * (h + 2 * kv) + h * h + h * m * (3 if config.family == "llama" else 2)
    embeddings = config.vocab_size * h * (1 if config.tie_embeddings else 2)
    positions = config.block_size * h if config.family == "gpt2" else 0
    return config.n_layer * per_layer + embeddings + positions


def memory_plan(config, trainable, rows, block_size, shards=1, compute_bytes=4,
                checkpointing=False):
    """Bytes one rank needs to train: float32 weights, gradients and AdamW's moments (1/shards each
    under FSDP) and the activations kept for backward: per layer and token the block's input, the
    norms' ins and outs, q/k/v, attention's output, the MLP's three widths (checkpointing: the
    blocks' inputs and one block's worth)."""
    h, kv, m = config.n_embd, config.n_kv_head * config.head_dim, config.mlp_hidden
    per_token_layer = (6 * h + 2 * kv + 3 * m) * compute_bytes
    layers = config.n_layer * h * compute_bytes + per_token_layer if checkpointing \
        else config.n_layer * per_token_layer
    plan = {"weights": 4 * parameter_count(config) // shards, "gradients": 4 * trainable // shards,
            "optimizer": 8 * trainable // shards, "activations": rows * block_size * layers}
    return {**plan, "total": sum(plan.values())}


def check_fits(config, batch_size, block_size, device):
    """UserError, before anything is allocated, when training cannot fit in the free memory."""
    need = memory_plan(config, parameter_count(config), batch_size, block_size)["total"]
    if is_cuda(device):
        have = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        kb = (_proc("/proc/meminfo", "MemAvailable:") or "").split()
        have = int(kb[0]) * 1024 if kb and kb[0].isdigit() else None
    if have is not None and need > have:
        raise UserError(f"this model ({parameter_count(config) / 1e6:,.0f}M parameters) and "
                        f"batch ({batch_size} x {block_size} tokens) need about "
                        f"{need / 2**30:,.1f} GiB to train; {device} has {have / 2**30:,.1f} GiB "
                        "free: make --n_layer, --n_embd, --batch_size or --block_size smaller")

"""
Where a model's weights come from, and checkpoint files.

Checkpoints: out_dir/ckpt.pt, written atomically, read with torch.load(weights_only=True) (plain dicts and tensors
only: a checkpoint file can never run code), and one training run per out_dir at a time. A checkpoint is a dict:
model (state dict), model_args (GPTConfig fields), tokenizer (its description), mask, and from train.py also
optimizer, config, iter_num, best_val_loss, data_state and tokens.

Starts (train.py --init_from): pretrained GPT-2 from Hugging Face (a hub name, or a local folder holding
config.json and the weights), or the weights of an ismGPT checkpoint, into the same GPT class (load_start).
"""
import fcntl
import os
import socket
import tempfile
import urllib.parse

import torch

from data.tokenizer import SPECIAL_TOKENS
from flags import UserError
from model import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BYTE_VOCAB, GPT2_VOCAB = 256, 50257  # a GPT-2's vocabulary: our byte tokenizer's bytes, or GPT-2's BPE
VOCAB_MULTIPLE = 64  # pretrained embeddings are padded to a multiple of this: faster matmuls on a GPU

REQUIRED_KEYS = {"model", "model_args", "tokenizer", "mask"}


def save_checkpoint(checkpoint, path):
    """Write atomically: a unique temporary file in the same folder, synced, then renamed over path. A crash or a
    full disk mid-write leaves the previous checkpoint intact and no temporary file behind (UserError)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)  # never follows a planted symlink
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a checkpoint is as readable as any file
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous checkpoint, if any, is "
                        "unchanged") from None
    except BaseException:
        _remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict, or a UserError saying why not."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: run python train.py first (or pass --out_dir=DIR)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or malicious files
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); retrain or restore it") from None
    missing = REQUIRED_KEYS - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise UserError(f"{path} is not an ismGPT checkpoint (missing {', '.join(sorted(missing))})")
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu", path="the checkpoint"):
    """Rebuild the GPT a checkpoint describes and load its weights (eval mode); UserError if they disagree."""
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # not a file train.py wrote
        raise UserError(f"{path}: weights do not match model_args ({type(e).__name__}); retrain or restore "
                        "it") from None
    return model.to(device).eval()


class RunLock:
    """Hold out_dir/train.lock while a run trains, so that a second run on the same out_dir is refused instead of
    both writing one ckpt.pt. The lock is the kernel's (flock): a killed run releases it with its process."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "train.lock")
        self.file = None

    def __enter__(self):
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot write to {os.path.dirname(self.path)} ({e.strerror}): pick another "
                            "--out_dir") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"another training run ({owner}) is using {os.path.dirname(self.path)}: wait for it to "
                            "finish or pick another --out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock; the file stays (removing it would race with a new run)



# ------------------------------------------------------------------------------------------------------- starts

def load_start(source, block_size, dropout, device="cpu"):
    """The model a run starts from: -> (GPT, tokenizer name it was trained with, a line saying what it is).
    source: an ismGPT checkpoint (a ckpt.pt file, or a folder holding one): its weights only, not its optimizer or
    step, so a model trained under one mask can be fine-tuned under another; a GPT-2 name (gpt2, gpt2-medium,
    gpt2-large, gpt2-xl; from the Hugging Face cache, downloaded once); or a folder holding a Hugging Face GPT-2
    (config.json + weights). The context is cut to block_size (it may not exceed the source's), dropout is set."""
    path = os.path.join(source, "ckpt.pt") if os.path.isdir(source) else source
    if os.path.isfile(path):
        checkpoint = load_checkpoint(path, device)
        model = model_from_checkpoint(checkpoint, device, path)
        name = checkpoint["tokenizer"].get("name")
        what = f"the weights of {path} (mask {checkpoint['mask']}, iter {checkpoint.get('iter_num', '?')})"
    elif source in GPT2_NAMES or os.path.isfile(os.path.join(source, "config.json")):
        model, name = from_hugging_face(_hf_gpt2(source), device)
        what = f"GPT-2 {source} from Hugging Face"
    else:
        raise UserError(f"--init_from={source}: not scratch, resume, a GPT-2 name ({', '.join(GPT2_NAMES)}), a "
                        "folder holding a Hugging Face GPT-2 (config.json), nor an ismGPT ckpt.pt")
    return _fit(model, block_size, dropout), name, what


def _fit(model, block_size, dropout):
    """The same weights with the position table cut to block_size and the given dropout."""
    config = model.config
    if block_size > config.block_size:
        raise UserError(f"--block_size={block_size} is longer than the {config.block_size} positions the start was "
                        f"trained with: pass --block_size={config.block_size} or less")
    state = model.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    fitted = GPT(GPTConfig(**{**vars(config), "block_size": block_size, "dropout": dropout}))
    fitted.load_state_dict(state)
    return fitted.to(state["lm_head.weight"].device)


def _hf_gpt2(source):
    """transformers' GPT2LMHeadModel for a hub name or a local folder; UserError, one line, when it cannot be had."""
    try:
        import transformers
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError(f"--init_from={source} needs the transformers package: pip install transformers") from None
    transformers.logging.set_verbosity_error()
    try:
        return GPT2LMHeadModel.from_pretrained(source, local_files_only=True)
    except OSError:
        if os.path.isdir(source):
            raise UserError(f"{source} holds no readable GPT-2 weights (config.json and model.safetensors or "
                            "pytorch_model.bin, as save_pretrained writes them)") from None
    fetch = (f"where there is network: python -c \"from transformers import GPT2LMHeadModel; "
             f"GPT2LMHeadModel.from_pretrained('{source}').save_pretrained('{source}-local')\", copy that folder "
             f"here and pass --init_from={source}-local")
    if not _hub_reachable():
        raise UserError(f"GPT-2 {source} is not in the Hugging Face cache and huggingface.co cannot be reached: "
                        f"download it {fetch}")
    try:
        return GPT2LMHeadModel.from_pretrained(source)
    except OSError as e:
        raise UserError(f"could not download GPT-2 {source} ({str(e).splitlines()[0]}): download it {fetch}") from None


def _hub_reachable(timeout=5):
    """Can the Hugging Face hub (HF_ENDPOINT) be reached? Without this, transformers retries for half a minute
    when offline."""
    from huggingface_hub import constants
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hugging_face(hf_model, device="cpu"):
    """Our GPT with every weight of a transformers GPT2LMHeadModel, copied by name (GPT-2's Conv1D layers store
    their weights transposed), as nanoGPT's from_pretrained does. The embedding (tied with lm_head) grows by the
    chat's special tokens, initialised to the mean embedding, and is padded to a multiple of VOCAB_MULTIPLE rows
    that no token uses. -> (GPT, tokenizer name)."""
    hf = hf_model.config
    unlike_ours = {"activation_function": hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
                   "layer_norm_epsilon": hf.layer_norm_epsilon != 1e-5,
                   "n_inner": hf.n_inner not in (None, 4 * hf.n_embd),
                   "scale_attn_weights": not hf.scale_attn_weights,
                   "scale_attn_by_inverse_layer_idx": hf.scale_attn_by_inverse_layer_idx,
                   "reorder_and_upcast_attn": hf.reorder_and_upcast_attn}
    if any(unlike_ours.values()):
        raise UserError(f"this GPT-2's {', '.join(k for k, v in unlike_ours.items() if v)} differs from GPT-2's: "
                        "it would not compute the same function here")
    tokenizers = {BYTE_VOCAB: "byte", GPT2_VOCAB: "gpt2"}
    if hf.vocab_size not in tokenizers:
        raise UserError(f"a GPT-2 with {hf.vocab_size} tokens: only GPT-2's BPE ({GPT2_VOCAB}) and the byte "
                        f"vocabulary ({BYTE_VOCAB}) have a tokenizer here")
    with_specials = hf.vocab_size + len(SPECIAL_TOKENS)
    vocab_size = -(-with_specials // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    model = GPT(GPTConfig(block_size=hf.n_positions, vocab_size=vocab_size, n_layer=hf.n_layer, n_head=hf.n_head,
                          n_embd=hf.n_embd))
    theirs = hf_model.state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                wte = theirs["transformer.wte.weight"]
                param[:hf.vocab_size] = wte
                param[hf.vocab_size:] = wte.mean(0)
            elif name.endswith(conv1d):
                param.copy_(theirs[name].t())
            else:
                param.copy_(theirs[name])
    return model.to(device), tokenizers[hf.vocab_size]

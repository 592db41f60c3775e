"""
Prepare a dataset: conversations -> token ids, roles and offsets as .npy files, plus meta.json.

    python prepare.py                        # the synthetic dataset -> data/synthetic/
    python prepare.py --input=chats.jsonl    # your own JSONL -> data/chats/
    python prepare.py --input=chitchat       # the BYU Chit-Chat corpus -> data/chitchat/

Writes into out_dir, per split (train, val): {split}_ids.npy (uint16; int32 for 65,536 tokens and
more), {split}_roles.npy (uint8), {split}_offsets.npy (int64: conversation i is [offsets[i],
offsets[i+1])), {split}.jsonl (the conversations as kept) and, last, meta.json. Bad input stops it
before anything is written; the files move in only once all are written; other files in out_dir
are left alone.
"""
import fcntl
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from cli import flags
from cli.errors import DataError, UserError, reason
from cli.flags import setting
from data import chitchat, synthetic
from data.batching import expansion_factor
from data.chat import fit_to_block, plural, read_jsonl, render
from data.store import ARRAYS, SPLITS, Split, array_name, array_path
from data.tokenizer import TOKENIZER_HELP, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# <|bos|> <|user|> x <|end|> <|assistant|> y <|end|>: a smaller block holds no conversation
MIN_BLOCK_SIZE = 7
# beyond any real dataset (2**20 tokens: longer than any loaded model's context), refused early
MAX_SIZES = {"n_train": 10**7, "n_val": 10**7, "max_turns": 1000, "block_size": 2**20}


@dataclass
class PrepareConfig:
    """The flags of python prepare.py (prepare() has the same defaults, a test checks)."""
    input: str = setting("", "JSONL of {\"messages\": [...]} or ShareGPT {\"conversations\": "
                             "[...]} lines | chitchat (or a file of its format) | empty: synthetic")
    out_dir: str = setting("", "empty: data/synthetic, data/chitchat or data/<input file stem> "
                               "(synthetic and chitchat get -TOKENIZER unless byte)")
    tokenizer: str = setting("byte", TOKENIZER_HELP)
    block_size: int = setting(512, "longer conversations are cut at a turn boundary, or dropped "
                                   f"({MIN_BLOCK_SIZE} to {MAX_SIZES['block_size']:,})",
                              max=MAX_SIZES["block_size"])
    seed: int = setting(1337, "synthetic generator and the train/val shuffle of JSONL")
    skip_bad: bool = setting(False, "skip bad JSONL lines and list them, instead of stopping")
    val_fraction: float = setting(0.05, "share of your conversations held out (at least one); "
                                        "Chit-Chat: by a hash of the id")
    n_train: int = setting(20000, f"synthetic training conversations (1 to "
                                  f"{MAX_SIZES['n_train']:,})", max=MAX_SIZES["n_train"])
    n_val: int = setting(500, f"synthetic held-out conversations (1 to {MAX_SIZES['n_val']:,})",
                         max=MAX_SIZES["n_val"])
    max_turns: int = setting(synthetic.MAX_TURNS, "turns of a synthetic conversation at most (1 "
                                                  f"to {MAX_SIZES['max_turns']:,})",
                             max=MAX_SIZES["max_turns"])


OUTPUT_FILES = ([array_name(split, field) for split in SPLITS for field in ARRAYS] +
                [f"{split}.jsonl" for split in SPLITS] + ["meta.json"])


def tokenizer_dir(dataset, tokenizer):
    """data/DATASET in byte tokens, data/DATASET-NAME in another tokenizer's."""
    name = os.path.splitext(os.path.basename(os.path.normpath(tokenizer)))[0]
    return os.path.join("data", dataset if tokenizer == "byte" else f"{dataset}-{name}")


def synthetic_dir(tokenizer="byte"):
    """The synthetic dataset's folder, relative to the repository."""
    return tokenizer_dir("synthetic", tokenizer)


def default_out_dir(input=None, tokenizer="byte"):
    if not input or input == chitchat.NAME:
        return os.path.join(ROOT, tokenizer_dir(input or "synthetic", tokenizer))
    return os.path.join(ROOT, "data", os.path.splitext(os.path.basename(input))[0])


def prepare_if_default(data_dir, tokenizer, block_size, log=print):
    """Prepare the synthetic dataset into data_dir if that is its missing folder for this
    tokenizer. Any other missing folder is left to load_meta to name: never a silent stand-in."""
    if os.path.exists(data_dir) or os.path.normpath(data_dir) != synthetic_dir(tokenizer):
        return
    log(f"no data at {data_dir}: preparing the synthetic dataset there (tokenizer {tokenizer}, "
        f"block_size {block_size})")
    prepare(data_dir, tokenizer=tokenizer, block_size=block_size)


def check_settings(config):
    """DataError naming the flag for a value prepare cannot use (config.out_dir filled in)."""
    if config.seed < 0:
        raise DataError(f"--seed={config.seed}: must be 0 or more (numpy seeds are unsigned)")
    if not 0 <= config.val_fraction < 1:
        raise DataError(f"--val_fraction={config.val_fraction}: must be at least 0 and below 1")
    for name in ("n_train", "n_val", "max_turns"):
        if getattr(config, name) < 1:
            raise DataError(f"--{name}={getattr(config, name)}: must be at least 1")
    if config.block_size < MIN_BLOCK_SIZE:
        raise DataError(f"--block_size={config.block_size}: must be at least {MIN_BLOCK_SIZE}, the "
                        "length of the shortest conversation")
    for name, largest in MAX_SIZES.items():  # the flags check these too, this is for prepare()
        if getattr(config, name) > largest:
            raise DataError(f"--{name}={getattr(config, name)}: must be at most {largest}")
    out_dir = os.path.realpath(config.out_dir)
    for name in OUTPUT_FILES if config.input else ():  # however the input is spelled
        if os.path.realpath(config.input) == os.path.join(out_dir, name):
            raise DataError(f"--input={config.input} is the {name} that --out_dir={config.out_dir} "
                            "would get: copy it elsewhere first, or choose another --out_dir")


def fit_all(conversations, tok, block_size):
    """-> ([(conversation as fitted, whether it was cut)], how many not even a first turn fit)."""
    fitted = [(fit_to_block(c, tok, block_size), c) for c in conversations]
    kept = [(f, f is not c) for f, c in fitted if f is not None]
    return kept, len(conversations) - len(kept)


def own_splits(input, tok, block_size, skip_bad, val_fraction, seed):
    """-> (train, val, dropped, bad lines, Chit-Chat counts or None) from a JSONL or Chit-Chat
    file, fitted before splitting: any conversation that fits can land in either split."""
    chit_chat = chitchat.read(input)
    if chit_chat is None:
        (conversations, bad), counts = read_jsonl(input, skip_bad=skip_bad), None
    else:
        (conversations, counts), bad = chit_chat, []
    if len(conversations) < 2:
        raise DataError(f"{input}: need at least 2 conversations (one for train, one for val), "
                        f"found {len(conversations)}")
    kept, dropped = fit_all(conversations, tok, block_size)
    if len(kept) < 2:
        raise DataError(f"{input}: {len(kept)} of {len(conversations)} conversations "
                        f"{'fits' if len(kept) == 1 else 'fit'} --block_size={block_size}, and "
                        "train and val need one each: raise --block_size")
    if counts is not None:
        return *chitchat.split_by_id(kept, val_fraction), dropped, bad, counts
    order = np.random.default_rng(seed).permutation(len(kept))  # at least one each way
    n_val = min(max(round(len(order) * val_fraction), 1), len(order) - 1)
    return [kept[i] for i in order[n_val:]], [kept[i] for i in order[:n_val]], dropped, bad, None


def synthetic_splits(tok, block_size, n_train, n_val, seed, max_turns):
    """-> (train, val, dropped, [], None) as own_splits, each split fitted on its own."""
    splits, dropped = [], 0
    for name, conversations in zip(SPLITS, synthetic.splits(n_train, n_val, seed, max_turns)):
        kept, split_dropped = fit_all(conversations, tok, block_size)
        if not kept:
            raise DataError(f"no synthetic {name} conversation fits --block_size={block_size}")
        splits.append(kept)
        dropped += split_dropped
    return *splits, dropped, [], None


def render_split(conversations, tok):
    """Conversations -> their Split, in memory."""
    ids, roles, offsets = [], [], [0]
    for conversation in conversations:
        conv_ids, conv_roles = render(conversation["messages"], tok)
        ids += conv_ids
        roles += conv_roles
        offsets.append(len(ids))
    return Split(ids=np.array(ids, dtype=np.uint16 if tok.vocab_size < 2**16 else np.int32),
                 roles=np.array(roles, dtype=np.uint8), offsets=np.array(offsets, dtype=np.int64))


def split_stats(split, conversations, cut):
    lengths = np.diff(split.offsets)
    return {"conversations": len(conversations), "tokens": int(split.offsets[-1]),
            "answers": sum(len(c["messages"]) // 2 for c in conversations),  # a system rounds away
            "mean_tokens": round(float(lengths.mean()), 1), "max_tokens": int(lengths.max()),
            "cut": cut, "prefix_expansion": round(expansion_factor(split), 3)}


def prepare(out_dir=None, input=None, tokenizer="byte", block_size=512, seed=1337, skip_bad=False,
            val_fraction=0.05, n_train=20000, n_val=500, max_turns=synthetic.MAX_TURNS):
    """Build a prepared dataset in out_dir (default: default_out_dir) -> its meta dict."""
    out_dir = out_dir or default_out_dir(input, tokenizer)
    check_settings(PrepareConfig(input=input or "", out_dir=out_dir, tokenizer=tokenizer,
                                 block_size=block_size, seed=seed, skip_bad=skip_bad,
                                 val_fraction=val_fraction, n_train=n_train, n_val=n_val,
                                 max_turns=max_turns))
    tok = get_tokenizer(tokenizer)
    train, val, dropped, bad, counts = (
        own_splits(input, tok, block_size, skip_bad, val_fraction, seed) if input
        else synthetic_splits(tok, block_size, n_train, n_val, seed, max_turns))
    meta = {"source": input or f"synthetic (1 to {max_turns} turns)", "seed": seed,
            "tokenizer": tok.describe(), "vocab_size": tok.vocab_size, "block_size": block_size,
            "skipped_lines": len(bad), "bad_lines": bad[:100], "dropped": dropped,
            **({"chitchat": counts} if counts else {}), "splits": {}}
    splits = {}
    for name, kept in zip(SPLITS, (train, val)):
        conversations = [conversation for conversation, _ in kept]
        splits[name] = render_split(conversations, tok), conversations
        meta["splits"][name] = split_stats(splits[name][0], conversations,
                                           cut=sum(was_cut for _, was_cut in kept))
    write_prepared(out_dir, splits, meta)
    return meta


def write_prepared(out_dir, splits, meta):
    """Write splits ({name: (Split, conversations)}) and meta into out_dir, all or nothing: into a
    work folder inside out_dir (moving is a rename), moved in once all are written."""
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)  # flock the folder: no lock file
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one prepare per folder; a killed one's goes with it
            for path in glob.glob(os.path.join(out_dir, ".prepare-*")):  # killed ones' work folders
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
            with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir,
                                             ignore_cleanup_errors=True) as work:
                write_all(work, splits, meta, out_dir)
                move_in(work, out_dir)
        finally:
            os.close(lock)
            if created and not os.listdir(out_dir):
                os.rmdir(out_dir)
    except OSError as e:
        raise DataError(f"cannot create a folder in {out_dir}: {reason(e)}") from None


def write_all(work, splits, meta, out_dir):
    try:
        for name, (split, conversations) in splits.items():
            for field in ARRAYS:
                np.save(array_path(work, name, field), getattr(split, field))
            with open(os.path.join(work, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations)
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except OSError as e:
        raise DataError(f"cannot write the prepared files in {out_dir} ({reason(e)}): it is left "
                        "as it was") from None


def move_in(work, out_dir):
    """meta.json goes first and comes back last: a folder caught midway has none, and load_meta
    calls it incomplete rather than pair an old meta.json with new arrays."""
    meta_path = os.path.join(out_dir, "meta.json")
    try:
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for name in sorted(os.listdir(work), key=lambda name: name == "meta.json"):
            os.replace(os.path.join(work, name), os.path.join(out_dir, name))
    except OSError as e:
        raise DataError(f"cannot move the prepared files into {out_dir} ({reason(e)}): it is "
                        "incomplete now; run python prepare.py again") from None


def summary(meta, out_dir, seconds):
    lines = [f"prepared {meta['source']} -> {out_dir} in {seconds:.1f}s (tokenizer "
             f"{meta['tokenizer']['name']}, vocab {meta['vocab_size']}, block_size "
             f"{meta['block_size']})",
             "| split | conversations | tokens | mean | max | answers | cut | prefix expansion |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in meta["splits"].items():
        cells = [name] + [s[k] for k in ("conversations", "tokens", "mean_tokens", "max_tokens",
                                         "answers", "cut", "prefix_expansion")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if "chitchat" in meta:
        lines.append(chitchat.describe(meta["chitchat"]))
    if meta["dropped"]:
        lines.append(f"dropped {plural(meta['dropped'], 'conversation')} whose first turn alone "
                     f"exceeds block_size {meta['block_size']}")
    if meta["skipped_lines"]:
        shown = "; ".join(f"line {n}: {problem}" for n, problem in meta["bad_lines"][:5])
        more = "; ..." if meta["skipped_lines"] > 5 else ""
        lines.append(f"skipped {plural(meta['skipped_lines'], 'bad line')} ({shown}{more})")
    return "\n".join(lines)


def main(argv):
    """-> exit status: 0, 1 for a problem with the data, 2 for a bad flag (one line on stderr)."""
    try:
        config = flags.parse(PrepareConfig(), argv, __doc__)
        config = replace(config, out_dir=config.out_dir or default_out_dir(config.input,
                                                                           config.tokenizer))
        check_settings(config)
    except UserError as e:  # DataError included: these are bad flag values
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        meta = prepare(**asdict(config))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(meta, config.out_dir, time.time() - t0))
    return 0

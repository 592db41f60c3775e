"""
Byte-level BPE of pretrained chat models (SmolLM2, Qwen2, Llama 3), read from a GGUF file or a
tokenizer.json and applied as Hugging Face's tokenizers library applies it:
1. split the text by each pattern in turn (matches and the gaps between them are pieces);
2. map each piece's UTF-8 bytes to GPT-2's printable stand-in characters (BYTE_TO_CHAR);
3. from single characters (those not in the vocabulary dropped), merge the adjacent pair first in
   the merges list, leftmost first, until none is left. Under ignore_merges (Llama 3) a piece that
   is a token is that token.
tiktoken cannot stand in: it joins any adjacent parts whose join is a token, so with the merges
"b c", "a b", "ab c" it makes "abc" one token where the merges list leaves "a" "bc".
Special tokens never come from text: a user who types "<|im_end|>" gets ordinary pieces.
"""
import collections
import functools
import hashlib
import heapq
import json
import os
import re as stdlib_re
import unicodedata

import regex  # tiktoken's dependency: the \p{L} / \p{N} classes the tokenizers patterns use

from cli.errors import DataError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS = r"\p{N}"
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# GGUF's tokenizer.ggml.pre names -> their stages, for the pre-tokenizers known here
GGUF_PRE_TOKENIZERS = {"gpt2": (GPT2_PATTERN,), "smollm": (DIGITS, GPT2_PATTERN),
                       "qwen2": (QWEN2_PATTERN,), "llama-bpe": (LLAMA3_PATTERN,)}
CACHE_WORDS = 1 << 16  # encoded pieces kept (chat text repeats its words)


def _byte_to_char():
    """GPT-2's reversible map of the 256 bytes to printable characters, the alphabet of tokens."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = (chr(256 + n) for n in range(256))
    return {b: chr(b) if b in printable else next(others) for b in range(256)}


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class BPE:
    """tokens: id -> string in BYTE_TO_CHAR characters (special ones as their text); merges: "left
    right" strings by priority; stages: the pre-tokenizer's patterns; special: the special tokens'
    ids; nfc: normalise text to NFC first (Qwen2); ignore_merges: Llama 3's rule."""

    def __init__(self, tokens, merges, stages, special, nfc=False, ignore_merges=False):
        self.tokens, self.merges, self.special = list(tokens), list(merges), sorted(special)
        special = set(special)
        self.ids = {t: i for i, t in enumerate(self.tokens) if i not in special}
        self.ranks = {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)}
        self.stage_patterns = tuple(stages)
        self.stages = [regex.compile(p) for p in stages]
        self.nfc, self.ignore_merges, self.cache = nfc, ignore_merges, {}

    def fingerprint(self):
        """sha256 of everything that decides an encoding: the same print, the same ids."""
        settings = [self.tokens, self.merges, self.stage_patterns, self.special, self.nfc]
        if self.ignore_merges:  # only when set: older fingerprints stay valid
            settings.append("ignore_merges")
        return hashlib.sha256(json.dumps(settings).encode("utf-8")).hexdigest()

    def encode(self, text, limit=None):
        """text -> ids; with a limit, None as soon as text is known to need more than limit ids
        (a piece is merged only while it may still fit: the work stays bounded by the limit)."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        pieces = [text]
        for stage in self.stages:  # step 1
            pieces = [part for piece in pieces for part in _split_isolated(stage, piece)]
        ids, limit = [], float("inf") if limit is None else limit
        for piece in pieces:
            cached = self.cache.get(piece)
            if cached is None:
                word = "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
                chars = [c for c in word if c in self.ids]
                if self.ignore_merges and word in self.ids:
                    cached = [self.ids[word]]
                elif self.needs_more(chars, limit - len(ids)):
                    return None
                else:
                    cached = self._merge(chars)
                if len(self.cache) >= CACHE_WORDS:
                    self.cache.clear()
                self.cache[piece] = cached
            ids += cached
            if len(ids) > limit:
                return None
        return ids

    def needs_more(self, chars, left):
        """Whether these characters surely need more than `left` tokens, known without merging: no
        token is longer than the vocabulary's longest made of their characters, and only as many
        tokens as there are of the rarest character can hold it."""
        if len(chars) <= left:
            return False
        counts = collections.Counter(chars)
        rarest, seen = min(counts.items(), key=lambda item: item[1])
        longest = self._longest_of(frozenset(counts))
        longest_without = self._longest_of(frozenset(counts) - {rarest})
        fewest = len(chars) / longest if len(chars) <= seen * longest else \
            seen + (len(chars) - seen * longest) / longest_without
        return fewest > left

    @functools.lru_cache(maxsize=256)
    def _longest_of(self, characters):
        return max((len(token) for token in self.ids if characters.issuperset(token)), default=1)

    def _merge(self, symbols):
        """Step 3 with a heap of candidate pairs (rank, position): O(n log n) for n characters."""
        n = len(symbols)
        nxt, prev = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(self.ranks[pair], i, *pair) for i, pair in enumerate(zip(symbols, symbols[1:]))
                if pair in self.ranks]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] != left or j >= n or symbols[j] != right:
                continue  # stale: a side has been merged into something else since
            symbols[i], symbols[j] = left + right, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prev[nxt[i]] = i
            for a, b in ((prev[i], i), (i, nxt[i])):
                if a >= 0 and b < n and (symbols[a], symbols[b]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[symbols[a], symbols[b]], a, symbols[a],
                                          symbols[b]))
        return [self.ids[s] for s in symbols if s is not None]

    def token_bytes(self, token_id):
        token = self.tokens[token_id]
        if token_id in self.special or any(c not in CHAR_TO_BYTE for c in token):
            return token.encode("utf-8")
        return bytes(CHAR_TO_BYTE[c] for c in token)

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _split_isolated(pattern, text):
    """Matches of pattern and the text between them, each a piece (tokenizers' "Isolated")."""
    out, end = [], 0
    for match in pattern.finditer(text):
        out += [text[end:match.start()], match.group()]
        end = match.end()
    return [piece for piece in out + [text[end:]] if piece]


def default_system_message(template):
    """The system message a ChatML chat template inserts when there is none (SmolLM2's), read off
    its literal text, or None."""
    pattern = r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>"
    template = template if isinstance(template, str) else ""
    for found in stdlib_re.finditer(pattern, template, stdlib_re.S):
        text = found.group(1)
        if "{" not in text and "'" not in text:  # literal, not a branch that builds it
            return text.replace("\\n", "\n")
    return None


def from_gguf(path):
    """-> (BPE, default system message or None) from a GGUF file's tokenizer.* fields."""
    fields = open_gguf(path).fields
    model, pre, tokens, merges, types, template = (
        fields[f"tokenizer.{key}"].contents() if f"tokenizer.{key}" in fields else None
        for key in ("ggml.model", "ggml.pre", "ggml.tokens", "ggml.merges", "ggml.token_type",
                    "chat_template"))
    if model != "gpt2" or pre not in GGUF_PRE_TOKENIZERS:
        raise DataError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r}: supported are "
                        "byte-level BPE (gpt2) with pre-tokenizer "
                        f"{', '.join(GGUF_PRE_TOKENIZERS)}")
    if tokens is None or merges is None or types is None:
        raise DataError(f"{path}: the tokenizer's tokens, merges or token types are missing")
    if len(types) != len(tokens):
        raise DataError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    check_merges(merges, tokens, f"{path}: tokenizer.ggml.merges")
    control = {i for i, kind in enumerate(types) if kind in (3, 4)}  # control, user-defined
    bpe = BPE(tokens, merges, GGUF_PRE_TOKENIZERS[pre], control, ignore_merges=pre == "llama-bpe")
    return bpe, default_system_message(template)


def check_merges(merges, vocabulary, where):
    """DataError unless every merge is two tokens of the vocabulary that join into a third, as the
    tokenizers library requires: a merge that never applies would split text into more tokens
    than the model was trained on."""
    known = set(vocabulary)
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge  # or [left, right]
        if not isinstance(pair, list) or len(pair) != 2 or \
                not all(isinstance(t, str) and t and " " not in t for t in pair) or \
                not {pair[0], pair[1], pair[0] + pair[1]} <= known:
            raise DataError(f"{where}: merge {rank} ({str(merge)[:40]!r}) is not two tokens of the "
                            "vocabulary that join into a third")


@functools.lru_cache(maxsize=2)
def open_gguf(path):
    """gguf.GGUFReader on path, or a one-line DataError; cached, as a start reads it twice."""
    try:
        import gguf
    except ImportError:
        raise DataError(f"{path} is a GGUF file: reading it needs the gguf package (pip install "
                        "gguf)") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise DataError(f"{path} is not a readable GGUF file ({type(e).__name__}: "
                        f"{str(e)[:80]})") from None


def from_tokenizer_json(folder):
    """-> (BPE, default system message or None) from a Hugging Face folder: tokenizer.json, if it
    computes as BPE above, and tokenizer_config.json's chat template."""
    path = os.path.join(folder, "tokenizer.json")
    spec = _read_json(path)
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or \
            model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or not isinstance(model.get("vocab"), dict) or \
            not isinstance(model.get("merges"), list):
        raise DataError(f"{path}: only byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2 style) are "
                        "supported")
    stages = _pre_tokenizer_stages(spec.get("pre_tokenizer"), path)
    normalizer = spec.get("normalizer")
    nfc = isinstance(normalizer, dict) and normalizer.get("type") == "NFC"
    if normalizer is not None and not nfc:
        raise DataError(f"{path}: normalizer {json.dumps(normalizer)[:80]} is not supported (only "
                        "none or NFC)")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) and type(t.get("id")) is int
                                              and isinstance(t.get("content"), str) for t in added):
        raise DataError(f"{path}: added_tokens: each needs a content (a string) and an id")
    vocab = {**model["vocab"], **{token["content"]: token["id"] for token in added}}
    names = {i: token for token, i in vocab.items()}
    tokens = [names.get(i, f"<unused {i}>") for i in range(max(names) + 1)]
    check_merges(model["merges"], model["vocab"], f"{path}: model.merges")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    config = os.path.join(folder, "tokenizer_config.json")
    template = _read_json(config).get("chat_template") if os.path.exists(config) else None
    special = {token["id"] for token in added if token.get("special")}
    encoder = BPE(tokens, merges, stages, special, nfc=nfc,
                  ignore_merges=bool(model.get("ignore_merges")))
    return encoder, default_system_message(template)


def _pre_tokenizer_stages(spec, path):
    """tokenizer.json's pre_tokenizer -> the patterns of step 1."""
    if spec is None:
        return []
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        subs = spec.get("pretokenizers", [])
        return [p for sub in subs for p in _pre_tokenizer_stages(sub, path)]
    if kind == "ByteLevel" and not spec.get("add_prefix_space"):
        return [GPT2_PATTERN] if spec.get("use_regex", True) else []
    if kind == "Digits" and spec.get("individual_digits"):
        return [DIGITS]
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert") and \
            isinstance(spec.get("pattern"), dict) and "Regex" in spec["pattern"]:
        return [spec["pattern"]["Regex"]]
    raise DataError(f"{path}: pre-tokenizer {json.dumps(spec)[:80]} is not supported (ByteLevel "
                    "without a prefix space, Digits, Split)")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise DataError(f"cannot read {path} ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a JSON object")
    return value

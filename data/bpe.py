"""
Byte-level BPE as pretrained Llama-family chat models ship it (SmolLM2, Qwen2): GPT-2's scheme, applied the way
Hugging Face's tokenizers library applies it, read from a GGUF file or a Hugging Face tokenizer.json.

Encoding a text:
1. pre-tokenize: split the text into pieces by a sequence of regular expressions (each stage splits every piece
   of the stage before; matches and the gaps between them both become pieces). SmolLM2: every digit alone, then
   GPT-2's pattern (words with their leading space, runs of punctuation, runs of whitespace);
2. map each piece's UTF-8 bytes to GPT-2's printable stand-in characters (byte_to_char);
3. merge: start from single characters (one not in the vocabulary is dropped, as Hugging Face's BPE does without
   an unknown token) and repeatedly merge the adjacent pair that comes first in the merges list, the leftmost one
   among equals, until no pair of the list is left; each resulting symbol is a token. Under ignore_merges (Llama 3's
   tokenizer) a piece that is a token of the vocabulary as a whole is that token, merges or not.
Special tokens (<|im_start|>, <|im_end|>, ...) are never produced from text: a special token's string typed by a
user splits into ordinary pieces at step 1, so nothing a user writes can close a turn or forge a role header.
"""
import collections
import functools
import hashlib
import heapq
import json
import os
import re as stdlib_re

import regex  # tiktoken's dependency: \p{L} / \p{N} classes, as the tokenizers library's patterns use

from cli.errors import DataError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS = r"\p{N}"
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# GGUF files name their pre-tokenizer (tokenizer.ggml.pre); these are the ones whose stages are known here.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_TOKENIZERS = {"gpt2": (GPT2_PATTERN,), "smollm": (DIGITS, GPT2_PATTERN), "qwen2": (QWEN2_PATTERN,),
                       "llama-bpe": (LLAMA3_PATTERN,)}
CACHE_WORDS = 1 << 16  # encoded pieces kept (chat text repeats its words)


def byte_to_char():
    """GPT-2's reversible map of the 256 byte values to printable characters (tokens are stored in these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_TO_CHAR = byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class BPE:
    """tokens: the vocabulary, token id -> string in BYTE_TO_CHAR characters (special tokens as their text);
    merges: "left right" strings in priority order; stages: the pre-tokenizer's patterns; special: ids of the
    special tokens; nfc: normalise text to Unicode NFC first (Qwen2's tokenizer does); ignore_merges: a piece that
    is a whole token skips the merges (Llama 3's does)."""

    def __init__(self, tokens, merges, stages, special, nfc=False, ignore_merges=False):
        self.tokens = list(tokens)
        self.special = sorted(special)
        self.ids = {t: i for i, t in enumerate(self.tokens) if i not in set(self.special)}
        self.ranks = {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)}
        self.stages = [regex.compile(p) for p in stages]
        self.stage_patterns, self.merges, self.nfc, self.ignore_merges = tuple(stages), list(merges), nfc, ignore_merges
        self.cache = {}

    def fingerprint(self):
        """sha256 of everything that decides an encoding: the same fingerprint, the same ids for every text."""
        settings = [self.tokens, self.merges, self.stage_patterns, self.special, self.nfc]
        if self.ignore_merges:  # only when set: a tokenizer fingerprinted before the setting existed keeps its print
            settings.append("ignore_merges")
        blob = json.dumps(settings)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def pieces(self, text):
        """Step 1: the pre-tokenizer's pieces of text, in order."""
        pieces = [text]
        for stage in self.stages:
            pieces = [part for piece in pieces for part in _split_isolated(stage, piece)]
        return pieces

    def encode(self, text, limit=None):
        """text -> ids; with a limit, None as soon as text is known to need more than limit ids. A piece is merged
        only while it may still fit (needs_more): the work stays bounded by the limit, not by the text (a message too
        long for the context is refused without encoding all of it)."""
        if self.nfc:
            import unicodedata
            text = unicodedata.normalize("NFC", text)
        ids, limit = [], float("inf") if limit is None else limit
        for piece in self.pieces(text):
            cached = self.cache.get(piece)
            if cached is None:
                word = "".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))
                chars = [c for c in word if c in self.ids]
                if self.ignore_merges and word in self.ids:  # a piece that is a token is that token (Llama 3)
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
        """Whether a piece of these characters needs more than `left` tokens, known without merging it: no token
        it can become is longer than the vocabulary's longest made of its characters only, and only as many tokens
        as there are of its rarest character can hold that one (a newline before a run of spaces: "\n" and 80
        spaces is a token, no run of spaces alone is longer than 64)."""
        if len(chars) <= left:
            return False
        counts = collections.Counter(chars)
        rarest, seen = min(counts.items(), key=lambda item: item[1])
        longest, longest_without = self._longest_of(frozenset(counts)), self._longest_of(frozenset(counts) - {rarest})
        fewest = len(chars) / longest if len(chars) <= seen * longest else \
            seen + (len(chars) - seen * longest) / longest_without
        return fewest > left

    @functools.lru_cache(maxsize=256)
    def _longest_of(self, characters):
        return max((len(token) for token in self.ids if characters.issuperset(token)), default=1)

    def _merge(self, symbols):
        """Step 3 with a heap of candidate pairs (rank, position) on a piece's characters (those in the vocabulary:
        the others are dropped first): O(n log n) for n characters."""
        n = len(symbols)
        nxt, prev = list(range(1, n + 1)), list(range(-1, n - 1))
        heap = [(self.ranks[pair], i, *pair) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in self.ranks]
        heapq.heapify(heap)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] != left or j >= n or symbols[j] != right:
                continue  # stale: one side has been merged into something else since this pair was pushed
            symbols[i], symbols[j] = left + right, None
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prev[nxt[i]] = i
            for a, b in ((prev[i], i), (i, nxt[i])):
                if a >= 0 and b < n and (symbols[a], symbols[b]) in self.ranks:
                    heapq.heappush(heap, (self.ranks[symbols[a], symbols[b]], a, symbols[a], symbols[b]))
        return [self.ids[s] for s in symbols if s is not None]

    def token_bytes(self, token_id):
        token = self.tokens[token_id]
        if token_id in self.special or any(c not in CHAR_TO_BYTE for c in token):
            return token.encode("utf-8")
        return bytes(CHAR_TO_BYTE[c] for c in token)

    def decode(self, ids):
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _split_isolated(pattern, text):
    """Matches of pattern and the text between them, each a piece (the tokenizers library's "Isolated" split)."""
    out, end = [], 0
    for match in pattern.finditer(text):
        if match.start() > end:
            out.append(text[end:match.start()])
        if match.end() > match.start():
            out.append(match.group())
        end = match.end()
    if end < len(text):
        out.append(text[end:])
    return out


def default_system_message(template):
    """The system message a ChatML chat template inserts when a conversation has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None. Read off the template's literal text; a template that builds
    it from variables gives None."""
    for found in stdlib_re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template or "", stdlib_re.S):
        text = found.group(1)
        if "{" not in text and "'" not in text:  # literal text, not a branch that builds it (Qwen2.5's tools)
            return text.replace("\\n", "\n")
    return None


# ---------------------------------------------------------------------------------------------------- sources

def from_gguf(path):
    """-> (BPE, default system message or None) from a GGUF file's tokenizer.ggml.* fields."""
    reader = open_gguf(path)
    fields = reader.fields

    def field(key):
        return fields[key].contents() if key in fields else None

    model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
    if model != "gpt2" or pre not in GGUF_PRE_TOKENIZERS:
        raise DataError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r}: supported are byte-level BPE "
                        f"(gpt2) with pre-tokenizer {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens, merges, types = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "merges", "token_type"))
    if tokens is None or merges is None or types is None:
        raise DataError(f"{path}: the tokenizer's tokens, merges or token types are missing")
    if len(types) != len(tokens):
        raise DataError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    check_merges(merges, tokens, f"{path}: tokenizer.ggml.merges")
    control = {i for i, kind in enumerate(types) if kind in (3, 4)}  # llama.cpp: 3 control, 4 user-defined
    bpe = BPE(tokens, merges, GGUF_PRE_TOKENIZERS[pre], control, ignore_merges=pre == "llama-bpe")  # as llama.cpp
    return bpe, default_system_message(field("tokenizer.chat_template"))


def check_merges(merges, vocabulary, where):
    """DataError unless every merge is "left right", two tokens of the vocabulary whose concatenation is one too:
    the rule Hugging Face's tokenizers library holds a tokenizer.json to. A merge that breaks it would never apply,
    and the text would be split into more tokens than the model was trained on."""
    known = set(vocabulary)
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge  # tokenizer.json also spells one [left, right]
        if not isinstance(pair, list) or len(pair) != 2 or \
                not all(isinstance(t, str) and t and " " not in t for t in pair) or \
                not {pair[0], pair[1], pair[0] + pair[1]} <= known:
            raise DataError(f"{where}: merge {rank} ({str(merge)[:40]!r}) is not two tokens of the vocabulary "
                            "that join into a third")


@functools.lru_cache(maxsize=2)
def open_gguf(path):
    """gguf.GGUFReader on path, or DataError (one line) when the package is missing or the file is not GGUF. Kept
    for the next call: reading the metadata of a 49,152-token vocabulary takes the reader seconds, and a start reads
    the file twice (weights, tokenizer)."""
    try:
        import gguf
    except ImportError:
        raise DataError(f"{path} is a GGUF file: reading it needs the gguf package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise DataError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:80]})") from None


def from_tokenizer_json(folder):
    """-> (BPE, default system message or None) from a Hugging Face folder's tokenizer.json (and the chat template
    in tokenizer_config.json). Only what computes as BPE above is accepted; anything else is one line."""
    path = os.path.join(folder, "tokenizer.json")
    spec = _read_json(path)
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("byte_fallback") or \
            model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or \
            not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise DataError(f"{path}: only byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2 style) are supported")
    stages = _pre_tokenizer_stages(spec.get("pre_tokenizer"), path)
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise DataError(f"{path}: normalizer {normalizer.get('type')!r} is not supported (only none or NFC)")
    vocab = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    tokens = [t if t is not None else f"<unused {i}>" for i, t in enumerate(tokens)]
    check_merges(model["merges"], model["vocab"], f"{path}: model.merges")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    config = os.path.join(folder, "tokenizer_config.json")
    template = _read_json(config).get("chat_template") if os.path.exists(config) else None
    template = template if isinstance(template, str) else None
    encoder = BPE(tokens, merges, stages, special, nfc=normalizer is not None,
                  ignore_merges=bool(model.get("ignore_merges")))
    return encoder, default_system_message(template)


def _pre_tokenizer_stages(spec, path):
    """tokenizer.json's pre_tokenizer -> the patterns of BPE's step 1."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [p for sub in spec.get("pretokenizers", []) for p in _pre_tokenizer_stages(sub, path)]
    if kind == "ByteLevel" and not spec.get("add_prefix_space"):
        return [GPT2_PATTERN] if spec.get("use_regex", True) else []
    if kind == "Digits" and spec.get("individual_digits"):
        return [DIGITS]
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert") and \
            "Regex" in spec.get("pattern", {}):
        return [spec["pattern"]["Regex"]]
    raise DataError(f"{path}: pre-tokenizer {json.dumps(spec)[:80]} is not supported (ByteLevel without a prefix "
                    "space, Digits, Split)")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: brackets nested too deep to parse
        raise DataError(f"cannot read {path} ({type(e).__name__})") from None

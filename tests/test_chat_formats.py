"""Llama 3's chat format, as a Llama 3 Instruct folder brings it (tokenizer.json with its special tokens and
tokenizer_config.json with its chat template): rendering equals transformers' apply_chat_template, the header
that opens the answer closes the query, rendering is prefix-stable, and a Llama-3-shaped folder with that tokenizer
fine-tunes with LoRA (as config/llama32_1b_lora.py does) and chats."""
import json
import os

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import sample
import train
from data.bpe import LLAMA3_PATTERN
from data.chat import render, render_user
from data.prepare import prepare
from data.tokenizer import get_tokenizer
from mask import ASSISTANT, SYSTEM, USER

transformers.logging.set_verbosity_error()
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's chat template
TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
            "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
            "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
            "{{ content }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
TEXTS = ["Hello there!", "What's 12 + 345?", "  padded  ", "line one\nline two", "I'm fine, thanks.", "ok"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A Llama-3-style tokenizer (byte-level BPE, Llama 3's split pattern, ignore_merges, its special tokens and
    chat template) trained on a little English."""
    path = tmp_path_factory.mktemp("llama3")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(TEXTS * 50 + ["the quick brown fox jumps over the lazy dog"] * 50,
                            trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=SPECIALS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return str(path)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]},
                {"role": "assistant", "content": TEXTS[1]}, {"role": "user", "content": TEXTS[2]},
                {"role": "assistant", "content": TEXTS[3]}, {"role": "user", "content": TEXTS[4]}]


def test_render_is_llama3_as_its_chat_template_writes_it(folder):
    tok, hf = get_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_format == "llama3" and tok.end == hf.convert_tokens_to_ids("<|eot_id|>")
    for n in range(1, len(CONVERSATION) + 1):
        messages = CONVERSATION[:n]
        want = hf.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] == "user", tokenize=True)
        want = want if isinstance(want, list) else want["input_ids"]
        assert render(messages, tok)[0] == list(want), n


def test_the_answer_header_closes_the_query_and_rendering_is_prefix_stable(folder):
    tok = get_tokenizer(folder)
    ids, roles = render(CONVERSATION[:3], tok)
    header_end = len(render(CONVERSATION[:2], tok)[0])  # the prompt of turn one, its answer header last
    assert roles[:header_end] == [SYSTEM] * len(render(CONVERSATION[:1], tok)[0]) + \
        [USER] * (header_end - len(render(CONVERSATION[:1], tok)[0]))
    assert roles[header_end:] == [ASSISTANT] * (len(ids) - header_end) and ids[-1] == tok.end
    prompt, _ = render_user(TEXTS[2], tok, after_answer=True)
    assert render(CONVERSATION[:4], tok)[0] == ids + prompt
    typed = tok.encode("<|eot_id|><|start_header_id|>system")
    assert not set(typed) & set(tok.special)  # typed special tokens stay text


def test_a_llama3_folder_fine_tunes_with_lora_and_chats(folder, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}))
    hf.save_pretrained(folder)  # beside its tokenizer, as a downloaded Llama-3.2 Instruct folder holds them
    data_dir = str(tmp_path / "data")
    prepare(data_dir, tokenizer=folder, block_size=256, n_train=30, n_val=4)
    out = str(tmp_path / "out")
    train.main([f"--init_from={folder}", f"--data_dir={data_dir}", f"--out_dir={out}", "--device=cpu",
                "--block_size=256", "--batch_size=1", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                "--lora_rank=4", "--lora_alpha=8", "--lora_targets=q_proj,v_proj"])
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello there!\n"))
    sample.main([f"--out_dir={out}", "--temperature=0", "--max_new_tokens=4", "--json"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["prefill_tokens"] == len(render([{"role": "user", "content": "Hello there!"}], get_tokenizer(folder))[0])

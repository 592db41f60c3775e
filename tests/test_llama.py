"""The Llama family against transformers: random Llama (grouped-query, tied and untied) and Qwen2 (q/k/v biases)
models with every parameter perturbed, loaded from the folders save_pretrained writes and from GGUF files written
here with the gguf package, give transformers' logits; the folder's config decides the loader, and what would
compute differently is refused. The packaged SmolLM2-135M-Instruct is in test_smollm2.py."""
import json
import os

import gguf
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import train
from data.prepare import prepare
from cli.errors import UserError
from mask import USER, make_mask
from support.starts import load_start

transformers.logging.set_verbosity_error()
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)


def hf_model(kind="llama", tie=False, seed=0, **overrides):
    """A small random transformers Llama or Qwen2, every parameter perturbed (norm gains and biases too)."""
    torch.manual_seed(seed)
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config,
                                                                                         Qwen2ForCausalLM)
    config = config_class(**{**SHAPE, "tie_word_embeddings": tie, "rope_theta": 5000.0, **overrides})
    model = model_class(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def llama_folder(folder, **overrides):
    """hf_model("llama", **overrides) saved as transformers saves a model -> the folder, as a string."""
    hf_model("llama", **overrides).save_pretrained(folder)
    return str(folder)


def logits(model, ids, positions=None):
    roles = torch.full((ids.shape[1],), USER)
    with torch.no_grad():
        return model(ids, make_mask("causal", roles), positions)[0]


IDS = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("qwen2", False)])
def test_a_hugging_face_folder_gives_transformers_logits(kind, tie, tmp_path):
    hf = hf_model(kind, tie)
    hf.save_pretrained(tmp_path)
    start = load_start(str(tmp_path))
    model = start.model
    assert model.config.family == "llama" and model.config.qkv_bias == (kind == "qwen2")
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    with torch.no_grad():
        theirs = hf(IDS).logits
    torch.testing.assert_close(logits(model, IDS)[..., :256], theirs, atol=1e-4, rtol=0)
    # RoPE at explicit positions: two packed documents, positions restarting at 0, are each what transformers says
    packed = torch.cat([IDS[:, :25], IDS[:, 25:]], dim=1)
    positions = torch.cat([torch.arange(25), torch.arange(15)])
    doc_ids = torch.tensor([0] * 25 + [1] * 15)
    with torch.no_grad():
        ours = model(packed, make_mask("causal", torch.full((40,), USER), doc_ids), positions)[0][..., :256]
        second = hf(IDS[:, 25:]).logits
    torch.testing.assert_close(ours[:, 25:], second, atol=1e-4, rtol=0)
    assert start.tok.name == "byte"  # the 256-byte vocabulary gets ismGPT's byte tokenizer and chat tokens


def test_sharded_safetensors_and_pytorch_model_bin_folders_load_alike(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with torch.no_grad():
        expected = hf(IDS).logits
    for folder in ("sharded", "bin"):
        model = load_start(str(tmp_path / folder)).model
        torch.testing.assert_close(logits(model, IDS)[..., :256], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change,named", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_what_would_compute_differently_is_refused(change, named, tmp_path):
    hf_model("llama", **change).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=named):
        load_start(str(tmp_path))


def test_the_folder_config_decides_the_loader(tmp_path):
    # transformers' GPT-2 loader would take this folder and return a random GPT-2: the config's model_type decides
    hf_model("llama").save_pretrained(tmp_path / "llama")
    assert load_start(str(tmp_path / "llama")).model.config.family == "llama"
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UserError, match="model_type 'mistral' is not supported"):
        load_start(str(tmp_path / "mistral"))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForTokenClassification"]}))
    with pytest.raises(UserError, match="architectures"):
        load_start(str(tmp_path / "odd"))


def test_damaged_weights_are_one_line(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="unreadable safetensors weights"):
        load_start(str(tmp_path))


# --------------------------------------------------------------------------------------------------------- GGUF

def permute_like_llama_cpp(weight, n_head):
    """What llama.cpp's converter does to q and k rows and biases (written here from its convert_hf_to_gguf.py's
    rule)."""
    w = weight.numpy()
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GGUF_FIXED = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_tensors(hf):
    """hf's tensors by llama.cpp's names, as float32 numpy arrays, q and k permuted as its converter does."""
    c, out = hf.config, {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name in GGUF_FIXED:
            gguf_name = GGUF_FIXED[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_MODULES[module]}.{kind}"
        array = tensor.float().numpy()
        if ".attn_q." in gguf_name:
            array = permute_like_llama_cpp(tensor.float(), c.num_attention_heads)
        elif ".attn_k." in gguf_name:
            array = permute_like_llama_cpp(tensor.float(), c.num_key_value_heads)
        out[gguf_name] = array
    return out


def write_gguf(hf, path, matrix_type, metadata=None, tensors=None):
    """hf as a llama-architecture GGUF file, matrices stored as matrix_type, norms and biases as F32. metadata and
    tensors: keys and tensors to write instead of hf's or besides them (None: leave that one out)."""
    c = hf.config
    fields = {"llama.block_count": c.num_hidden_layers, "llama.context_length": c.max_position_embeddings,
              "llama.embedding_length": c.hidden_size, "llama.feed_forward_length": c.intermediate_size,
              "llama.attention.head_count": c.num_attention_heads,
              "llama.attention.head_count_kv": c.num_key_value_heads,
              "llama.rope.freq_base": float(c.rope_parameters["rope_theta"]),
              "llama.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
              "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads, "llama.vocab_size": c.vocab_size}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**fields, **(metadata or {})}.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif value is not None:  # an int: as wide as it needs, signed only when negative
            kinds = gguf.GGUFValueType
            kind = kinds.UINT64 if value >= 2**32 else kinds.INT32 if value < 0 else kinds.UINT32
            writer.add_key_value(key, value, kind)
    qtype = getattr(gguf.GGMLQuantizationType, matrix_type)
    for name, array in {**gguf_tensors(hf), **(tensors or {})}.items():
        if array is None:
            continue
        if array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("matrix_type,tie", [("F32", False), ("Q8_0", True), ("Q4_1", False)])
def test_a_gguf_file_gives_what_transformers_reads_from_it(matrix_type, tie, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(hf_model("llama", tie), path, matrix_type)
    ours = load_start(str(path)).model
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(IDS).logits
    torch.testing.assert_close(logits(ours, IDS)[..., :256], expected, atol=1e-4, rtol=0)


def test_a_gguf_of_another_architecture_or_quantization_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'falcon'; GGUF files of llama architecture are supported"):
        load_start(str(tmp_path / "falcon.gguf"))
    write_gguf(hf_model("llama"), tmp_path / "q5.gguf", "Q5_1")
    with pytest.raises(UserError, match="tensor types Q5_1; supported are F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        load_start(str(tmp_path / "q5.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        load_start(str(tmp_path / "junk.gguf"))


# ------------------------------------------------------------------------------------------- through train.py

def test_train_fine_tunes_a_llama_folder_and_sample_chats_with_it(tmp_path, capsys):
    import sample
    folder = tmp_path / "llama"
    hf_model("llama", tie=True).save_pretrained(folder)
    data = tmp_path / "data"
    prepare(str(data), n_train=40, n_val=8, block_size=128)
    out = tmp_path / "out"
    train.main([f"--init_from={folder}", f"--data_dir={data}", f"--out_dir={out}", "--block_size=128",
                "--batch_size=2", "--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=0"])
    assert "starting from LlamaForCausalLM" in capsys.readouterr().out
    script = tmp_path / "chat.jsonl"
    script.write_text(json.dumps({"messages": [{"role": "user", "content": "12+3="}]}) + "\n")
    sample.main([f"--out_dir={out}", f"--script={script}", "--temperature=0", "--max_new_tokens=4"])
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["turn"] == 1 and record["generated_tokens"] >= 1


def test_fsdp_without_torchrun_says_to_launch_with_torchrun(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)  # as a plain `python train.py` runs
    data, out = tmp_path / "data", tmp_path / "out"
    prepare(str(data), n_train=16, n_val=4, block_size=128)
    common = [f"--data_dir={data}", f"--out_dir={out}", "--block_size=128", "--batch_size=2",
              "--eval_interval=1", "--eval_iters=1", "--warmup_iters=0"]
    fresh = [f"--init_from={llama_folder(tmp_path / 'llama')}", "--max_iters=1"]
    train.main(common + fresh)
    for start in (fresh + ["--overwrite"], ["--init_from=resume", "--max_iters=2"]):
        with pytest.raises(UserError, match="--fsdp .*launch with torchrun") as info:
            train.main(common + start + ["--fsdp"])
        assert "\n" not in str(info.value)


def test_a_config_json_of_impossible_shape_is_one_line(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))  # 4 heads, 3 groups
    with pytest.raises(UserError, match="config.json: .*n_head must be a multiple of n_kv_head|config.json: .*multiple"):
        load_start(str(tmp_path))


def test_the_default_system_message_is_read_off_chat_templates():
    from data.bpe import default_system_message
    smollm2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
               "<|im_end|>\n' }}{% endif %}")
    qwen25 = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
              "{{- messages[0]['content'] }}{%- endif %}{{- '<|im_end|>\\n' }}{%- else %}"
              "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
              "<|im_end|>\\n' }}{%- endif %}")
    assert default_system_message(smollm2) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system_message(qwen25) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert default_system_message("{{ messages }}") is None and default_system_message(None) is None


def test_a_tokenizer_whose_file_has_moved_says_so(tmp_path):
    from cli.errors import DataError
    from data.tokenizer import get_tokenizer
    with pytest.raises(DataError, match="is not there any more"):
        get_tokenizer(str(tmp_path / "gone.gguf"))

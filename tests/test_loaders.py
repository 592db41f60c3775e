"""The Llama family as the papers' models are published, against transformers: Llama 3.2- and 3.1-style folders
(Llama 3's RoPE scaling, tied and untied embeddings, grouped-query attention) and Qwen2.5-style ones, saved in bfloat16
shards with an index, give transformers' float32 logits at lengths where the scaling matters, and the cached chat
equals the no-cache one on them; other RoPE scalings are refused. Every model is built here (random, perturbed
weights): nothing is downloaded."""
import json
import os
import re
import shutil
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import ChatSession
from model import GPT, GPTConfig
from support.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from support.errors import UserError
from support.hf import to_transformers
from support.starts import load_start
from test_llama import hf_model, logits

LONG = 320  # tokens: positions far past the small original context below, where Llama 3's scaling changes angles
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
FAMILIES = {  # the published shapes in small: Llama 3.2 ties its embeddings, 3.1 does not, Qwen2.5 has q/k/v biases
    "llama3.2": dict(kind="llama", tie=True, rope_scaling=LLAMA3, rope_theta=5000.0),
    "llama3.1": dict(kind="llama", tie=False, rope_scaling=LLAMA3, rope_theta=5000.0),
    "qwen2.5": dict(kind="qwen2", tie=True, rope_theta=1e6),
}
IDS = torch.randint(0, 256, (1, LONG), generator=torch.Generator().manual_seed(3))


def published(name, seed=0, **overrides):
    """A small random model of one family, in bfloat16 as they are published, with room for LONG tokens."""
    settings = {**FAMILIES[name], **overrides}
    return hf_model(settings.pop("kind"), settings.pop("tie"), seed, max_position_embeddings=512,
                    **settings).to(torch.bfloat16)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    published(request.param).save_pretrained(folder, max_shard_size="100KB")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    return folder


def transformers_logits(folder, ids=IDS):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits


def test_the_papers_families_in_bf16_shards_give_transformers_float32_logits(family_folder):
    model = load_start(str(family_folder)).model
    assert next(model.parameters()).dtype == torch.float32
    expected = transformers_logits(family_folder)
    torch.testing.assert_close(logits(model, IDS)[..., :256], expected, atol=1e-4, rtol=0)
    with torch.no_grad():  # and the peer bench.py measures against computes this model too
        torch.testing.assert_close(to_transformers(model)(IDS).logits[..., :256], expected, atol=1e-4, rtol=0)


def test_the_scaling_changes_the_logits_there(tmp_path):
    # the comparison above could not pass with the scaling ignored: plain RoPE gives other logits at these lengths
    scaled = published("llama3.2")
    plain = published("llama3.2", rope_scaling=None)
    plain.load_state_dict(scaled.state_dict())
    plain.save_pretrained(tmp_path)
    with torch.no_grad():
        difference = logits(load_start(str(tmp_path)).model, IDS)[..., :256] - scaled.float()(IDS).logits
    assert difference.abs().amax() > 0.1


@pytest.mark.parametrize("kind", ["ism", "causal"])
def test_cached_chats_equal_the_no_cache_path_on_them(family_folder, kind):
    start = load_start(str(family_folder))
    users = ["the " * 25 + "end", "7 2 9 4 1 " * 10 + "max", "and now " * 12 + "sort"]  # about 110 tokens a turn

    def chat(use_cache):
        session = ChatSession(start.model, start.tok, kind, use_cache=use_cache)
        return [session.turn(u, max_new_tokens=8, temperature=0) for u in users]

    cached, reference = chat(True), chat(False)
    assert [r["reply"] for r in cached] == [r["reply"] for r in reference]
    assert cached[-1]["context_tokens"] > 300 and not any(r["dropped_turns"] for r in cached)


def test_both_spellings_of_the_rope_settings_load_the_same_model(tmp_path):
    # transformers 5 writes rope_parameters; published config.json files have rope_theta and rope_scaling on top
    published("llama3.1").save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    old = {**config, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    new_model, old_model = (load_start(str(tmp_path / name)).model for name in ("new", "old"))
    assert old_model.config == new_model.config and new_model.config.rope_scaling["factor"] == 8.0
    torch.testing.assert_close(logits(old_model, IDS)[..., :256], transformers_logits(tmp_path / "old"),
                               atol=1e-4, rtol=0)
    # "default" is plain RoPE in either spelling
    (tmp_path / "old" / "config.json").write_text(json.dumps({**old, "rope_scaling": {"rope_type": "default"}}))
    assert load_start(str(tmp_path / "old")).model.config.rope_scaling is None


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                     {"rope_type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                     {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                      "original_max_position_embeddings": 64}])
def test_other_rope_scalings_are_refused(scaling, tmp_path):
    published("llama3.1").save_pretrained(tmp_path)
    edit_config(tmp_path, rope_parameters=None, rope_scaling=scaling, rope_theta=5000.0)
    refused(tmp_path, f"rope_scaling '{scaling.get('rope_type', scaling.get('type'))}' is not supported")


def test_the_scaling_is_kept_by_a_checkpoint_and_older_checkpoints_still_load(family_folder, tmp_path):
    model = load_start(str(family_folder)).model
    rebuilt = GPT(GPTConfig(**asdict(model.config)))
    assert rebuilt.config == model.config
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint({"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": {"name": "byte"},
                     "mask": "causal"}, path)  # read back with weights_only=True: plain dicts and floats
    loaded = model_from_checkpoint(load_checkpoint(path))
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), atol=0, rtol=0)
    older = {k: v for k, v in asdict(model.config).items() if k != "rope_scaling"}  # written before the field
    assert GPT(GPTConfig(**older)).config.rope_scaling is None


# ---------------------------------------------------------------------------------------------- refusals

def refused(source, match, load=load_start):
    """load(source) raises a UserError of one line that names the file (its folder) and matches match."""
    with pytest.raises(UserError) as info:
        load(str(source))
    message = str(info.value)
    assert "\n" not in message and re.search(match, message), message
    assert str(source) in message or os.path.dirname(str(source)) in message, message
    return message


def edit_config(folder, **changes):
    """Rewrite folder/config.json with these keys changed (None: removed)."""
    path = os.path.join(folder, "config.json")
    config = {**json.loads(open(path).read()), **changes}
    with open(path, "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)

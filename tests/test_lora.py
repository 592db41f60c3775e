"""LoRA against peft: an adapter trained here, written in PEFT's format, gives our logits on
transformers' model of the same base under peft; an adapter made by peft gives peft's logits here;
both merged give the same; and what is not plain LoRA is refused."""
import json
import os

import pytest
import torch
import transformers
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model

from mask import USER, make_mask
from model import LORA_TARGETS
from cli.errors import UserError
from support.lora import merged, peft_base, read_adapter, with_lora, write_adapter
from support.starts import load_start
from test_llama import llama_folder

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small random Llama folder, every parameter perturbed."""
    return llama_folder(tmp_path_factory.mktemp("base") / "llama", hidden_size=32,
                        intermediate_size=48, max_position_embeddings=64)


def ours_logits(model, ids):
    """Our logits of the base's 256 tokens (the byte-vocabulary start's embedding gains ismGPT's
    chat tokens)."""
    with torch.no_grad():
        return model(ids, make_mask("causal", torch.full((ids.shape[1],), USER)))[0][..., :256]


def theirs(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


IDS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))


def test_fresh_adapters_compute_the_base_and_only_they_train(base):
    model = load_start(base).model
    adapted = with_lora(model, 4, 8, ["q_proj", "v_proj"])
    torch.testing.assert_close(ours_logits(adapted, IDS), ours_logits(model, IDS), atol=0, rtol=0)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], list(LORA_TARGETS)])
def test_our_adapter_under_peft_gives_our_logits(base, tmp_path, targets):
    torch.manual_seed(2)
    adapted = with_lora(load_start(base).model, 4, 8, targets).eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.2)  # trained-looking adapters: B no longer zero
    write_adapter(adapted.state_dict(), adapted.config, str(tmp_path / "adapter"), base)
    peft_model = PeftModel.from_pretrained(theirs(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, ours_logits(adapted, IDS), atol=1e-4,
                                   rtol=0)
        # the adapter matters
        assert (peft_model(IDS).logits - theirs(base)(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(ours_logits(merged(adapted), IDS), ours_logits(adapted, IDS),
                               atol=1e-4, rtol=0)


def test_an_adapter_names_a_base_peft_can_open_by_itself(base, tmp_path, monkeypatch):
    torch.manual_seed(3)
    adapted = with_lora(load_start(base).model, 4, 8, ["q_proj", "v_proj"]).eval()
    with torch.no_grad():
        for p in adapted.adapter_params().values():
            p.normal_(0, 0.2)
    monkeypatch.chdir(tmp_path)  # a start given as a relative path is named by its absolute one
    relative = os.path.relpath(base, tmp_path)
    write_adapter(adapted.state_dict(), adapted.config, "adapter", peft_base(relative))
    opened = AutoPeftModelForCausalLM.from_pretrained("adapter").eval()  # no base given: its name
    with torch.no_grad():
        torch.testing.assert_close(opened(IDS).logits, ours_logits(adapted, IDS), atol=1e-4,
                                   rtol=0)
    # the packaged GGUF's model
    assert peft_base("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_peft_adapter_here_gives_peft_logits(base, tmp_path):
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                        lora_dropout=0.1, init_lora_weights=False,
                        task_type="CAUSAL_LM")  # random B: not the identity
    peft_model = get_peft_model(theirs(base), config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    adapted = read_adapter(load_start(base).model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = peft_model(IDS).logits
    torch.testing.assert_close(ours_logits(adapted, IDS), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_logits(merged(adapted), IDS), want, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.merge_and_unload()(IDS).logits, want, atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("change, named", [
    ({"use_dora": True}, "use_dora"),
    ({"use_rslora": True}, "use_rslora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"target_modules": ".*q_proj"}, "target_modules"),
    ({"target_modules": ["c_attn"]}, "target_modules"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_what_is_not_plain_lora_is_refused(base, tmp_path, change, named):
    adapted = with_lora(load_start(base).model, 4, 8, ["q_proj", "v_proj"])
    folder = tmp_path / "adapter"
    write_adapter(adapted.state_dict(), adapted.config, str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=named):
        read_adapter(load_start(base).model, str(folder))


def test_an_adapter_of_another_shape_is_one_line(base, tmp_path):
    adapted = with_lora(load_start(base).model, 4, 8, ["q_proj", "v_proj"])
    write_adapter(adapted.state_dict(), adapted.config, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(UserError, match="its tensors are not those of LoRA on q_proj"):
        read_adapter(load_start(base).model, str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(UserError, match="do not fit this model"):
        read_adapter(load_start(base).model, str(tmp_path / "adapter"))

"""Starting from pretrained weights: our GPT computes what transformers' GPT-2 computes with the same weights, and
train.py --init_from takes a Hugging Face GPT-2 folder or an ismGPT checkpoint, offline, to a model sample.py chats
with. Every Hugging Face model here is built in the test (random, perturbed weights): nothing is downloaded."""
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import train
from support.checkpoint import load_checkpoint
from support.hf import from_gpt2 as from_hugging_face
from support.weights import VOCAB_MULTIPLE
from data.prepare import prepare
from data.tokenizer import SPECIAL_TOKENS
from cli import flags
from cli.errors import UserError
from mask import ASSISTANT, MASKS, USER, make_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers.logging.set_verbosity_error()


def hf_gpt2(vocab_size=256, n_positions=128, seed=0):
    """A small transformers GPT-2 with every parameter perturbed away from its initialisation (LayerNorm gains and
    all biases included), in eval mode."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_logits_equal_transformers_gpt2():
    hf = hf_gpt2()
    ours, _ = from_hugging_face(hf)
    ours.eval()
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    roles = torch.full((50,), ASSISTANT)  # a causal mask: every token an answer token
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids, make_mask("causal", roles))[0]
    torch.testing.assert_close(got[..., :256], want, atol=1e-4, rtol=0)
    # the new rows: the chat's special tokens start as the mean embedding, then padding up to a multiple of 64
    assert ours.config.vocab_size % VOCAB_MULTIPLE == 0 and ours.config.vocab_size >= 256 + len(SPECIAL_TOKENS)
    wte = ours.transformer.wte.weight
    torch.testing.assert_close(wte[256:], hf.transformer.wte.weight.mean(0).expand_as(wte[256:]))


@pytest.mark.parametrize("kind", ["ism", "prefix"])
@pytest.mark.parametrize("layout", ["answer only", "query last"])
def test_other_masks_differ_from_gpt2_only_where_the_mask_differs(kind, layout):
    hf = hf_gpt2()
    ours, _ = from_hugging_face(hf)
    ours.eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    roles = torch.tensor([ASSISTANT] * 40 if layout == "answer only" else [ASSISTANT] * 30 + [USER] * 10)
    differs = (make_mask(kind, roles) != make_mask("causal", roles)).any(-1)
    first = int(differs.float().argmax()) if differs.any() else 40  # the first row that sees a later token
    with torch.no_grad():
        want = hf(ids).logits[0]
        got = ours(ids, make_mask(kind, roles))[0][0, :, :256]
    torch.testing.assert_close(got[:first], want[:first], atol=1e-4, rtol=0)
    assert first == (40 if layout == "answer only" else 30 if kind == "ism" else 0)
    if first < 40:  # from there on every row has seen a token GPT-2's row could not
        assert (got[first:] - want[first:]).abs().amax(-1).min() > 1e-3


def test_unlike_gpt2_configs_are_refused():
    hf = hf_gpt2()
    hf.config.activation_function = "relu"
    with pytest.raises(UserError, match="activation_function differs"):
        from_hugging_face(hf)
    for field, value in (("n_inner", 100), ("scale_attn_weights", False)):
        hf = hf_gpt2()
        setattr(hf.config, field, value)
        with pytest.raises(UserError, match=f"{field} differs"):
            from_hugging_face(hf)
    with pytest.raises(UserError, match="only GPT-2's BPE"):
        from_hugging_face(hf_gpt2(vocab_size=1000))


# ---------------------------------------------------------------------------------------- train.py --init_from

TINY = ["--device=cpu", "--block_size=128", "--log_interval=5", "--warmup_iters=2", "--batch_size=4",
        "--learning_rate=3e-3", "--min_lr=3e-4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "synthetic")
    prepare(path, block_size=128, n_train=120, n_val=12)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A GPT-2 with the byte vocabulary, saved as a Hugging Face folder (config.json + model.safetensors)."""
    path = str(tmp_path_factory.mktemp("gpt2-bytes"))
    hf_gpt2(vocab_size=256, n_positions=256).save_pretrained(path)
    return path


def held_out_loss(log, when):
    """The val answer loss train.py logged at `eval iter {when}`."""
    line = next(line for line in log.splitlines() if line.startswith(f"eval iter {when}:"))
    return float(line.split("val answer loss ")[1].split()[0])


def test_init_from_a_hugging_face_folder_trains_and_chats(hf_dir, data_dir, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    start = train.main(TINY + [f"--init_from={hf_dir}", f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                               "--max_iters=0"])
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = start.eval()(ids, make_mask("causal", torch.full((60,), ASSISTANT)))[0][..., :256]
        torch.testing.assert_close(got, hf(ids).logits, atol=1e-4, rtol=0)  # before training: GPT-2 itself
    assert start.config.block_size == 128 and start.config.n_layer == 2  # its shape, cut to --block_size
    capsys.readouterr()
    train.main(TINY + [f"--init_from={hf_dir}", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--max_iters=30",
                       "--eval_interval=30", "--overwrite"])  # the log.jsonl of the run above is replaced
    log = capsys.readouterr().out
    assert "starting from GPT-2" in log
    assert held_out_loss(log, 30) < held_out_loss(log, 0) - 0.5
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    assert checkpoint["tokenizer"]["name"] == "byte" and checkpoint["config"]["init_from"] == hf_dir
    chat = subprocess.run([sys.executable, "sample.py", f"--out_dir={out_dir}", "--temperature=0",
                           "--max_new_tokens=6", "--device=cpu"], cwd=ROOT, input="my pin is 4821\n7 2 9 max\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) == 2


@pytest.mark.parametrize("kind", MASKS)
def test_init_from_an_ismgpt_checkpoint_takes_its_weights_only(data_dir, tmp_path, kind):
    first = str(tmp_path / "causal")
    trained = train.main(TINY + ["--mask=causal", "--n_layer=1", "--n_head=2", "--n_embd=16", f"--data_dir={data_dir}",
                                 f"--out_dir={first}", "--max_iters=4", "--eval_interval=4"])
    warm = train.main(TINY + [f"--mask={kind}", f"--init_from={first}", f"--data_dir={data_dir}",
                              f"--out_dir={tmp_path / 'warm'}", "--max_iters=0"])
    for (name, a), b in zip(trained.state_dict().items(), warm.state_dict().values()):
        assert torch.equal(a, b), name
    assert warm.config.n_embd == 16  # its shape, whatever the flags say


def test_a_gpt2_bpe_start_offline_names_the_vocabulary_it_needs(data_dir, tmp_path):
    bpe = str(tmp_path / "gpt2-bpe")
    hf_gpt2(vocab_size=50257).save_pretrained(bpe)
    with pytest.raises(UserError, match="could not load the GPT-2 BPE vocabulary"):
        train.main(TINY + [f"--init_from={bpe}", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}"])


def test_gpt2_offline_is_one_line_saying_how_to_get_it(data_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # no local copy
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # and a hub that refuses connections
    with pytest.raises(SystemExit) as exit_info:
        flags.run(lambda: train.main(TINY + ["--init_from=gpt2", f"--data_dir={data_dir}", f"--out_dir={tmp_path}"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "cannot be reached: download it where there is network" in err and "--init_from=gpt2-local" in err


def test_without_transformers_a_gpt2_start_says_what_to_install(hf_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UserError, match="needs the transformers package: pip install transformers"):
        train.main(TINY + [f"--init_from={hf_dir}", f"--data_dir={data_dir}", f"--out_dir={tmp_path}"])


def test_unknown_starts_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not one of smollm2 .* FILE.gguf .* a Hugging Face folder"):
        train.main(TINY + [f"--init_from={tmp_path / 'nothing'}", f"--out_dir={tmp_path}"])

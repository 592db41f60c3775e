"""CUDA-only checks: FlexAttention with mask.py's BlockMask against SDPA with the dense mask, forward and backward,
and the KV cache on the GPU. Skipped, with the reason shown, on machines without CUDA (CI has none)."""
import pytest
import torch

from mask import ASSISTANT, MASKS, SYSTEM, USER, block_mask, make_mask
from model import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's GPU path)")

CONFIG = GPTConfig(block_size=512, vocab_size=261, n_layer=2, n_head=4, n_embd=128)


def packed_batch(B=4, T=512, seed=0):
    """Rows of packed random conversations: doc ids, roles in segment runs, random ids."""
    g = torch.Generator().manual_seed(seed)
    roles, docs = torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        t, doc = 0, 0
        while t < T:
            doc_end = min(T, t + int(torch.randint(40, 200, (1,), generator=g)))
            role = SYSTEM if torch.rand(1, generator=g) < 0.5 else USER
            while t < doc_end:
                n = min(doc_end - t, int(torch.randint(3, 30, (1,), generator=g)))
                roles[b, t:t + n], docs[b, t:t + n] = role, doc
                t += n
                role = ASSISTANT if role != ASSISTANT else USER
            doc += 1
    ids = torch.randint(0, CONFIG.vocab_size, (B, T), generator=g)
    return ids.cuda(), roles.cuda(), docs.cuda()


@pytest.mark.parametrize("kind", MASKS)
def test_flex_equals_sdpa_forward_and_backward(kind):
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda()
    ids, roles, docs = packed_batch()
    targets = torch.where(roles == ASSISTANT, ids, -1)
    results = []
    for mask in (make_mask(kind, roles, docs), block_mask(kind, roles, docs)):
        model.zero_grad()
        logits, loss = model(ids, mask, targets=targets)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (dense_logits, dense_grads), (flex_logits, flex_grads) = results
    torch.testing.assert_close(flex_logits, dense_logits, atol=2e-4, rtol=2e-4)
    for flex_grad, dense_grad in zip(flex_grads, dense_grads):
        torch.testing.assert_close(flex_grad, dense_grad, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("kind", ["causal", "ism"])
def test_cache_on_cuda_equals_full_forward(kind):
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().eval()
    ids, roles, _ = packed_batch(B=1, T=200)
    ids, roles = ids[0], roles[0]
    chunk_ends = [i + 1 for i in range(len(roles) - 1) if roles[i] != roles[i + 1] and roles[i] != ASSISTANT]
    with torch.no_grad():
        full = model(ids[None], make_mask(kind, roles))[0][0]
        cache, start = KVCache(CONFIG, device="cuda"), 0
        for end in chunk_ends + [len(ids)]:
            got = model(ids[None, start:end], make_mask(kind, roles[:end], start=start), kv_cache=cache)[0][0]
            torch.testing.assert_close(got, full[start:end], atol=1e-4, rtol=1e-4)
            start = end


def test_bf16_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    ids, roles, docs = packed_batch()
    targets = torch.where(roles == ASSISTANT, ids, -1)
    mask = block_mask("ism", roles, docs)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(ids, mask, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("kind", MASKS)
def test_chat_session_on_cuda_matches_the_no_cache_path(kind):
    # The path eval.py and bench.py take with --device=cuda: prefill chunks, then one token at a time.
    from data.tokenizer import get_tokenizer
    from engine import ChatSession
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().eval()
    tok = get_tokenizer("byte")
    cached, reference = ChatSession(model, tok, kind), ChatSession(model, tok, kind, use_cache=False)
    for user in ["9 4 7 1 sort", "my pin is 4821", "what is my pin?"]:
        got = cached.turn(user, max_new_tokens=12)
        want = reference.turn(user, max_new_tokens=12)
        assert got["reply"] == want["reply"]
    assert cached.ids == reference.ids


@pytest.mark.parametrize("kind", MASKS)
def test_compiled_decode_step_equals_the_eager_one(kind):
    """The static-shape step under torch.compile(mode="reduce-overhead"), i.e. replayed as a CUDA graph: the same
    greedy transcript and, step by step, the same logits as the eager path (fp32: a tight tolerance)."""
    from data.tokenizer import get_tokenizer
    from engine import ChatSession
    torch.manual_seed(0)
    model = GPT(CONFIG).cuda().eval()
    tok = get_tokenizer("byte")
    transcripts, logits = {}, {}
    for decode in ("eager", "compiled"):
        session = ChatSession(model, tok, kind, decode=decode)
        steps = []
        if decode == "compiled":
            step = session.static.step
            session.static.step = lambda idx, pos: steps.append(step(idx, pos).clone()) or steps[-1]
        else:
            handle = model.register_forward_hook(
                lambda m, args, out: steps.append(out[0][0, -1].clone()) if args[0].shape[1] == 1 else None)
        transcripts[decode] = [session.turn(u, max_new_tokens=16, min_new_tokens=16)["reply"]
                               for u in ["9 4 7 1 sort", "my pin is 4821", "what is my pin?"]]
        if decode == "eager":
            handle.remove()
        logits[decode] = torch.stack(steps)
    assert transcripts["compiled"] == transcripts["eager"]
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-3, rtol=1e-3)


def test_compiled_bf16_decode_stays_with_the_eager_bf16_one():
    """The dtype sample.py and serve.py use on CUDA. Larger weights than GPT-2's init give clear argmax margins, so
    bf16 rounding in a different kernel order does not flip a greedy choice."""
    from data.tokenizer import get_tokenizer
    from engine import ChatSession
    torch.manual_seed(0)
    model = GPT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model = model.cuda().to(torch.bfloat16).eval()
    tok = get_tokenizer("byte")
    replies = {decode: [ChatSession(model, tok, "ism", decode=decode).turn(u, 16, min_new_tokens=16)["reply"]
                        for u in ["9 4 7 1 sort", "my pin is 4821"]] for decode in ("eager", "compiled")}
    assert replies["compiled"] == replies["eager"]


def test_eval_scores_a_checkpoint_on_cuda(tmp_path):
    """eval.py --device=cuda: the held-out loss and the replay on the GPU."""
    import subprocess
    import sys
    import os
    from data.prepare import prepare
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data_dir = str(tmp_path / "data")
    prepare(data_dir, block_size=128, n_train=40, n_val=6)
    common = ["--device=cuda", f"--out_dir={tmp_path / 'out'}"]
    subprocess.run([sys.executable, "train.py", *common, f"--data_dir={data_dir}", "--block_size=128", "--n_layer=1",
                    "--n_embd=32", "--n_head=2", "--max_iters=4", "--eval_interval=4"], cwd=root, check=True)
    proc = subprocess.run([sys.executable, "eval.py", *common, "--json"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

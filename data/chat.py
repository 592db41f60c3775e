"""
Conversations (JSON messages) -> token ids and one role per token, in the tokenizer's chat format:
ismGPT's (byte, gpt2), ChatML (SmolLM2, Qwen2) or Llama 3's:

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> answer <|end|> ...
    <|im_start|>system\ntext<|im_end|>\n<|im_start|>user\ntext<|im_end|>\n<|im_start|>assistant\n

Roles are the attention segments: <|bos|> is the first segment's, the header that opens the answer
USER, the answer and its closing token ASSISTANT; ChatML's newline after an answer begins the next
user segment. No piece depends on what follows, so render(history + [user message]) is
render(history) + the prompt: the chat reuses its KV cache across turns.
"""
import json
import re
import sys

from cli.errors import DataError, reason
from mask import ASSISTANT, SYSTEM, USER

ROLE_CODES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}  # ShareGPT's "from" -> role
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON allows "\ud800", UTF-8 does not


def plural(count, noun):
    """plural(2, "bad line") -> "2 bad lines"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def render_start(first_role, tok):
    """<|bos|> (Llama 3: <|begin_of_text|>) in the first segment's role; ChatML: nothing."""
    return ([], []) if tok.chat_format == "chatml" else ([tok.bos], [first_role])


def opened(role, text, tok):
    """A message up to its closing token: ChatML <|im_start|>role\\ntext, Llama 3
    <|start_header_id|>role<|end_header_id|>\\n\\ntext (trimmed). The header's last text is
    encoded with the message's, as the chat templates tokenize it."""
    if tok.chat_format == "chatml":
        return [tok.im_start] + tok.encode(f"{role}\n{text}")
    return [tok.header] + tok.encode(role) + [tok.header_end] + tok.encode("\n\n" + text.strip())


def newline_after(tok):  # ChatML's newline after <|im_end|>
    return tok.encode("\n") if tok.chat_format == "chatml" else []


def render_system(text, tok):
    if tok.chat_format == "ismgpt":
        ids = [tok.system] + tok.encode(text) + [tok.end]
    else:
        ids = opened("system", text, tok) + [tok.end] + newline_after(tok)
    return ids, [SYSTEM] * len(ids)


def render_user(text, tok, after_answer=False):
    """A turn's prompt, all USER, up to the header that opens the answer: ismGPT <|user|> text
    <|end|> <|assistant|>; ChatML [\\n after an answer] <|im_start|>user\\ntext<|im_end|>\\n
    <|im_start|>assistant\\n; Llama 3 likewise."""
    if tok.chat_format == "ismgpt":
        ids = [tok.user] + tok.encode(text) + [tok.end, tok.assistant]
    else:
        ids = (newline_after(tok) if after_answer else []) + opened("user", text, tok) + \
            [tok.end] + newline_after(tok) + opened("assistant", "", tok)
    return ids, [USER] * len(ids)


def render_answer(content, tok):
    """Answer + its closing token (tok.end), all ASSISTANT. content: text, or the ids a sampler
    generated (decoded text need not re-encode to the same ids)."""
    if isinstance(content, str):  # Llama 3's template trims it
        content = tok.encode(content.strip() if tok.chat_format == "llama3" else content)
    ids = list(content) + [tok.end]
    return ids, [ASSISTANT] * len(ids)


def render(messages, tok):
    """Validated messages -> (ids, roles), lists of equal length; a default system message first
    (a ChatML model's) when there is none."""
    if tok.default_system and system_of(messages) is None:
        messages = [{"role": "system", "content": tok.default_system}] + list(messages)
    ids, roles = render_start(USER if system_of(messages) is None else SYSTEM, tok)
    for k, m in enumerate(messages):
        if m["role"] == "user":
            after_answer = k > 0 and messages[k - 1]["role"] == "assistant"
            piece = render_user(m["content"], tok, after_answer)
        else:
            piece = (render_system if m["role"] == "system" else render_answer)(m["content"], tok)
        ids += piece[0]
        roles += piece[1]
    return ids, roles


class _OverBudget(Exception):
    pass


class _Budget:
    """tok, encoding at most `left` ids in all before it raises _OverBudget."""

    def __init__(self, tok, left):
        self.tok, self.left = tok, left

    def encode(self, text):
        ids = self.tok.encode(text, self.left)
        if ids is None:
            raise _OverBudget
        self.left -= len(ids)
        return ids

    def __getattr__(self, name):
        return getattr(self.tok, name)


def render_within(messages, tok, limit):
    """render(messages, tok), or None as soon as they surely need more than limit tokens: a
    conversation too long for the context is refused without encoding all of it."""
    try:
        return render(messages, _Budget(tok, limit))
    except _OverBudget:
        return None


def system_of(messages):
    """The system message's text, or None."""
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def _objects(items, name, keys, where):
    """(number, item) of a non-empty list of objects holding both keys, else DataError."""
    if not isinstance(items, list) or not items:
        raise DataError(f'{where}: "{name}" must be a non-empty list')
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or keys[0] not in item or keys[1] not in item:
            raise DataError(f'{where}: message {number} is not an object with "{keys[0]}" and '
                            f'"{keys[1]}"')
        yield number, item


def chat_messages(raw, where):
    """OpenAI's messages (serve.py's requests, JSONL lines) -> this module's: developer is system,
    text parts are joined, other fields dropped; validate() checks the rest."""
    return [{"role": "system" if m["role"] == "developer" else m["role"],
             "content": text_of(m["content"], number, where)}
            for number, m in _objects(raw, "messages", ("role", "content"), where)]


def text_of(content, number, where):
    """A content string, or OpenAI's [{"type": "text", "text": ...}] parts joined by newlines."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(part, dict) and part.get("type") == "text" and
               isinstance(part.get("text"), str) for part in content):
        raise DataError(f"{where}: message {number}: only text content parts are supported")
    return "\n".join(part["text"] for part in content)


def shorten(text, limit=40):
    """repr of text, cut so that an error stays one readable line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _known(value, known, field, expected, number, where):
    """value, a string among known, else DataError saying which field of which message it is."""
    if not isinstance(value, str):
        raise DataError(f"{where}: message {number} has a non-string {field} "
                        f"({type(value).__name__})")
    if value not in known:
        raise DataError(f"{where}: message {number} has unknown {field} {shorten(value)} "
                        f"(expected {expected})")
    return value


def _check_message(message, number, where, blank_answer_ok=False):
    content = message["content"]
    role = _known(message["role"], ROLE_CODES, "role", "system, user or assistant", number, where)
    if not isinstance(content, str):
        raise DataError(f"{where}: message {number} has non-string content "
                        f"({type(content).__name__})")
    if not content.strip() and not (blank_answer_ok and role == "assistant"):
        raise DataError(f"{where}: message {number} has empty content")
    if LONE_SURROGATE.search(content):
        raise DataError(f"{where}: message {number} content is not valid Unicode (a lone surrogate "
                        "such as \\ud800)")


def validate(messages, where, need_answer=True):
    """DataError(f"{where}: <problem>") unless messages are optional system first, then user and
    assistant alternating. need_answer (training data): it ends with an answer, none is blank;
    else (a conversation to continue) an answer may be blank."""
    for number, message in _objects(messages, "messages", ("role", "content"), where):
        _check_message(message, number, where, blank_answer_ok=not need_answer)
    roles = [m["role"] for m in messages]
    start = int(roles[0] == "system")
    for i in range(start, len(roles)):
        expected = ("user", "assistant")[(i - start) % 2]
        if roles[i] != expected:
            raise DataError(f"{where}: message {i + 1} is {roles[i]!r} where {expected!r} belongs "
                            "(optional system first, then user and assistant alternating)")
    if need_answer and "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn")
    if need_answer and roles[-1] != "assistant":
        raise DataError(f"{where}: ends with a {roles[-1]} message; a training conversation ends "
                        "with an answer")


def parse_line(raw, where, need_answer=True):
    """One JSONL line (bytes) -> {"messages": [...]} plus "tasks" (a task tag per answer, the
    synthetic data's) when present; None for a blank line (JSON's null is a bad line)."""
    if not raw.strip():
        return None
    record = json_value(raw, where)
    messages = _messages_of(record, where)
    validate(messages, where, need_answer)
    if "tasks" not in record:
        return {"messages": messages}
    tasks, answers = record["tasks"], sum(m["role"] == "assistant" for m in messages)
    if not (isinstance(tasks, list) and len(tasks) == answers and
            all(isinstance(t, str) for t in tasks)):
        raise DataError(f'{where}: "tasks" must be a list of {plural(answers, "string")}, one per '
                        "assistant turn")
    for number, task in enumerate(tasks, 1):
        if LONE_SURROGATE.search(task):
            raise DataError(f'{where}: "tasks" entry {number} is not valid Unicode (a lone '
                            'surrogate)')
    return {"messages": messages, "tasks": tasks}


def json_value(raw, where):
    """The JSON value of raw bytes, or a one-line DataError naming where."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise DataError(f"{where}: bad JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply") from None
    except ValueError:  # int() refuses an integer longer than this many digits
        raise DataError(f"{where}: bad JSON (an integer of more than "
                        f"{sys.get_int_max_str_digits()} digits)") from None


def _messages_of(record, where):
    """The line's messages: OpenAI's "messages", or ShareGPT's "conversations" mapped."""
    if not isinstance(record, dict) or not ("messages" in record or "conversations" in record):
        raise DataError(f'{where}: expected an object with a "messages" list (or ShareGPT\'s '
                        '"conversations")')
    if "messages" in record and "conversations" in record:  # which one to train on: a guess
        raise DataError(f'{where}: has both "messages" and "conversations": keep one')
    if "messages" in record:
        messages = chat_messages(record["messages"], where)
        for number, message in enumerate(record["messages"], 1):
            weight = message.get("weight", 1)
            if weight != 1 or isinstance(weight, bool):  # OpenAI's fine-tuning format: 0 or 1
                raise DataError(f'{where}: message {number} has "weight": '
                                f"{json.dumps(weight)[:40]}: every answer trains here, none can be "
                                'left out; drop that turn, or the "weight"')
        return messages
    messages = []
    for number, turn in _objects(record["conversations"], "conversations", ("from", "value"),
                                 where):
        speaker = _known(turn["from"], SHAREGPT_ROLES, '"from"', "human, gpt or system", number,
                         where)
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def read_bytes(path):
    """A file's bytes without a UTF-8 BOM (Windows editors), or a one-line DataError."""
    try:
        with open(path, "rb") as f:
            return f.read().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:
        raise DataError(f"cannot read {path}: {reason(e)}") from None


def read_jsonl(path, skip_bad=False, need_answer=True):
    """-> (conversations, bad). Stops at the first bad line with DataError("path:line: problem"),
    or with skip_bad lists bad = [(line_no, problem)] and goes on. Blank lines are ignored."""
    conversations, bad = [], []
    for line_no, raw in enumerate(read_bytes(path).splitlines(), 1):
        where = f"{path}:{line_no}"
        try:
            conversations.append(parse_line(raw, where, need_answer))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append((line_no, str(e).removeprefix(f"{where}: ")))
    return [c for c in conversations if c is not None], bad


def fit_to_block(conversation, tok, block_size):
    """The conversation if it renders to <= block_size tokens; else a copy cut after the last turn
    that fits ("tasks" cut alongside); None when not even the first turn fits."""
    messages = conversation["messages"]
    head = 1 if messages[0]["role"] == "system" else 0
    length, turns = len(render(messages[:head], tok)[0]), 0
    for user, answer in zip(messages[head::2], messages[head + 1::2]):
        length += len(render_user(user["content"], tok, after_answer=turns > 0)[0])
        length += len(render_answer(answer["content"], tok)[0])
        if length > block_size:
            break
        turns += 1
    if turns == 0:
        return None
    if head + 2 * turns == len(messages):
        return conversation
    cut = dict(conversation, messages=messages[:head + 2 * turns])
    if "tasks" in conversation:
        cut["tasks"] = conversation["tasks"][:turns]
    return cut

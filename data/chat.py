"""
Conversations as JSON messages, rendered to token ids plus one role per token, in the tokenizer's
format: ismGPT's own (byte, gpt2), ChatML (SmolLM2, Qwen2) or Llama 3's:

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> answer <|end|> ...
    <|im_start|>system\ntext<|im_end|>\n<|im_start|>user\ntext<|im_end|>\n<|im_start|>assistant\n

Roles follow the attention segments: <|bos|> is the first segment's; a system or user message is
its role; the header that opens the answer is USER; the answer and its closing token are
ASSISTANT. ChatML's newline after an answer begins the next user segment. render() joins pieces
that never depend on what follows, so render(history + [user message]) begins with
render(history) and is exactly the prompt: the chat reuses its KV cache across turns.
"""
import json
import sys

from cli.errors import DataError, reason
from mask import ASSISTANT, SYSTEM, USER

ROLE_CODES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}  # ShareGPT's "from" -> role


def plural(count, noun):
    """plural(2, "bad line") -> "2 bad lines"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ------------------------------------------------------------------------------------- rendering

def render_start(first_role, tok):
    """<|bos|> (Llama 3: <|begin_of_text|>) in the first segment's role; ChatML: nothing."""
    return ([], []) if tok.chat_format == "chatml" else ([tok.bos], [first_role])


def opened(role, text, tok):
    """A message in a pretrained format, up to its closing token: ChatML <|im_start|>role\\ntext,
    Llama 3 <|start_header_id|>role<|end_header_id|>\\n\\ntext (trimmed). The header's last text
    is encoded with the message's, as the chat templates tokenize it."""
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
    <|im_start|>assistant\\n; Llama 3 likewise with its headers and <|eot_id|>."""
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
        ids = tok.encode(content.strip() if tok.chat_format == "llama3" else content)
    else:
        ids = list(content)
    ids = ids + [tok.end]
    return ids, [ASSISTANT] * len(ids)


def render(messages, tok):
    """Validated messages -> (ids, roles), two lists of equal length. A ChatML model's default
    system message comes first when there is none."""
    if tok.default_system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": tok.default_system}] + list(messages)
    ids, roles = render_start(SYSTEM if messages and messages[0]["role"] == "system" else USER,
                              tok)
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
    """A tokenizer that encodes at most `left` ids in all, then raises _OverBudget; the special
    tokens and the chat format are the tokenizer's own."""

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
    """render(messages, tok), or None as soon as they are known to need more than limit tokens:
    a conversation too long for the context is refused without encoding all of it."""
    try:
        return render(messages, _Budget(tok, limit))
    except _OverBudget:
        return None


def system_of(messages):
    """The system message's text, or None."""
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


# ------------------------------------------------------------------------ reading and validating

def _objects(items, name, keys, where):
    """(number, item) of a non-empty list of objects that hold both keys, else DataError."""
    if not isinstance(items, list) or not items:
        raise DataError(f'{where}: "{name}" must be a non-empty list')
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or keys[0] not in item or keys[1] not in item:
            raise DataError(f'{where}: message {number} is not an object with "{keys[0]}" and '
                            f'"{keys[1]}"')
        yield number, item


def chat_messages(raw, where):
    """OpenAI's messages (a request to serve.py, a JSONL line) -> this module's: developer is
    system, a list of text parts is their text, other fields are dropped; validate() checks the
    rest. One reader, so a client may send what prepare.py and sample.py --script read."""
    return [{"role": "system" if m["role"] == "developer" else m["role"],
             "content": text_of(m["content"], number, where)}
            for number, m in _objects(raw, "messages", ("role", "content"), where)]


def text_of(content, number, where):
    """A content string, or OpenAI's [{"type": "text", "text": ...}] parts joined by newlines."""
    if not isinstance(content, list):
        return content
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and
                isinstance(part.get("text"), str)):
            raise DataError(f"{where}: message {number}: only text content parts are supported")
    return "\n".join(part["text"] for part in content)


def shorten(text, limit=40):
    """repr of text, cut so that an error stays one readable line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _is_unicode(text):  # False for a lone surrogate (JSON allows "\\ud800")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_message(message, number, where, blank_answer_ok=False):
    role, content = message["role"], message["content"]
    if not isinstance(role, str):
        raise DataError(f"{where}: message {number} has a non-string role ({type(role).__name__})")
    if role not in ROLE_CODES:
        raise DataError(f"{where}: message {number} has unknown role {shorten(role)} "
                        "(expected system, user or assistant)")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {number} has non-string content "
                        f"({type(content).__name__})")
    if not content.strip() and not (blank_answer_ok and role == "assistant"):
        raise DataError(f"{where}: message {number} has empty content")
    if not _is_unicode(content):
        raise DataError(f"{where}: message {number} content is not valid Unicode (a lone surrogate "
                        "such as \\ud800)")


def validate(messages, where, need_answer=True):
    """DataError(f"{where}: <problem>") unless messages is a well-formed conversation: optional
    system first, then user and assistant alternating. need_answer (training data): it ends with
    an answer, and no message is blank; else (a conversation to continue) an answer may be blank."""
    for number, message in _objects(messages, "messages", ("role", "content"), where):
        _check_message(message, number, where, blank_answer_ok=not need_answer)
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise DataError(f"{where}: message {i + 1} is {roles[i]!r} where {expected!r} belongs "
                            "(optional system first, then user and assistant alternating)")
    if need_answer and "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn")
    if need_answer and roles[-1] != "assistant":
        raise DataError(f"{where}: ends with a {roles[-1]} message; a training conversation ends "
                        "with an answer")


def _check_tasks(tasks, messages, where):
    """Optional per-answer task tags (the synthetic data's; eval scores per tag)."""
    answers = sum(m["role"] == "assistant" for m in messages)
    if not isinstance(tasks, list) or len(tasks) != answers or \
            not all(isinstance(t, str) for t in tasks):
        raise DataError(f'{where}: "tasks" must be a list of {plural(answers, "string")}, one per '
                        "assistant turn")
    for number, task in enumerate(tasks, 1):
        if not _is_unicode(task):
            raise DataError(f'{where}: "tasks" entry {number} is not valid Unicode (a lone '
                            'surrogate)')


def parse_line(raw, where, need_answer=True):
    """One JSONL line (bytes) -> {"messages": [...]} plus "tasks" when present, other fields
    dropped; None for a blank line (a line holding JSON's null is a bad line)."""
    if not raw.strip():
        return None
    record = json_value(raw, where)
    messages = _messages_of(record, where)
    validate(messages, where, need_answer)
    conversation = {"messages": messages}
    if "tasks" in record:
        _check_tasks(record["tasks"], messages, where)
        conversation["tasks"] = record["tasks"]
    return conversation


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
                shown = json.dumps(weight)[:40]
                raise DataError(f'{where}: message {number} has "weight": {shown}: every '
                                "answer trains here, none can be left out; drop that turn, or the "
                                '"weight"')
        return messages
    messages = []
    turns = _objects(record["conversations"], "conversations", ("from", "value"), where)
    for number, turn in turns:
        speaker = turn["from"]
        if not isinstance(speaker, str):
            raise DataError(f'{where}: message {number} has a non-string "from" '
                            f"({type(speaker).__name__})")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f'{where}: message {number} has unknown "from" {shorten(speaker)} '
                            "(expected human, gpt or system)")
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
            conversation = parse_line(raw, where, need_answer)
        except DataError as e:
            if not skip_bad:
                raise
            bad.append((line_no, str(e).removeprefix(f"{where}: ")))
            continue
        if conversation is not None:
            conversations.append(conversation)
    return conversations, bad


def fit_to_block(conversation, tok, block_size):
    """The conversation if it renders to <= block_size tokens; else a copy cut after the last whole
    turn that fits (system and earliest turns kept, "tasks" cut alongside); None when not even the
    first turn fits."""
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

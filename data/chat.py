"""
The chat format: conversations as JSON messages, rendered to token ids plus one role per token.

A tokenizer comes with its chat format (tok.chat_format). ismGPT's own, for the byte and gpt2 tokenizers:

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> answer <|end|> <|user|> ...

ChatML, for pretrained chat models (SmolLM2, Qwen2), as their chat templates write it, with the model's default
system message when a conversation has none:

    <|im_start|>system\ntext<|im_end|>\n<|im_start|>user\ntext<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>
    \n<|im_start|>user\n...

Roles (mask.py's codes) follow the attention segments, not the text:
- <|bos|> belongs to the first segment (SYSTEM if there is a system message, else USER);
- a system or user message's header, text and closing token(s) carry its role;
- the header that opens the answer (<|assistant|>, or <|im_start|>assistant\n) is USER: it is the last prompt text
  the model reads before answering, so it belongs to the query segment;
- an answer's text and its closing token (<|end|>, or <|im_end|>) are ASSISTANT. In ChatML the newline after an
  answer's <|im_end|> begins the next user segment: the model never samples it.

render() is the concatenation of small pieces (render_start, render_system, render_user, render_answer) that the
sampler calls one at a time. A piece never depends on what comes after it, so rendering is prefix-stable by
construction: render(history + [user message]) begins with render(history), ids and roles, and is exactly the
inference prompt. That is what lets the sampler reuse its KV cache across turns. (In ChatML a message's role
line and text are encoded together, as the template's tokenization does; an answer is encoded on its own, as the
model generates it after its header.)

Input lines are OpenAI-style {"messages": [{"role": "user", "content": "hi"}, ...]}, read as serve.py reads a
request's (chat_messages), or ShareGPT-style {"conversations": [{"from": "human", "value": "hi"}, ...]}, told
apart line by line; both read as the same messages.
"""
import json
import sys

from cli.errors import DataError, reason
from mask import ASSISTANT, SYSTEM, USER

ROLE_CODES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# ShareGPT's speaker names ("from") -> roles. Exports use human/gpt; some also write the OpenAI names, or chatgpt.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def plural(count, noun):
    """plural(1, "bad line") -> "1 bad line", plural(2, "bad line") -> "2 bad lines"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# ---------------------------------------------------------------------------------------------------- rendering

def render_start(first_role, tok):
    """ismGPT: <|bos|>, Llama 3: <|begin_of_text|>, in the role of the conversation's first segment (SYSTEM or USER).
    ChatML: nothing."""
    if tok.chat_format == "chatml":
        return [], []
    return [tok.bos], [first_role]


def opened(role, text, tok):
    """A message of `role` in a pretrained chat format, up to the token that closes it: ChatML <|im_start|>role\\ntext,
    Llama 3 <|start_header_id|>role<|end_header_id|>\\n\\ntext (its template trims the text). The header's last
    text is encoded with the message's, as a chat template's tokenization does."""
    if tok.chat_format == "chatml":
        return [tok.im_start] + tok.encode(f"{role}\n{text}")
    return [tok.header] + tok.encode(role) + [tok.header_end] + tok.encode("\n\n" + text.strip())


def newline_after(tok):
    """ChatML closes a message with <|im_end|> and a newline; in the prompt the newline after an answer's
    <|im_end|> opens the next user segment (the model never samples it)."""
    return tok.encode("\n") if tok.chat_format == "chatml" else []


def render_system(text, tok):
    if tok.chat_format == "ismgpt":
        ids = [tok.system] + tok.encode(text) + [tok.end]
    else:
        ids = opened("system", text, tok) + [tok.end] + newline_after(tok)
    return ids, [SYSTEM] * len(ids)


def render_user(text, tok, after_answer=False):
    """The prompt of a turn, all USER: the header that opens the answer ends the query. ismGPT: <|user|> text
    <|end|> <|assistant|>. ChatML: [\\n after an answer] <|im_start|>user\\ntext<|im_end|>\\n<|im_start|>assistant\\n.
    Llama 3: <|start_header_id|>user<|end_header_id|>\\n\\ntext<|eot_id|><|start_header_id|>assistant<|end_header_id|>
    \\n\\n."""
    if tok.chat_format == "ismgpt":
        ids = [tok.user] + tok.encode(text) + [tok.end, tok.assistant]
    else:
        ids = (newline_after(tok) if after_answer else []) + opened("user", text, tok) + [tok.end] + \
            newline_after(tok) + opened("assistant", "", tok)
    return ids, [USER] * len(ids)


def render_answer(content, tok):
    """Answer content + its closing token (<|end|>, <|im_end|> or <|eot_id|>: tok.end), all ASSISTANT. content is
    the answer text, or the token ids a sampler generated (without the closing token): re-encoding decoded text
    need not give back the same ids under BPE."""
    if isinstance(content, str):
        ids = tok.encode(content.strip() if tok.chat_format == "llama3" else content)  # Llama 3's template trims it
    else:
        ids = list(content)
    ids = ids + [tok.end]
    return ids, [ASSISTANT] * len(ids)


def with_default_system(messages, tok):
    """messages with the tokenizer's default system message first when they have none (ChatML models' templates
    add one; ismGPT's format has none)."""
    if tok.default_system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": tok.default_system}] + list(messages)
    return messages


def render(messages, tok):
    """messages (validated) -> (ids, roles), two lists of equal length."""
    messages = with_default_system(messages, tok)
    first_role = SYSTEM if messages and messages[0]["role"] == "system" else USER
    ids, roles = render_start(first_role, tok)
    previous = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "user":
            piece_ids, piece_roles = render_user(content, tok, after_answer=previous == "assistant")
        else:
            piece_ids, piece_roles = (render_system if role == "system" else render_answer)(content, tok)
        ids += piece_ids
        roles += piece_roles
        previous = role
    return ids, roles


class _OverBudget(Exception):
    pass


class _Budget:
    """A tokenizer that encodes at most `left` ids of text in all, then raises _OverBudget (render_within)."""

    def __init__(self, tok, left):
        self.tok, self.left = tok, left

    def encode(self, text):
        ids = self.tok.encode(text, self.left)
        if ids is None:
            raise _OverBudget
        self.left -= len(ids)
        return ids

    def __getattr__(self, name):  # the special tokens, the chat format: the tokenizer's own
        return getattr(self.tok, name)


def render_within(messages, tok, limit):
    """render(messages, tok), or None as soon as their text is known to need more than limit tokens: a
    conversation too long for the context is refused after encoding about limit tokens of it, never all of it (a
    megabyte of text keeps a pure-Python BPE busy for many seconds)."""
    try:
        return render(messages, _Budget(tok, limit))
    except _OverBudget:
        return None


def system_of(messages):
    """The system message's text of a conversation, or None."""
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


# ------------------------------------------------------------------------------------------- OpenAI's messages

def chat_messages(raw, where):
    """OpenAI's messages, as a client sends serve.py and a JSONL line holds them, -> this module's: developer is
    system, a list of text parts is their text, other fields are dropped; validate() checks the rest. One reader
    for every entry point, so that what a client may send is what prepare.py and sample.py --script read."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    messages = []
    for number, message in enumerate(raw, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f'{where}: message {number} is not an object with "role" and "content"')
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": text_of(message["content"], number, where)})
    return messages


def text_of(content, number, where):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined by
    newlines). Other types are left to validate() to name."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise DataError(f"{where}: message {number}: only text content parts are supported")
        texts.append(part["text"])
    return "\n".join(texts)


# --------------------------------------------------------------------------------------------------- validation

def _check_message(message, number, where, blank_answer_ok=False):
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f'{where}: message {number} is not an object with "role" and "content"')
    role, content = message["role"], message["content"]
    if not isinstance(role, str):
        raise DataError(f"{where}: message {number} has a non-string role ({type(role).__name__})")
    if role not in ROLE_CODES:
        raise DataError(f"{where}: message {number} has unknown role {shorten(role)} "
                        "(expected system, user or assistant)")
    if not isinstance(content, str):
        raise DataError(f"{where}: message {number} has non-string content ({type(content).__name__})")
    if not content.strip() and not (blank_answer_ok and role == "assistant"):
        raise DataError(f"{where}: message {number} has empty content")
    if not _is_unicode(content):
        raise DataError(f"{where}: message {number} content is not valid Unicode (a lone surrogate such as \\ud800)")


def shorten(text, limit=40):
    """repr of text, cut so that an error stays one readable line."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _is_unicode(text):
    """False for a str holding a lone surrogate (JSON allows "\\ud800"): it cannot be encoded, and tiktoken would
    silently turn it into U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_order(roles, where):
    """Optional system first, then user and assistant alternating, starting with user."""
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise DataError(f"{where}: message {i + 1} is {roles[i]!r} where {expected!r} belongs "
                            "(optional system first, then user and assistant alternating)")


def validate(messages, where, need_answer=True):
    """Raise DataError(f"{where}: <problem>") unless messages is a well-formed conversation. need_answer=True
    (training data) also requires an assistant turn and a final assistant message, and no blank message at all;
    with False (a conversation to continue: sample.py --script, serve.py) an answer may be blank, as a model may
    have answered with nothing and the client sends that back."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    for number, message in enumerate(messages, 1):
        _check_message(message, number, where, blank_answer_ok=not need_answer)
    roles = [m["role"] for m in messages]
    _check_order(roles, where)
    if need_answer and "assistant" not in roles:
        raise DataError(f"{where}: no assistant turn")
    if need_answer and roles[-1] != "assistant":
        raise DataError(f"{where}: ends with a {roles[-1]} message; a training conversation ends with an answer")


def _check_tasks(tasks, messages, where):
    """Optional per-answer task tags (the synthetic data has them; eval scores per tag)."""
    answers = sum(m["role"] == "assistant" for m in messages)
    if not isinstance(tasks, list) or len(tasks) != answers or not all(isinstance(t, str) for t in tasks):
        raise DataError(f'{where}: "tasks" must be a list of {plural(answers, "string")}, one per assistant turn')
    for number, task in enumerate(tasks, 1):
        if not _is_unicode(task):
            raise DataError(f'{where}: "tasks" entry {number} is not valid Unicode (a lone surrogate)')


# --------------------------------------------------------------------------------------------------------- JSONL

def parse_line(raw, where, need_answer=True):
    """One JSONL line (bytes), {"messages": [{"role", "content"}, ...]} or ShareGPT's {"conversations": [{"from",
    "value"}, ...]} -> {"messages": [...]} plus "tasks" when present (other fields are dropped), or None for a
    blank line (only whitespace: a line holding JSON's null is a bad line like any other non-object)."""
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
    except ValueError:  # json's one other error: int() refuses an integer longer than this many digits
        raise DataError(f"{where}: bad JSON (an integer of more than {sys.get_int_max_str_digits()} digits)") from None


def _messages_of(record, where):
    """The line's messages, in this module's form: OpenAI's "messages" (chat_messages), or ShareGPT's
    "conversations" mapped."""
    if not isinstance(record, dict) or not ("messages" in record or "conversations" in record):
        raise DataError(f'{where}: expected an object with a "messages" list (or ShareGPT\'s "conversations")')
    if "messages" in record and "conversations" in record:  # which one to train on would be a guess
        raise DataError(f'{where}: has both "messages" and "conversations": keep one')
    if "messages" in record:
        return chat_messages(record["messages"], where)
    return _from_sharegpt(record["conversations"], where)


def _from_sharegpt(turns, where):
    """[{"from": "human", "value": text}, ...] -> [{"role": "user", "content": text}, ...]; validate() checks
    the rest (content, order) as for any line."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f'{where}: "conversations" must be a non-empty list')
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f'{where}: message {number} is not an object with "from" and "value"')
        speaker = turn["from"]
        if not isinstance(speaker, str):
            raise DataError(f'{where}: message {number} has a non-string "from" ({type(speaker).__name__})')
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f'{where}: message {number} has unknown "from" {shorten(speaker)} '
                            "(expected human, gpt or system)")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def read_jsonl(path, skip_bad=False, need_answer=True):
    """-> (conversations, bad). Stops at the first bad line with DataError("path:line: problem"), or with
    skip_bad collects bad = [(line_no, problem)] and goes on. Blank lines are ignored."""
    try:
        with open(path, "rb") as f:
            lines = f.read().removeprefix(b"\xef\xbb\xbf").splitlines()  # a UTF-8 BOM (Windows editors)
    except OSError as e:
        raise DataError(f"cannot read {path}: {reason(e)}") from None
    conversations, bad = [], []
    for line_no, raw in enumerate(lines, 1):
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


def write_jsonl(path, conversations):
    with open(path, "w", encoding="utf-8") as f:
        for conversation in conversations:
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------- fitting blocks

def fit_to_block(conversation, tok, block_size):
    """The conversation itself if it renders to <= block_size tokens; else a copy cut after the last whole
    user+assistant turn that still fits (system and earliest turns kept, "tasks" cut alongside); None when not
    even the first turn fits. Never cuts inside a message."""
    messages = conversation["messages"]
    head = 1 if messages[0]["role"] == "system" else 0
    length = len(render(messages[:head], tok)[0])
    turns = 0
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

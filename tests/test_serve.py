"""serve.py over real HTTP on 127.0.0.1: replies against the no-cache reference (a use_cache=False ChatSession fed
the same text history), exact cross-request reuse, OpenAI's shapes for answers, streams and errors, the busy line,
a client that disconnects mid-stream, and answers whose text does not re-encode to the sampled ids."""
import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from data.chat import render
from engine import ChatSession
from cli.errors import DataError
from cli.flags import run
from mask import MASKS, ROLE_LETTERS
import serve
from serve import ServeConfig
from tools.http_server import MAX_BODY, Server
from tools.openai_api import ChatService
from test_engine import CONFIG, MODEL, SYSTEM_TEXT, TOK, USERS
from test_sample import ROOT, out_dir  # noqa: F401  (a fixture: a checkpoint of MODEL, mask ism)

ASCII = [TOK.encode(chr(c))[0] for c in range(32, 127)]


@contextmanager
def forward_hook(hook):
    handle = MODEL.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def printable_answers(module, args, output):
    """Answers of printable ASCII, closed after a '.': their text re-encodes to the sampled ids, so a client that
    sends them back keeps the whole cache. It reads only the last input token, so the cached and the no-cache path
    see the same change."""
    logits, loss = output
    logits = logits.clone()
    allowed = logits[0, -1, ASCII]
    logits[0, -1] = float("-inf")
    logits[0, -1, ASCII] = allowed
    logits[0, -1, TOK.end] = 1e4 if int(args[0][0, -1]) == ord("a") else float("-inf")
    return logits, loss


@contextmanager
def serving(kind="ism", log=None, **options):
    """A server on an ephemeral port of --host (127.0.0.1 by default), in a thread, answering greedily by default;
    yields (port, service)."""
    cfg = ServeConfig(temperature=0.0, **options)
    service = ChatService(MODEL, TOK, kind, cfg, log=[].append if log is None else log.append)
    server = Server(service, cfg.host)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.address[1], service
    finally:
        server.should_exit = True
        thread.join()


def request(port, method="POST", path="/v1/chat/completions", body=None, headers=None):
    """-> (status, headers, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, data, headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, response.headers, payload


def chat(port, messages, **options):
    status, _, payload = request(port, body={"messages": messages, **options})
    assert status == 200, payload
    return json.loads(payload)


def stream(port, messages, **options):
    """The chunks of a streamed answer; checks the SSE framing and the final [DONE]."""
    status, headers, payload = request(port, body={"messages": messages, "stream": True, **options})
    assert status == 200 and headers["Content-Type"] == "text/event-stream", payload
    events = payload.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    return [json.loads(e[len("data: "):]) for e in events[:-2]]


def reference(kind, messages, max_tokens):
    """The greedy answer to messages (the last one the user's) through the no-cache path, given the same text."""
    session = ChatSession(MODEL, TOK, kind, use_cache=False, reply_reserve=1)
    session.set_history(messages[:-1])
    return session.turn(messages[-1]["content"], max_tokens, temperature=0)


def letters(messages):
    return "".join(ROLE_LETTERS[r] for r in render(messages, TOK)[1])


def take_turn(port, messages, user, answer=chat, **options):
    """One turn as a stateless client takes it: the request carries the whole history, the answer comes back as
    text and joins it. -> the response (the chunks, for answer=stream)."""
    messages.append({"role": "user", "content": user})
    response = answer(port, messages, **options)
    text = response["choices"][0]["message"]["content"] if answer is chat else \
        "".join(c["choices"][0]["delta"].get("content", "") for c in response if c["choices"])
    messages.append({"role": "assistant", "content": text})
    return response


def play(port, users, answer=chat, system=SYSTEM_TEXT, **options):
    """-> (messages, responses) of a chat through the server."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages, [take_turn(port, messages, user, answer, **options) for user in users]


# ------------------------------------------------------------------------------------------------------ answers

@pytest.mark.parametrize("kind", MASKS)
def test_chat_equals_the_no_cache_reference_and_prefills_only_new_tokens(kind):
    with forward_hook(printable_answers), serving(kind) as (port, _):
        messages, responses = play(port, USERS, max_tokens=8)
        for k, response in enumerate(responses):
            asked = messages[:2 + 2 * k]  # system, then the turns so far up to this user message
            want = reference(kind, asked, 8)
            assert response["choices"][0]["message"]["content"] == want["reply"]
            assert response["choices"][0]["finish_reason"] == ("stop" if want["stopped"] == "end" else "length")
            usage, facts = response["usage"], response["ismgpt"]
            assert usage["prompt_tokens"] == len(render(asked, TOK)[0])
            assert usage["completion_tokens"] == want["generated_tokens"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            if kind == "prefix" or k == 0:
                assert cached == 0
            else:  # every token of the last request and its answer but the last sampled one, never fed
                before = responses[k - 1]["usage"]
                assert cached == before["prompt_tokens"] + before["completion_tokens"] - 1 > 0
            assert facts["reused_tokens"] == cached and facts["prefill_tokens"] == usage["prompt_tokens"] - cached
            assert facts["mask"] == kind and facts["roles"] == letters(messages[:3 + 2 * k])
        assert {r["choices"][0]["finish_reason"] for r in responses} == {"stop", "length"}


def test_stream_equals_the_answer_and_usage_comes_last_when_asked():
    with forward_hook(printable_answers):
        with serving() as (port, _):
            messages, answers = play(port, USERS[:3], max_tokens=12)
        with serving() as (port, _):
            streamed_messages, streams = play(port, USERS[:3], answer=stream, max_tokens=12,
                                              stream_options={"include_usage": True})
        with serving() as (port, _):
            plain = stream(port, messages[:2], max_tokens=12)
    assert streamed_messages == messages
    for answer, chunks in zip(answers, streams):
        first, *middle, finish, usage = chunks
        assert first["object"] == "chat.completion.chunk" and first["model"] == "ismgpt"
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)
        assert all(c["usage"] is None and c["id"] == first["id"] for c in [first, *middle, finish])
        assert finish["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        assert finish["ismgpt"]["roles"] == answer["ismgpt"]["roles"]
        assert usage["choices"] == [] and usage["usage"] == answer["usage"]
    assert "usage" not in plain[-1] and plain[-1]["choices"][0]["finish_reason"]


def test_interleaved_conversations_keep_their_own_caches_and_the_no_cache_server_agrees():
    systems, users = {"a": SYSTEM_TEXT, "b": None}, {"a": USERS[:2], "b": USERS[2:]}
    chats = {"a": [{"role": "system", "content": SYSTEM_TEXT}], "b": []}
    with forward_hook(printable_answers):
        with serving(sessions=2) as (port, service):
            turns = [{name: take_turn(port, chats[name], users[name][k], max_tokens=8) for name in chats}
                     for k in range(2)]  # a1 b1 a2 b2
            assert len(service.sessions) == 2
        with serving(no_cache=True) as (port, _):
            replayed = {name: play(port, users[name], system=systems[name], max_tokens=8) for name in chats}
    for name in chats:
        first, second = turns[0][name]["usage"], turns[1][name]["usage"]
        cached = second["prompt_tokens_details"]["cached_tokens"]
        assert cached == first["prompt_tokens"] + first["completion_tokens"] - 1  # all but the last sampled token
        assert replayed[name][0] == chats[name]  # the same answers without a cache
        assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for r in replayed[name][1])


def test_answer_whose_text_does_not_give_back_its_ids_keeps_less_of_the_cache_never_a_wrong_row():
    # The first answer is the byte 0xff, then "ok": not UTF-8, so the client gets "\ufffdok", whose bytes differ.
    forced = {TOK.assistant: 0xFF, 0xFF: ord("o"), ord("o"): ord("k"), ord("k"): TOK.end}

    def invalid_utf8(module, args, output):
        logits, loss = output
        logits = logits.clone()
        logits[0, -1, forced.get(int(args[0][0, -1]), TOK.end)] = 1e4
        return logits, loss

    with serving() as (port, _):
        with forward_hook(invalid_utf8):
            first = chat(port, [{"role": "user", "content": USERS[0]}], max_tokens=10)
        assert first["choices"][0]["message"]["content"] == "\ufffdok"
        messages = [{"role": "user", "content": USERS[0]}, {"role": "assistant", "content": "\ufffdok"},
                    {"role": "user", "content": USERS[1]}]
        second = chat(port, messages, max_tokens=10)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == first["usage"]["prompt_tokens"]  # up to the answer, whose first byte differs
    assert cached < len(render(messages[:2], TOK)[0]) - 1
    assert second["choices"][0]["message"]["content"] == reference("ism", messages, 10)["reply"]


@pytest.mark.parametrize("kind", ["causal", "ism"])
def test_a_message_that_goes_on_differently_keeps_only_the_rows_that_stay_exact(kind):
    edited = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": USERS[1]}]
    with serving(kind) as (port, _):
        chat(port, [{"role": "user", "content": "hello there"}], max_tokens=4)
        answer = chat(port, edited, max_tokens=8)
    shared = 2 + len(TOK.encode("hello "))  # <|bos|> <|user|> "hello "
    # ISM: the shared tokens attended to "there", which this conversation does not have
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == (shared if kind == "causal" else 0)
    assert answer["choices"][0]["message"]["content"] == reference(kind, edited, 8)["reply"]


def test_stop_strings_end_the_answer_before_them():
    messages = [{"role": "user", "content": USERS[1]}]
    full = reference("ism", messages, 20)["reply"]
    stop = next(full[i:i + 2] for i in range(2, len(full)) if full.find(full[i:i + 2]) == i)  # inside the reply
    before = full[:full.find(stop)]
    with serving() as (port, _):
        answer = chat(port, messages, max_tokens=20, stop=["never", stop])
        chunks = stream(port, messages, max_tokens=20, stop=stop)
        nothing = chat(port, messages, max_tokens=20, stop=full[0])
        turns = [messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": USERS[2]}]
                 for reply in (before, "")]
        after = [chat(port, turn, max_tokens=8) for turn in turns]  # the cut answers were closed consistently
    assert answer["choices"][0]["message"]["content"] == before and answer["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == before
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert nothing["choices"][0]["message"]["content"] == "" and nothing["choices"][0]["finish_reason"] == "stop"
    for turn, answer in zip(turns, after):  # a blank answer sent back is accepted too
        assert answer["choices"][0]["message"]["content"] == reference("ism", turn, 8)["reply"]


def test_seed_repeats_a_sampled_answer():
    messages = [{"role": "user", "content": USERS[0]}]
    with serving() as (port, _):
        same = [chat(port, messages, temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12) for _ in range(2)]
        other = chat(port, messages, temperature=1.0, top_p=0.9, top_k=50, seed=8, max_tokens=12)
    texts = [r["choices"][0]["message"]["content"] for r in same + [other]]
    assert texts[0] == texts[1] != texts[2]


def test_models_and_the_page():
    with serving() as (port, _):
        status, _, models = request(port, "GET", "/v1/models")
        page_status, headers, page = request(port, "GET", "/")
    assert status == 200 and json.loads(models)["data"][0] == {
        "id": "ismgpt", "object": "model", "created": 0, "owned_by": "ismgpt", "mask": "ism",
        "block_size": CONFIG.block_size}
    assert page_status == 200 and headers["Content-Type"].startswith("text/html") and b"<canvas" in page


# ------------------------------------------------------------------------------------------------------- errors

USER = [{"role": "user", "content": USERS[0]}]
BAD_REQUESTS = {
    "not JSON": (b'{"messages": [', None, None),
    "NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, None),
    "not an object": ([1, 2], None, None),
    "no messages": ({"model": "x"}, "messages", None),
    "unknown role": ({"messages": [{"role": "tool", "content": "hi"}]}, "messages", None),
    "empty content": ({"messages": [{"role": "user", "content": " "}]}, "messages", None),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                   "messages", None),
    "last is not the user's": ({"messages": USER + [{"role": "assistant", "content": "ok"}]}, "messages", None),
    "answer first": ({"messages": [{"role": "assistant", "content": "ok"}] + USER}, "messages", None),
    "n=2": ({"messages": USER, "n": 2}, "n", None),
    "temperature": ({"messages": USER, "temperature": -1}, "temperature", None),
    "stream": ({"messages": USER, "stream": "yes"}, "stream", None),
    "max_tokens": ({"messages": USER, "max_tokens": 0}, "max_tokens", None),
    "top_p": ({"messages": USER, "top_p": 0}, "top_p", None),
    "seed": ({"messages": USER, "seed": "7"}, "seed", None),
    "stop": ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    "too long": ({"messages": [{"role": "user", "content": "x" * (CONFIG.block_size - 5)}]}, "messages",
                 "context_length_exceeded"),
    # JSON's "\ud800" escape alone is a lone surrogate: no Unicode text, which no answer or log could encode
    "model not Unicode": (b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}', "model", None),
    "streamed model not Unicode": (b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, '
                                   b'"model": "x\\udc00"}', "model", None),
    "stop not Unicode": (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\ud800"]}', "stop",
                         None),
    "content not Unicode": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages", None),
    "a key not Unicode": (b'{"messages": [{"role": "user", "content": "hi"}], "metadata": {"\\ud800": 1}}',
                          "metadata", None),
    # 1e309 is inf to Python
    "temperature 1e309": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e309}',
                          "temperature", None),
    "top_p -1e309": (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -1e309}', "top_p", None),
}


def test_errors_in_openai_shape_and_the_server_goes_on():
    log = []
    with forward_hook(printable_answers), serving(log=log) as (port, _):
        for name, (body, param, code) in BAD_REQUESTS.items():
            status, _, payload = request(port, body=body)
            error = json.loads(payload)["error"]
            assert status == 400 and (error["param"], error["code"]) == (param, code), name
            assert error["type"] == "invalid_request_error" and error["message"], name
        fits = [{"role": "user", "content": "x" * (CONFIG.block_size - 6)}]
        assert chat(port, fits, max_tokens=5)["choices"][0]["finish_reason"] == "length"  # room for one token
        assert request(port, path="/v1/nothing", body={})[0] == 404
        status, headers, _ = request(port, "GET")
        assert status == 405 and headers["Allow"] == "POST"
        assert request(port, body=b"", headers={"Content-Length": str(MAX_BODY + 1)})[0] == 413
        assert request(port, body=b"", headers={"Content-Length": "-5"})[0] == 400  # not a wait for the end
        status, headers, _ = request(port, "OPTIONS")
        assert status == 405 and headers["Content-Type"] == "application/json"
        developer = [{"role": "developer", "content": SYSTEM_TEXT},
                     {"role": "user", "content": [{"type": "text", "text": USERS[0]}]}]
        answer = chat(port, developer, max_tokens=9, model="any", unknown_field=1)
        want = reference("ism", [{"role": "system", "content": SYSTEM_TEXT}, USER[0]], 9)
    assert answer["model"] == "any" and answer["choices"][0]["message"]["content"] == want["reply"]
    assert len(log) == len(BAD_REQUESTS) + 7 and log[-1].startswith("127.0.0.1 POST /v1/chat/completions 200 prompt")


TEXT_PARTS = [{"type": "text", "text": USERS[0]}, {"type": "text", "text": "ok"}]
OPENAI_CONVERSATION = [{"role": "developer", "content": SYSTEM_TEXT}, {"role": "user", "content": TEXT_PARTS},
                       {"role": "assistant", "content": [{"type": "text", "text": "fine"}]}]
MALFORMED = {  # each refused with the same words by every reader of OpenAI messages
    "image part": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
    "part without text": [{"role": "user", "content": [{"type": "text"}]}],
    "no parts": [{"role": "user", "content": []}],
    "tool role": [{"role": "tool", "content": "hi"}],
    "not a message": [{"role": "user"}],
}


def test_one_reader_of_openai_messages_for_serve_prepare_and_script(out_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                    capsys):
    """The developer role and text parts, which a client may send, are what prepare.py and sample.py --script read
    in a file: the same conversation is accepted alike, and the same malformed ones refused with the same words."""
    from data.prepare import prepare
    from test_sample import cli
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": OPENAI_CONVERSATION}) for _ in range(2)) + "\n")
    prepare(str(tmp_path / "prepared"), input=str(chats), block_size=CONFIG.block_size)
    read = json.loads((tmp_path / "prepared" / "train.jsonl").read_text())["messages"]
    assert read == [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": USERS[0] + "\nok"},
                    {"role": "assistant", "content": "fine"}]
    code, out, err = cli([f"--out_dir={out_dir}", f"--script={chats}", "--temperature=0", "--max_new_tokens=4"], "",
                         monkeypatch, capsys)
    assert code == 0 and json.loads(out.splitlines()[0])["user"] == USERS[0] + "\nok", err
    with serving() as (port, _):
        assert chat(port, OPENAI_CONVERSATION[:2], max_tokens=4)["choices"][0]["message"]["content"]
        for name, messages in MALFORMED.items():
            status, _, payload = request(port, body={"messages": messages})
            served = json.loads(payload)["error"]["message"].removeprefix("messages: ")
            chats.write_text(json.dumps({"messages": messages + [{"role": "assistant", "content": "a"}]}) + "\n")
            code, out, err = cli([f"--out_dir={out_dir}", f"--script={chats}"], "", monkeypatch, capsys)
            assert status == 400 and code == 2 and err == f"error: {chats}:1: {served}\n", name
            with pytest.raises(DataError) as refused:
                prepare(str(tmp_path / "refused"), input=str(chats), block_size=CONFIG.block_size)
            assert str(refused.value) == f"{chats}:1: {served}", name


def test_a_conversation_too_long_for_the_context_is_refused_without_encoding_all_of_it(monkeypatch):
    """What cannot fit the context is refused after encoding at most about the context's worth of it, not all."""
    encoded = []  # the characters the tokenizer's encoder was given
    encode_ordinary = TOK.enc.encode_ordinary
    monkeypatch.setattr(TOK.enc, "encode_ordinary", lambda text: encoded.append(len(text)) or encode_ordinary(text))
    one_long = [{"role": "user", "content": "x" * (MAX_BODY // 2)}]
    many_short = [{"role": ("user", "assistant")[i % 2], "content": "y" * 100} for i in range(2001)]
    with serving() as (port, _):
        for messages in (one_long, many_short):
            encoded.clear()
            status, _, payload = request(port, body={"messages": messages})
            assert status == 400 and json.loads(payload)["error"]["code"] == "context_length_exceeded", payload
            assert sum(encoded) <= 2 * CONFIG.block_size, sum(encoded)


def test_an_internal_error_is_a_500_or_an_error_event_and_its_traceback_is_logged(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("the engine broke")

    log = []
    with serving(log=log) as (port, _):
        monkeypatch.setattr(ChatSession, "generate", broken)
        status, _, payload = request(port, body={"messages": USER})
        chunks = stream(port, USER)  # [DONE] last
        monkeypatch.undo()
        again = chat(port, USER, max_tokens=4)
    error = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}
    assert status == 500 and json.loads(payload) == error and chunks == [error]
    assert again["choices"][0]["message"]["content"] == reference("ism", USER, 4)["reply"]
    tracebacks = [entry for entry in log if entry.startswith("Traceback")]
    assert len(tracebacks) == 2 and all(t.endswith("RuntimeError: the engine broke") for t in tracebacks)
    # a request's line is logged after its answer is sent: the next request's may come first
    assert sorted(entry.split()[3:5] for entry in log if "(internal error)" in entry) == [["200", "(internal"],
                                                                                          ["500", "(internal"]]


@contextmanager
def held_in_generation():
    """While inside, the model's forward waits: a request being answered stays inside its generation. Yields the
    event set once a forward is waiting."""
    waiting, release = threading.Event(), threading.Event()

    def hold(module, args, output):
        waiting.set()
        release.wait(timeout=30)

    with forward_hook(hold):
        try:
            yield waiting
        finally:
            release.set()


def test_a_full_queue_answers_503():
    with serving(queue=0) as (port, _):
        results = []
        with held_in_generation() as waiting:
            first = threading.Thread(target=lambda: results.append(request(port, body={"messages": USER,
                                                                                        "max_tokens": 3})))
            first.start()
            assert waiting.wait(timeout=30)
            status, _, payload = request(port, body={"messages": USER})
        first.join(timeout=30)
    assert status == 503 and json.loads(payload)["error"]["type"] == "server_error"
    assert results[0][0] == 200


def raw_request(port, body):
    """A socket that has sent a chat request (the caller reads, or not, and closes it)."""
    data = json.dumps(body).encode()
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return client


def check_the_generation_stopped(log, service, port):
    """Once the server has logged the request: its answer was cut short and closed, and the next request on the
    same session equals the reference."""
    for _ in range(300):
        if log:
            break
        time.sleep(0.01)
    (session,) = service.sessions.values()
    again = chat(port, USER, max_tokens=12)
    assert "(client gone)" in log[0]
    assert session.last.stopped == "interrupted" and len(session.messages[-1]["content"]) < 50
    assert again["choices"][0]["message"]["content"] == reference("ism", USER, 12)["reply"]


def test_a_client_gone_mid_stream_stops_the_generation():
    def slow(module, args, output):
        time.sleep(0.01)  # a long answer takes a second: the server is still generating when the client goes

    log = []
    with serving(log=log) as (port, service):
        with forward_hook(slow), raw_request(port, {"messages": USER, "stream": True, "max_tokens": 100}) as client:
            received = b""
            while received.count(b"data: ") < 3:
                received += client.recv(4096)
        check_the_generation_stopped(log, service, port)


def test_a_client_gone_before_a_whole_answer_stops_the_generation():
    def never_end(module, args, output):  # and slowly: the server is still generating when the client goes
        time.sleep(0.01)
        output[0][..., TOK.end] = float("-inf")

    log = []
    with serving(log=log) as (port, service):
        with forward_hook(never_end):
            with raw_request(port, {"messages": USER, "max_tokens": 100}):
                time.sleep(0.1)  # it has started
            check_the_generation_stopped(log, service, port)


# ------------------------------------------------------------------------------------------- hostile clients

def exchange(port, data, timeout=5):
    """Send raw bytes and half-close (as `nc -N` does) -> every byte the server sends back before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while piece := client.recv(65536):
            received += piece
    return received


def test_what_a_client_sends_is_logged_escaped_never_raw():
    log = []
    with serving(log=log) as (port, _):
        assert request(port, "GET", "/%1b]0;TITLE%07%1b[2J%c2%9b")[0] == 404  # the path, decoded
        exchange(port, b"GET / HTTP/1.1\x1b[2J\r\n\r\n")  # refused by h11 itself, as is the next one
        exchange(port, b"GET /\x1b]0;TITLE\x07\x1b[2J\x9b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert len(log) == 3 and all(line.isprintable() for line in log), log
    assert "GET /\\x1b]0;TITLE\\x07\\x1b[2J\\x9b 404" in log[0]
    assert "illegal request line" in log[1] and "\\x1b[2J" in log[1]
    assert " 400 " in log[2] and "GET /\\x1b]0;TITLE\\x07\\x1b[2J\\x9b" in log[2]


def test_a_client_that_half_closes_is_taken_as_gone():
    """uvicorn takes a client that closes its sending side (`nc -N`) as gone: a closed connection reads the same
    until a write fails, and a whole answer has none before it is done. Nothing is answered; the server goes on."""
    log = []
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
    with serving(log=log) as (port, _):
        for stream_ in (False, True):
            body = json.dumps({"messages": USER, "max_tokens": 10, "stream": stream_}).encode()
            assert exchange(port, head % len(body) + body) == b""
        again = chat(port, USER, max_tokens=10)
    # each request's line is written as it ends: the streamed one may end after the next began
    assert len(log) == 3 and sum("(client gone)" in line for line in log) == 2, log
    assert again["choices"][0]["message"]["content"] == reference("ism", USER, 10)["reply"]


# ------------------------------------------------------------------------------------------------- command line

def test_serve_py_loads_a_checkpoint_and_answers(out_dir):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={out_dir}", "--port=0", "--device=cpu",
                             "--temperature=0", "--threads=1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:") and "mask ism" in line, proc.stderr.read()
        port = int(line.split()[1].rsplit(":", 1)[1])
        answer = chat(port, USER, max_tokens=6)
        logged = proc.stderr.readline()  # written once the answer is sent
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert answer["choices"][0]["message"]["content"] == reference("ism", USER, 6)["reply"]
    assert logged.startswith("127.0.0.1 POST /v1/chat/completions 200 prompt 6 cached 0 completion 6 length")


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        run(lambda: serve.main(["--queue=-1"]))
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: --queue=-1: must be at least 0\n"


def test_a_client_that_sends_nothing_or_too_little_is_dropped_after_the_timeout():
    data = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    too_long = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (
        len(data) + 10, data)
    with serving(timeout=0.2) as (port, _):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(5)]
        for client in idle:
            with client:
                assert client.recv(1) == b""  # closed by the server, its thread freed
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            client.sendall(too_long)  # and waits for the answer: the missing bytes never come
            assert client.recv(65536).startswith(b"HTTP/1.1 408 ")
        assert exchange(port, too_long).startswith(b"HTTP/1.1 400 ")  # the client said it has sent all


def trickle(port, data, sent_at_once=b"", pause=0.02, limit=5.0):
    """Send sent_at_once, then data a byte at a time, one byte every `pause` seconds (each read of the server gets
    its byte long before --timeout) -> (seconds until the server answered or closed, what it sent)."""
    begun = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as client:
        client.sendall(sent_at_once)
        for byte in data:
            if select.select([client], [], [], pause)[0]:
                break  # the server has answered or closed
            try:
                client.sendall(bytes([byte]))
            except OSError:
                break
        received = b""
        while select.select([client], [], [], limit)[0] and (piece := client.recv(65536)):
            received += piece
    return time.monotonic() - begun, received


def test_a_client_that_sends_slowly_cannot_hold_a_connection_past_the_timeout():
    body = json.dumps({"messages": USER, "max_tokens": 2, "padding": "x" * 200}).encode()  # 4 s, a byte at a time
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    with serving(timeout=0.5) as (port, _):
        seconds, answer = trickle(port, b"X-Padding: " + b"x" * 200, sent_at_once=head[:-2])  # headers never end
        assert seconds < 2 and answer == b""  # closed: a head cut short is not answered
        seconds, answer = trickle(port, body, sent_at_once=head)
        assert seconds < 2 and answer.startswith(b"HTTP/1.1 408 "), answer
        assert request(port, body=body)[0] == 200  # the same request sent at once


def test_connections_beyond_the_limit_are_refused_at_once_and_served_again_once_they_close():
    body = {"messages": USER, "max_tokens": 2}
    with serving(connections=2, timeout=10) as (port, _):
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]  # sending nothing
        begun = time.monotonic()
        status, _, payload = request(port, body=body)
        assert status == 503 and time.monotonic() - begun < 2
        assert payload == b"Service Unavailable"  # uvicorn's own refusal (limit_concurrency)
        for client in held:
            client.close()
        statuses = []
        for _ in range(100):  # uvicorn frees a connection once it has read its end (each try's too)
            statuses.append(request(port, body=body)[0])
            if statuses[-1] == 200:
                break
            time.sleep(0.05)
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}


@pytest.mark.parametrize("headers", [b"Content-Length: %d\r\nContent-Length: 500\r\n",  # which one is right?
                                     b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n",  # not chunks
                                     b"Content-Length: +%d\r\n"])  # not digits only
def test_a_body_whose_length_is_in_doubt_is_refused(headers):
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    lengths = headers % ((len(body),) * headers.count(b"%d"))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + lengths
    with serving() as (port, _):
        answer = exchange(port, head + b"\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"


def test_bodies_whose_length_is_not_in_doubt_are_read():
    """h11 reads a chunked body, and two Content-Length headers of one value as that value (RFC 9110, 8.6)."""
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    twice = b"Content-Length: %d\r\nContent-length: %d\r\n" % (len(body), len(body))
    with serving() as (port, _):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/chat/completions", iter([body[:10], body[10:]]), encode_chunked=True)
        assert connection.getresponse().status == 200
        connection.close()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" +
                           twice + b"\r\n" + body)
            answer = b"".join(iter(lambda: client.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_the_timeout_does_not_limit_how_long_an_answer_takes():
    def slow(module, args, output):
        time.sleep(0.03)

    with serving(timeout=0.1) as (port, _):
        with forward_hook(slow):  # about 0.2 s to answer
            whole = chat(port, USER, max_tokens=6)
            chunks = stream(port, USER, max_tokens=6)
    want = reference("ism", USER, 6)["reply"]
    assert whole["choices"][0]["message"]["content"] == want
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want


def refusal(response):
    """The message of a 403 in OpenAI's shape."""
    status, _, payload = response
    error = json.loads(payload)["error"]
    assert status == 403 and error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param",
                                                                                        "code"}, payload
    return error["message"]


def test_on_loopback_only_this_machine_s_names_and_the_server_s_own_pages_are_answered():
    log = []
    with forward_hook(printable_answers), serving(log=log) as (port, _):
        here = f"127.0.0.1:{port}"
        elsewhere = [{"Host": f"attacker.example:{port}"}, {"Host": "attacker.example"},  # DNS rebinding
                     {"Host": f"127.0.0.1.attacker.example:{port}"}, {"Host": "attacker\x1b[2J.example"},
                     {"Host": here, "Origin": "http://attacker.example"},  # a page of another site
                     {"Host": here, "Origin": "null"},  # a sandboxed frame, a file:// page
                     {"Host": here, "Origin": f"http://localhost:{port + 1}"}]  # another local server's page
        for headers in elsewhere:
            assert "may not use this API" in refusal(request(port, "GET", "/v1/models", headers=headers)), headers
        text_plain = {"Content-Type": "text/plain", "Origin": "http://attacker.example"}  # no CORS preflight
        assert refusal(request(port, body={"messages": USER, "max_tokens": 2}, headers=text_plain))
        for host in ["localhost", f"localhost:{port}", "LocalHost", "127.0.0.1", here, f"127.1.2.3:{port}",
                     f"[::1]:{port}", "[::1]"]:
            assert request(port, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
        for host in [here, "localhost:9000"]:  # the page itself; the page through ssh -L 9000:localhost:<port>
            own = {"Host": host, "Origin": f"http://{host}", "Content-Type": "text/plain"}
            assert request(port, body={"messages": USER, "max_tokens": 2}, headers=own)[0] == 200
    assert all(line.isprintable() for line in log) and any("Host 'attacker\\x1b[2J.example'" in line for line in log)


def test_beyond_loopback_any_host_is_answered_but_only_the_server_s_own_pages():
    with serving(host="0.0.0.0") as (port, _):
        assert request(port, "GET", "/v1/models", headers={"Host": f"gpu-box.lan:{port}"})[0] == 200
        own = {"Host": f"gpu-box.lan:{port}", "Origin": f"http://gpu-box.lan:{port}"}
        assert request(port, "GET", "/v1/models", headers=own)[0] == 200
        other = {"Host": f"gpu-box.lan:{port}", "Origin": "http://attacker.example"}
        assert "may not use this API" in refusal(request(port, "GET", "/v1/models", headers=other))


@pytest.mark.parametrize("where", ["flag", "file"])
def test_an_empty_host_is_refused_not_every_interface(where, tmp_path, capsys):
    settings = tmp_path / "serve.conf"
    settings.write_text('host = ""\n')
    with pytest.raises(SystemExit) as exit_:
        run(lambda: serve.main(["--host="] if where == "flag" else [str(settings)]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: --host is empty") and "--host=127.0.0.1" in err
    assert err.count("\n") == 1


def test_listening_beyond_loopback_is_asked_for_by_name_and_warned_of(capsys):
    with serving() as (port, _):
        assert capsys.readouterr().err == ""
        assert request(port, "GET", "/v1/models")[0] == 200
    with serving(host="0.0.0.0") as (port, _):
        warning = capsys.readouterr().err
        assert request(port, "GET", "/v1/models")[0] == 200
    assert warning == f"warning: listening on 0.0.0.0:{port}, beyond this machine: the API has no authentication " \
                      "and is reachable from other machines\n"

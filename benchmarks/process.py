"""A chat model alone in a process, driven one JSON line at a time over stdin and stdout, so that
its resident memory and time from start to ready are its own: llama.cpp on a GGUF file (this
process never imports torch), or ismGPT's chat model as sample.py loads it.

    python -m benchmarks.process llama.cpp FILE THREADS CONTEXT
    python -m benchmarks.process ismgpt START THREADS CONTEXT QUANTIZE

Once ready it prints {"resident_mib": ...}, then answers each request. llama.cpp only:
{"tokenize": text} -> ids; {"turn": ids, "answer": ids or null, "new_tokens": n} -> a turn's
timings, its prompt cache kept ({"reset": true} empties it). Both: {"peak": text or ids} -> the
peak resident MiB over one prefill of it, the cache emptied first."""
import json
import sys
import time


def memory_mib(field="VmRSS"):
    """The process's resident memory (VmRSS) or its peak (VmHWM) in MiB; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return None


def peak_mib(step):
    """The process's peak resident MiB over step() (VmHWM, reset to the current set first); None
    where /proc cannot tell. step() runs either way: a caller may need what it does."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    step()
    return memory_mib("VmHWM") if reset else None


class LlamaCpp:
    """llama-cpp-python on the file, n_threads and n_threads_batch both the given threads."""

    def __init__(self, path, threads, context):
        import llama_cpp
        import numpy
        self.llama_cpp, self.numpy = llama_cpp, numpy
        self.llm = llama_cpp.Llama(path, n_threads=int(threads), n_threads_batch=int(threads),
                                   n_ctx=int(context), verbose=False)

    def greedy(self):
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(self.numpy.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).argmax())

    def prefill(self, ids):
        """Evaluate what the cache lacks of ids (llama.cpp's own prefix matching) -> how many."""
        llm = self.llm
        n = min(llm.n_tokens, len(ids) - 1)
        same = llm.input_ids[:n] == self.numpy.array(ids[:n], dtype=llm.input_ids.dtype)
        llm.n_tokens = cached = n if same.all() else int(same.argmin())  # eval() drops the rest
        llm.eval(ids[cached:])
        return len(ids) - cached

    def turn(self, ids, answer=None, new_tokens=1):
        """Prefill, then decode one token at a time: the answer's (all but its last, as a chat
        feeds them) or new_tokens greedy ones -> time to the first token, decode tokens/s."""
        t0 = time.perf_counter()
        prefilled = self.prefill(ids)
        tokens, first = list(answer or [self.greedy()]), time.perf_counter()
        steps = len(answer) - 1 if answer else new_tokens - 1
        for step in range(steps):
            self.llm.eval(tokens[step:step + 1])
            if not answer:
                tokens.append(self.greedy())
        seconds = time.perf_counter() - first
        return {"ttft_ms": (first - t0) * 1e3, "prefill_tokens": prefilled,
                "decode_tokens_per_s": steps / seconds if steps else None}

    def serve(self, request):
        if "tokenize" in request:
            return self.llm.tokenize(request["tokenize"].encode(), add_bos=False, special=True)
        if "reset" in request:
            return self.llm.reset()
        if "peak" in request:
            self.llm.reset()
            return peak_mib(lambda: self.prefill(request["peak"]))
        return self.turn(request["turn"], request.get("answer"), request.get("new_tokens", 1))


class IsmGPT:
    """The chat model sample.py loads (--init_from, --quantize), in a ChatSession."""

    def __init__(self, start, threads, context, quantize):
        from support.compute import compute_init
        from support.starts import load_chat_model
        from engine import ChatSession
        rt = compute_init("cpu", "float32", threads=int(threads))
        chat = load_chat_model(start, block_size=int(context), rt=rt, quantize=quantize)
        self.session = ChatSession(chat.model, chat.tok, "causal")

    def serve(self, request):
        self.session.reset()
        return peak_mib(lambda: self.session.turn(request["peak"], max_new_tokens=1))


def main(kind, *args):
    peer = LlamaCpp(*args) if kind == "llama.cpp" else IsmGPT(*args)
    print(json.dumps({"resident_mib": memory_mib()}), flush=True)
    for line in sys.stdin:
        print(json.dumps(peer.serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])

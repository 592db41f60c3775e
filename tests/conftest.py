"""Settings every test shares. The tests run tiny models: on a small CPU a second torch thread only adds
synchronisation (and on a busy machine, stalls for a descheduled thread), so the tests and the scripts they start
run one thread each."""
import atexit
import os
import shutil
import tempfile

import torch

os.environ["OMP_NUM_THREADS"] = "1"  # for the scripts the tests start as subprocesses
torch.set_num_threads(1)

# GGUF conversions go to a cache of this session's own (the scripts the tests start inherit it), never the user's.
_CACHE = tempfile.mkdtemp(prefix="ismgpt-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

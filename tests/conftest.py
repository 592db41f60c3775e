"""Settings every test shares. The tests run tiny models: on a small CPU a second torch thread only adds
synchronisation (and on a busy machine, stalls for a descheduled thread), so the tests and the scripts they start
run one thread each."""
import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"  # for the scripts the tests start as subprocesses
torch.set_num_threads(1)

#!/usr/bin/env bash
# The GPU checks as one command, each step time-boxed so that the whole stays under 12 minutes:
# the CUDA tests, the cost bench at the GPT-2-small config (compiled training steps with
# FlexAttention and their MFU, chat TTFT, the compiled decode step against Hugging Face generate),
# the default-size decode (compiled vs eager), a GPT-2 fine-tuning step's memory and a short
# compiled training run. What it prints also goes to $OUT/log.txt (default out/gpu-check/log.txt).
#   bash experiments/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # step SECONDS COMMAND...: run it, time-boxed, into the log
    local limit=$1; shift
    echo -e "\n### $*" | tee -a "$out/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
}
{ nvidia-smi --query-gpu=name,memory.total --format=csv; git rev-parse --short HEAD; } 2>&1 \
    | tee "$out/log.txt"
step 180 python -m pytest -q tests/test_gpu.py tests/test_train.py -k "cuda or gpu or compiled"
step 60 python prepare.py --block_size=1024 --max_turns=32 --n_train=20000 \
    --out_dir=data/synthetic-1024
step 240 python bench.py config/gpt2_small.py --device=cuda --compile --repeats=10 \
    --chat_repeats=5 --plot="$out/ttft_gpu.png"
step 90 python bench.py --device=cuda --compile --sections=decode --repeats=10
# a GPT-2 fine-tuning micro-batch: GPT-2's vocabulary, config/finetune_gpt2.py's rows
step 60 python bench.py config/gpt2_small.py --device=cuda --sections=train --attention=flex \
    --vocab_size=50304 --batch_size=8 --repeats=5
step 120 python train.py config/gpt2_small.py --max_iters=200 --eval_interval=200 --eval_iters=4 \
    --out_dir="$out/train" --overwrite

#!/usr/bin/env bash
# The learning curve of full fine-tuning on Chit-Chat: one 400-step run per mask and seed, trained in four stages
# of 100 steps on ONE 400-step schedule (--lr_decay_iters=400; each stage resumes the last one exactly), the
# held-out answer loss by turn scored after every stage (the first 60 held-out conversations; all 205 at 400).
#
#     python prepare.py --input=chitchat --tokenizer=smollm2 --block_size=512
#     bash experiments/learning_curve.sh causal 1 2 & bash experiments/learning_curve.sh ism 1 2 &
#
# Each stage is an ordinary `python train.py ... --init_from=resume --max_iters=N`, so the checkpoints at 100, 200
# and 300 steps are the states of one uninterrupted 400-step run; a stopped script goes on where it stopped
# (a stage finished already is skipped; an interrupted one resumes from its last save, every 50 steps).
# Results: OUT/<mask>-s<seed>/eval-<steps>.json (eval.py --json), eval-400-all.json, and the start as it is
# under the mask, OUT/start-<mask>/eval-0.json; python experiments/curve_report.py tabulates and plots them.
set -euo pipefail
cd "$(dirname "$0")/.."
MASK=$1; shift
OUT=${OUT:-out/chitchat-curve}
DATA=${DATA:-data/chitchat-smollm2}
STEPS=${STEPS:-"100 200 300 400"}
LAST=${STEPS##* }
mkdir -p "$OUT/start-$MASK"
if [ ! -f "$OUT/start-$MASK/eval-0.json" ]; then
    OMP_NUM_THREADS=1 python eval.py --init_from=smollm2 --mask="$MASK" --data_dir="$DATA" --replay=false \
        --max_conversations=60 --threads=1 --json > "$OUT/start-$MASK/eval-0.tmp"
    mv "$OUT/start-$MASK/eval-0.tmp" "$OUT/start-$MASK/eval-0.json"
fi
for SEED in "$@"; do
    RUN=$OUT/$MASK-s$SEED
    mkdir -p "$RUN"
    for N in $STEPS; do
        if [ ! -f "$RUN/eval-$N.json" ]; then
            START=smollm2
            [ -f "$RUN/ckpt.pt" ] && START=resume
            OMP_NUM_THREADS=1 python train.py --init_from=$START --mask="$MASK" --seed="$SEED" --out_dir="$RUN" \
                --data_dir="$DATA" --max_iters="$N" --lr_decay_iters="$LAST" --block_size=512 --batch_size=1 \
                --eval_interval=50 --eval_iters=1 --log_interval=10 --threads=1 \
                --learning_rate=1e-4 --min_lr=1e-5 --warmup_iters=5 >> "$RUN/train.log" 2>&1
            OMP_NUM_THREADS=1 python eval.py --out_dir="$RUN" --data_dir="$DATA" --replay=false \
                --max_conversations=60 --threads=1 --json > "$RUN/eval-$N.tmp"
            mv "$RUN/eval-$N.tmp" "$RUN/eval-$N.json"
        fi
    done
    if [ ! -f "$RUN/eval-$LAST-all.json" ]; then
        OMP_NUM_THREADS=1 python eval.py --out_dir="$RUN" --data_dir="$DATA" --replay=false --threads=1 \
            --json > "$RUN/eval-$LAST-all.tmp"
        mv "$RUN/eval-$LAST-all.tmp" "$RUN/eval-$LAST-all.json"
    fi
done

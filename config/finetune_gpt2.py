# Fine-tune pretrained GPT-2 (124M; pip install transformers) on multi-turn chat with ISM, as the
# ISM and MAS papers fine-tune causal LLMs (--init_from=gpt2-medium etc. for larger ones):
#   python prepare.py --tokenizer=gpt2 --block_size=1024 --max_turns=32 --n_train=50000 \
#       --out_dir=data/synthetic-gpt2
#   python train.py config/finetune_gpt2.py && python sample.py --out_dir=out-gpt2-ism
# The other masks from the same weights: --mask=causal --out_dir=out-gpt2-causal, --mask=prefix ...
init_from = 'gpt2'
data_dir = 'data/synthetic-gpt2'
out_dir = 'out-gpt2-ism'
device = 'cuda'
compile = True
mask = 'ism'
block_size = 1024
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 2000
learning_rate = 3e-5
min_lr = 3e-6
warmup_iters = 100
weight_decay = 0.1
dropout = 0.1
eval_interval = 250
eval_iters = 20
log_interval = 10

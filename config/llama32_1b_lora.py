# Llama-3.2-1B-Instruct under ISM with the MAS paper's LoRA (rank 32, alpha 64, q_proj and v_proj)
# on one GPU. Once, where there is network:
#   huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir Llama-3.2-1B-Instruct
#   python prepare.py --input=chitchat --tokenizer=Llama-3.2-1B-Instruct --block_size=2048
#   python train.py config/llama32_1b_lora.py
#   python sample.py --out_dir=out-llama32-1b-lora    # out_dir/adapter/: the adapter, PEFT's format
init_from = 'Llama-3.2-1B-Instruct'
data_dir = 'data/chitchat-Llama-3.2-1B-Instruct'
out_dir = 'out-llama32-1b-lora'
mask = 'ism'
lora_rank = 32
lora_alpha = 64
lora_targets = 'q_proj,v_proj'
lora_dropout = 0.05
device = 'cuda'
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 1000
learning_rate = 2e-4
min_lr = 2e-5
warmup_iters = 50
weight_decay = 0.0
eval_interval = 100
eval_iters = 20

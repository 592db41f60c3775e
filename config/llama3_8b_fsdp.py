# Llama-3-8B-Instruct, every weight fine-tuned under ISM, sharded over a node's 8 GPUs (FSDP2: bf16
# compute, float32 gradient reduction) with activation checkpointing. Once, where there is network:
# huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct --local-dir Meta-Llama-3-8B-Instruct
#   python prepare.py --input=chitchat --tokenizer=Meta-Llama-3-8B-Instruct --block_size=4096
#   torchrun --standalone --nproc_per_node=8 train.py config/llama3_8b_fsdp.py
# Several nodes: torchrun's own --nnodes, --node_rank and --rdzv_endpoint, nothing else.
init_from = 'Meta-Llama-3-8B-Instruct'
data_dir = 'data/chitchat-Meta-Llama-3-8B-Instruct'
out_dir = 'out-llama3-8b-fsdp'
mask = 'ism'
fsdp = True
activation_checkpointing = True
device = 'cuda'
block_size = 4096
batch_size = 1
gradient_accumulation_steps = 4
max_iters = 500
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 20
weight_decay = 0.0
eval_interval = 100
eval_iters = 8

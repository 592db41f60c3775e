# Llama-3.2-1B-Instruct fine-tuned under ISM with the MAS paper's LoRA (rank 32, alpha 64, on q_proj and v_proj),
# on one GPU. The rank, alpha and targets are the paper's; the rows, steps and learning rate are this file's.
# Where there is network, once: huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir
# Llama-3.2-1B-Instruct; then the data in its tokens and chat format:
#   python prepare.py --input=chitchat --tokenizer=Llama-3.2-1B-Instruct --block_size=2048
#   python train.py config/llama32_1b_lora.py
#   python sample.py --out_dir=out-llama32-1b-lora         # the base named in the checkpoint, with the adapters
# out-llama32-1b-lora/adapter/ is the adapter in PEFT's format (PeftModel.from_pretrained on the same base).
# The memory plan train.py prints at the start, for these settings: see the README.
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

# Qwen2.5-7B-Instruct (ChatML, q/k/v biases) under ISM with LoRA (rank 32, alpha 64) on every
# attention and MLP projection, on one GPU. Once, where there is network: huggingface-cli download
# Qwen/Qwen2.5-7B-Instruct --local-dir Qwen2.5-7B-Instruct; then:
#   python prepare.py --input=chitchat --tokenizer=Qwen2.5-7B-Instruct --block_size=2048
#   python train.py config/qwen25_lora.py
init_from = 'Qwen2.5-7B-Instruct'
data_dir = 'data/chitchat-Qwen2.5-7B-Instruct'
out_dir = 'out-qwen25-7b-lora'
mask = 'ism'
lora_rank = 32
lora_alpha = 64
lora_targets = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
lora_dropout = 0.05
device = 'cuda'
activation_checkpointing = True
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 8
max_iters = 1000
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 50
weight_decay = 0.0
eval_interval = 100
eval_iters = 20

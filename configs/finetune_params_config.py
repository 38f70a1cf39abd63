# The homework's default experiment: LoRA r=128, alpha=512 on GPT-2 medium, Rotten Tomatoes.
#   python train.py configs/finetune_params_config.py --init_from=gpt2-medium --out_dir=gpt-lora-default
# Sized to learn the task in about two minutes on a Colab T4 (float16); a laptop CPU takes far longer.

init_from = 'gpt2-medium'
out_dir = 'gpt-lora-default'
dataset = 'cornell-movie-review-data/rotten_tomatoes'

lora_rank = 128
lora_alpha = 512.0
lora_dropout = 0.05

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 400  # 6,400 reviews: three quarters of an epoch
learning_rate = 5e-4
decay_lr = True
warmup_iters = 20

eval_interval = 100
eval_iters = 20
log_interval = 10

wandb_log = False
wandb_project = 'gpt2-lora'

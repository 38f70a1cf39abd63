# The homework's default experiment: LoRA r=128, alpha=512 on GPT-2 medium, Rotten Tomatoes.
#   python train.py configs/finetune_params_config.py --init_from=gpt2-medium --out_dir=gpt-lora-default
# Time on a Colab T4 (float16) is an estimate, not a measurement: a step is about 1.1 TFLOP (16
# reviews of 48 tokens on average, forward and backward through 355M weights), so at the 15-25
# TFLOP/s a T4 sustains at best, 400 steps train in 20-30 s; the evaluations, the 1.5 GB download and
# loading add a few minutes. Measured on a 2-core CPU: 10-16 s a step at gpt2-medium's shapes, about
# 1.5-2 hours for the run; --init_from=gpt2 does about a third of the work.

init_from = 'gpt2-medium'
out_dir = 'gpt-lora-default'
dataset = 'cornell-movie-review-data/rotten_tomatoes'
prompt_template = 'instruct'  # dataloader.py's own; or bare, question, choices, or a text with {review} (lorakit/prompts.py)
label_words = ''  # dataloader.py's own; or label 0's answer and label 1's, comma-separated: bad,good

lora_rank = 128
lora_alpha = 512.0
lora_dropout = 0.05

batch_size = 16
gradient_accumulation_steps = 1
max_iters = 400  # 6,400 reviews: three quarters of an epoch
learning_rate = 5e-4
decay_lr = True
warmup_iters = 20

eval_interval = 50  # 9 points on the loss curve (question 2.2); measured: about 12% more time than 100
eval_iters = 20
log_interval = 10

wandb_log = False
wandb_project = 'gpt2-lora'

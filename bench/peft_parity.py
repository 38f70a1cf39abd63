"""
Accuracy parity with Hugging Face PEFT: LoRA trained here against PEFT LoRA trained on the same
model, data, batches, prompt, rank, alpha, steps, optimizer and learning-rate schedule, both scored
on the same test prompts with greedy decoding and the same matching rule.

    python bench/peft_parity.py --init_from=../shared/models/gpt2-imdb-standin \
        --dataset=../shared/data/rotten_tomatoes --lora_rank=16 --lora_alpha=32 --max_iters=300

Needs `peft` (requirements-dev.txt). Prints both accuracies and writes bench/peft_parity.json.
"""

import json
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# -----------------------------------------------------------------------------
init_from = 'gpt2'
dataset = 'cornell-movie-review-data/rotten_tomatoes'
out_dir = 'bench/peft_parity'
lora_rank = 16
lora_alpha = 32.0
learning_rate = 3e-3
max_iters = 300
batch_size = 16
warmup_iters = 20
min_lr = 3e-4
loss_on = 'label'
num_samples = 0  # test reviews; 0: all
eval_batch_size = 32
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def train_peft(c, loader):
    """PEFT LoRA on transformers' GPT-2, attention c_attn and c_proj only, with train.py's recipe."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    torch.manual_seed(c.seed)
    base = GPT2LMHeadModel.from_pretrained(c.init_from, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # as train.py
    from export import PEFT_TARGETS, copy_lora_into_peft
    from model import GPT
    from train import get_lr
    config = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=0.0, fan_in_fan_out=True,
                        target_modules=PEFT_TARGETS, bias="none")
    model = get_peft_model(base, config)
    # start from the very A matrices train.py started from (same seed, same construction)
    torch.manual_seed(c.seed)
    copy_lora_into_peft(GPT.from_pretrained(c.init_from, dict(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha)), model)
    schedule = SimpleNamespace(**vars(c), decay_lr=True, lr_decay_iters=0)  # train.py's, as main() runs it
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    for it in range(c.max_iters):
        lr = get_lr(schedule, it)
        for g in opt.param_groups:
            g['lr'] = lr
        x, y = loader.get_batch(it)
        logits = model(input_ids=x).logits
        keep = y != -1
        loss = torch.nn.functional.cross_entropy(logits[keep], y[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 50 == 0:
            print(f"peft iter {it}: loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def hf_val_loss(model, val_loader, eval_iters):
    """train.py's validation loss (the same batches, token-weighted) for a transformers model."""
    total, count = 0.0, 0
    for _, (x, y) in zip(range(eval_iters), val_loader):
        keep = y != -1
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits[keep], y[keep])
        total, count = total + loss.item() * int(keep.sum()), count + int(keep.sum())
    return total / count


@torch.no_grad()
def hf_accuracy(model, sampler):
    """Greedy transformers generate on sampler's prompts, the same matching rule as generate.py."""
    from generate import parse_label
    correct = 0
    recs = list(sampler.records)
    for s in range(0, len(recs), sampler.batch_size):
        part = recs[s:s + sampler.batch_size]
        idx, mask = sampler._left_pad([sampler.prompt_ids(r['text']) for r in part])
        out = model.generate(input_ids=idx, attention_mask=mask, max_new_tokens=sampler.max_new_tokens,
                             do_sample=False, pad_token_id=sampler.enc.eot_token)
        for r, row in zip(part, out[:, idx.size(1):].tolist()):
            row = row[:row.index(sampler.enc.eot_token)] if sampler.enc.eot_token in row else row
            correct += parse_label(sampler.enc.decode(row)) == r['label']
    return correct / len(recs)


def main(argv):
    import tiktoken

    import train
    from configurator import configure
    from dataloader import CustomDataLoader, load_splits
    from generate import ModelSampler
    c = SimpleNamespace(**configure(DEFAULTS, argv))
    common = dict(dataset=c.dataset, device='cpu', num_samples=c.num_samples, batch_size=c.eval_batch_size)

    t0 = time.time()
    train.main([f'--init_from={c.init_from}', f'--dataset={c.dataset}', f'--out_dir={c.out_dir}', '--overwrite=True',
                f'--lora_rank={c.lora_rank}', f'--lora_alpha={c.lora_alpha}', '--lora_dropout=0.0',
                f'--learning_rate={c.learning_rate}', f'--max_iters={c.max_iters}', f'--batch_size={c.batch_size}',
                f'--warmup_iters={c.warmup_iters}', f'--min_lr={c.min_lr}', f'--loss_on={c.loss_on}',
                f'--eval_interval={c.max_iters}', '--eval_iters=10', '--log_interval=50', f'--seed={c.seed}',
                '--device=cpu'])
    ours_train_s = time.time() - t0
    sampler = ModelSampler(init_from='resume', out_dir=c.out_dir, **common)
    ours, _, _ = sampler.get_accuracy()
    with open(os.path.join(c.out_dir, 'metrics.jsonl')) as f:
        ours_val = [json.loads(line) for line in f][-1]['val_loss']

    data = load_splits(c.dataset)
    loader = CustomDataLoader(data['train'], tiktoken.get_encoding('gpt2'), c.batch_size, loss_on=c.loss_on,
                              seed=c.seed)  # the batches train.py used, in the same order
    t0 = time.time()
    peft_model = train_peft(c, loader)
    peft_train_s = time.time() - t0
    theirs = hf_accuracy(peft_model, sampler)
    val_loader = CustomDataLoader(data['validation'], tiktoken.get_encoding('gpt2'), c.batch_size, loss_on=c.loss_on,
                                  seed=c.seed)
    peft_val = hf_val_loss(peft_model, val_loader, 10)

    result = dict(ours_accuracy=ours, peft_accuracy=theirs, difference_points=round(100 * (ours - theirs), 2),
                  ours_val_loss=ours_val, peft_val_loss=peft_val,
                  ours_train_s=round(ours_train_s, 1), peft_train_s=round(peft_train_s, 1),
                  n_test=len(sampler.records), settings=vars(c))
    print(json.dumps(result, indent=2))
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peft_parity.json'), 'w') as f:
        json.dump(result, f, indent=2)


if __name__ == '__main__':
    main(sys.argv[1:])

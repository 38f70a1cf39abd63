"""
Homework question 2.1, measured: forward latency of a LoRA model with the update merged into W
(model.eval()), against the same model without LoRA, and with LoRA un-merged.

    python bench/merge_latency.py                       # gpt2 shapes, r=128, batch 1 x 128 tokens
    python bench/merge_latency.py --model=gpt2-medium --lora_rank=16 --batch_size=8 --device=cuda

Random weights of the named GPT-2 shape (nothing is downloaded). The three variants are timed in
turns, round after round, each going first in turn, and the median of each is reported, so a busy
machine slows all three alike.
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# -----------------------------------------------------------------------------
model = 'gpt2'  # a GPT-2 shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl
lora_rank = 128
batch_size = 1
seq_len = 128
rounds = 30
device = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


def main(argv):
    from bench.perf import device_sync
    from configurator import configure
    from model import GPT, PRETRAINED_SHAPES, GPTConfig
    from train import pick_device
    c = configure(DEFAULTS, argv)
    dev = pick_device(c['device'])
    torch.manual_seed(c['seed'])
    shape = dict(PRETRAINED_SHAPES[c['model']], block_size=max(c['seq_len'], 64))
    plain = GPT(GPTConfig(**shape)).to(dev).eval()
    lora = GPT(GPTConfig(**shape, lora_rank=c['lora_rank'], lora_alpha=2.0 * c['lora_rank'])).to(dev)
    lora.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if n.endswith('lora_B'):
                p.normal_(std=0.01)  # a trained-looking update, so merging changes W
    merged = lora.eval()
    # an un-merged copy: the same weights, kept in train mode with dropout off
    unmerged = GPT(GPTConfig(**shape, lora_rank=c['lora_rank'], lora_alpha=2.0 * c['lora_rank'])).to(dev)
    unmerged.load_state_dict(lora.state_dict())
    variants = {'no LoRA': plain, 'LoRA merged': merged, 'LoRA un-merged': unmerged}
    idx = torch.randint(0, 50257, (c['batch_size'], c['seq_len']), device=dev)
    sync = device_sync(dev)
    times = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():  # warm up
            m(idx, idx)
        names = list(variants)
        for r in range(c['rounds']):
            for name in names[r % 3:] + names[:r % 3]:  # each variant goes first in turn
                m = variants[name]
                sync()
                t0 = time.perf_counter()
                m(idx, idx)
                sync()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times['no LoRA'])
    print(f"{c['model']} shapes, LoRA r={c['lora_rank']}, batch {c['batch_size']} x {c['seq_len']} tokens, "
          f"{dev}, median of {c['rounds']} rounds")
    for name, ts in times.items():
        print(f"  {name:<15} {1000 * statistics.median(ts):8.2f} ms   {statistics.median(ts) / base:5.3f}x no LoRA")
    return {name: statistics.median(ts) / base for name, ts in times.items()}


if __name__ == '__main__':
    main(sys.argv[1:])

"""
Timing helpers the benchmarks share: waiting for a device, timing functions in turns, and the
forward latency of a LoRA model merged, un-merged and without LoRA (homework question 2.1).
"""

import statistics
import time

import torch

from lorakit.adapters import merge_lora
from model import GPT, PRETRAINED_SHAPES, GPTConfig


def device_sync(dev):
    """A function that waits for dev's queued work (a no-op on CPU), for timing."""
    return torch.cuda.synchronize if dev.startswith('cuda') else (lambda: None)


def timed_rounds(fns, rounds, sync, warmup=1, rotate=False, every=False):
    """
    Median seconds of each function, called in turns round after round (each going first in turn
    with rotate), after warmup calls each: a machine that gets busier slows them all alike. every:
    each round's seconds instead of the median.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    names, times = list(fns), {k: [] for k in fns}
    for r in range(rounds):
        for k in (names[r % len(names):] + names[:r % len(names)]) if rotate else names:
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times if every else {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def merge_latency(model, lora_rank, batch_size, seq_len, rounds, dev, seed, every=False):
    """Median forward seconds (every: each round's) of the same random GPT-2 shape without LoRA, with LoRA
    merged, and un-merged."""
    torch.manual_seed(seed)
    shape = dict(PRETRAINED_SHAPES[model], block_size=max(seq_len, 64))
    lora = dict(lora_rank=lora_rank, lora_alpha=2.0 * lora_rank)
    plain = GPT(GPTConfig(**shape)).to(dev).eval()
    unmerged = GPT(GPTConfig(**shape, **lora)).to(dev)
    unmerged.load_state_dict(plain.state_dict(), strict=False)
    for n, p in unmerged.named_parameters():
        if n.endswith('lora_B'):
            p.normal_(std=0.01)  # a trained-looking update, so merging changes W
    merged = GPT(GPTConfig(**shape, **lora)).to(dev)
    merged.load_state_dict(unmerged.state_dict())
    merge_lora(merged.eval())  # the un-merged copy stays in train mode, with dropout 0
    idx = torch.randint(0, 50257, (batch_size, seq_len), device=dev)
    variants = {'no LoRA': plain, 'LoRA merged': merged, 'LoRA un-merged': unmerged}
    return timed_rounds({k: (lambda m=m: m(idx, idx)) for k, m in variants.items()}, rounds, device_sync(dev),
                        rotate=True, every=every)

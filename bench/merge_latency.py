"""
Homework question 2.1, measured: forward latency of a LoRA model with the update merged into W
(each LoRA layer's eval()), against the same model without LoRA, and with LoRA un-merged.

    python bench/merge_latency.py                       # gpt2 shapes, r=128, batch 1 x 128 tokens
    python bench/merge_latency.py --model=gpt2-medium --lora_rank=16 --batch_size=8 --device=cuda

Random weights of the named GPT-2 shape (nothing is downloaded). The three variants are timed in
turns, round after round, each going first in turn, and the median of each is reported, so a busy
machine slows all three alike. Each ratio comes with the middle half of its per-round values:
where that range holds 1, the two are the same within this machine's noise.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configurator import check, configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)
from bench.timing import merge_latency  # noqa: E402
from lorakit.common import pick_device  # noqa: E402
from model import PRETRAINED_SHAPES  # noqa: E402

# -----------------------------------------------------------------------------
model = 'gpt2'  # a GPT-2 shape: gpt2, gpt2-medium, gpt2-large, gpt2-xl
lora_rank = 128
batch_size = 1
seq_len = 128
rounds = 30
device = 'auto'
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())


def main(argv):
    c = configure(DEFAULTS, argv)
    check([(c.model not in PRETRAINED_SHAPES, f"model must be one of {', '.join(PRETRAINED_SHAPES)}, not {c.model!r}"),
           (c.lora_rank < 1, f"lora_rank must be >= 1, not {c.lora_rank}")])
    dev = pick_device(c.device)
    t = merge_latency(c.model, c.lora_rank, c.batch_size, c.seq_len, c.rounds, dev, c.seed, every=True)
    print(f"{c.model} shapes, LoRA r={c.lora_rank}, batch {c.batch_size} x {c.seq_len} tokens, {dev}, {c.rounds} rounds: "
          f"median ms, and the ratio to no LoRA in the same round (median, and the middle half of the rounds)")
    ratios = {}
    for name, times in t.items():
        r = sorted(a / b for a, b in zip(times, t['no LoRA']))
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        ratios[name] = dict(median=q[1], low=q[0], high=q[2])
        print(f"  {name:<15} {1000 * statistics.median(times):8.2f} ms   {q[1]:5.3f}x no LoRA ({q[0]:.3f}-{q[2]:.3f})")
    merged = ratios['LoRA merged']
    if merged['low'] <= 1 <= merged['high']:
        print("  merged and no LoRA are within this machine's noise of each other")
    return ratios

if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

"""
The GPU checks in one run, on the real workload: the handout's default run (configs/
finetune_params_config.py: LoRA r=128, 400 x 16 Rotten Tomatoes reviews, evaluation every 100) on
gpt2-medium shapes with random weights, run by train.py itself in float16 with the gradient scaler
(as on a T4) and in bfloat16, each eager and compiled. For each: wall time end to end, step time,
tokens per second, MFU and the ratio of the step time to its FLOP floor, the final validation loss,
and the checkpoint's size. Then greedy generation on the GPU against the CPU, and the size and save
time of a full and of an adapter-only checkpoint of these shapes.

    python bench/gpu.py --dataset=path/to/rotten_tomatoes           # on a CUDA machine; writes bench/gpu.json
    python bench/gpu.py --variants=bfloat16 --max_iters=100         # a part

MFU counts the FLOPs the step really does (PyTorch's FlopCounterMode on training batches: a LoRA step
has no weight gradients for the frozen weights) over the chip's dense bf16/fp16 peak (peak_tflops,
or looked up by the device's name). The FLOP floor is the step's FLOPs at that peak.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)

import tiktoken  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lorakit.common import pick_device, save_atomic, write_json  # noqa: E402
from dataloader import CustomDataLoader  # noqa: E402
from lorakit.data import load_splits  # noqa: E402
from lora import mark_only_lora_as_trainable  # noqa: E402
from lorakit.adapters import lora_state_dict  # noqa: E402
from model import GPT, GPTConfig, target_positions  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 24  # the model's shape: gpt2-medium's
n_head = 16
n_embd = 1024
dataset = 'cornell-movie-review-data/rotten_tomatoes'
variants = 'float16,float16+compile,bfloat16,bfloat16+compile'  # dtype, +compile for torch.compile
max_iters = 400  # the default run's
train_args = ''  # more train.py flags for every variant
peak_tflops = 0.0  # 0: look it up by the device's name
device = 'auto'
out = 'out-bench/gpu.json'  # docs/ quotes bench/gpu.json, written with --out=bench/gpu.json
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
CONFIG = os.path.join(ROOT, 'configs', 'finetune_params_config.py')

# dense bfloat16/float16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
PEAKS = {'H200': 989.0, 'H100 PCIe': 756.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'A10': 125.0, 'T4': 65.0}


def device_peak(dev, given):
    if given:
        return given * 1e12
    if dev.startswith('cuda'):
        name = torch.cuda.get_device_name(dev)
        for key, tflops in PEAKS.items():  # the first match: 'H100 PCIe' before 'H100'
            if key in name:
                return tflops * 1e12
    return None


def random_base(c, path):
    """A random GPT-2 of the benchmark's shape saved as a Hugging Face checkpoint: LoRA runs on it
    write adapter-only checkpoints, as they do on gpt2-medium."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)).save_pretrained(path)
    return path


def flops_per_token(base, c, dev):
    """FLOPs of forward and backward per input token of the default run's step, counted on 5 batches."""
    torch.manual_seed(0)
    model = mark_only_lora_as_trainable(GPT.from_pretrained(base, dict(lora_rank=128, lora_alpha=512.0))).to(dev)
    loader = CustomDataLoader(load_splits(c.dataset)['train'], tiktoken.get_encoding('gpt2'), 16).batches
    flops = tokens = 0
    for i in range(5):
        x, y = loader.get_batch(i)
        first, index = target_positions(y)
        with FlopCounterMode(display=False) as counter:
            model(x.to(dev), y.to(dev), positions=(first, index.to(dev)))[1].backward()
        flops, tokens = flops + counter.get_total_flops(), tokens + x.numel()
    return flops / tokens


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_variant(c, base, dev, dtype, compiled, work):
    """train.py's default run in this variant: what it took and what it reached."""
    out_dir = os.path.join(work, f"{dtype}{'-compile' if compiled else ''}")
    cmd = [sys.executable, os.path.join(ROOT, 'train.py'), CONFIG, f'--init_from={base}', f'--dataset={c.dataset}',
           f'--out_dir={out_dir}', '--overwrite=True', f'--device={dev}', f'--dtype={dtype}', f'--compile={compiled}',
           f'--max_iters={c.max_iters}', *c.train_args.split()]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode:
        return dict(error=(p.stderr.strip().splitlines() or ['exit status %d' % p.returncode])[-1][:300])
    steps, evals = (read_jsonl(os.path.join(out_dir, name)) for name in ('steps.jsonl', 'metrics.jsonl'))
    steps = steps[2:] or steps  # the first log intervals hold compilation and warm-up
    return dict(wall_s=wall, step_ms=statistics.median(s['step_ms'] for s in steps),
                tokens_per_s=statistics.median(s['tokens_per_s'] for s in steps), final_val_loss=evals[-1]['val_loss'],
                checkpoint_mb=os.path.getsize(os.path.join(out_dir, 'ckpt.pt')) / 1e6)


def generation_matches_cpu(dev):
    """Greedy tokens of a small random LoRA GPT on dev (float32) against the CPU."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, lora_rank=8, lora_alpha=16)).eval()
    idx = torch.randint(0, 50257, (4, 24))
    mask = torch.ones_like(idx)
    mask[0, :5] = mask[2, :11] = 0
    on_cpu = m.generate(idx, 8, temperature=0, attention_mask=mask)
    m = m.to(dev)
    on_dev = m.generate(idx.to(dev), 8, temperature=0, attention_mask=mask.to(dev)).cpu()
    return bool(torch.equal(on_cpu, on_dev))


def checkpoint_cost(c, work):
    """Size and seconds to write a full and an adapter-only checkpoint of LoRA r=128 on these shapes."""
    torch.manual_seed(0)
    model = mark_only_lora_as_trainable(GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                                      lora_rank=128, lora_alpha=512.0)))
    opt = model.configure_optimizers(0.0, 1e-4, (0.9, 0.95), 'cpu')
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    opt.step()  # AdamW's state exists, as in a checkpoint taken during training
    out = {}
    for kind, state in (('full', model.state_dict()), ('adapter', lora_state_dict(model))):
        path = os.path.join(work, f'{kind}.pt')
        t0 = time.time()
        save_atomic({'model': state, 'optimizer': opt.state_dict()}, path)
        out[kind] = dict(mb=os.path.getsize(path) / 1e6, save_s=time.time() - t0)
        os.remove(path)
    return out


def main(argv):
    c = configure(DEFAULTS, argv)
    dev = pick_device(c.device)
    peak = device_peak(dev, c.peak_tflops)
    work = tempfile.mkdtemp()
    base = random_base(c, os.path.join(work, 'base'))
    per_token = flops_per_token(base, c, dev)
    res = dict(device=torch.cuda.get_device_name(dev) if dev.startswith('cuda') else dev, torch=torch.__version__,
               shape=dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd), max_iters=c.max_iters,
               datasheet_peak_tflops=peak and peak / 1e12, flops_per_token=per_token,
               generation_matches_cpu=generation_matches_cpu(dev), checkpoint=checkpoint_cost(c, work))
    print(json.dumps(res, indent=2), flush=True)
    for v in [v for v in c.variants.split(',') if v]:
        dtype, _, how = v.partition('+')
        r = run_variant(c, base, dev, dtype, how == 'compile', work)
        if 'error' not in r and peak:
            r['mfu'] = per_token * r['tokens_per_s'] / peak
            r['step_over_flop_floor'] = 1 / r['mfu']
        res[v] = r
        print(v, json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(c.out) or '.', exist_ok=True)
    write_json(res, c.out)
    return res


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

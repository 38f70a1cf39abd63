"""
The GPU checks in one run: LoRA training of gpt2-medium shapes (random weights) in bfloat16 and in
float16 with a gradient scaler, each with and without torch.compile, reporting tokens per second
and MFU; then greedy generation on the GPU against the CPU.

    python bench/gpu.py                                   # on a CUDA machine; writes bench/gpu.json
    python bench/gpu.py --variants=float16 --steps=5      # a part

MFU is nanoGPT's estimate: 6 N + 12 L H Q T FLOPs per token (forward and backward of every weight),
over the chip's dense bf16/fp16 peak (peak_tflops, or looked up by the device's name). A LoRA step
does less (frozen weights need no weight gradient), so the matrix-product FLOPs that PyTorch counts
in the step are reported too, with their share of a large bf16 matmul timed in the same run.
"""

import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.perf import device_sync, timed_rounds  # noqa: E402

# -----------------------------------------------------------------------------
model = 'gpt2-medium'  # a GPT-2 shape
lora_rank = 128
lora_alpha = 512.0
batch_size = 16
seq_len = 1024
steps = 20  # timed steps per variant, after warmup
warmup = 3  # untimed steps (a compiled model compiles in the first)
variants = 'bfloat16,bfloat16+compile,float16,float16+compile'
peak_tflops = 0.0  # 0: look it up by the device's name
device = 'auto'
out = os.path.join(ROOT, 'bench', 'gpu.json')
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

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


def nanogpt_flops_per_token(m, T):
    cfg = m.config
    N = m.get_num_params()
    return 6 * N + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T


def train_variant(c, dev, dtype, compiled, peak):
    from torch.utils.flop_counter import FlopCounterMode

    from lora import mark_only_lora_as_trainable
    from model import GPT, PRETRAINED_SHAPES, GPTConfig
    from train import autocast
    torch.manual_seed(0)
    raw = GPT(GPTConfig(**PRETRAINED_SHAPES[c['model']], block_size=max(1024, c['seq_len']),
                        lora_rank=c['lora_rank'], lora_alpha=c['lora_alpha']))
    raw = mark_only_lora_as_trainable(raw).to(dev).train()
    opt = raw.configure_optimizers(0.0, 1e-4, (0.9, 0.95), dev.split(':')[0])
    scaler = torch.amp.GradScaler(dev.split(':')[0], enabled=dtype == 'float16')
    m = torch.compile(raw) if compiled else raw
    x = torch.randint(0, 50257, (c['batch_size'], c['seq_len']), device=dev)
    ctx = autocast(dev, dtype)
    sync = device_sync(dev)
    losses = []

    def step():
        with ctx:
            loss = m(x, x, targets_only=True)[1]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t0 = time.perf_counter()
    for _ in range(c['warmup']):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    dt = timed_rounds({'step': step}, c['steps'], sync, warmup=0)['step']
    with FlopCounterMode(display=False) as counter:
        with ctx:
            raw(x, x, targets_only=True)[1].backward()
    raw.zero_grad(set_to_none=True)
    losses = [float(v) for v in losses]
    tokens = c['batch_size'] * c['seq_len']
    r = dict(step_ms=1000 * dt, tokens_per_s=tokens / dt, warmup_s=warmup_s, first_loss=losses[0],
             last_loss=losses[-1], all_losses_finite=all(v == v and abs(v) != float('inf') for v in losses),
             counted_flops_per_s=counter.get_total_flops() / dt)
    if dtype == 'float16':
        r['final_loss_scale'] = scaler.get_scale()
    if peak:
        r['mfu'] = nanogpt_flops_per_token(raw, c['seq_len']) * tokens / dt / peak
    if dev.startswith('cuda'):
        r['max_memory_allocated_gib'] = torch.cuda.max_memory_allocated(dev) / 2**30
        torch.cuda.reset_peak_memory_stats(dev)
    return r


def matmul_peak(dev, dtype):
    n = 8192 if dev.startswith('cuda') else 1024
    a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
    return 2 * n ** 3 / timed_rounds({'mm': lambda: a @ b}, 10, device_sync(dev))['mm']


def generation_matches_cpu(dev):
    """Greedy tokens of a small random LoRA GPT on dev (float32) against the CPU."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, lora_rank=8, lora_alpha=16)).eval()
    idx = torch.randint(0, 50257, (4, 24))
    mask = torch.ones_like(idx)
    mask[0, :5] = mask[2, :11] = 0
    on_cpu = m.generate(idx, 8, temperature=0, attention_mask=mask)
    on_dev = m.to(dev).generate(idx.to(dev), 8, temperature=0, attention_mask=mask.to(dev)).cpu()
    return bool(torch.equal(on_cpu, on_dev))


def main(argv):
    from configurator import configure
    from train import pick_device
    c = configure(DEFAULTS, argv)
    dev = pick_device(c['device'])
    peak = device_peak(dev, c['peak_tflops'])
    res = dict(device=torch.cuda.get_device_name(dev) if dev.startswith('cuda') else dev, torch=torch.__version__,
               settings={k: c[k] for k in ('model', 'lora_rank', 'batch_size', 'seq_len', 'steps')},
               datasheet_peak_tflops=peak and peak / 1e12, generation_matches_cpu=generation_matches_cpu(dev))
    if dev.startswith('cuda') and torch.cuda.get_device_capability(dev)[0] >= 8:
        res['measured_bf16_matmul_tflops'] = matmul_peak(dev, 'bfloat16') / 1e12
    print(json.dumps(res, indent=2), flush=True)
    for v in c['variants'].split(','):
        dtype, _, how = v.partition('+')
        try:
            r = train_variant(c, dev, dtype, how == 'compile', peak)
        except Exception as e:  # one variant failing (say, compile without a compiler) must not lose the rest
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        res[v] = r
        print(v, json.dumps(r), flush=True)
    with open(c['out'], 'w') as f:
        json.dump(res, f, indent=2)
    return res


if __name__ == '__main__':
    main(sys.argv[1:])

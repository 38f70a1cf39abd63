"""
Speed and memory of this repository against Hugging Face transformers + PEFT, measured side by side
in one run on the same machine, weights, batches and settings. Writes results.md and results.json
to out_dir (docs/ quotes bench/results.md, written with --out_dir=bench).

    python bench/perf.py                                  # everything, on this machine's CPU or GPU
    python bench/perf.py --only=train,eval --rounds=5     # a part, fewer rounds

1. train: a LoRA training step (forward, backward, AdamW) on GPT-2 124M shapes with random weights,
   rank 16 on the attention c_attn and c_proj, batch 16 of Rotten Tomatoes reviews, against
   GPT2LMHeadModel + PEFT; loss on all tokens, and on the label only. Both start from the same
   weights and LoRA matrices, and their first losses are checked equal before anything is timed.
   Timed in the same rounds: our step with activation checkpointing, its cost in step time.
2. eval: reviews per second of `python generate.py` (greedy, max_new_tokens=5; its own timing of the
   predictions) against transformers' generate on the same prompts, batches and weights; and of
   generate.py's score mode.
3. latency: forward latency of a merged LoRA model against the model without LoRA (question 2.1).
4. memory: peak memory of LoRA r=128 training, also with activation checkpointing, against full
   fine-tuning, gpt2-medium shapes (each in its own process: RSS on CPU,
   torch.cuda.max_memory_allocated on GPU); and per process of full fine-tuning under DDP and FSDP
   with two processes (torchrun).
5. flops: achieved FLOP/s of our training step as a share of this machine's matmul peak (measured
   here), and the share of computed tokens that are padding.
6. bf16: our training step with bfloat16 autocast against float32 (where the hardware has it).

Timings alternate between the contenders round after round and report medians, so a busy machine
slows both alike.
"""

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import check, configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)

import tiktoken  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from bench.timing import device_sync, merge_latency, timed_rounds  # noqa: E402
from lorakit.hf_checkpoint import copy_lora_into_peft, peft_target_modules  # noqa: E402
from lorakit.common import autocast, pick_device, save_atomic, write_json  # noqa: E402
from dataloader import CustomDataLoader  # noqa: E402
from lorakit.data import load_splits, stratified_subset  # noqa: E402
from lorakit.decoding import left_pad  # noqa: E402
from lorakit.prompts import own_instruction, prompt_of  # noqa: E402
from lora import mark_only_lora_as_trainable  # noqa: E402
from model import GPT, target_positions  # noqa: E402

# -----------------------------------------------------------------------------
only = 'train,eval,latency,memory,flops,bf16'
dataset = 'cornell-movie-review-data/rotten_tomatoes'
eval_model = 'gpt2'  # weights for the evaluation benchmark (real weights, so generations end naturally)
rounds = 7
batch_size = 16
eval_reviews = 256
eval_batch_size = 32
device = 'auto'
seed = 1337
memory_model = 'gpt2-medium'
out_dir = 'out-bench'  # where results.md and results.json go
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
PARTS = ('train', 'eval', 'latency', 'memory', 'flops', 'bf16')


def gpt2_small_pair(dev, rank=16, seed=1337):
    """Our LoRA GPT and a transformers + PEFT GPT-2, 124M shapes, the same random weights and LoRA A."""
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    ours = mark_only_lora_as_trainable(GPT.from_pretrained(path, dict(lora_rank=rank, lora_alpha=2.0 * rank)))
    peft = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, fan_in_fan_out=True,
                                         target_modules=peft_target_modules('attn')))
    copy_lora_into_peft(ours, peft)
    return ours.to(dev).train(), peft.to(dev).train()


def first_batch(c, dev, records, loss_on='label', bucket=32):
    """The first training batch train.py would take, on dev, and its loader."""
    loader = CustomDataLoader(records, tiktoken.get_encoding('gpt2'), c.batch_size, loss_on=loss_on, seed=c.seed,
                              bucket=bucket).batches
    x, y = (t.to(dev) for t in loader.get_batch(0))
    return x, y, loader


def bench_train(c, dev, sync, records):
    ours, peft = gpt2_small_pair(dev)
    # a copy of ours with activation checkpointing: ours and peft must take the same steps (checked below)
    recomputing = copy.deepcopy(ours).use_grad_checkpoint(True)
    opt_ours, opt_recomputing = (m.configure_optimizers(0.0, 1e-4, (0.9, 0.95), dev.split(':')[0])
                                 for m in (ours, recomputing))
    opt_peft = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                                 weight_decay=0.0)
    out = {}
    for loss_on in ('all', 'label'):
        x, y, _ = first_batch(c, dev, records, loss_on)
        keep = y != -1

        def step_ours(model=ours, opt=opt_ours):
            _, loss = model(x, y, positions=target_positions(y))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        def step_checkpointed():  # the same step, each block recomputed in the backward pass
            return step_ours(recomputing, opt_recomputing)

        def step_peft():
            # the usual transformers way: logits of every position, then the loss where a target is
            logits = peft(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits[keep], y[keep])
            loss.backward()
            opt_peft.step()
            opt_peft.zero_grad(set_to_none=True)
            return loss

        with torch.no_grad():
            a, b = ours(x, y, positions=target_positions(y))[1].item(), torch.nn.functional.cross_entropy(
                peft(input_ids=x).logits[keep], y[keep]).item()
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), f"initial losses differ: {a} vs {b}"
        t = timed_rounds({'ours': step_ours, 'peft': step_peft, 'checkpointed': step_checkpointed}, c.rounds, sync)
        tokens = int((x != 50256).sum())
        out[loss_on] = dict(initial_loss=a, tokens=tokens, ours_tokens_per_s=tokens / t['ours'],
                            peft_tokens_per_s=tokens / t['peft'], ratio=t['peft'] / t['ours'],
                            checkpointed_tokens_per_s=tokens / t['checkpointed'],
                            checkpointing_cost=t['checkpointed'] / t['ours'])
    return out


def bench_eval(c, dev):
    """
    Reviews per second of generate.py (its own timing of the predictions, model and data loaded) and
    of transformers' generate on the same prompts in the same batches, in turns round after round.
    """
    hf = GPT2LMHeadModel.from_pretrained(c.eval_model).to(dev).eval()
    test = load_splits(c.dataset, ('test',))['test']
    enc, max_new_tokens, eot = tiktoken.get_encoding('gpt2'), 5, 50256
    texts = test.select(stratified_subset(test['label'], c.eval_reviews, 1337))['text']  # generate.py's reviews
    prompts = sorted((prompt_of(own_instruction(enc)).encode(enc, t, hf.config.n_positions - max_new_tokens) for t in texts), key=len)
    out_dir = tempfile.mkdtemp()

    def ours(mode):
        subprocess.run([sys.executable, os.path.join(ROOT, 'generate.py'), f'--init_from={c.eval_model}',
                        f'--dataset={c.dataset}', f'--device={dev}', f'--num_samples={c.eval_reviews}', '--dtype=float32',
                        f'--batch_size={c.eval_batch_size}', f'--mode={mode}', f'--out_dir={out_dir}'],
                       check=True, capture_output=True)
        with open(os.path.join(out_dir, 'results.json')) as f:
            return json.load(f)['seconds']

    @torch.no_grad()
    def theirs():
        sync = device_sync(dev)
        sync()
        t0 = time.perf_counter()
        for s in range(0, len(prompts), c.eval_batch_size):
            idx, mask = left_pad(prompts[s:s + c.eval_batch_size], eot)
            hf.generate(input_ids=idx.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                        do_sample=False, pad_token_id=eot)
        sync()
        return time.perf_counter() - t0
    theirs()  # warm up
    t = {k: [] for k in ('ours', 'hf', 'score')}
    for _ in range(max(1, c.rounds // 3)):
        t['ours'].append(ours('generate'))
        t['hf'].append(theirs())
        t['score'].append(ours('score'))
    t = {k: statistics.median(v) for k, v in t.items()}
    n = len(prompts)
    return dict(reviews=n, ours_reviews_per_s=n / t['ours'], hf_reviews_per_s=n / t['hf'],
                score_reviews_per_s=n / t['score'], generate_ratio=t['hf'] / t['ours'], score_ratio=t['hf'] / t['score'])


def bench_latency(c, dev):
    t = merge_latency('gpt2', 128, 1, 128, max(30, c.rounds), dev, c.seed)
    return {name: s / t['no LoRA'] for name, s in t.items()}


MEMORY_CHILD = r'''
import json, os, resource, sys, torch
sys.path.insert(0, {root!r})
from torch.distributed.tensor import DTensor
from lora import mark_only_lora_as_trainable
from model import GPT, GPTConfig, PRETRAINED_SHAPES, target_positions
rank, dev, layout = {rank}, {dev!r}, {layout!r}
cpu = not dev.startswith('cuda')
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() if cpu else 0
local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # this process's shard
baseline = rss()  # the interpreter, torch and its libraries
if layout != 'one':  # under torchrun, the process group and device as train.py sets them up
    torch.distributed.init_process_group('gloo' if cpu else 'nccl')
    if not cpu:
        dev = f"cuda:{{os.environ['LOCAL_RANK']}}"
        torch.cuda.set_device(dev)
torch.manual_seed(0)
m = GPT(GPTConfig(**PRETRAINED_SHAPES[{model!r}], lora_rank=rank, lora_alpha=4.0 * max(rank, 1))).to(dev)
m.use_grad_checkpoint({checkpointed})
if rank:
    mark_only_lora_as_trainable(m)
if layout == 'fsdp':
    from train import shard
    shard(m)
opt = m.configure_optimizers(0.0, 1e-4, (0.9, 0.95), dev.split(':')[0])
model = torch.nn.parallel.DistributedDataParallel(m) if layout == 'ddp' else m
x = torch.randint(0, 50257, (8, 64), device=dev)
params = {{local(p).untyped_storage().data_ptr() for p in m.parameters()}}
saved = {{}}
def pack(t):  # what autograd keeps for backward, each storage once
    st = t.untyped_storage()
    if st.data_ptr() not in params:
        saved[st.data_ptr()] = st.nbytes()
    return t
for i in range(2):
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, x, positions=target_positions(x))[1]
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
weights = sum(local(p).numel() * p.element_size() for p in m.parameters())
trained = [local(p) for p in m.parameters() if p.requires_grad]
states = sum(p.numel() * p.element_size() for p in trained) + sum(  # gradients, then AdamW's moments
    local(v).numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if cpu else torch.cuda.max_memory_allocated()
print(json.dumps(dict(peak_bytes=peak, baseline_bytes=baseline, weight_bytes=weights, grad_and_adam_bytes=states,
                      saved_activation_bytes=sum(saved.values()))))
'''
# glibc's malloc keeps freed buffers for reuse once its mmap threshold has risen (to up to 32 MB);
# a fixed threshold hands every buffer of 1 MiB or more back to the system when it is freed
FIXED_MMAP = {'MALLOC_MMAP_THRESHOLD_': str(2**20)}
# name: (lora rank, activation checkpointing, layout, environment); every run a batch of 8 x 64 per process
MEMORY_RUNS = {
    'lora_r128': (128, False, 'one', {}),
    'full': (0, False, 'one', {}),
    'lora_r128_checkpointed': (128, True, 'one', {}),
    'full_ddp2': (0, False, 'ddp', {}),
    'full_fsdp2': (0, False, 'fsdp', {}),
    'full_fsdp2_checkpointed': (0, True, 'fsdp', {}),
    'full_fixed_mmap': (0, False, 'one', FIXED_MMAP),
    'lora_r128_checkpointed_fixed_mmap': (128, True, 'one', FIXED_MMAP),
    'full_fsdp2_fixed_mmap': (0, False, 'fsdp', FIXED_MMAP),
}


def bench_memory(c, dev):
    """Peak memory of each of MEMORY_RUNS in processes of its own; under DDP and FSDP two, on torchrun
    (gloo on a CPU), and the larger of their two peaks."""
    out = {}
    for name, (rank, checkpointed, layout, env) in MEMORY_RUNS.items():
        code = MEMORY_CHILD.format(root=ROOT, rank=rank, dev=dev, model=c.memory_model, checkpointed=checkpointed,
                                   layout=layout)
        with tempfile.TemporaryDirectory() as tmp:
            script = os.path.join(tmp, 'memory_step.py')
            with open(script, 'w') as f:
                f.write(code)
            launch = [] if layout == 'one' else ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
            p = subprocess.run([sys.executable, *launch, script], capture_output=True, text=True,
                               env=dict(os.environ, **env), check=True)
        processes = [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]
        out[name] = max(processes, key=lambda r: r['peak_bytes'])
    out['ratio'] = out['lora_r128']['peak_bytes'] / out['full']['peak_bytes']
    for name, (_, _, _, env) in MEMORY_RUNS.items():  # against full fine-tuning with the same allocator
        out[name]['ratio_to_full'] = out[name]['peak_bytes'] / out['full_fixed_mmap' if env else 'full']['peak_bytes']
    return out


def bench_flops(c, dev, sync, records):
    n = 2048
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    ours, _ = gpt2_small_pair(dev)
    x, y, loader = first_batch(c, dev, records)
    opt = ours.configure_optimizers(0.0, 1e-4, (0.9, 0.95), dev.split(':')[0])

    def step():
        ours(x, y, positions=target_positions(y))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # the matrix-product FLOPs the step really does, forward and backward, counted by PyTorch (the
    # attention's own products are left out: about 1% here)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    # the peak and the step in turns, so that a machine whose speed drifts affects both alike
    t = timed_rounds({'mm': lambda: a @ b, 'step': step}, c.rounds, sync)
    peak = 2 * n ** 3 / t['mm']
    return dict(matmul_peak_flops=peak, step_flops=flops, step_flops_per_s=flops / t['step'],
                share_of_peak=flops / t['step'] / peak,
                padding_share_bucketed=loader.padding_share(100),
                padding_share_unbucketed=first_batch(c, dev, records, bucket=0)[2].padding_share(100))


def bench_bf16(c, dev, sync, records):
    ours, _ = gpt2_small_pair(dev)
    x, y, _ = first_batch(c, dev, records)

    def step(dtype):
        def run():
            with autocast(dev, dtype):
                loss = ours(x, y, positions=target_positions(y))[1]
            loss.backward()
            ours.zero_grad(set_to_none=True)
        return run
    # without native bfloat16 a step takes about a minute here: fewer rounds
    t = timed_rounds({'float32': step('float32'), 'bfloat16': step('bfloat16')}, max(1, c.rounds // 3), sync)
    return dict(float32_s=t['float32'], bfloat16_s=t['bfloat16'], speedup=t['float32'] / t['bfloat16'])


def row(*cells):
    """One line of a Markdown table."""
    return '| ' + ' | '.join(cells) + ' |'


def memory_breakdown(memory):
    """The table of where each memory run's peak goes."""
    lines = ["", "Where the peak memory goes (GiB; activations: what autograd keeps for backward in one forward; "
             "the rest: transient buffers and allocator slack):", "",
             row('run', 'peak', 'process before the model', 'weights', 'gradients + AdamW', 'activations', 'rest'),
             row(*['---'] * 7)]
    for name in MEMORY_RUNS:
        r = memory[name]
        parts = [r[k] for k in ('baseline_bytes', 'weight_bytes', 'grad_and_adam_bytes', 'saved_activation_bytes')]
        lines.append(row(name, *(f"{v / 2**30:.2f}" for v in (r['peak_bytes'], *parts, r['peak_bytes'] - sum(parts)))))
    return lines


def write_results(res, c, argv, dev):
    cmd = ' '.join(['python', 'bench/perf.py', *argv])
    lines = ["# Benchmarks: this repository against transformers + PEFT", "",
             f"`{cmd}` on {dev} ({torch.get_num_threads()} threads), torch {torch.__version__}. Ratios are "
             f"this repository over the peer (higher is better for speed, lower for memory and latency).", "",
             row('benchmark', 'this repository', 'peer', 'ratio', 'target'), row(*['---'] * 5)]
    if 'train' in res:
        for k, target in (('all', '>= 1.0x'), ('label', '>= 1.5x')):
            r = res['train'][k]
            lines.append(row(f"LoRA r=16 training step, gpt2 shapes, loss on {k} tokens", f"{r['ours_tokens_per_s']:,.0f} tok/s",
                             f"{r['peft_tokens_per_s']:,.0f} tok/s (HF + PEFT)", f"{r['ratio']:.2f}x", target))
        for k in ('all', 'label'):
            r = res['train'][k]
            lines.append(row(f"... its step time with activation checkpointing, loss on {k} tokens",
                             f"{r['checkpointed_tokens_per_s']:,.0f} tok/s", f"{r['ours_tokens_per_s']:,.0f} tok/s "
                             f"(without)", f"{r['checkpointing_cost']:.2f}x the time", "-"))
    if 'eval' in res:
        r = res['eval']
        hf = f"{r['hf_reviews_per_s']:.1f} reviews/s (transformers generate)"
        lines.append(row(f"test accuracy, generate ({r['reviews']} reviews, {c.eval_model})",
                         f"{r['ours_reviews_per_s']:.1f} reviews/s", hf, f"{r['generate_ratio']:.2f}x", ">= 1.0x"))
        lines.append(row("test accuracy, score mode", f"{r['score_reviews_per_s']:.1f} reviews/s", hf,
                         f"{r['score_ratio']:.2f}x", ">= 4x"))
    if 'latency' in res:
        r = res['latency']
        for name, what, target in (('LoRA merged', 'LoRA r=128 merged (gpt2 shapes)', '<= 1.03x'),
                                   ('LoRA un-merged', 'LoRA r=128 un-merged', '-')):
            lines.append(row(f"forward latency, {what}", f"{r[name]:.3f}x", "1.000x (no LoRA)", f"{r[name]:.3f}x", target))
    if 'memory' in res:
        r = res['memory']
        lines.append(row(f"peak training memory, {c.memory_model} shapes", f"{r['lora_r128']['peak_bytes'] / 2**30:.2f} GiB (LoRA r=128)",
                         f"{r['full']['peak_bytes'] / 2**30:.2f} GiB (full fine-tuning)", f"{r['ratio']:.2f}x", "<= 0.4x"))
        for name, what, target in (
                ('lora_r128_checkpointed', '... LoRA r=128 with activation checkpointing', '<= 0.3x'),
                ('full_ddp2', 'full fine-tuning, DDP over 2 processes, per process', '-'),
                ('full_fsdp2', 'full fine-tuning, FSDP over 2 processes, per process', '<= 0.6x'),
                ('full_fsdp2_checkpointed', '... FSDP with activation checkpointing', '-'),
                ('lora_r128_checkpointed_fixed_mmap', 'LoRA r=128 checkpointed, MALLOC_MMAP_THRESHOLD_=1048576', '<= 0.3x'),
                ('full_fsdp2_fixed_mmap', 'full fine-tuning, FSDP over 2, MALLOC_MMAP_THRESHOLD_=1048576', '<= 0.6x')):
            full = 'full_fixed_mmap' if MEMORY_RUNS[name][3] else 'full'
            lines.append(row(what, f"{r[name]['peak_bytes'] / 2**30:.2f} GiB", f"{r[full]['peak_bytes'] / 2**30:.2f} GiB "
                             f"(full fine-tuning, one process)", f"{r[name]['ratio_to_full']:.2f}x", target))
    if 'flops' in res:
        r = res['flops']
        lines.append(row("achieved FLOP/s of a LoRA training step", f"{r['step_flops_per_s'] / 1e9:.1f} GFLOP/s",
                         f"{r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s (2048^2 matmul)", f"{r['share_of_peak']:.2f}", ">= 0.5"))
        lines.append(row("padding share of computed tokens", f"{r['padding_share_bucketed']:.3f} (length buckets)",
                         f"{r['padding_share_unbucketed']:.3f} (random batches)", "-", "<= 0.10"))
    if 'bf16' in res:
        r = res['bf16']
        lines.append(row("training step (fwd+bwd), bfloat16 autocast vs float32", f"{r['bfloat16_s'] * 1000:.0f} ms",
                         f"{r['float32_s'] * 1000:.0f} ms", f"{r['speedup']:.2f}x faster", "pays off"))
    if 'memory' in res:
        lines += memory_breakdown(res['memory'])
    os.makedirs(c.out_dir, exist_ok=True)
    save_atomic(('\n'.join(lines) + '\n').encode(), os.path.join(c.out_dir, 'results.md'))
    write_json(dict(command=cmd, device=dev, results=res), os.path.join(c.out_dir, 'results.json'))
    print('\n'.join(lines))


def main(argv):
    c = configure(DEFAULTS, argv)
    parts = c.only.split(',')
    check([(p not in PARTS, f"only names parts among {', '.join(PARTS)}, not {p!r}") for p in parts])
    dev = pick_device(c.device)
    sync = device_sync(dev)
    records = load_splits(c.dataset)['train']
    res = {}
    for part in parts:
        t0 = time.time()
        if part == 'train':
            res[part] = bench_train(c, dev, sync, records)
        elif part == 'eval':
            res[part] = bench_eval(c, dev)
        elif part == 'latency':
            res[part] = bench_latency(c, dev)
        elif part == 'memory':
            res[part] = bench_memory(c, dev)
        elif part == 'flops':
            res[part] = bench_flops(c, dev, sync, records)
        elif part == 'bf16':
            res[part] = bench_bf16(c, dev, sync, records)
        print(f"{part}: {time.time() - t0:.0f} s", flush=True)
    write_results(res, c, argv, dev)


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

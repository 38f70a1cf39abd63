"""
Fine-tune GPT-2 on instruction-templated Rotten Tomatoes reviews, with LoRA or in full.

    python train.py configs/finetune_params_config.py --init_from=gpt2-medium --out_dir=gpt-lora-default
    python train.py configs/finetune_params_config.py --rank=0 --lr=5e-5     # full fine-tuning
    python train.py --init_from=resume --out_dir=gpt-lora-default            # continue a run
    torchrun --standalone --nproc_per_node=2 train.py ...                    # data parallel (DDP)

With lora_rank > 0 only the LoRA matrices train; with lora_rank = 0 every parameter does.
Writes out_dir/ckpt.pt (atomically), out_dir/metrics.jsonl, out_dir/loss_curve.png and out_dir/run.json
(what was trained: base model, parameter counts, settings).
The settings below are the defaults; a config file and --key=value flags override them.
"""

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from types import SimpleNamespace

import torch

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
init_from = 'gpt2-medium'  # gpt2 .. gpt2-xl, a hub id, a local checkpoint directory, 'resume' or 'scratch'
overwrite = False  # replace another run's checkpoint in out_dir instead of refusing to
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 20  # batches per loss estimate
log_interval = 10
eval_only = False  # evaluate once and stop
always_save_checkpoint = True  # save at every evaluation, not only when validation loss improves
checkpoint = 'full'  # 'full': the whole model; 'adapter': LoRA tensors only (MBs), the base model is reloaded from init_from
# Weights & Biases
wandb_log = False
wandb_project = 'gpt2-lora'
wandb_run_name = ''  # '' names the run after rank, alpha and learning rate
# data
dataset = 'cornell-movie-review-data/rotten_tomatoes'  # hub id or local directory of split files
loss_on = 'label'  # 'label': learn the answer only; 'all': the whole text, as the handout does
batch_size = 16
gradient_accumulation_steps = 1
bucket = 32  # batch reviews of similar length, drawn from windows of this many batches (little padding); 0: random batches
block_size = 0  # longest text in tokens (reviews beyond it are shortened); 0: the model's context
# model
lora_rank = 128  # 0: full fine-tuning
lora_alpha = 512.0
lora_dropout = 0.05
dropout = 0.0
n_layer = 12  # these three only for init_from='scratch'
n_head = 12
n_embd = 768
# optimizer
learning_rate = 5e-4
max_iters = 400
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
decay_lr = True  # cosine decay to min_lr after warmup
warmup_iters = 20
lr_decay_iters = 0  # iteration where the decay ends; 0: max_iters
min_lr = 0.0  # where the decay ends; 0: learning_rate / 10
# system
device = 'auto'  # auto: cuda, else mps, else cpu; or cpu, cuda, cuda:1, mps
dtype = 'auto'  # auto: bfloat16 on GPUs of compute capability >= 8, float16 (+ gradient scaler) on older ones, else float32
compile = False  # torch.compile the model
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

from configurator import ConfigError, configure, run_cli  # noqa: E402

# Ctrl-C (or Colab's stop button) ends a run at the next step boundary, with a checkpoint
INTERRUPTED = threading.Event()


def on_sigint(signum, frame):
    INTERRUPTED.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once


def check_settings(c):
    """One clear error for a setting no run can use."""
    rules = [
        (c.lora_rank < 0, f"lora_rank must be >= 0 (0 means full fine-tuning), not {c.lora_rank}"),
        (c.lora_rank > 0 and c.lora_alpha <= 0, f"lora_alpha must be > 0 when lora_rank > 0, not {c.lora_alpha}"),
        (not 0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), not {c.lora_dropout}"),
        (not 0 <= c.dropout < 1, f"dropout must be in [0, 1), not {c.dropout}"),
        (c.batch_size < 1, f"batch_size must be >= 1, not {c.batch_size}"),
        (c.bucket < 0, f"bucket must be >= 0 (0 turns length bucketing off), not {c.bucket}"),
        (c.gradient_accumulation_steps < 1, f"gradient_accumulation_steps must be >= 1, not {c.gradient_accumulation_steps}"),
        (c.max_iters < 1 and not c.eval_only, f"max_iters must be >= 1, not {c.max_iters}"),
        (min(c.eval_interval, c.eval_iters, c.log_interval) < 1, "eval_interval, eval_iters and log_interval must be >= 1"),
        (c.learning_rate <= 0, f"learning_rate must be > 0, not {c.learning_rate}"),
        (0 < c.block_size < 8 or c.block_size < 0, f"block_size must be 0 (the model's) or >= 8, not {c.block_size}"),
        (c.loss_on not in ("label", "all"), f"loss_on must be 'label' or 'all', not {c.loss_on!r}"),
        (c.checkpoint not in ("full", "adapter"), f"checkpoint must be 'full' or 'adapter', not {c.checkpoint!r}"),
        (c.checkpoint == "adapter" and (c.lora_rank == 0 or c.init_from == "scratch") and c.init_from != "resume",
         "checkpoint='adapter' needs LoRA (lora_rank > 0) on a pretrained model (not init_from='scratch')"),
        (c.dtype not in ("auto", "float32", "bfloat16", "float16"),
         f"dtype must be auto, float32, bfloat16 or float16, not {c.dtype!r}"),
    ]
    for bad, message in rules:
        if bad:
            raise ConfigError(message)


def get_lr(c, it):
    """Learning rate at iteration it: linear warmup, then cosine decay to min_lr (if decay_lr)."""
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if not c.decay_lr:
        return c.learning_rate
    decay_iters = max(1, (c.lr_decay_iters or c.max_iters) - c.warmup_iters)
    ratio = min(1.0, (it - c.warmup_iters) / decay_iters)
    min_lr = c.min_lr or c.learning_rate / 10
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - min_lr)


def as_config_error(load, *args, **kwargs):
    """load(...), its ValueError (a missing or malformed model, checkpoint or data set) as a ConfigError."""
    try:
        return load(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def pick_device(name):
    """'auto' -> cuda, else mps, else cpu; a named device that is not there is a ConfigError."""
    if name == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        return 'mps' if torch.backends.mps.is_available() else 'cpu'
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is available here; use --device=cpu (or auto)")
    if name == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available here; use --device=cpu (or auto)")
    return name


def pick_dtype(name, device):
    if name != 'auto':
        return name
    if device.startswith('cuda'):
        # a T4 (7.5) answers is_bf16_supported() with True but only emulates bfloat16, slowly
        return 'bfloat16' if torch.cuda.get_device_capability(device)[0] >= 8 else 'float16'
    return 'float32'


def autocast(device, dtype):
    device_type = device.split(':')[0]
    if dtype == 'float32':
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=getattr(torch, dtype))


def save_atomic(obj, path, write=torch.save):
    """Write to path.tmp, flush to disk, then rename: a crash leaves the old file or the new one.
    obj is bytes, or what write(obj, file) writes (torch.save by default)."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(obj) if isinstance(obj, bytes) else write(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_losses(records, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    its = [r['iter'] for r in records]
    ax.plot(its, [r['train_loss'] for r in records], 'o-', label='train')
    ax.plot(its, [r['val_loss'] for r in records], 's-', label='validation')
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss (log scale)')
    ax.set_yscale('log')
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(path))))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_atomic(fig, path, write=lambda f, fh: f.savefig(fh, format='png', dpi=100))
    plt.close(fig)


def main(argv):
    c = SimpleNamespace(**configure(DEFAULTS, argv))
    check_settings(c)
    import tiktoken
    from dataloader import CustomDataLoader, load_splits
    from lora import LoRALinear, lora_state_dict, mark_only_lora_as_trainable
    from model import GPT, GPTConfig, load_checkpoint, parameter_summary

    # distributed data parallel when launched by torchrun
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        from torch.distributed import init_process_group
        rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        use_cuda = torch.cuda.is_available() and c.device != 'cpu'
        init_process_group(backend='nccl' if use_cuda else 'gloo')
        device = f'cuda:{local_rank}' if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = pick_device(c.device)
    master = rank == 0
    dtype = pick_dtype(c.dtype, device)
    if dtype == 'bfloat16' and device.startswith('cuda') and not torch.cuda.is_bf16_supported():
        raise ConfigError("dtype=bfloat16 but this GPU does not support it; use --dtype=float16")
    ctx = autocast(device, dtype)

    ckpt_path = os.path.join(c.out_dir, 'ckpt.pt')
    resume = c.init_from == 'resume'
    if master and not resume and os.path.exists(ckpt_path) and not c.overwrite:
        raise ConfigError(f"{ckpt_path} already holds a run's checkpoint: continue it with --init_from=resume, "
                          f"replace it with --overwrite=True, or pick another --out_dir")
    if master:
        try:
            os.makedirs(c.out_dir, exist_ok=True)
            with open(os.path.join(c.out_dir, '.write_test'), 'w'):
                pass
            os.remove(os.path.join(c.out_dir, '.write_test'))
        except OSError as e:
            raise ConfigError(f"cannot write to out_dir '{c.out_dir}': {e.strerror}; pick another --out_dir") from None

    data = as_config_error(load_splits, c.dataset)  # before the model: a bad data set fails fast

    # model: pretrained, resumed or new; then which parameters train
    torch.manual_seed(c.seed)  # the LoRA init: the same on every rank and in every run with this seed
    iter_num, best_val_loss, elapsed0 = 0, float('inf'), 0.0
    if resume:
        model, ckpt = as_config_error(load_checkpoint, ckpt_path)
        base_model = ckpt['base_model']
        iter_num, best_val_loss, elapsed0 = ckpt['iter_num'], ckpt['best_val_loss'], ckpt.get('elapsed_s', 0.0)
        for k in ('lora_rank', 'lora_alpha', 'lora_dropout', 'dropout'):
            setattr(c, k, getattr(model.config, k))  # the run's model, not this command line's defaults
        if ckpt.get('adapter_only'):
            c.checkpoint = 'adapter'
        if master:
            print(f"resuming {ckpt_path} at iteration {iter_num} (base model {base_model}, lora_rank={c.lora_rank})")
    elif c.init_from == 'scratch':
        model = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size or 1024,
                              dropout=c.dropout, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                              lora_dropout=c.lora_dropout))
        base_model = 'scratch'
    else:
        model = as_config_error(GPT.from_pretrained, c.init_from, dict(
            dropout=c.dropout, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout))
        base_model = c.init_from
    if c.block_size > model.config.block_size:
        raise ConfigError(f"block_size={c.block_size} is larger than the model's context of "
                          f"{model.config.block_size} tokens; use --block_size={model.config.block_size} or less")
    if 0 < c.block_size < model.config.block_size:
        model.crop_block_size(c.block_size)
    if c.lora_rank > 0:
        mark_only_lora_as_trainable(model)
    else:
        for p in model.parameters():
            p.requires_grad = True
    trainable, total, pct = parameter_summary(model)
    if master:
        what = f"LoRA r={c.lora_rank}, alpha={c.lora_alpha:g}" if c.lora_rank > 0 else "full fine-tuning"
        print(f"{what}: {trainable:,} trainable parameters of {total:,} ({pct:.2f}%)")
    model.to(device)

    optimizer = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device.split(':')[0])
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=(dtype == 'float16'))
    if resume:
        optimizer.load_state_dict(ckpt['optimizer'])
        if 'scaler' in ckpt and dtype == 'float16':
            scaler.load_state_dict(ckpt['scaler'])
        del ckpt
    raw_model = model
    if c.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device] if device.startswith('cuda') else None)

    enc = tiktoken.get_encoding('gpt2')
    train_loader = as_config_error(CustomDataLoader, data['train'], enc, c.batch_size, raw_model.config.block_size,
                                   c.loss_on, seed=c.seed, rank=rank, world_size=world, bucket=c.bucket)
    val_loader = as_config_error(CustomDataLoader, data['validation'], enc, c.batch_size, raw_model.config.block_size,
                                 c.loss_on, seed=c.seed, bucket=c.bucket)

    def set_dropout(on):
        # not model.eval(): merging LoRA into W and taking it out again rounds W a little every time
        for m in model.modules():
            if not isinstance(m, LoRALinear):
                m.training = on

    @torch.no_grad()
    def estimate_loss():
        out = {}
        set_dropout(False)
        for split, loader in (('train', train_loader), ('val', val_loader)):
            total, count = 0.0, 0
            for _, (x, y) in zip(range(c.eval_iters), loader):
                n = int((y != -1).sum())
                with ctx:
                    _, loss = raw_model(x.to(device), y.to(device), targets_only=True)
                total, count = total + loss.item() * n, count + n
            out[split] = total / count
        set_dropout(True)
        return out

    config = {k: getattr(c, k) for k in DEFAULTS}
    metrics_path = os.path.join(c.out_dir, 'metrics.jsonl')
    records = []
    if master:
        run_info = dict(base_model=base_model, trainable_params=trainable, total_params=total, trainable_pct=pct,
                        device=device, dtype=dtype, world_size=world, config=config)
        save_atomic(json.dumps(run_info, indent=2).encode(), os.path.join(c.out_dir, 'run.json'))
        if resume and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                records = [r for r in map(json.loads, f) if r['iter'] <= iter_num]
        with open(metrics_path, 'w') as f:  # a new run starts a new file; a resumed one keeps its past
            f.writelines(json.dumps(r) + '\n' for r in records)
    if c.wandb_log and master:
        import wandb
        name = c.wandb_run_name or (f"lora-r{c.lora_rank}-a{c.lora_alpha:g}-lr{c.learning_rate:g}" if c.lora_rank
                                    else f"full-lr{c.learning_rate:g}")
        wandb.init(project=c.wandb_project, name=name, config=config)

    def save_checkpoint(it):
        save_atomic({
            # un-merged W plus lora_A/lora_B (see lora.py), or lora_A/lora_B alone
            'model': lora_state_dict(raw_model) if c.checkpoint == 'adapter' else raw_model.state_dict(),
            'adapter_only': c.checkpoint == 'adapter',
            'model_args': asdict(raw_model.config),
            'optimizer': optimizer.state_dict(),
            **({'scaler': scaler.state_dict()} if scaler.is_enabled() else {}),
            'iter_num': it,
            'best_val_loss': best_val_loss,
            'elapsed_s': elapsed0 + time.time() - t_start,
            'base_model': base_model,
            'config': config,
        }, ckpt_path)

    params = [p for p in raw_model.parameters() if p.requires_grad]
    interrupted = False
    t_start = time.time()
    start_iter = iter_num
    saved = False
    for iter_num in range(start_iter, c.max_iters + 1):
        lr = get_lr(c, iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr
        last = iter_num == c.max_iters or c.eval_only
        if master and (last or iter_num % c.eval_interval == 0) and (iter_num > start_iter or not resume or c.eval_only):
            losses = estimate_loss()
            if not all(map(math.isfinite, losses.values())):
                raise FloatingPointError(f"the loss became non-finite before iteration {iter_num}; the last good "
                                         f"checkpoint in {c.out_dir} is kept; lower --learning_rate")
            rec = dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], lr=lr,
                       elapsed_s=round(elapsed0 + time.time() - t_start, 3))
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            records.append(rec)
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
            plot_losses(records, os.path.join(c.out_dir, 'loss_curve.png'))
            if c.wandb_log:
                wandb.log({'iter': iter_num, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})
            improved = losses['val'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val'])
            if iter_num > start_iter and not c.eval_only and (c.always_save_checkpoint or improved or (last and not saved)):
                save_checkpoint(iter_num)
                saved = True
                print(f"saved checkpoint to {ckpt_path}")
        if last:
            break

        t0 = time.time()
        # one optimizer step over gradient_accumulation_steps micro-batches on every rank; the loss
        # is normalised by the target tokens of the whole step, so the gradient is the same for any
        # split of the same examples over micro-batches and processes
        batches = [train_loader.get_batch(iter_num * c.gradient_accumulation_steps + m)
                   for m in range(c.gradient_accumulation_steps)]
        counts = [int((y != -1).sum()) for _, y in batches]
        # one all-reduce carries the step's target tokens and whether any rank was interrupted
        step_info = torch.tensor([float(sum(counts)), float(INTERRUPTED.is_set())])
        if ddp:
            torch.distributed.all_reduce(step_info)
        if step_info[1] > 0:
            interrupted = True
            break
        n_step = step_info[0].item()
        torch.manual_seed(c.seed + 1000 * rank + iter_num)  # dropout masks depend on the iteration alone
        loss_sum, n_tokens = 0.0, 0
        try:
            for m, ((x, y), n) in enumerate(zip(batches, counts)):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if ddp:
                    model.require_backward_grad_sync = m == len(batches) - 1
                with ctx:
                    loss = model(x, y, targets_only=True)[1]  # logits not kept alive through backward
                scaler.scale(loss * (n * world / n_step)).backward()
                loss_sum += loss.item() * n
                n_tokens += int((x != enc.eot_token).sum())
        except torch.cuda.OutOfMemoryError:
            raise ConfigError(f"out of GPU memory at batch_size={c.batch_size}: try --batch_size="
                              f"{max(1, c.batch_size // 2)} --gradient_accumulation_steps="
                              f"{2 * c.gradient_accumulation_steps} (the same step in smaller pieces)") from None
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip if c.grad_clip > 0 else float('inf'))
        lossf = loss_sum / max(1, sum(counts))
        # float16's scaler skips steps with inf/NaN gradients by design; anything else non-finite is divergence
        if not math.isfinite(lossf) or (not scaler.is_enabled() and not math.isfinite(grad_norm.item())):
            raise FloatingPointError(f"{'loss' if not math.isfinite(lossf) else 'gradient norm'} became non-finite "
                                     f"at iteration {iter_num}; the last good checkpoint in {c.out_dir} is kept; "
                                     f"lower --learning_rate, or use --dtype=float32")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        dt = time.time() - t0
        if master and iter_num % c.log_interval == 0:
            print(f"iter {iter_num}: loss {lossf:.4f}, grad norm {grad_norm.item():.6f}, lr {lr:.2e}, "
                  f"time {dt * 1000:.0f}ms, {n_tokens * world / dt:,.0f} tokens/s")

    if interrupted and master:
        save_checkpoint(iter_num)
        print(f"interrupted: saved checkpoint at iteration {iter_num} to {ckpt_path}; "
              f"continue with --init_from=resume --out_dir={c.out_dir}")
    if c.wandb_log and master:
        wandb.finish()
        wandb.teardown()  # a later run in this process (tests, notebooks) starts afresh
    if ddp:
        torch.distributed.destroy_process_group()
    return 130 if interrupted else 0


if __name__ == '__main__':
    signal.signal(signal.SIGINT, on_sigint)
    sys.exit(run_cli(main, sys.argv[1:], errors=(FloatingPointError,)))

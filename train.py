"""
Fine-tune GPT-2 on instruction-templated Rotten Tomatoes reviews, with LoRA or in full.

    python train.py configs/finetune_params_config.py --init_from=gpt2-medium --out_dir=gpt-lora-default
    python train.py configs/finetune_params_config.py --rank=0 --lr=1e-4 --out_dir=out-full   # full fine-tuning
    python train.py --init_from=resume --out_dir=gpt-lora-default            # continue a run as it was set up
    torchrun --standalone --nproc_per_node=2 train.py configs/finetune_params_config.py   # data parallel
    torchrun --standalone --nproc_per_node=2 train.py configs/finetune_params_config.py --fsdp=True   # sharded

With lora_rank > 0 only the LoRA matrices train; with lora_rank = 0 every parameter does. Writes to
out_dir: ckpt.pt (atomically; LoRA runs keep only the adapter by default), metrics.jsonl (one line
per evaluation), steps.jsonl (one line per log step), loss_curve.png and run.json (base model,
parameter counts, settings). The settings below are the defaults; a config file and --key=value
flags override them; with init_from=resume the run's own settings are the defaults.
"""

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from types import SimpleNamespace

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import base_fingerprint, model_from_checkpoint, read_checkpoint
from common import (append_line, as_config_error, autocast, command_line, fetch_inputs, get_lr, gpt2_encoding,
                    hold_out_dir, log_scale, pick_device, pick_dtype, read_jsonl, save_atomic, save_figure, write_json)
from configurator import ConfigError, Interrupted, Settings, check, configure, one_of, run_cli, settings_of, stop_signals
from dataloader import LOSS_ON, CustomDataLoader, Prompt, load_splits, prompt_errors
from lora import evaluating, lora_state_dict, mark_only_lora_as_trainable, parameter_summary
from model import GPT, LORA_SCALINGS, LORA_TARGETS, OVERRIDABLE, GPTConfig, target_positions

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
init_from = 'gpt2-medium'  # gpt2 .. gpt2-xl, a hub id, a local checkpoint directory, 'resume' or 'scratch'
overwrite = False  # replace another run's checkpoint in out_dir instead of refusing to
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 20  # batches per loss estimate
log_interval = 10  # iterations between printed (and steps.jsonl) training losses, each the mean since the last
eval_only = False  # evaluate once and stop
always_save_checkpoint = True  # save at every evaluation, not only when validation loss improves
checkpoint = 'auto'  # 'adapter': LoRA tensors only (MBs; the base is reloaded from init_from); 'full'; 'auto': adapter for LoRA on a pretrained model
# Weights & Biases
wandb_log = False  # log to W&B (wandb_project, wandb_run_name only take effect with it)
wandb_project = 'gpt2-lora'
wandb_run_name = ''  # '' names the run after rank, alpha and learning rate
# data
dataset = 'cornell-movie-review-data/rotten_tomatoes'  # hub id or local directory of split files
loss_on = 'label'  # 'label': learn the answer only; 'all': the whole text, as the handout does
prompt_template = 'instruct'  # instruct (the homework's), bare, question, choices, or a text with {review} (dataloader.py)
label_words = 'negative,positive'  # the answers for label 0 and 1, comma-separated: words or phrases (bad,good)
batch_size = 16
gradient_accumulation_steps = 1
bucket = 32  # batch reviews of similar length, drawn from windows of this many batches (little padding); 0: random batches
pad_multiple = 0  # pad batch lengths to a multiple of this, so torch.compile sees few shapes; 0: 32 with compile, else none
block_size = 0  # longest text in tokens (reviews beyond it are shortened); 0: the model's context
# model
lora_rank = 128  # 0: full fine-tuning
lora_alpha = 512.0
lora_dropout = 0.05
lora_targets = 'attn'  # attn: c_attn and the attention's c_proj (the handout's); qv: the query and value only (the LoRA paper's); attn_mlp: attn and the MLP
lora_scaling = 'standard'  # standard: the update is scaled by alpha / r; rslora: alpha / sqrt(r) (rank-stabilised LoRA)
lora_plus_ratio = 1.0  # LoRA+: every B learns at this multiple of the learning rate, A at the rate itself; 1: plain LoRA
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
grad_checkpoint = False  # recompute each block's activations in the backward pass: less memory, more compute
fsdp = False  # under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2), not copy them (DDP)
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
# what a resumed run may change freely; everything else makes it differ from an uninterrupted run
HARMLESS = {'out_dir', 'init_from', 'overwrite', 'max_iters', 'eval_interval', 'eval_iters', 'log_interval', 'eval_only',
            'always_save_checkpoint', 'checkpoint', 'wandb_log', 'wandb_project', 'wandb_run_name', 'device',
            'compile', 'pad_multiple', 'grad_checkpoint', 'fsdp'}
MODEL_SETTINGS = ('lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets', 'lora_scaling', 'dropout', 'n_layer', 'n_head',
                  'n_embd', 'block_size')
MACHINE_SETTINGS = ('device', 'dtype', 'compile', 'grad_checkpoint', 'fsdp')  # a resumed run takes these from its new command line

# Ctrl-C, Colab's stop button, SIGTERM (Slurm, Kubernetes, `timeout`) or SIGHUP end a run at the
# next step boundary, with a checkpoint; a second signal stops it at once
STOP = {}


def defer_stop(signum, frame):
    if STOP:
        raise Interrupted(signum, "stopped at once; the last complete checkpoint is kept")
    STOP['signum'] = signum


class stops_deferred:
    """While the block runs, a stop signal is noted (STOP) rather than raised; the handlers before it
    come back afterwards. Only the main thread can set handlers: elsewhere signals stay as they are."""

    def __enter__(self):
        STOP.clear()
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {sig: signal.signal(sig, defer_stop) for sig in stop_signals()}

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def check_settings(c):
    """One clear error for a setting no run can use."""
    check([
        (c.lora_rank < 0, f"lora_rank must be >= 0 (0 means full fine-tuning), not {c.lora_rank}"),
        (c.lora_rank > 0 and c.lora_alpha <= 0, f"lora_alpha must be > 0 when lora_rank > 0, not {c.lora_alpha}"),
        (not 0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), not {c.lora_dropout}"),
        one_of('lora_targets', c.lora_targets, LORA_TARGETS),
        one_of('lora_scaling', c.lora_scaling, LORA_SCALINGS),
        (c.lora_plus_ratio <= 0, f"lora_plus_ratio must be > 0 (1 is plain LoRA), not {c.lora_plus_ratio}"),
        (not 0 <= c.dropout < 1, f"dropout must be in [0, 1), not {c.dropout}"),
        (c.batch_size < 1, f"batch_size must be >= 1, not {c.batch_size}"),
        (c.bucket < 0, f"bucket must be >= 0 (0 turns length bucketing off), not {c.bucket}"),
        (c.pad_multiple < 0, f"pad_multiple must be >= 0 (0: 32 with compile, else none), not {c.pad_multiple}"),
        (c.gradient_accumulation_steps < 1,
         f"gradient_accumulation_steps must be >= 1, not {c.gradient_accumulation_steps}"),
        (c.max_iters < 1 and not c.eval_only, f"max_iters must be >= 1, not {c.max_iters}"),
        (min(c.eval_interval, c.eval_iters, c.log_interval) < 1, "eval_interval, eval_iters and log_interval must be >= 1"),
        (c.learning_rate <= 0, f"learning_rate must be > 0, not {c.learning_rate}"),
        (not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1), f"beta1 and beta2 must be in [0, 1), not {c.beta1}, {c.beta2}"),
        (c.weight_decay < 0, f"weight_decay must be >= 0, not {c.weight_decay}"),
        (c.grad_clip < 0, f"grad_clip must be >= 0 (0 disables clipping), not {c.grad_clip}"),
        (c.warmup_iters < 0, f"warmup_iters must be >= 0, not {c.warmup_iters}"),
        (c.lr_decay_iters < 0, f"lr_decay_iters must be >= 0 (0: max_iters), not {c.lr_decay_iters}"),
        (c.min_lr < 0, f"min_lr must be >= 0 (0: learning_rate / 10), not {c.min_lr}"),
        (min(c.n_layer, c.n_head, c.n_embd) < 1 or c.n_embd % c.n_head,
         f"n_layer, n_head and n_embd must be >= 1 with n_embd divisible by n_head, not {c.n_layer}, {c.n_head}, "
         f"{c.n_embd}"),
        (0 < c.block_size < 8 or c.block_size < 0, f"block_size must be 0 (the model's) or >= 8, not {c.block_size}"),
        one_of('loss_on', c.loss_on, LOSS_ON),
        *prompt_errors(c.prompt_template, c.label_words),
        one_of('checkpoint', c.checkpoint, ('auto', 'full', 'adapter')),
        (c.checkpoint == "adapter" and (c.lora_rank == 0 or c.init_from == "scratch") and c.init_from != "resume",
         "checkpoint='adapter' needs LoRA (lora_rank > 0) on a pretrained model (not init_from='scratch')"),
        (c.fsdp and 'RANK' not in os.environ, "fsdp=True shards the model over torchrun's processes: start it with "
                                              "torchrun --standalone --nproc_per_node=2 train.py ..., or drop --fsdp"),
    ])


def read_settings(argv):
    """
    (settings, checkpoint or None), the settings checked and read-only from here on. For
    init_from=resume the run's saved settings are the defaults and the command line overrides them: a
    change to the model is an error, and a change that makes the run differ from an uninterrupted one
    is said in one line.
    """
    c = configure(DEFAULTS, argv)
    check_settings(c)
    if c.init_from != 'resume':
        return resolved(c, c.init_from), None
    ckpt = as_config_error(read_checkpoint, ckpt_path(c.out_dir))
    # an imported adapter's checkpoint has no settings of its own, only its model's
    saved = {k: ckpt['model_args'][k] for k in OVERRIDABLE if k in ckpt['model_args']}
    saved.update((k, v) for k, v in ckpt.get('config', {}).items() if k in DEFAULTS and k not in MACHINE_SETTINGS)
    c = configure(Settings(DEFAULTS, **{**saved, 'init_from': 'resume', 'out_dir': c.out_dir}), argv)
    check_settings(c)
    changed = [k for k in saved if c[k] != saved[k] and k not in HARMLESS]
    schedule_follows_max_iters = c.decay_lr and not c.lr_decay_iters and c.max_iters != saved.get('max_iters')
    for k in changed:
        if k in MODEL_SETTINGS:
            raise ConfigError(f"{k}={c[k]} differs from the resumed run's {saved[k]}: a resumed run keeps its model; "
                              f"drop --{k}, or start a new run in another --out_dir")
    notes = [f"{k} {saved[k]} -> {c[k]}" for k in changed if k != 'batch_size']
    # a step's examples are batch_size from each process: the same step on other processes is the same run
    world = int(os.environ.get('WORLD_SIZE', 1))
    saved_world = ckpt.get('world_size', world)
    if 'batch_size' in saved and c.batch_size * world != saved['batch_size'] * saved_world:
        notes.append(f"batch_size {saved['batch_size']} -> {c.batch_size}" if world == saved_world else
                     f"a step's batch {saved['batch_size']} x {saved_world} processes -> {c.batch_size} x {world}")
    if schedule_follows_max_iters:
        notes.append(f"max_iters {saved['max_iters']} -> {c.max_iters} moves the end of the learning-rate decay")
    if notes and int(os.environ.get('RANK', 0)) == 0:
        print(f"note: resuming with {'; '.join(notes)}: the run will differ from one that was never interrupted")
    return resolved(c, ckpt.get('base_model')), ckpt


def resolved(c, base_model):
    """The settings frozen, checkpoint='auto' made what it stands for: an adapter for LoRA on a pretrained model."""
    if c.checkpoint == 'auto':
        c.checkpoint = 'adapter' if c.lora_rank > 0 and base_model != 'scratch' else 'full'
    return c.frozen()


def ckpt_path(out_dir):
    return os.path.join(out_dir, 'ckpt.pt')


def setup_runtime(c):
    """Device, precision and, under torchrun, the process group (DDP, or FSDP with fsdp=True)."""
    rt = SimpleNamespace(distributed='RANK' in os.environ, fsdp=c.fsdp, rank=0, world=1)
    if rt.distributed:
        rt.rank, local_rank, rt.world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        use_cuda = torch.cuda.is_available() and c.device != 'cpu'
        torch.distributed.init_process_group(backend='nccl' if use_cuda else 'gloo')
        rt.device = f'cuda:{local_rank}' if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(rt.device)
    else:
        rt.device = pick_device(c.device)
    rt.master = rt.rank == 0
    rt.evaluates = rt.master or rt.fsdp  # and saves: under FSDP every process, each holding a shard; rank 0 writes
    rt.dtype = pick_dtype(c.dtype, rt.device)
    rt.ctx = autocast(rt.device, rt.dtype)
    return rt


def check_out_dir(c, master):
    """Refuse to replace another run's checkpoint (writing waits for hold_out_dir)."""
    if not master:
        return
    if c.init_from != 'resume' and os.path.exists(ckpt_path(c.out_dir)) and not c.overwrite:
        raise ConfigError(f"{ckpt_path(c.out_dir)} already holds a run's checkpoint: continue it with --init_from=resume, "
                          f"replace it with --overwrite=True, or pick another --out_dir")
    if c.wandb_run_name and not c.wandb_log:
        print(f"warning: wandb_run_name={c.wandb_run_name!r} without wandb_log=True: nothing is logged to "
              f"Weights & Biases; add --wandb_log=True")


def build_model(c, ckpt):
    """The model to train (pretrained, resumed or new), its base model's name, and which parameters train."""
    torch.manual_seed(c.seed)  # the LoRA init: the same on every rank and in every run with this seed
    lora = {k: c[k] for k in OVERRIDABLE}  # dropout and the LoRA settings
    if ckpt is not None:
        model = as_config_error(model_from_checkpoint, ckpt, ckpt_path(c.out_dir))
        base_model = ckpt['base_model']
    elif c.init_from == 'scratch':
        model = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size or 1024, **lora))
        base_model = 'scratch'
    else:
        model = as_config_error(GPT.from_pretrained, c.init_from, lora)
        # a local base is reloaded from wherever the run is continued or evaluated
        base_model = os.path.abspath(c.init_from) if os.path.isdir(c.init_from) else c.init_from
    if c.block_size > model.config.block_size:
        raise ConfigError(f"block_size={c.block_size} is larger than the model's context of "
                          f"{model.config.block_size} tokens; use --block_size={model.config.block_size} or less")
    if 0 < c.block_size < model.config.block_size:
        model.crop_block_size(c.block_size)
    if c.lora_rank > 0:
        mark_only_lora_as_trainable(model)
    else:
        model.requires_grad_(True)
    return model, base_model


def store_frozen_weights_in(model, dtype):
    """
    Keep the frozen weights of the linear layers in dtype (the autocast one): half the memory, and no
    float32-to-half cast of them in every step. The LoRA matrices, their gradients and AdamW's state
    stay float32; so do embeddings and LayerNorms, which feed the float32 residual stream.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and name != 'lm_head':
            module.weight.data = module.weight.data.to(getattr(torch, dtype))


def save_checkpoint(path, raw_model, optimizer, scaler, c, progress, rt):
    """
    ckpt.pt, atomically: un-merged W plus lora_A/lora_B (see lora.py), or lora_A/lora_B alone. Weights
    that are not all finite are never saved: a bad update must not replace the last good checkpoint.
    Under FSDP every process calls it: the shards are gathered, and rank 0 writes the checkpoint one
    process would have written, so it resumes with or without FSDP, on any number of processes.
    """
    bad = non_finite_parameter(raw_model, rt)
    if bad is not None:
        raise FloatingPointError(f"the weights became non-finite ({bad}) by iteration {progress.iter_num}; "
                                 f"{kept(c.out_dir)}; lower --learning_rate, or use --dtype=float32")
    adapter = c.checkpoint == 'adapter'
    # keep_vars: the head's weight is wte's, one object, gathered and saved once
    model_state = whole(lora_state_dict(raw_model) if adapter else raw_model.state_dict(keep_vars=rt.fsdp), rt.master)
    optimizer_state = whole(optimizer.state_dict(), rt.master)
    if not rt.master:
        return
    save_atomic({
        'model': model_state,
        'adapter_only': adapter,
        'model_args': asdict(raw_model.config),
        'optimizer': optimizer_state,
        **({'scaler': scaler.state_dict()} if scaler.is_enabled() else {}),
        'iter_num': progress.iter_num,
        'best_val_loss': progress.best_val_loss,
        'elapsed_s': progress.elapsed(),
        'base_model': progress.base_model,
        **({'base_fingerprint': progress.base_fingerprint} if adapter else {}),
        'world_size': rt.world,
        'config': dict(c),
    }, path)


def non_finite_parameter(raw_model, rt):
    """The name of a trained parameter that is not all finite, or None. Under FSDP each process checks
    its shards, and every process learns the answer."""
    trained = [(n, p.to_local() if isinstance(p, DTensor) else p) for n, p in raw_model.named_parameters()
               if p.requires_grad]
    bad = torch.stack([~torch.isfinite(p.detach()).all() for _, p in trained]).int()
    if rt.fsdp:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return next((n for (n, _), b in zip(trained, bad.tolist()) if b), None)


def whole(state, keep):
    """
    A state_dict (nested) as one process holds it: FSDP's shards (DTensors) gathered into whole tensors
    on the CPU, kept where keep (rank 0) and dropped elsewhere; every process must call it. A tensor
    that appears twice is gathered once and stays one tensor. Without FSDP: state itself.
    """
    seen = {}

    def gathered(v):
        if isinstance(v, dict):
            return {k: gathered(x) for k, x in v.items()}
        if not isinstance(v, DTensor):
            return v
        if id(v) not in seen:
            full = v.full_tensor().detach()
            seen[id(v)] = full.cpu() if keep else None
        return seen[id(v)]
    return gathered(state)


def optimized(optimizer):
    """The optimizer's parameters in the order its state_dict numbers them."""
    return [p for group in optimizer.param_groups for p in group['params']]


def sharded_like(optimizer, saved):
    """A saved optimizer state_dict (one process's) with every tensor cut to this process's shard of its
    parameter, to load into an optimizer of FSDP's sharded parameters. Without FSDP: saved itself."""
    params = optimized(optimizer)

    def cut(p, v):
        if isinstance(p, DTensor) and v.shape == p.shape:  # not the step count
            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        return v
    return {**saved, 'state': {i: {k: cut(params[i], v) for k, v in s.items()} for i, s in saved['state'].items()}}


class Progress:
    """Where the run stands: iteration, best validation loss, seconds trained (over resumes), its base model."""

    def __init__(self, base_model, fingerprint, ckpt=None):
        self.iter_num, self.best_val_loss, self.elapsed0 = 0, float('inf'), 0.0
        self.base_model, self.base_fingerprint = base_model, fingerprint
        if ckpt is not None:
            self.iter_num, self.best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
            self.elapsed0 = ckpt.get('elapsed_s', 0.0)
        self.t_start = time.time()

    def elapsed(self):
        return self.elapsed0 + time.time() - self.t_start


def kept(out_dir):
    """What a run that stops on a fault leaves: its last good checkpoint, or none."""
    path = ckpt_path(out_dir)
    return f"the last good checkpoint {path} is kept" if os.path.exists(path) else "no checkpoint was saved yet"


def read_logs(c, iter_num):
    """The evaluations and log steps a resumed run keeps (those up to its checkpoint); a new run keeps none.
    Lines that cannot be read (torn by a kill, garbled) are dropped, with one line saying so."""
    if c.init_from != 'resume':
        return [], []
    logs = []
    for name in ('metrics.jsonl', 'steps.jsonl'):
        records, dropped = read_jsonl(os.path.join(c.out_dir, name))
        if dropped:
            print(f"note: dropped {dropped} unreadable line{'s' * (dropped > 1)} of {os.path.join(c.out_dir, name)}")
        logs.append([r for r in records if r['iter'] <= iter_num])
    return logs


class RunLog:
    """metrics.jsonl (evaluations), steps.jsonl (log steps), run.json, loss_curve.png and W&B, on rank 0."""

    def __init__(self, c, progress, info, logs):
        self.c, self.progress = c, progress
        self.metrics_path = os.path.join(c.out_dir, 'metrics.jsonl')
        self.steps_path = os.path.join(c.out_dir, 'steps.jsonl')
        write_json(info, os.path.join(c.out_dir, 'run.json'))
        # a new run starts new files; a resumed one keeps its past up to its checkpoint
        self.evals, self.steps = logs
        for records, path in ((self.evals, self.metrics_path), (self.steps, self.steps_path)):
            save_atomic(''.join(json.dumps(r) + '\n' for r in records).encode(), path)
        self.wandb = None
        if c.wandb_log:
            import wandb
            name = c.wandb_run_name or (f"lora-r{c.lora_rank}-a{c.lora_alpha:g}-lr{c.learning_rate:g}" if c.lora_rank
                                        else f"full-lr{c.learning_rate:g}")
            self.wandb = wandb
            wandb.init(project=c.wandb_project, name=name, config=dict(c))

    def _append(self, records, path, rec):
        append_line(path, rec)
        records.append(rec)

    def evaluation(self, it, losses, lr):
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self._append(self.evals, self.metrics_path, dict(iter=it, train_loss=losses['train'], val_loss=losses['val'],
                                                         lr=lr, elapsed_s=round(self.progress.elapsed(), 3)))
        plot_losses(self.steps, self.evals, os.path.join(self.c.out_dir, 'loss_curve.png'), run_title(self.c))
        if self.wandb:
            self.wandb.log({'iter': it, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})

    def step(self, it, loss, grad_norm, lr, ms, tokens_per_s):
        print(f"iter {it}: loss {loss:.4f}, grad norm {grad_norm:.6f}, lr {lr:.2e}, time {ms:.0f}ms, "
              f"{tokens_per_s:,.0f} tokens/s")
        self._append(self.steps, self.steps_path, dict(iter=it, loss=loss, grad_norm=grad_norm, lr=lr,
                                                       step_ms=round(ms, 2), tokens_per_s=round(tokens_per_s)))
        if self.wandb:
            self.wandb.log({'iter': it, 'train/step_loss': loss, 'lr': lr})

    def close(self):
        if self.wandb:
            self.wandb.finish()
            self.wandb.teardown()  # a later run in this process (tests, notebooks) starts afresh


def method(c):
    return f"LoRA r={c.lora_rank}, alpha={c.lora_alpha:g}" if c.lora_rank else "full fine-tuning"


def run_title(c):
    return f"{method(c)}, lr {c.learning_rate:g}"


def loss_figure(steps, evals, title):
    """
    Training loss at every log step as a line, validation loss as markers: the whole run on a log
    scale, and beside it the run after its first drop (from the second evaluation on) on a linear
    scale, where runs differ.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    start = evals[1]['iter'] if len(evals) > 1 else 0
    for ax, first in zip(axes, (0, start)):
        later = [r for r in steps if r['iter'] >= first]
        if later:
            ax.plot([r['iter'] for r in later], [r['loss'] for r in later], '-', lw=1.2, color='tab:blue',
                    label='training (mean since the previous log step)')
        later = [r for r in evals if r['iter'] >= first]
        ax.plot([r['iter'] for r in later], [r['val_loss'] for r in later], 'o-', ms=5, lw=0.8, color='tab:orange',
                mec='black', mew=0.6, label='validation', zorder=3)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3, which='both')
    log_scale(axes[0])
    axes[0].set_ylabel('loss per target token')
    axes[0].set_title('the whole run (log scale)')
    axes[1].set_title(f'from iteration {start} (linear scale)')
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_losses(steps, evals, path, title):
    save_figure(loss_figure(steps, evals, title), path)


def label_positions(y, c, device, compiled=False):
    """
    Where a batch's targets are, for the model's label_loss (see model.py), found on the host before the
    batch moves; or None for the plain loss of forward, which a compiled model uses when every token is
    a target (one shape per length).
    """
    if compiled and c.loss_on == 'all':
        return None
    first, index = target_positions(y, trim=not compiled)  # compiled: no shape per first column
    return first, index.to(device, non_blocking=True)


@torch.no_grad()
def estimate_loss(model, loaders, c, rt):
    """Mean loss per target token over eval_iters batches of each split, dropout off, LoRA un-merged."""
    out = {}
    with evaluating(model):
        for split, loader in loaders.items():
            total, count = torch.zeros((), device=rt.device), 0
            for _, (x, y) in zip(range(c.eval_iters), loader):
                positions = label_positions(y, c, rt.device)
                with rt.ctx:
                    _, loss = model(x.to(rt.device), y.to(rt.device), positions=positions)
                total += loss.float() * len(positions[1])
                count += len(positions[1])
            out[split] = total.item() / count
    return out


@dataclass
class Trainer:
    """A run as it trains. The loop, train(), calls its methods: set_lr, evaluate, step, log_step, stop."""
    c: Settings
    rt: SimpleNamespace  # device, dtype, autocast context, ranks (setup_runtime)
    raw_model: GPT
    model: torch.nn.Module  # raw_model as it trains: compiled, under DDP (FSDP shards raw_model itself)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: CustomDataLoader
    val_loader: CustomDataLoader = None
    progress: 'Progress' = None
    log: 'RunLog' = None  # rank 0's; None elsewhere
    saved: bool = False  # a checkpoint was saved in this run

    def __post_init__(self):
        self.start = self.progress.iter_num if self.progress else 0

    def set_lr(self, it):
        lr = get_lr(self.c, it)
        for group in self.optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']  # LoRA+: B's groups learn faster
        return lr

    def step(self, it):
        """
        One optimizer step over gradient_accumulation_steps micro-batches, with no host-device sync:
        (the summed loss and target count as a device tensor, the tokens computed, the gradient norm).
        The loss is normalised by the target tokens of the whole step (n_step, every rank's), so the
        gradient is the same for any split of the same examples over micro-batches and processes.
        """
        c, rt, model = self.c, self.rt, self.model
        steps = range(it * c.gradient_accumulation_steps, (it + 1) * c.gradient_accumulation_steps)
        batches = [self.train_loader.get_batch(i) for i in steps]
        n_step = sum(map(self.train_loader.global_targets, steps))
        sums = torch.zeros(2, device=rt.device)
        torch.manual_seed(c.seed + 1000 * rt.rank + it)  # dropout masks depend on the iteration alone
        try:
            for m, (x, y) in enumerate(batches):
                n = int((y != -1).sum())
                positions = label_positions(y, c, rt.device, compiled=c.compile)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                if rt.distributed and not rt.fsdp:
                    model.require_backward_grad_sync = m == len(batches) - 1
                with rt.ctx:
                    loss = model(x, y, positions=positions)[1]  # logits not kept alive through backward
                self.scaler.scale(loss * (n * rt.world / n_step)).backward()
                sums[0] += loss.detach().float() * n
                sums[1] += n
        except torch.cuda.OutOfMemoryError:
            raise ConfigError(f"out of GPU memory at batch_size={c.batch_size}: try --batch_size="
                              f"{max(1, c.batch_size // 2)} --gradient_accumulation_steps="
                              f"{2 * c.gradient_accumulation_steps} (the same step in smaller pieces)") from None
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(optimized(self.optimizer),
                                                   c.grad_clip if c.grad_clip > 0 else float('inf'))
        self.scaler.step(self.optimizer)  # float16: a step whose gradients overflowed is skipped, by design
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int((x != self.train_loader.tokenizer.eot_token).sum()) for x, _ in batches)
        return sums, tokens, grad_norm

    def evaluate(self, it, lr, last):
        """Estimate the losses, log them, save a checkpoint if it is due; the seconds it took."""
        c, progress, t0 = self.c, self.progress, time.time()
        losses = estimate_loss(self.raw_model, {'train': self.train_loader, 'val': self.val_loader}, c, self.rt)
        if not all(map(math.isfinite, losses.values())):
            raise FloatingPointError(f"the loss became non-finite before iteration {it}; {kept(c.out_dir)}; "
                                     f"lower --learning_rate")
        if self.log:
            self.log.evaluation(it, losses, lr)
        improved = losses['val'] < progress.best_val_loss
        progress.best_val_loss = min(progress.best_val_loss, losses['val'])
        trained = it > self.start and not c.eval_only
        if trained and (c.always_save_checkpoint or improved or (last and not self.saved)):
            self.save()
            if self.rt.master:
                print(f"saved checkpoint to {ckpt_path(c.out_dir)}")
        return time.time() - t0

    def save(self):
        save_checkpoint(ckpt_path(self.c.out_dir), self.raw_model, self.optimizer, self.scaler, self.c, self.progress,
                        self.rt)
        self.saved = True

    def log_step(self, it, sums, grad_norm, lr, step_s, tokens_per_s):
        """Print and log the mean loss since the last log step (every process's examples); a FloatingPointError
        on every process if it is not finite."""
        if self.rt.distributed:
            torch.distributed.all_reduce(sums)
        loss = check_finite(sums, it, self.c, None if self.scaler.is_enabled() else grad_norm)
        if self.rt.master:
            self.log.step(it, loss, grad_norm.item(), lr, 1000 * step_s, tokens_per_s * self.rt.world)

    def stop_requested(self, it):
        """The number of the stop signal received, or 0; under torchrun every rank learns it at the same log step."""
        if not self.rt.distributed:
            return STOP.get('signum', 0)
        if it % self.c.log_interval:
            return 0
        flag = torch.tensor([STOP.get('signum', 0)], device=self.rt.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def stop(self, it, signum, sums):
        """A stop signal: the weights saved as they are at this step boundary, unless they went bad."""
        c = self.c
        check_finite(sums, it, c)
        if self.rt.evaluates:
            self.save()
        if self.rt.master:
            plot_losses(self.log.steps, self.log.evals, os.path.join(c.out_dir, 'loss_curve.png'), run_title(c))
            print(f"interrupted ({signal.Signals(signum).name}): saved checkpoint at iteration {it} to "
                  f"{ckpt_path(c.out_dir)}; continue with --init_from=resume --out_dir={c.out_dir}")


def prepare_training(c, rt, raw_model, ckpt):
    """
    The model on its device, as it trains (sharded; compiled; under DDP), its optimizer and float16's
    gradient scaler. Under FSDP the optimizer is built over the shards, so its state is sharded too.
    """
    raw_model.to(rt.device).use_grad_checkpoint(c.grad_checkpoint)
    if c.lora_rank > 0 and rt.device.startswith('cuda') and rt.dtype != 'float32':
        store_frozen_weights_in(raw_model, rt.dtype)
    if rt.fsdp:
        shard(raw_model)
    device_type = rt.device.split(':')[0]
    optimizer = raw_model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device_type,
                                               c.lora_plus_ratio)
    # a shard's overflow must skip the step on every process: FSDP's scaler agrees on it across them
    scaler = (ShardedGradScaler if rt.fsdp else torch.amp.GradScaler)(device_type, enabled=rt.dtype == 'float16')
    if ckpt is not None:
        scales = [g['lr_scale'] for g in optimizer.param_groups]  # this command line's LoRA+ ratio
        optimizer.load_state_dict(sharded_like(optimizer, ckpt['optimizer']))
        for group, scale in zip(optimizer.param_groups, scales):
            group['lr_scale'] = scale
        if 'scaler' in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
    model = torch.compile(raw_model, dynamic=False) if c.compile else raw_model
    if rt.distributed and not rt.fsdp:
        model = DDP(model, device_ids=[rt.device] if rt.device.startswith('cuda') else None)
    return model, optimizer, scaler


def shard(model):
    """
    FSDP2: each block, then the rest (the embeddings, whose weight the head shares, and ln_f), split
    over the processes; a block's whole weights exist only while it computes, forward and backward.
    """
    # a block returns its keys and values as views; they are only ever read (the KV cache concatenates),
    # so FSDP's warning about in-place changes to a view does not apply; nor does its scaler's, about its
    # own one-element tensor
    warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
    warnings.filterwarnings('ignore', message='Found a non-scalar tensor with numel=1')
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def make_loaders(c, rt, data, enc, block_size):
    """Batches of the train split (this rank's share) and of the validation split."""
    loader = dict(tokenizer=enc, batch_size=c.batch_size, block_size=block_size, loss_on=c.loss_on, seed=c.seed,
                  bucket=c.bucket, pad_multiple=c.pad_multiple or (32 if c.compile else 1),
                  prompt=Prompt(c.prompt_template, c.label_words))
    return (as_config_error(CustomDataLoader, data['train'], rank=rt.rank, world_size=rt.world, **loader),
            as_config_error(CustomDataLoader, data['validation'], **loader))


def main(argv):
    c, ckpt = read_settings(argv)
    rt = setup_runtime(c)
    check_out_dir(c, rt.master)
    # rank 0 holds out_dir: a second command that would write there stops at once
    with hold_out_dir(c.out_dir, command_line()) if rt.master else nullcontext():
        return run(c, ckpt, rt)


def run(c, ckpt, rt):
    """Set up the run, with every check before the first write, then train."""
    # the data set first: a bad one fails fast; whatever cannot be downloaded is reported at once
    data, (raw_model, base_model), enc = fetch_inputs(partial(as_config_error, load_splits, c.dataset),
                                                      partial(build_model, c, ckpt), gpt2_encoding)
    trainable, total, pct = parameter_summary(raw_model)
    progress = Progress(base_model, base_fingerprint(raw_model) if c.checkpoint == 'adapter' else None, ckpt)
    if rt.master:
        print(f"{method(c)}: {trainable:,} trainable parameters of {total:,} ({pct:.2f}%)")
        if ckpt is not None:
            print(f"resuming {ckpt_path(c.out_dir)} at iteration {progress.iter_num} "
                  f"(base model {base_model}, lora_rank={c.lora_rank})")
    model, optimizer, scaler = prepare_training(c, rt, raw_model, ckpt)
    del ckpt
    train_loader, val_loader = make_loaders(c, rt, data, enc, raw_model.config.block_size)
    info = dict(base_model=base_model, trainable_params=trainable, total_params=total, trainable_pct=pct,
                device=rt.device, dtype=rt.dtype, world_size=rt.world, config=dict(c))
    log = RunLog(c, progress, info, read_logs(c, progress.iter_num)) if rt.master else None
    t = Trainer(c, rt, raw_model, model, optimizer, scaler, train_loader, val_loader, progress, log)
    with stops_deferred():
        signum = train(t)
        if rt.master:
            log.close()
    if rt.distributed:
        # every process waits here first, the GIL released: a gloo thread that still has to free a tensor
        # needs the GIL, which the group's destructor would hold while it waits for that thread
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 128 + signum if signum else 0


def train(t):
    """The iterations, nanoGPT's way; the number of the signal that stopped them, or 0. t: the Trainer."""
    c, start = t.c, t.start
    sums = torch.zeros(2, device=t.rt.device)  # summed loss and target tokens since the last log step
    tokens, t_log = 0, time.time()
    for it in range(start, c.max_iters + 1):
        # --- set the learning rate ---------------------------------------------------------
        t.progress.iter_num, lr = it, t.set_lr(it)
        last = it == c.max_iters or c.eval_only

        # --- evaluate, and save a checkpoint -------------------------------------------------
        logged_before_it_stopped = c.init_from == 'resume' and it == start and not c.eval_only
        if t.rt.evaluates and (it % c.eval_interval == 0 or last) and not logged_before_it_stopped:
            t_log += t.evaluate(it, lr, last)
        if last:
            return 0
        signum = t.stop_requested(it)
        if signum:
            t.stop(it, signum, sums)
            return signum

        # --- forward, backward, update -------------------------------------------------------
        step_sums, step_tokens, grad_norm = t.step(it)
        sums += step_sums
        tokens += step_tokens

        # --- timing and logging: the only place the host waits for the device between evaluations
        if it % c.log_interval == 0:
            dt = time.time() - t_log
            t.log_step(it, sums, grad_norm, lr, dt / min(c.log_interval, it - start + 1), tokens / dt)
            sums.zero_()
            tokens, t_log = 0, time.time()


def check_finite(sums, it, c, grad_norm=None):
    """The mean training loss of sums; a FloatingPointError if it (or grad_norm) is not finite."""
    loss_sum, count = sums.tolist()
    loss = loss_sum / max(1, count)
    bad = 'loss' if not math.isfinite(loss) else 'gradient norm' if grad_norm is not None and \
        not math.isfinite(grad_norm.item()) else None
    if bad:
        raise FloatingPointError(f"{bad} became non-finite by iteration {it}; {kept(c.out_dir)}; "
                                 f"lower --learning_rate, or use --dtype=float32")
    return loss


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__, errors=(FloatingPointError,)))

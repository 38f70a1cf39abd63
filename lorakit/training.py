"""
train.py's settings checked and read, and its model made ready to train: the rules every setting
must meet (one line each for a setting no run can use), a resumed run's settings over the defaults,
and the model on its device (sharded, compiled, under DDP) with its optimizer.
"""

import os

import torch

from configurator import ConfigError, Settings, check, configure, one_of
from lorakit.adapters import VARIANTS_MISSING, pissa_iterations, variants_needed
from lorakit.checkpoint import ckpt_path, read_checkpoint, resume_notes, saved_settings
from lorakit.common import as_config_error
from lorakit.data import LOSS_ON
from lorakit.distributed import gradient_scaler, shard, sharded_like, wrap
from lorakit.prompts import prompt_errors
from model import LORA_SCALINGS, LORA_TARGETS, LORA_VARIANTS


def check_settings(c):
    """One clear error for a setting no run can use."""
    check([
        (c.lora_rank < 0, f"lora_rank must be >= 0 (0 means full fine-tuning), not {c.lora_rank}"),
        (c.lora_rank > 0 and c.lora_alpha <= 0, f"lora_alpha must be > 0 when lora_rank > 0, not {c.lora_alpha}"),
        (not 0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), not {c.lora_dropout}"),
        one_of('lora_targets', c.lora_targets, LORA_TARGETS),
        one_of('lora_scaling', c.lora_scaling, LORA_SCALINGS),
        (c.lora_plus_ratio <= 0, f"lora_plus_ratio must be > 0 (1 is plain LoRA), not {c.lora_plus_ratio}"),
        one_of('lora_variant', c.lora_variant, LORA_VARIANTS),
        (pissa_iterations(c.lora_init) is False,
         f"lora_init must be default, pissa or pissa_niter_N (N from 1 to 100), not {c.lora_init!r}"),
        *[(c.lora_rank == 0 and c.init_from != 'resume' and not is_default, f"{name}={c[name]} changes LoRA's update: it "
           f"needs lora_rank > 0 (0 is full fine-tuning)") for name, is_default in (
              ('lora_variant', c.lora_variant == 'lora'), ('lora_init', c.lora_init == 'default'),
              ('lora_scaling', c.lora_scaling == 'standard'), ('lora_plus_ratio', c.lora_plus_ratio == 1.0))],
        (c.out_dir.strip().lower() in ('', 'none', 'null'), f"out_dir={c.out_dir!r} reads as no folder: name one"),
        (c.lora_targets == 'qv' and (c.lora_variant != 'lora' or c.lora_init != 'default'),
         "DoRA and PiSSA adapt whole weights, not qv's slices of c_attn: use lora_targets attn or attn_mlp"),
        (c.lora_variant == 'dora' and c.lora_init != 'default', "DoRA with PiSSA's start is not supported: pick one"),
        (c.lora_variant == 'dora' and c.fsdp, "DoRA with fsdp=True is not supported (its norm needs the whole weight "
                                              "of each layer): drop --fsdp, or use DDP"),
        (c.lora_init != 'default' and c.init_from == 'scratch', "PiSSA starts from a pretrained model's weights, not "
                                                                "init_from='scratch'"),
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
        (variants_needed(c.lora_targets, c.lora_variant, c.lora_init), VARIANTS_MISSING),
        (c.fsdp and 'RANK' not in os.environ, "fsdp=True shards the model over torchrun's processes: start it with "
                                              "torchrun --standalone --nproc_per_node=2 train.py ..., or drop --fsdp"),
    ])


def read_settings(argv, defaults):
    """
    (settings, checkpoint or None), the settings checked and read-only from here on. For
    init_from=resume the run's saved settings are the defaults and the command line overrides them: a
    change to the model is an error, and a change that makes the run differ from an uninterrupted one
    is said in one line.
    """
    c = configure(defaults, argv)
    check_settings(c)
    if c.init_from != 'resume':
        return resolved(c, c.init_from), None
    ckpt = as_config_error(read_checkpoint, ckpt_path(c.out_dir))
    saved = saved_settings(ckpt, defaults)
    c = configure(Settings(defaults, **{**saved, 'init_from': 'resume', 'out_dir': c.out_dir}), argv)
    check_settings(c)
    if c.max_iters < ckpt.get('iter_num', 0):
        raise ConfigError(f"{ckpt_path(c.out_dir)} is at iteration {ckpt['iter_num']}, past max_iters={c.max_iters}: "
                          f"give a larger --max_iters to train on, or start a new run in another --out_dir")
    notes = resume_notes(c, saved, ckpt)
    if notes and int(os.environ.get('RANK', 0)) == 0:
        print(f"note: resuming with {'; '.join(notes)}: the run will differ from one that was never interrupted")
    return resolved(c, ckpt.get('base_model')), ckpt


def resolved(c, base_model):
    """The settings frozen, checkpoint='auto' made what it stands for: an adapter for LoRA on a pretrained model."""
    if c.checkpoint == 'auto':
        c.checkpoint = 'adapter' if c.lora_rank > 0 and base_model != 'scratch' else 'full'
    return c.frozen()


def prepare_training(c, rt, raw_model, ckpt):
    """The model on its device, as it trains (sharded; compiled; under DDP), its optimizer and float16's
    gradient scaler. Under FSDP the optimizer is built over the shards, so its state is sharded too."""
    raw_model.to(rt.device).use_grad_checkpoint(c.grad_checkpoint)
    if c.lora_rank > 0 and rt.device.startswith('cuda') and rt.dtype != 'float32':
        raw_model.frozen_weights_to(getattr(torch, rt.dtype))
    if rt.fsdp:
        shard(raw_model)
    optimizer = raw_model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2),
                                               rt.device.split(':')[0], c.lora_plus_ratio)
    scaler = gradient_scaler(rt)
    if ckpt is not None and 'optimizer' not in ckpt and rt.master:
        print("note: the checkpoint holds no optimizer state (kept for evaluation, as sweep.py keeps a finished "
              "full fine-tuning): AdamW starts afresh")
    if ckpt is not None and 'optimizer' in ckpt:
        scales = [g['lr_scale'] for g in optimizer.param_groups]  # this command line's LoRA+ ratio
        optimizer.load_state_dict(sharded_like(optimizer, ckpt['optimizer'], rt))
        for group, scale in zip(optimizer.param_groups, scales):
            group['lr_scale'] = scale
        if 'scaler' in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
    model = wrap(torch.compile(raw_model, dynamic=False) if c.compile else raw_model, rt)
    return model, optimizer, scaler

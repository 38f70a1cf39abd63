"""
train.py's checkpoints: ckpt.pt holds the whole model, or only the LoRA tensors on top of a base
model that is reloaded (GPT.from_pretrained) and checked against the fingerprint saved with them.

    model, ckpt = load_checkpoint("out/ckpt.pt")
    save_checkpoint(ckpt_path(out_dir), model, optimizer, scaler, c, progress, rt)   # train.py

A checkpoint is written atomically (a crash leaves the old one or the new one) and never holds
non-finite weights.
"""

import hashlib
import math
import os
import time
from dataclasses import asdict

import torch

from configurator import ConfigError
from lorakit.adapters import is_lora_param, lora_state_dict, variants
from lorakit.common import error_summary, read_json, save_atomic
from lorakit.distributed import non_finite_parameter, whole
from model import GPT, OVERRIDABLE, GPTConfig


# what a resumed run may change freely; everything else makes it differ from an uninterrupted run
HARMLESS = {"out_dir", "init_from", "overwrite", "max_iters", "eval_interval", "eval_iters", "log_interval", "eval_only",
            "always_save_checkpoint", "checkpoint", "wandb_log", "wandb_project", "wandb_run_name", "device",
            "compile", "pad_multiple", "grad_checkpoint", "fsdp"}
MODEL_SETTINGS = (*OVERRIDABLE, "lora_init", "n_layer", "n_head", "n_embd", "block_size")  # a resumed run keeps its model
MACHINE_SETTINGS = ("device", "dtype", "compile", "grad_checkpoint", "fsdp")  # taken from the new command line


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.pt")


def kept(out_dir):
    """What a run that stops on a fault leaves: its last good checkpoint, or none."""
    path = ckpt_path(out_dir)
    return f"the last good checkpoint {path} is kept" if os.path.exists(path) else "no checkpoint was saved yet"


def base_fingerprint(model):
    """The SHA-256 of every element of the model's non-LoRA weights (as float32): tells whether a base model
    changed under an adapter, down to one weight. About a second for gpt2-medium."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not is_lora_param(k):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


# what each field of a ckpt.pt must be, where it is there
FIELDS = dict(model=dict, model_args=dict, config=dict, base_model=str, iter_num=int, optimizer=dict,
              adapter_only=bool, base_fingerprint=str)


def read_checkpoint(path, device="cpu"):
    """The dict in a train.py ckpt.pt, read with weights_only: loading runs no pickled code."""
    if not os.path.isfile(path):
        if read_json(os.path.join(os.path.dirname(path), "sweep_run.json"), {}).get("checkpoint_removed"):
            raise ValueError(f"no checkpoint at {path}: sweep.py removed it after evaluating the run "
                             f"(--keep_checkpoints=False); remove {os.path.dirname(path)} and run the sweep again, "
                             f"which keeps checkpoints by default")
        raise ValueError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be loaded as a checkpoint ({error_summary(e)}); it may be truncated, "
                         f"corrupted, or hold objects other than tensors") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= set(ckpt):
        raise ValueError(f"{path} is not a train.py checkpoint (it needs 'model' and 'model_args')")
    wrong = next((f"'{k}' is {type(ckpt[k]).__name__}, not {kind.__name__}" for k, kind in FIELDS.items()
                  if k in ckpt and not isinstance(ckpt[k], kind)), None)
    if wrong is None and not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        wrong = "'model' holds something other than named tensors"
    if wrong is None and ckpt.get("adapter_only") and "base_model" not in ckpt:
        wrong = "an adapter-only checkpoint without its 'base_model'"
    if wrong:
        raise ValueError(f"{path} is not a train.py checkpoint: {wrong}")
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # training never saves one: it was edited or copied from elsewhere
        raise ValueError(f"{path} holds non-finite values (NaN or inf) in {bad}: it cannot be used; "
                         f"train again, or restore the checkpoint from a copy")
    return ckpt


def base_with_lora(base_model, lora):
    """The pretrained GPT-2 base_model built with the LoRA layers that lora (model.py's OVERRIDABLE settings) asks
    for, once: the adapter's tensors start fresh."""
    from lorakit.hf_checkpoint import copy_gpt2_weights, read_hf_checkpoint  # as from_pretrained: only when needed
    config_args, sd_hf = read_hf_checkpoint(base_model)
    return copy_gpt2_weights(GPT(GPTConfig(**config_args, **lora)), sd_hf, base_model)


def _adapter_model(path, ckpt, state):
    """The base model the adapter was trained on, with the adapter's LoRA tensors loaded."""
    args = ckpt["model_args"]
    model = base_with_lora(ckpt["base_model"], {k: args[k] for k in OVERRIDABLE if k in args})
    if args["block_size"] < model.config.block_size:
        model.crop_block_size(args["block_size"])
    if model.config != GPTConfig(**args):
        raise ValueError(f"the adapter in {path} was trained on a model shaped {args}, but "
                         f"{ckpt['base_model']} is shaped {asdict(model.config)}")
    # a 16-digit fingerprint (older checkpoints) sampled the weights: it cannot be compared with a whole one
    if len(ckpt.get("base_fingerprint") or "") == 64 and ckpt["base_fingerprint"] != base_fingerprint(model):
        raise ValueError(f"the base model {ckpt['base_model']} has other weights than the one the adapter in "
                         f"{path} was trained on")
    # PiSSA's initial A and B come with the adapter alone: loading them rebuilds the residual W (lorakit/variants.py)
    missing = set(lora_state_dict(model)) ^ {k for k in state if not is_lora_param(k, "lora_A0", "lora_B0")}
    if missing:
        raise RuntimeError(f"adapter tensors differ from the model's, e.g. {sorted(missing)[0]}")
    load_weights(model, state, strict=False)
    return model


def load_weights(model, state, strict=True):
    """model.load_state_dict(state, strict), PiSSA's initial A and B included (lorakit/variants.py)."""
    if not any(is_lora_param(k, "lora_A0") for k in state):
        return model.load_state_dict(state, strict=strict)
    result = variants().load_pissa(model, state)
    wrong = result.missing_keys + result.unexpected_keys
    if strict and wrong:
        raise RuntimeError(f"Error(s) in loading state_dict: {'missing' if result.missing_keys else 'unexpected'} "
                           f"key {wrong[0]}")
    return result


def model_from_checkpoint(ckpt, path):
    """The model of a train.py checkpoint dict read from path, whole or adapter-only."""
    # torch.compile and DDP prefix the parameter names
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    pissa = str(ckpt.get("config", {}).get("lora_init", "default")).startswith("pissa")
    if pissa and not any(is_lora_param(k, "lora_A0") for k in state):
        raise ValueError(f"{path} is a PiSSA run's checkpoint without its initial A and B (lora_A0, lora_B0): without "
                         f"them its base cannot be rebuilt; use the checkpoint train.py wrote")
    try:
        if ckpt.get("adapter_only"):  # only the LoRA tensors: the rest is the base model the run started from
            return _adapter_model(path, ckpt, state)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        load_weights(model, state)
        return model
    except (TypeError, RuntimeError, AssertionError) as e:  # GPTConfig's checks are asserts
        what = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ValueError(f"{path} does not match its own model settings: {what[:400] or type(e).__name__}") from None


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from a train.py ckpt.pt, whole or adapter-only."""
    ckpt = read_checkpoint(path, device)
    return model_from_checkpoint(ckpt, path), ckpt


def saved_settings(ckpt, defaults):
    """The settings a checkpoint's run was made with (of those in defaults), but the machine's."""
    # an imported adapter's checkpoint has no settings of its own, only its model's
    saved = {k: ckpt["model_args"][k] for k in OVERRIDABLE if k in ckpt["model_args"]}
    saved.update((k, v) for k, v in ckpt.get("config", {}).items() if k in defaults and k not in MACHINE_SETTINGS)
    return saved


def resume_notes(c, saved, ckpt):
    """
    How a resumed run's settings c make it differ from the uninterrupted run of saved (one note each),
    or a ConfigError for a change to the model, which a resumed run keeps.
    """
    changed = [k for k in saved if c[k] != saved[k] and k not in HARMLESS]
    for k in changed:
        if k in MODEL_SETTINGS:
            raise ConfigError(f"{k}={c[k]} differs from the resumed run's {saved[k]}: a resumed run keeps its model; "
                              f"drop --{k}, or start a new run in another --out_dir")
    notes = [f"{k} {saved[k]} -> {c[k]}" for k in changed if k != "batch_size"]
    # a step's examples are batch_size from each process: the same step on other processes is the same run
    world = int(os.environ.get("WORLD_SIZE", 1))
    saved_world = ckpt.get("world_size", world)
    if "batch_size" in saved and c.batch_size * world != saved["batch_size"] * saved_world:
        notes.append(f"batch_size {saved['batch_size']} -> {c.batch_size}" if world == saved_world else
                     f"a step's batch {saved['batch_size']} x {saved_world} processes -> {c.batch_size} x {world}")
    if c.decay_lr and not c.lr_decay_iters and c.max_iters != saved.get("max_iters"):
        notes.append(f"max_iters {saved['max_iters']} -> {c.max_iters} moves the end of the learning-rate decay")
    return notes


def diverged(what, it, out_dir, detail=""):
    """The error that stops a run whose loss, gradients or weights became non-finite (what: which)."""
    return FloatingPointError(f"{what} became non-finite{detail} by iteration {it}; {kept(out_dir)}; "
                              f"lower --learning_rate, or use --dtype=float32")


def mean_loss(sums, it, c, grad_norm=None):
    """The mean training loss of sums; a FloatingPointError if it (or grad_norm) is not finite."""
    loss_sum, count = sums.tolist()
    loss = loss_sum / max(1, count)
    if not math.isfinite(loss):
        raise diverged("the loss", it, c.out_dir)
    if grad_norm is not None and not math.isfinite(grad_norm.item()):
        raise diverged("the gradient norm", it, c.out_dir)
    return loss


class Progress:
    """Where the run stands: iteration, best validation loss, seconds trained (over resumes), its base model."""

    def __init__(self, base_model, fingerprint, ckpt=None):
        self.iter_num, self.best_val_loss, self.elapsed0 = 0, float("inf"), 0.0
        self.base_model, self.base_fingerprint = base_model, fingerprint
        if ckpt is not None:
            self.iter_num, self.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
            self.elapsed0 = ckpt.get("elapsed_s", 0.0)
        self.t_start = time.time()

    def elapsed(self):
        return self.elapsed0 + time.time() - self.t_start


def save_checkpoint(path, raw_model, optimizer, scaler, c, progress, rt):
    """
    ckpt.pt, atomically: un-merged W plus lora_A/lora_B (see lora.py), or lora_A/lora_B alone. Weights
    that are not all finite are never saved: a bad update must not replace the last good checkpoint.
    Under FSDP every process calls it: the shards are gathered, and rank 0 writes the checkpoint one
    process would have written, so it resumes with or without FSDP, on any number of processes.
    """
    bad = non_finite_parameter(raw_model, rt)
    if bad is not None:
        raise diverged("the weights", progress.iter_num, c.out_dir, f" ({bad})")
    adapter = c.checkpoint == "adapter"
    # keep_vars: the head's weight is wte's, one object, gathered and saved once
    model_state = whole(lora_state_dict(raw_model) if adapter else raw_model.state_dict(keep_vars=rt.fsdp), rt)
    optimizer_state = whole(optimizer.state_dict(), rt)
    if not rt.master:
        return
    save_atomic({
        "model": model_state,
        "adapter_only": adapter,
        "model_args": asdict(raw_model.config),
        "optimizer": optimizer_state,
        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
        "iter_num": progress.iter_num,
        "best_val_loss": progress.best_val_loss,
        "elapsed_s": progress.elapsed(),
        "base_model": progress.base_model,
        **({"base_fingerprint": progress.base_fingerprint} if adapter else {}),
        "world_size": rt.world,
        "config": dict(c),
    }, path)

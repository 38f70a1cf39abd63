"""
Reading train.py's checkpoints: ckpt.pt holds the whole model, or only the LoRA tensors on top of a
base model that is reloaded (GPT.from_pretrained) and checked against the fingerprint saved with them.

    model, ckpt = load_checkpoint("out/ckpt.pt")
"""

import hashlib
import os
from dataclasses import asdict

import torch

from common import error_summary
from lora import is_lora_param, lora_state_dict
from model import GPT, OVERRIDABLE, GPTConfig

def base_fingerprint(model):
    """The SHA-256 of every element of the model's non-LoRA weights (as float32): tells whether a base model
    changed under an adapter, down to one weight. About a second for gpt2-medium."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not is_lora_param(k):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path, device="cpu"):
    """The dict in a train.py ckpt.pt, read with weights_only: loading runs no pickled code."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}: train one first, or check --out_dir")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be loaded as a checkpoint ({error_summary(e)}); it may be truncated, "
                         f"corrupted, or hold objects other than tensors") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= set(ckpt):
        raise ValueError(f"{path} is not a train.py checkpoint (it needs 'model' and 'model_args')")
    return ckpt


def _adapter_model(path, ckpt, state):
    """The base model the adapter was trained on, with the adapter's LoRA tensors loaded."""
    args = ckpt["model_args"]
    model = GPT.from_pretrained(ckpt["base_model"], {k: args[k] for k in OVERRIDABLE if k in args})
    if args["block_size"] < model.config.block_size:
        model.crop_block_size(args["block_size"])
    if model.config != GPTConfig(**args):
        raise ValueError(f"the adapter in {path} was trained on a model shaped {args}, but "
                         f"{ckpt['base_model']} is shaped {asdict(model.config)}")
    # a 16-digit fingerprint (older checkpoints) sampled the weights: it cannot be compared with a whole one
    if len(ckpt.get("base_fingerprint") or "") == 64 and ckpt["base_fingerprint"] != base_fingerprint(model):
        raise ValueError(f"the base model {ckpt['base_model']} has other weights than the one the adapter in "
                         f"{path} was trained on")
    missing = set(lora_state_dict(model)) ^ set(state)
    if missing:
        raise RuntimeError(f"adapter tensors differ from the model's, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=False)
    return model


def model_from_checkpoint(ckpt, path):
    """The model of a train.py checkpoint dict read from path, whole or adapter-only."""
    # torch.compile and DDP prefix the parameter names
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        if ckpt.get("adapter_only"):  # only the LoRA tensors: the rest is the base model the run started from
            return _adapter_model(path, ckpt, state)
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(state)
        return model
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path} does not match its own model settings: {str(e).splitlines()[0]}") from None


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict) from a train.py ckpt.pt, whole or adapter-only."""
    ckpt = read_checkpoint(path, device)
    return model_from_checkpoint(ckpt, path), ckpt

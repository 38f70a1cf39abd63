"""
Reading checkpoints: Hugging Face GPT-2 checkpoints (a hub id or a local directory) and train.py's
ckpt.pt (the whole model, or only the LoRA tensors on top of a base model that is reloaded), and
the names PEFT gives LoRA tensors.

    model = GPT.from_pretrained("gpt2-medium", dict(lora_rank=16, lora_alpha=64))   # calls from_pretrained below
    model, ckpt = load_checkpoint("out/ckpt.pt")
"""

import hashlib
import json
import os
from dataclasses import asdict

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file

from common import Unreachable, error_summary, hub_offline, not_a_hub_id
from lora import is_lora_param, lora_state_dict
from model import GPT, OVERRIDABLE, GPTConfig

# Hugging Face's GPT-2 keeps these four projections as Conv1D, i.e. weights stored (in, out)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PEFT_PREFIX = "base_model.model."
# PEFT's target_modules for each lora_targets ("c_proj" alone would match the MLP's projection too);
# PEFT cannot adapt only some slices of the fused c_attn, so "qv" has no counterpart
PEFT_TARGET_MODULES = {"attn": r".*\.attn\.(c_attn|c_proj)", "attn_mlp": r".*\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))"}


def _file_getter(model_type, fail):
    """fetch(name) -> a local path of that file of the checkpoint, or None if it has no such file."""
    if os.path.isdir(model_type):
        def fetch(name):
            path = os.path.join(model_type, name)
            return path if os.path.isfile(path) else None
        return fetch
    if not_a_hub_id(model_type):
        raise fail("no such directory")
    offline = hub_offline()

    def fetch(name):
        try:
            return hf_hub_download(model_type, name, local_files_only=offline)
        except LocalEntryNotFoundError:  # (a kind of EntryNotFoundError) not in the cache, offline
            if name == "config.json":
                raise Unreachable(f"the GPT-2 checkpoint '{model_type}'",
                                  "pass its local directory with --init_from=DIR") from None
            return None
        except EntryNotFoundError:
            return None
        except Exception as e:  # no such repository, a network error, ...
            raise fail(error_summary(e)) from None
    return fetch


def read_hf_checkpoint(model_type):
    """
    (config dict, state dict) of a Hugging Face GPT-2 checkpoint: a local directory or a hub id (through
    the hub cache, so it works offline once downloaded). Reads the files directly, without building a
    transformers model: faster, and no second copy of the weights in memory.
    """
    def fail(why):
        return ValueError(f"cannot load a GPT-2 checkpoint from '{model_type}': {why}; give gpt2, gpt2-medium, "
                          f"gpt2-large, gpt2-xl, a hub id or a local directory with config.json and weights")
    fetch = _file_getter(model_type, fail)
    config_path = fetch("config.json")
    if config_path is None:
        raise fail("no config.json")
    with open(config_path) as f:
        config = json.load(f)
    if (index := fetch("model.safetensors.index.json")) is not None:
        with open(index) as f:
            files = [fetch(shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = [fetch("model.safetensors") or fetch("pytorch_model.bin")]
    if None in files:
        raise fail("no model.safetensors or pytorch_model.bin")
    state = {}
    for path in files:
        if path.endswith(".safetensors"):
            state.update(load_file(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    # GPT2Model checkpoints (OpenAI's) have no "transformer." prefix; GPT2LMHeadModel ones do
    state = {("" if k.startswith(("transformer.", "lm_head.")) else "transformer.") + k: v for k, v in state.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return config, state


def _check_plain_gpt2(model_type, hc):
    unsupported = [what for what, bad in (
        (f"model_type {hc.get('model_type')}", hc.get("model_type", "gpt2") != "gpt2"),
        (f"activation {hc.get('activation_function')}",
         hc.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh")),
        (f"n_inner={hc.get('n_inner')}", hc.get("n_inner") not in (None, 4 * hc["n_embd"])),
        (f"layer_norm_epsilon={hc.get('layer_norm_epsilon')}", hc.get("layer_norm_epsilon", 1e-5) != 1e-5),
        ("scale_attn_by_inverse_layer_idx", hc.get("scale_attn_by_inverse_layer_idx", False)),
        ("scale_attn_weights=False", not hc.get("scale_attn_weights", True)),
        ("add_cross_attention", hc.get("add_cross_attention", False)),
    ) if bad]
    if unsupported:
        raise ValueError(f"'{model_type}' is not a plain GPT-2 ({', '.join(unsupported)})")


def from_pretrained(model_type, override_args=None, cls=GPT):
    """GPT.from_pretrained: a GPT-2 from a Hugging Face checkpoint, with override_args (LoRA, dropout)."""
    override_args = dict(override_args or {})
    unknown = sorted(set(override_args) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"from_pretrained cannot override {', '.join(unknown)}; "
                         f"only {', '.join(OVERRIDABLE)} can be set, the rest comes from the checkpoint")
    hc, sd_hf = read_hf_checkpoint(model_type)
    _check_plain_gpt2(model_type, hc)
    config_args = dict(n_layer=hc["n_layer"], n_head=hc["n_head"], n_embd=hc["n_embd"],
                       block_size=hc["n_positions"], vocab_size=hc["vocab_size"], bias=True)
    model = cls(GPTConfig(**config_args, **override_args))
    sd = model.state_dict()
    expected = {k for k in sd if not is_lora_param(k) and k != "lm_head.weight"}
    missing = expected - set(sd_hf)
    if missing:
        raise ValueError(f"'{model_type}' lacks {len(missing)} GPT-2 tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for k in expected:
            v = sd_hf[k].t() if k.endswith(CONV1D_WEIGHTS) else sd_hf[k]
            assert v.shape == sd[k].shape, f"{k}: checkpoint {tuple(v.shape)}, model {tuple(sd[k].shape)}"
            sd[k].copy_(v)
    return model


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
    model = from_pretrained(ckpt["base_model"], {k: args[k] for k in OVERRIDABLE if k in args})
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


def peft_target_modules(lora_targets):
    """PEFT's target_modules for these lora_targets, or a ValueError saying PEFT cannot express them."""
    if lora_targets not in PEFT_TARGET_MODULES:
        raise ValueError(f"PEFT cannot adapt only the query and value slices of GPT-2's fused c_attn "
                         f"(lora_targets={lora_targets}); export the merged model with --format=hf instead")
    return PEFT_TARGET_MODULES[lora_targets]


def copy_lora_into_peft(model, peft_model):
    """Set a live PEFT model's LoRA matrices (adapter "default") to this repository's model's."""
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            params[f"{PEFT_PREFIX}{k}.default.weight"].copy_(v)

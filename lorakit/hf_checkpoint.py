"""
Hugging Face's formats: reading a GPT-2 checkpoint (a hub id or a local directory) into this
repository's layout, the architecture as GPTConfig arguments and the weights as a state dict (model.py's
GPT.from_pretrained builds the model from them); and the names PEFT gives LoRA tensors (export.py).

    config_args, state = read_hf_checkpoint("gpt2-medium")
"""

import json
import os

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file

from lorakit.common import Unreachable, error_summary, hub_offline, not_a_hub_id
from lorakit.adapters import is_lora_param, lora_state_dict

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
    (GPTConfig arguments, state dict) of a Hugging Face GPT-2 checkpoint: a local directory or a hub id
    (through the hub cache, so it works offline once downloaded). Reads the files directly, without
    building a transformers model: faster, and no second copy of the weights in memory. The Conv1D
    weights come transposed, as nn.Linear stores them.
    """
    def fail(why):
        return ValueError(f"cannot load a GPT-2 checkpoint from '{model_type}': {why}; give gpt2, gpt2-medium, "
                          f"gpt2-large, gpt2-xl, a hub id or a local directory with config.json and weights")
    fetch = _file_getter(model_type, fail)
    config_path = fetch("config.json")
    if config_path is None:
        raise fail("no config.json")
    try:
        with open(config_path) as f:
            hc = json.load(f)
    except (OSError, ValueError) as e:
        raise fail(f"its config.json cannot be read ({error_summary(e)})") from None
    if not isinstance(hc, dict):
        raise fail("its config.json is not a JSON object")
    _check_plain_gpt2(model_type, hc)
    if (index := fetch("model.safetensors.index.json")) is not None:
        with open(index) as f:
            files = [fetch(shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        files = [fetch("model.safetensors") or fetch("pytorch_model.bin")]
    if None in files:
        raise fail("no model.safetensors or pytorch_model.bin")
    state = {}
    for path in files:
        try:
            state.update(load_file(path) if path.endswith(".safetensors") else
                         torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # safetensors and torch raise their own types for a short or garbled file
            raise fail(f"{path} cannot be read ({error_summary(e)}): an interrupted download leaves a "
                       f"truncated file; download it again") from None
    # GPT2Model checkpoints (OpenAI's) have no "transformer." prefix; GPT2LMHeadModel ones do
    state = {("" if k.startswith(("transformer.", "lm_head.")) else "transformer.") + k:
             v.t() if k.endswith(CONV1D_WEIGHTS) else v
             for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    config_args = dict(n_layer=hc["n_layer"], n_head=hc["n_head"], n_embd=hc["n_embd"], block_size=hc["n_positions"],
                       vocab_size=hc["vocab_size"], bias=True)
    return config_args, state


def copy_gpt2_weights(model, sd_hf, model_type):
    """model (a GPT, with LoRA layers or without) holding the checkpoint's weights, sd_hf from read_hf_checkpoint:
    every tensor but LoRA's, which keep their start, and the head, which is tied to wte."""
    sd = model.state_dict()
    expected = {k for k in sd if not is_lora_param(k) and k != "lm_head.weight"}
    missing = expected - set(sd_hf)
    if missing:
        raise ValueError(f"'{model_type}' lacks {len(missing)} GPT-2 tensors, e.g. {sorted(missing)[0]}")
    with torch.no_grad():
        for k in expected:
            assert sd_hf[k].shape == sd[k].shape, f"{k}: checkpoint {tuple(sd_hf[k].shape)}, model {tuple(sd[k].shape)}"
            sd[k].copy_(sd_hf[k])
    for m in model.modules():
        if hasattr(m, "reset_magnitude"):
            m.reset_magnitude()  # DoRA's m from the pretrained weights
    return model


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


def peft_target_modules(lora_targets):
    """PEFT's target_modules for these lora_targets, or a ValueError saying PEFT cannot express them."""
    if lora_targets not in PEFT_TARGET_MODULES:
        raise ValueError(f"PEFT cannot adapt only the query and value slices of GPT-2's fused c_attn "
                         f"(lora_targets={lora_targets}); export the merged model with --format=hf instead")
    return PEFT_TARGET_MODULES[lora_targets]


def peft_tensors(model):
    """
    The model's adapter under the names a saved PEFT adapter gives it: LoRA's A and B, DoRA's magnitudes
    (lora_magnitude_vector). A PiSSA adapter becomes, as PEFT converts one, a plain LoRA adapter of its
    change from its start, of rank 2r: s (B A - B0 A0) = s [B, -B0] [A; A0].
    """
    state, out = lora_state_dict(model), {}
    for k, v in state.items():
        layer, kind = k.rsplit(".", 1)
        if kind == "lora_magnitude":
            out[f"{PEFT_PREFIX}{layer}.lora_magnitude_vector"] = v
        elif kind in ("lora_A", "lora_B"):
            if f"{layer}.lora_A0" in state:
                start = state[f"{layer}.{kind}0"]
                v = torch.cat([v, start]) if kind == "lora_A" else torch.cat([v, -start], dim=1)
            out[f"{PEFT_PREFIX}{k}.weight"] = v
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def copy_lora_into_peft(model, peft_model):
    """Set a live PEFT model's adapter ("default") to this repository's model's: A, B, DoRA's magnitudes, and for
    PiSSA the residual W too (PEFT's base layers hold Conv1D weights, (in, out))."""
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            layer, kind = k.rsplit(".", 1)
            if kind in ("lora_A", "lora_B"):
                params[f"{PEFT_PREFIX}{k}.default.weight"].copy_(v)
            elif kind == "lora_magnitude":
                params[f"{PEFT_PREFIX}{layer}.lora_magnitude_vector.default.weight"].copy_(v)
            elif kind == "lora_A0":
                params[f"{PEFT_PREFIX}{layer}.base_layer.weight"].copy_(model.get_submodule(layer).weight.t())

"""
Export a train.py run for use elsewhere, or import a PEFT adapter to evaluate here.

    python export.py --out_dir=gpt-lora-default --format=hf     # merged model -> out_dir/hf
    python export.py --out_dir=gpt-lora-default --format=peft   # LoRA weights -> out_dir/peft
    python export.py --format=import_peft --adapter=path/to/adapter --out_dir=out-imported
    python generate.py --init_from=resume --out_dir=out-imported

hf: a transformers GPT-2 checkpoint (config.json, model.safetensors, and the tokenizer files when the
base model's folder, the hub cache or --tokenizer_dir has them) with the LoRA update merged into the
weights: GPT2LMHeadModel.from_pretrained(path) loads it.
peft: a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) for the base model:
PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), path) loads it. It exists for
lora_targets attn and attn_mlp, either scaling; PEFT cannot adapt slices of the fused c_attn (qv).
import_peft: the reverse, for an adapter on GPT-2's attention c_attn / c_proj and MLP c_fc / c_proj:
writes an adapter-only out_dir/ckpt.pt that generate.py and train.py (init_from=resume) load.
"""

import json
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import asdict

from configurator import ConfigError, configure, run_cli, settings_of  # first: --help skips torch
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file, save

from lorakit.checkpoint import base_with_lora, load_checkpoint
from lorakit.common import as_config_error, command_line, gpt2_encoding, hold_out_dir, hub_offline, save_atomic, sync_folder, write_json
from lorakit.hf_checkpoint import CONV1D_WEIGHTS, PEFT_PREFIX, peft_target_modules, peft_tensors
from lorakit.adapters import is_lora_param, lora_layers, lora_state_dict, merge_lora

# -----------------------------------------------------------------------------
out_dir = 'out'  # the run to export (its ckpt.pt), or where an imported adapter's ckpt.pt goes
format = 'hf'  # 'hf', 'peft' or 'import_peft'
export_dir = ''  # where the export goes; '' means out_dir/hf or out_dir/peft
tokenizer_dir = ''  # a folder with GPT-2's vocab.json and merges.txt, when the base model has none
adapter = ''  # import_peft: the adapter folder
init_from = ''  # import_peft: the base model; '' means the adapter's base_model_name_or_path
overwrite = False  # replace files an earlier export (or import) left where this one writes
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
WRITES = {'hf': ("config.json", "model.safetensors") + TOKENIZER_FILES,
          'peft': ("adapter_config.json", "adapter_model.safetensors"), 'import_peft': ("ckpt.pt",)}


def hf_state_dict(model):
    """The weights with the LoRA update merged (each LoRA layer's own eval()), under transformers' GPT-2 names,
    Conv1D weights as (in, out). The model is left merged, in eval mode."""
    merge_lora(model.eval())
    state = model.state_dict()
    for name, layer in lora_layers(model):
        state[f"{name}.weight"] = layer.weight.detach()  # its state_dict may give the un-merged W
    return {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous() for k, v in state.items()
            if not is_lora_param(k) and k != "lm_head.weight"}  # lm_head is tied to wte


def hf_config(config):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
            "n_inner": None, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "attn_pdrop": 0.0,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "bos_token_id": 50256, "eos_token_id": 50256,
            "tie_word_embeddings": True, "scale_attn_weights": True, "use_cache": True, "torch_dtype": "float32"}


def copy_tokenizer(base_model, tokenizer_dir, dest):
    """Copy GPT-2's tokenizer files from tokenizer_dir, the base model's folder or the hub cache."""
    def find(name):
        for folder in (tokenizer_dir, base_model):
            if folder and os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        if base_model and not os.path.isdir(base_model):
            try:
                return hf_hub_download(base_model, name, local_files_only=hub_offline())
            except Exception:  # not on the hub, or offline and not cached: the export works without it
                return None
        return None
    copied = []
    for name in TOKENIZER_FILES:
        path = find(name)
        if path:
            with open(path, "rb") as f:
                save_atomic(f.read(), os.path.join(dest, name))
            copied.append(name)
    return copied


def _byte_to_char():
    """GPT-2's byte-level BPE writes every byte as a printable character: those that are stay, the rest move
    to 256 and up (the mapping tokenizers' vocab.json and merges.txt are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def tokenizer_from_encoding(enc, dest):
    """vocab.json and merges.txt for transformers' GPT2Tokenizer, rebuilt from tiktoken's GPT-2 encoding: each
    token's merge is the last step of byte-pair encoding its bytes with the merges ranked before it."""
    ranks, char = enc._mergeable_ranks, _byte_to_char()
    text = lambda token: "".join(char[b] for b in token)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the best-ranked adjacent pair until two parts are left
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], rank))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = enc.eot_token
    write_json(vocab, os.path.join(dest, "vocab.json"))
    save_atomic(("#version: 0.2\n" + "\n".join(merges) + "\n").encode(), os.path.join(dest, "merges.txt"))
    write_json({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False},
               os.path.join(dest, "tokenizer_config.json"))
    return ["vocab.json", "merges.txt", "tokenizer_config.json"]


def save_safetensors(state, path):
    save_atomic(save(state, metadata={"format": "pt"}), path)


def export_hf(model, base_model, dest, tokenizer_dir=''):
    """config.json, model.safetensors and GPT-2's tokenizer (the base model's files, else built from tiktoken's
    encoding); the tokenizer files written."""
    write_json(hf_config(model.config), os.path.join(dest, "config.json"))
    save_safetensors(hf_state_dict(model), os.path.join(dest, "model.safetensors"))
    return copy_tokenizer(base_model, tokenizer_dir, dest) or tokenizer_from_encoding(gpt2_encoding(), dest)


def export_peft(model, base_model, dest):
    cfg = model.config
    if cfg.lora_rank == 0:
        raise ValueError("this run has no LoRA (lora_rank=0): export it with --format=hf")
    target_modules = peft_target_modules(cfg.lora_targets)
    rslora = cfg.lora_scaling == "rslora"
    # PEFT keeps A as Linear(in, r) and B as Linear(r, out) even around Conv1D: the same shapes as here
    state = peft_tensors(model)
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    # PiSSA's change from its start has rank 2r: alpha grows with it, so that the scale stays alpha / r
    alpha = cfg.lora_alpha * (rank / cfg.lora_rank) ** (0.5 if rslora else 1.0)
    write_json({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": rank, "lora_alpha": alpha, "lora_dropout": cfg.lora_dropout,
                "target_modules": target_modules, "fan_in_fan_out": True, "bias": "none", "inference_mode": True,
                "init_lora_weights": True, "use_rslora": rslora, "use_dora": cfg.lora_variant == "dora",
                "modules_to_save": None},
               os.path.join(dest, "adapter_config.json"))
    save_safetensors(state, os.path.join(dest, "adapter_model.safetensors"))


def import_peft(adapter_dir, base_model, dest):
    """An adapter-only ckpt.pt in dest from a PEFT LoRA adapter of GPT-2's attention (and MLP) projections."""
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            acfg = json.load(f)
        tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{adapter_dir} is not a readable PEFT adapter (it needs adapter_config.json and "
                         f"adapter_model.safetensors): {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(acfg, dict) or acfg.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir} is not a plain LoRA adapter (peft_type "
                         f"{acfg.get('peft_type') if isinstance(acfg, dict) else None})")
    alpha, dropout = acfg.get("lora_alpha"), acfg.get("lora_dropout", 0.0)
    if not (type(acfg.get("r")) is int and acfg["r"] > 0 and type(alpha) in (int, float) and math.isfinite(alpha)
            and alpha > 0):
        raise ValueError(f"{adapter_dir}/adapter_config.json needs r (an integer > 0) and lora_alpha (a finite number "
                         f"> 0), not r={acfg.get('r')!r}, lora_alpha={alpha!r}")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise ValueError(f"{adapter_dir}/adapter_config.json: lora_dropout must be a number in [0, 1), not {dropout!r}")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir} gives some layers their own rank or alpha (rank_pattern, alpha_pattern): this "
                         f"repository's LoRA has one rank and alpha for every layer, so it cannot be imported")
    if acfg.get("init_lora_weights") not in (None, True, False, "gaussian"):
        raise ValueError(f"{adapter_dir} was initialised with init_lora_weights={acfg['init_lora_weights']!r} and not "
                         f"converted: convert it to a plain LoRA adapter in PEFT first (save_pretrained with "
                         f"path_initial_model_for_weight_conversion), then import it")
    base_model = base_model or acfg.get("base_model_name_or_path")
    state = {}
    for k, v in tensors.items():
        name = k.removeprefix(PEFT_PREFIX).removesuffix(".weight").removesuffix(".default")
        name = name.replace("lora_magnitude_vector", "lora_magnitude")  # DoRA's
        if not re.fullmatch(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                            r"\.lora_(A|B|magnitude)", name):
            raise ValueError(f"{adapter_dir} adapts {k}; only GPT-2's attention c_attn and c_proj and MLP c_fc and "
                             f"c_proj can be imported")
        state[name] = v.float()
    lora = dict(lora_rank=acfg["r"], lora_alpha=float(alpha), lora_dropout=float(dropout),
                lora_targets="attn_mlp" if any(".mlp." in k for k in state) else "attn",
                lora_scaling="rslora" if acfg.get("use_rslora") else "standard",
                lora_variant="dora" if acfg.get("use_dora") else "lora")
    model = base_with_lora(base_model, lora)
    check_adapter(adapter_dir, acfg, state, lora_state_dict(model), base_model)
    for k, v in lora_state_dict(model).items():  # modules the adapter leaves out keep B = 0: no change
        state.setdefault(k, v)
    model.load_state_dict(state, strict=False)
    save_atomic({"model": state, "adapter_only": True, "model_args": asdict(model.config), "iter_num": 0,
                 "base_model": base_model, "config": {"imported_from": adapter_dir}},
                os.path.join(dest, "ckpt.pt"))
    return model


def check_adapter(adapter_dir, acfg, state, expected, base_model):
    """The adapter's tensors against its config's r and its base model's layers: a ValueError before any write."""
    for k, v in state.items():
        if k not in expected:
            raise ValueError(f"{adapter_dir} adapts {k}, which {base_model} does not have: it was made for "
                             f"another model; give its base with --init_from")
        rank = v.shape[0] if k.endswith("lora_A") else v.shape[-1]
        if not k.endswith("lora_magnitude") and rank != acfg["r"]:
            raise ValueError(f"{adapter_dir}: adapter_config.json says r={acfg['r']}, but {k} has rank {rank}")
        if v.shape != expected[k].shape:
            raise ValueError(f"{adapter_dir}: {k} is shaped {tuple(v.shape)}, {base_model} needs "
                             f"{tuple(expected[k].shape)}: it was made for another model; give its base with --init_from")
    # a module the adapter adapts in some layers must be adapted in all of them (as PEFT's target_modules do)
    kinds = {re.sub(r"\.h\.\d+\.", ".h.N.", k) for k in state}
    missing = [k for k in expected if re.sub(r"\.h\.\d+\.", ".h.N.", k) in kinds and k not in state]
    if missing and not acfg.get("layers_to_transform"):
        raise ValueError(f"{adapter_dir} has no {missing[0]}, though {base_model} has that layer: it was made for "
                         f"a model with fewer layers; give its base with --init_from")


def check_destination(dest, fmt, overwrite, base_model):
    """Refuse to write into the run's base model's folder at all, or over an earlier export without --overwrite."""
    if base_model and os.path.isdir(base_model):
        base, where = os.path.realpath(base_model), os.path.realpath(dest)
        if where == base or where.startswith(base + os.sep):
            raise ConfigError(f"{dest} is inside the run's base model folder {base_model}: an export there would "
                              f"replace the model the run needs; pick another --export_dir")
    there = [name for name in WRITES[fmt] if os.path.lexists(os.path.join(dest, name))]
    if there and not overwrite:
        raise ConfigError(f"{os.path.join(dest, there[0])} already exists: pick another "
                          f"{'--out_dir' if fmt == 'import_peft' else '--export_dir'}, or replace it with --overwrite=True")


def main(argv):
    c = configure(DEFAULTS, argv)
    if c.format not in WRITES:
        raise ConfigError(f"format must be 'hf', 'peft' or 'import_peft', not {c.format!r}")
    if c.format == 'import_peft':
        if not c.adapter:
            raise ConfigError("import_peft needs --adapter=path/to/adapter_folder")
        check_destination(c.out_dir, c.format, c.overwrite, c.init_from)
        with hold_out_dir(c.out_dir, command_line()):
            as_config_error(import_peft, c.adapter, c.init_from, c.out_dir)
        print(f"wrote {os.path.join(c.out_dir, 'ckpt.pt')}; evaluate it with "
              f"python generate.py --init_from=resume --out_dir={c.out_dir}")
        return
    dest = c.export_dir or os.path.join(c.out_dir, c.format)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ConfigError(f"{dest} is a file, not a folder: pick another --export_dir")
    if c.tokenizer_dir and not all(os.path.isfile(os.path.join(c.tokenizer_dir, f)) for f in TOKENIZER_FILES[:2]):
        raise ConfigError(f"tokenizer_dir {c.tokenizer_dir} has no {' and '.join(TOKENIZER_FILES[:2])}: give the "
                          f"folder that holds GPT-2's tokenizer files")
    with ExitStack() as held:
        held.enter_context(hold_out_dir(c.out_dir, command_line()))  # no run writes its checkpoint meanwhile
        model, ckpt = as_config_error(load_checkpoint, os.path.join(c.out_dir, 'ckpt.pt'))
        base_model = ckpt.get('base_model', '')
        check_destination(dest, c.format, c.overwrite, base_model)
        if os.path.realpath(dest) != os.path.realpath(c.out_dir):
            held.enter_context(hold_out_dir(dest, command_line()))
        with staged(dest) as stage:
            what = export(c, model, base_model, stage)
        print(f"wrote {what} to {dest}")


@contextmanager
def staged(dest):
    """A hidden folder in dest to write an export into: its files move into dest once all are written, so an
    export appears whole or not at all (a full disk or a signal removes the folder)."""
    stage = tempfile.mkdtemp(dir=dest, prefix=".export.", suffix=".tmp")
    try:
        yield stage
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(dest, name))
        sync_folder(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export(c, model, base_model, dest):
    """The export of c.format written to dest; what it is, in words."""
    if c.format == 'hf':
        copied = export_hf(model, base_model, dest, c.tokenizer_dir)
        return "a transformers GPT-2 checkpoint" + (f" with {', '.join(copied)}" if copied else "")
    as_config_error(export_peft, model, base_model, dest)
    return f"a PEFT adapter for {base_model}"


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

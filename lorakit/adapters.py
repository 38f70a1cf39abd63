"""
LoRA layers of a model, by the course's API alone (a layer with is_lora() true; its lora_A, lora_B,
lora_scaling; eval() merges, train() un-merges), so whoever wrote lora.py, these work:

    merge_lora(model.eval())                  # inference: every update folded into W once
    with evaluating(model): ...               # a loss estimate during training, nothing merged
    torch.save(lora_state_dict(model), "adapter.pt")      # a few MB
    trainable, total, percent = parameter_summary(model)  # homework question 2.3
    add_lora(any_model, r".*(q|v)_proj", lora_rank=8, lora_alpha=16)   # LoRA on another PyTorch model
    apply_lora_settings(gpt, config)          # model.py's lora_targets, lora_scaling, lora_variant
"""

import importlib.util
import re
from contextlib import contextmanager

import torch
import torch.nn as nn

ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude", "lora_A0", "lora_B0")  # DoRA's m, PiSSA's start


def is_lora_layer(module):
    return isinstance(module, nn.Linear) and callable(getattr(module, "is_lora", None)) and module.is_lora()


def is_conv1d(module):
    """transformers' Conv1D (GPT-2's projections): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def lora_layers(model):
    """[(name, layer)] of model's layers with LoRA."""
    return [(name, m) for name, m in model.named_modules() if is_lora_layer(m)]


def replace_layer(model, name, layer):
    """layer in model's place name (a qualified name, as named_modules gives it)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def merge_lora(model):
    """Each LoRA layer's eval(): its update folded into W, for inference. The model."""
    for _, m in lora_layers(model):
        m.eval()
    return model


@contextmanager
def evaluating(model):
    """model.eval() for a loss estimate during training, LoRA un-merged; the mode restored after. Layers
    whose train(False) merges are un-merged again by train(True), as the course's API has it."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def is_lora_param(name, *kinds):
    """Whether a state-dict name is an adapter's: lora_A or lora_B, DoRA's lora_magnitude, PiSSA's initial
    lora_A0 and lora_B0; or only the kinds given."""
    return name.rsplit(".", 1)[-1] in (kinds or ADAPTER_TENSORS)


def lora_state_dict(model):
    """Only the adapter's tensors of model.state_dict(): a few MB instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def parameter_summary(model):
    """(trainable, total, percent trainable): homework question 2.3."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, 100.0 * trainable / total


def train_adapter_extras(model):
    """After mark_only_lora_as_trainable: what an adapter trains besides A and B (DoRA's magnitudes)."""
    for name, p in model.named_parameters():
        if is_lora_param(name, "lora_magnitude"):
            p.requires_grad_(True)
    return model


def rescale(model, lora_alpha, rslora):
    """rsLoRA (Kalajdzievski, 2023): each LoRA layer's update scaled by alpha / sqrt(r) instead of alpha / r."""
    if rslora:
        for _, m in lora_layers(model):
            r = getattr(m, "lora_rank", m.lora_A.shape[0])  # a sliced layer stacks its slices' A
            m.lora_scaling = lora_alpha / r ** 0.5
    return model


def add_lora(model, target_modules, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, rslora=False):
    """
    LoRA on any PyTorch model: each nn.Linear (or transformers' Conv1D, as in its GPT-2) whose qualified name
    matches target_modules (a regular expression matched against the whole name, or a list of names) becomes
    a lora.LoRALinear holding the same weights, in the same place (every place, when a layer is registered
    under several names).
    Returns the model; make only the LoRA matrices train with mark_only_lora_as_trainable(model). What
    cannot keep the layer's exact function is a ValueError naming the layer: a pattern that matches no
    nn.Linear (it names those there are), a pruned or weight-normalised layer (its weight is computed),
    a weight shared with another module (merging would change both), a rank that is not a whole number >= 1.
    """
    from lora import LoRALinear
    if type(lora_rank) is not int or lora_rank < 1:
        raise ValueError(f"lora_rank must be a whole number >= 1, not {lora_rank!r}")
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError("target_modules is empty: give a regular expression or a list of layer names")
    places = {}  # every name of every linear layer: a module registered twice has two
    for name, m in model.named_modules(remove_duplicate=False):
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and not callable(getattr(m, "is_lora", None)):
            places.setdefault(id(m), (m, []))[1].append(name)
    linears = {name: m for m, names in places.values() for name in names}
    if isinstance(target_modules, str):
        chosen = [name for name in linears if re.fullmatch(target_modules, name)]
    else:
        chosen = list(target_modules)
    unknown = [name for name in chosen if name not in linears]
    if not chosen or unknown:
        raise ValueError(f"target_modules {target_modules!r} names no nn.Linear or Conv1D of the model"
                         f"{' (' + unknown[0] + ' is none)' if unknown else ''}; it has: {', '.join(linears) or 'none'}")
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    for name in chosen:
        old = linears[name]
        extra = sorted(set(old.state_dict()) - {"weight", "bias"})
        if extra or getattr(old, "parametrizations", None) or old._forward_pre_hooks:
            raise ValueError(f"{name} computes its weight ({', '.join(extra) or 'a parametrization or hook'}: pruned or "
                             f"weight-normalised): remove that first (torch.nn.utils.prune.remove), then add LoRA")
        ties = [n for n in shared.get(id(old.weight), []) if n.rpartition(".")[0] not in places[id(old)][1]]
        if ties:
            raise ValueError(f"{name}'s weight is shared with {ties[0]} (tied): merging LoRA into it would change "
                             f"both; untie them first, or leave {name} out")
    for name in dict.fromkeys(chosen):
        old = linears[name]
        if isinstance(model.get_submodule(name), LoRALinear):
            continue  # done under another of its names
        W = old.weight.t() if is_conv1d(old) else old.weight  # Conv1D keeps W as (in, out)
        new = LoRALinear(W.shape[1], W.shape[0], bias=old.bias is not None, device=W.device, dtype=W.dtype,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        with torch.no_grad():  # the same W and b; A drawn, B zero
            new.weight.copy_(W)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        new.train(old.training)
        rescale(new, lora_alpha, rslora)
        for where in places[id(old)][1]:  # every name the layer has
            replace_layer(model, where, new)
    return model


def pissa_iterations(lora_init):
    """lora_init's randomised-SVD iterations: None for the exact SVD (pissa) or for default, N for
    pissa_niter_N (1 to 100: more is slower than the exact SVD); False for anything else."""
    if lora_init in ("default", "pissa"):
        return None
    m = re.fullmatch(r"pissa_niter_([0-9]{1,3})", lora_init)
    return int(m.group(1)) if m and 1 <= int(m.group(1)) <= 100 else False


VARIANTS_MISSING = ("DoRA, PiSSA and LoRA on qv's slices are in lorakit/variants.py, which ships with the solution, "
                    "not the starter: drop --lora_variant, --lora_init and --lora_targets=qv")


def has_variants():
    return importlib.util.find_spec("lorakit.variants") is not None  # the starter has none


def variants_needed(lora_targets="attn", lora_variant="lora", lora_init="default"):
    """Whether these settings need lorakit/variants.py and it is not there (the starter)."""
    wanted = lora_targets == "qv" or lora_variant != "lora" or lora_init != "default"
    return wanted and not has_variants()


def variants():
    """lorakit.variants, or a ValueError saying it ships with the solution only."""
    if not has_variants():
        raise ValueError(VARIANTS_MISSING)
    from lorakit import variants
    return variants


def apply_lora_settings(model, config):
    """
    A GPT built by model.py (LoRA on the attention's c_attn and c_proj) made what config asks beyond the
    homework: lora_targets qv (the query and value slices of c_attn) or attn_mlp (the MLP's projections
    too), lora_scaling rslora, lora_variant dora. The model.
    """
    if config.lora_rank == 0:
        return model
    lora = dict(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
    if config.lora_targets == "qv":
        variants().slice_qv(model, **lora)
    elif config.lora_targets == "attn_mlp":
        add_lora(model, r"transformer\.h\.\d+\.mlp\.(c_fc|c_proj)", **lora)
    rescale(model, config.lora_alpha, config.lora_scaling == "rslora")
    if config.lora_variant == "dora":
        variants().use_dora(model)
    return model


def lora_parameter_counts(model_type, lora_rank, lora_targets="attn"):
    """(trainable, total, percent trainable) of a GPT-2 shape (model.py's PRETRAINED_SHAPES) with LoRA of this
    rank, built on the meta device (no weights): LoRA trains its A and B matrices, rank 0 every parameter."""
    from model import GPT, PRETRAINED_SHAPES, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**PRETRAINED_SHAPES[model_type], lora_rank=lora_rank, lora_alpha=float(lora_rank),
                              lora_targets=lora_targets))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if is_lora_param(n, "lora_A", "lora_B")) \
        if lora_rank > 0 else total
    return trainable, total, 100.0 * trainable / total


"""
LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685): a linear layer plus a trainable low-rank update,

    y = W x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r)

where W and b are the pretrained weights, frozen. B starts at zero, so a fresh layer computes what
the pretrained one did. For inference the update is folded into W (merged): model.eval() merges,
model.train() takes it out again, so a LoRA model evaluates as fast as the model without LoRA.

    model = mark_only_lora_as_trainable(model)        # only lora_A and lora_B train
    trainable, total, percent = parameter_summary(model)
    torch.save(lora_state_dict(model), "adapter.pt")  # a few MB
    add_lora(any_model, ".*(q|v)_proj", lora_rank=8, lora_alpha=16)  # LoRA on another PyTorch model

After the layer, marked: the machinery that makes merging safe, and LoRASlicedLinear, which adapts
only some slices of a fused projection (the LoRA paper's query and value of GPT-2's c_attn).
"""

import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    """nn.Linear with LoRA of rank lora_rank (0: a plain nn.Linear). rslora: scale by alpha / sqrt(r)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, rslora=False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)  # draws W and b
        self.lora_rank, self.has_weights_merged, self.merge_on_eval = lora_rank, False, True
        if lora_rank > 0:
            # BEGIN SOLUTION LoRALinear.__init__
            # STUB: # TODO: store lora_alpha, the update's scale alpha / r (alpha / sqrt(r) when rslora), and
            # STUB: # lora_dropout as an nn.Dropout; create lora_A (r x in) and lora_B (out x r) as frozen
            # STUB: # nn.Parameters (requires_grad=False); then call self.reset_parameters() to initialise them.
            # STUB: # Hint: self._lora_shapes(in_features, out_features) gives the two shapes.
            # STUB: raise NotImplementedError("LoRALinear.__init__: create lora_A and lora_B")
            self.lora_alpha = lora_alpha
            self.lora_scaling = lora_alpha / (math.sqrt(lora_rank) if rslora else lora_rank)
            self.lora_dropout = nn.Dropout(lora_dropout)
            a_shape, b_shape = self._lora_shapes(in_features, out_features)
            # frozen until mark_only_lora_as_trainable() turns them on, as in the homework
            self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype), requires_grad=False)
            self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype), requires_grad=False)
            self.reset_parameters()  # the starter's order of random draws: W and b again, then A
            # END SOLUTION

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # W x + b
        # BEGIN SOLUTION LoRALinear.forward
        # STUB: # TODO: unless the update is merged into W (has_weights_merged) or there is no LoRA (is_lora()),
        # STUB: # add (alpha / r) B A dropout(x) to y. Hint: self.lora_update(x) computes B A x.
        # STUB: if self.is_lora():
        # STUB:     raise NotImplementedError("LoRALinear.forward: add the low-rank update")
        if self.is_lora() and not self.has_weights_merged:
            y = y + self.lora_scaling * self.lora_update(self.lora_dropout(x))  # + (alpha / r) B A dropout(x)
        # END SOLUTION
        return y

    def lora_update(self, x):
        return F.linear(F.linear(x, self.lora_A), self.lora_B)  # B A x

    def delta_weight(self):
        """scaling * B @ A in float32: the update merging adds to W (no autograd history)."""
        return self.lora_scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self):
        """Fold the update into W: the layer then costs what an nn.Linear costs. Merging twice does nothing."""
        if self.is_lora() and not self.has_weights_merged:
            self._add_delta(1)
            self.has_weights_merged = True
        return self

    def unmerge(self):
        """Take the update out of W again, for training. Un-merging twice does nothing."""
        if self.is_lora() and self.has_weights_merged:
            self._add_delta(-1)
            self.has_weights_merged = False
        return self

    def train(self, mode=True):
        # nn.Module.eval() calls train(False) on every child, never a child's eval(): overriding train()
        # is what makes model.eval() merge (loralib overrode only eval(): microsoft/LoRA#61)
        super().train(mode)
        # BEGIN SOLUTION LoRALinear.train
        # STUB: # TODO: train(True) takes a merged update out of W again (unmerge); train(False) folds it in
        # STUB: # (merge), unless merge_on_eval is off. Both leave a layer without LoRA as it is.
        # STUB: if self.is_lora():
        # STUB:     raise NotImplementedError("LoRALinear.train: merge or un-merge")
        if mode:
            self.unmerge()
        elif self.merge_on_eval:  # evaluating() turns this off for loss estimates during training
            self.merge()
        # END SOLUTION
        return self

    def eval(self):
        """The layer for inference, its update merged into W; returns self."""
        # BEGIN SOLUTION LoRALinear.eval
        # STUB: # TODO: put the layer in eval mode with its LoRA update merged into W, and return it.
        # STUB: raise NotImplementedError("LoRALinear.eval: merge the update")
        return self.train(False)
        # END SOLUTION

    def is_lora(self):
        return self.lora_rank > 0

    def reset_parameters(self):
        # nn.Linear.__init__ calls this before the LoRA tensors exist; W and b are initialised
        # exactly as nn.Linear does, so a rank-0 layer is an nn.Linear to the last bit
        super().reset_parameters()
        if getattr(self, "lora_A", None) is not None:
            # BEGIN SOLUTION LoRALinear.reset_parameters
            # STUB: # TODO: initialise lora_A as nn.Linear initialises its weight (Kaiming-uniform, a=sqrt(5))
            # STUB: # and lora_B to zeros, so that B A = 0; the layer is then un-merged.
            # STUB: raise NotImplementedError("LoRALinear.reset_parameters: initialise lora_A and lora_B")
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear does for its weight
            nn.init.zeros_(self.lora_B)  # B A = 0: training starts from the pretrained function
            self.has_weights_merged = False
            # END SOLUTION

    # --- machinery: safe merging, state dicts ------------------------------------------------------
    # A merge adds in float32 and rounds once (also for half-precision W), and refuses an update that
    # holds NaN. A state_dict() always holds the *un-merged* W next to lora_A and lora_B, whatever mode
    # the layer is in: a checkpoint saved in eval mode loads into a fresh model (in either mode) with
    # the same outputs, and the update is never added twice. Loading into a merged layer keeps it
    # merged with the loaded A and B, also when only the LoRA tensors are loaded (strict=False).

    def _lora_shapes(self, in_features, out_features):
        return (self.lora_rank, in_features), (out_features, self.lora_rank)

    @torch.no_grad()
    def _add_delta(self, sign):
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("the LoRA update holds NaN or infinite values (the training diverged); "
                             "refusing to add it to the weights")
        self.weight.copy_(self.weight.float() + sign * delta)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_weights_merged:
            destination[prefix + "weight"] = (self.weight.detach().float() - self.delta_weight()).to(self.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merged = self.has_weights_merged
        self.unmerge()  # load W, A, B as the un-merged tensors they are ...
        pissa = prefix + "lora_A0" in state_dict
        if pissa and getattr(self, "lora_A0", None) is None:  # a PiSSA layer's initial A and B (see pissa_init)
            self.register_buffer("lora_A0", torch.empty_like(self.lora_A))
            self.register_buffer("lora_B0", torch.empty_like(self.lora_B))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if pissa and prefix + "weight" not in state_dict:  # an adapter alone, on the original base: its residual
            with torch.no_grad():
                self.weight.copy_(self.weight.float() - _pissa_update(self))
        self._after_load(state_dict, prefix)
        if merged:
            self.merge()  # ... then fold the loaded update back in

    def _after_load(self, state_dict, prefix):
        """What a variant of the layer derives from loaded weights (DoRA: its magnitudes)."""

    def extra_repr(self):
        s = super().extra_repr()
        if self.is_lora():
            s += f", lora_rank={self.lora_rank}, lora_scaling={self.lora_scaling:g}, lora_dropout={self.lora_dropout.p:g}"
        return s


class LoRASlicedLinear(LoRALinear):
    """
    LoRA on some of the output's equal slices only, each with an update of its own: lora_slices=(True,
    False, True) adapts the query and value of GPT-2's fused query/key/value projection and leaves the
    key alone, as the LoRA paper did. The slices' A are stacked in lora_A, their B in lora_B.
    """

    def __init__(self, in_features, out_features, lora_slices, **kwargs):
        self.lora_slices = tuple(lora_slices)  # read by _lora_shapes during LoRALinear.__init__
        self.slice_size = out_features // len(self.lora_slices)
        super().__init__(in_features, out_features, **kwargs)

    def _lora_shapes(self, in_features, out_features):
        n = sum(self.lora_slices)
        return (n * self.lora_rank, in_features), (n * self.slice_size, self.lora_rank)

    def _assemble(self, parts, dim):
        """The adapted slices' parts (B_i A_i x, or B_i A_i) in their places along dim, zeros in the others."""
        shape = list(parts[0].shape)
        shape[dim] = self.slice_size
        zeros, parts = parts[0].new_zeros(shape), iter(parts)
        return torch.cat([next(parts) if on else zeros for on in self.lora_slices], dim)

    def lora_update(self, x):
        h = F.linear(x, self.lora_A)
        return self._assemble([F.linear(h_i, b) for h_i, b in zip(h.split(self.lora_rank, -1),
                                                                    self.lora_B.split(self.slice_size))], -1)

    def delta_weight(self):
        A, B = self.lora_A.detach().float(), self.lora_B.detach().float()
        return self.lora_scaling * self._assemble([b @ a for a, b in zip(A.split(self.lora_rank),
                                                                         B.split(self.slice_size))], 0)

    def extra_repr(self):
        return super().extra_repr() + (f", lora_slices={self.lora_slices}" if self.is_lora() else "")


# --- variants: DoRA and PiSSA ------------------------------------------------------------------------

class DoRALinear(LoRALinear):
    """
    DoRA (Liu et al., 2024, arXiv:2402.09353): the adapted weight has the direction of W + s B A and,
    per output feature, the length of a learned magnitude m (initialised to the lengths of W's rows),

        y = m / ||W + s B A|| * (W x + s B A dropout(x)) + b

    the norm taken over each output feature's row and, as in the paper and PEFT, treated as a constant
    in the backward pass. With dropout, W x's share of the update sees dropout(x) too, as in PEFT.
    Merging folds the whole change into W and remembers the factor m / ||W + s B A|| to undo it.
    """

    @classmethod
    def from_lora(cls, layer):
        """The LoRALinear layer (with LoRA), in place, as a DoRALinear; m from its weights."""
        layer.__class__ = cls
        layer._factor = None  # m / ||W + s B A|| while merged
        layer.lora_magnitude = nn.Parameter(layer._norm(), requires_grad=layer.lora_A.requires_grad)
        return layer

    def reset_magnitude(self):
        """m = ||W + s B A||: the layer computes what W + s B A does (after new weights are loaded)."""
        self.lora_magnitude.data.copy_(self._norm())

    @torch.no_grad()
    def _norm(self, weight=None):
        """||W + s B A|| of each output feature's row, in float32."""
        W = self._unmerged_weight() if weight is None else weight
        return torch.linalg.vector_norm(W.float() + super().delta_weight(), dim=1)

    def forward(self, x):
        if self.has_weights_merged:
            return F.linear(x, self.weight, self.bias)
        scale = (self.lora_magnitude / self._norm(self.weight)).to(x.dtype)  # no gradient through the norm
        wx = F.linear(x, self.weight)
        dropped = self.training and self.lora_dropout.p > 0
        xd = self.lora_dropout(x) if dropped else x
        y = wx + (scale - 1) * (F.linear(xd, self.weight) if dropped else wx) \
            + scale * self.lora_scaling * self.lora_update(xd)
        return y if self.bias is None else y + self.bias

    def _unmerged_weight(self):
        if not self.has_weights_merged:
            return self.weight
        return self.weight.detach().float() / self._factor[:, None] - super().delta_weight()

    def delta_weight(self):
        """What merging adds to W: m / ||W + s B A|| * (W + s B A) - W, in float32."""
        W = self._unmerged_weight().detach().float()
        factor = self.lora_magnitude.detach().float() / self._norm(W)
        return factor[:, None] * (W + super().delta_weight()) - W

    @torch.no_grad()
    def _add_delta(self, sign):
        if sign > 0:
            factor = self.lora_magnitude.detach().float() / self._norm()
            merged = factor[:, None] * (self.weight.float() + super().delta_weight())
            if not torch.isfinite(merged).all():
                raise ValueError("the DoRA update holds NaN or infinite values (the training diverged); "
                                 "refusing to add it to the weights")
            self.weight.copy_(merged)
            self._factor = factor
        else:
            self.weight.copy_(self._unmerged_weight())
            self._factor = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Linear._save_to_state_dict(self, destination, prefix, keep_vars)
        if self.has_weights_merged:
            destination[prefix + "weight"] = self._unmerged_weight().to(self.weight.dtype)

    def _after_load(self, state_dict, prefix):
        if prefix + "lora_magnitude" not in state_dict and prefix + "weight" in state_dict:
            self.reset_magnitude()  # new weights without magnitudes: m from them

    def extra_repr(self):
        return super().extra_repr() + ", dora"


def use_dora(model):
    """Every LoRALinear layer with LoRA of model, in place, a DoRALinear; the model."""
    for m in model.modules():
        if type(m) is LoRALinear and m.is_lora():
            DoRALinear.from_lora(m)
    return model


def _pissa_update(layer):
    """s B0 A0: what PiSSA moved out of W into the adapter's initial A and B, in float32."""
    return layer.lora_scaling * (layer.lora_B0.float() @ layer.lora_A0.float())


@torch.no_grad()
def pissa_init(model, niter=None):
    """
    PiSSA (Meng et al., 2024, arXiv:2404.02948) on every LoRA layer of model: A and B start from the top
    r singular vectors and values of W (W = U S V^T: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, so
    s B A is W's best rank-r part) and W becomes the residual W - s B A, so the model computes what it
    did. niter: a randomised SVD with that many subspace iterations (torch.svd_lowrank) instead of the
    exact one. The initial A and B stay in the layer as buffers lora_A0, lora_B0: with them an adapter
    alone rebuilds the residual from the original base. The model.
    """
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.is_lora():
            if isinstance(m, LoRASlicedLinear):
                raise ValueError("PiSSA starts from the singular vectors of a whole weight, not of slices of it: "
                                 "use lora_targets attn or attn_mlp")
            W = m.weight.float()
            if niter is None:
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            else:
                U, S, V = torch.svd_lowrank(W, q=m.lora_rank, niter=niter)
                Vh = V.t()
            r = m.lora_rank
            root = torch.sqrt(S[:r] / m.lora_scaling)
            m.lora_A.copy_(root[:, None] * Vh[:r])
            m.lora_B.copy_(U[:, :r] * root[None, :])
            m.register_buffer("lora_A0", m.lora_A.detach().clone())
            m.register_buffer("lora_B0", m.lora_B.detach().clone())
            m.weight.copy_(W - _pissa_update(m))
    return model


def pissa_iterations(lora_init):
    """lora_init's randomised-SVD iterations: None for the exact SVD (pissa) or for default, N for
    pissa_niter_N; False for anything else."""
    if lora_init in ("default", "pissa"):
        return None
    n = lora_init.removeprefix("pissa_niter_")
    return int(n) if lora_init.startswith("pissa_niter_") and n.isdigit() and int(n) >= 1 else False


def is_lora_param(name, *kinds):
    """Whether a state-dict name is an adapter's: lora_A or lora_B, DoRA's lora_magnitude, PiSSA's initial
    lora_A0 and lora_B0; or only the kinds given."""
    return name.rsplit(".", 1)[-1] in (kinds or ADAPTER_TENSORS)


ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude", "lora_A0", "lora_B0")


def mark_only_lora_as_trainable(model):
    """Freeze everything except the LoRA matrices (biases, LayerNorms and embeddings included)."""
    # BEGIN SOLUTION mark_only_lora_as_trainable
    # STUB: # TODO: let only the parameters named lora_A or lora_B train (requires_grad); freeze the rest.
    # STUB: # Hint: is_lora_param(name) tells them apart.
    # STUB: raise NotImplementedError("mark_only_lora_as_trainable")
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_param(name)
    # END SOLUTION
    return model


def lora_state_dict(model):
    """Only the LoRA tensors of model.state_dict(): a few MB instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def add_lora(model, target_modules, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0, rslora=False):
    """
    LoRA on any PyTorch model: each nn.Linear whose qualified name matches target_modules (a regular
    expression matched against the whole name, or a list of names) becomes a LoRALinear holding the same
    weights, in the same place. Returns the model; make only the LoRA matrices train with
    mark_only_lora_as_trainable(model). A pattern that matches no nn.Linear is a ValueError naming those
    there are.
    """
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if isinstance(target_modules, str):
        chosen = [name for name in linears if re.fullmatch(target_modules, name)]
    else:
        chosen = list(target_modules)
    unknown = [name for name in chosen if name not in linears]
    if not chosen or unknown:
        raise ValueError(f"target_modules {target_modules!r} names no nn.Linear of the model"
                         f"{' (' + unknown[0] + ' is none)' if unknown else ''}; it has: {', '.join(linears) or 'none'}")
    for name in chosen:
        old = linears[name]
        new = LoRALinear(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device,
                         dtype=old.weight.dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_dropout=lora_dropout, rslora=rslora)
        new.load_state_dict(old.state_dict(), strict=False)  # the same W and b; A drawn, B zero
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        new.train(old.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def parameter_summary(model):
    """(trainable, total, percent trainable): homework question 2.3."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, 100.0 * trainable / total


@contextmanager
def evaluating(model):
    """model.eval() for a loss estimate during training, LoRA kept un-merged; the mode is restored after."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    was_training = model.training
    for m in layers:
        m.merge_on_eval = False
    try:
        yield model.eval()
    finally:
        model.train(was_training)
        for m in layers:
            m.merge_on_eval = True

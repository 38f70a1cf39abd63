"""
Variants of LoRA's update, for train.py's --lora_targets=qv, --lora_variant=dora and --lora_init=pissa.
Part of the solution only: the starter leaves this file out, since its layers merge an update into W,
which is what the homework asks a student to write.

    LoRASlicedLinear   LoRA on some slices of a fused projection (the LoRA paper's query and value)
    DoRALinear         DoRA (Liu et al., 2024): a learned magnitude per output feature, W + s B A's direction
    pissa_init         PiSSA (Meng et al., 2024): A and B from W's top singular vectors, W the residual

The layers stand beside lora.LoRALinear rather than on it, so they work whoever wrote lora.py; they
offer its API (lora_A, lora_B, lora_scaling, lora_dropout, has_weights_merged, is_lora, train, eval)
and, as PEFT's layers do, the update as a method and explicit, idempotent merging.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdaptedLinear(nn.Linear):
    """
    An nn.Linear with a low-rank update, y = W x + b + s B A dropout(x), s = alpha / r; the base of the
    variants. A merge adds in float32 and rounds once, and refuses an update that holds NaN. A
    state_dict() holds the un-merged W in either mode, so the update is never added twice.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, lora_rank=1, lora_alpha=1.0,
                 lora_dropout=0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_rank, self.has_weights_merged = lora_rank, False
        self.lora_scaling = lora_alpha / lora_rank
        self.lora_dropout = nn.Dropout(lora_dropout)
        a_shape, b_shape = self._lora_shapes(in_features, out_features)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype), requires_grad=False)
        self.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=dtype), requires_grad=False)
        self.reset_parameters()

    def is_lora(self):
        return True

    def _lora_shapes(self, in_features, out_features):
        return (self.lora_rank, in_features), (out_features, self.lora_rank)

    def reset_parameters(self):
        super().reset_parameters()
        if getattr(self, "lora_A", None) is not None:
            nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
            nn.init.zeros_(self.lora_B)
            self.has_weights_merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.has_weights_merged:
            y = y + self.lora_scaling * self.lora_update(self.lora_dropout(x))
        return y

    def lora_update(self, x):
        return F.linear(F.linear(x, self.lora_A), self.lora_B)  # B A x

    def delta_weight(self):
        """What merging adds to W (s B A), in float32, without autograd history."""
        return self.lora_scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merge(self):
        """Fold the update into W; merging twice does nothing."""
        if not self.has_weights_merged:
            self._add_delta(1)
            self.has_weights_merged = True
        return self

    def unmerge(self):
        """Take the update out of W again; un-merging twice does nothing."""
        if self.has_weights_merged:
            self._add_delta(-1)
            self.has_weights_merged = False
        return self

    def train(self, mode=True):
        super().train(mode)
        return self.unmerge() if mode else self

    def eval(self):
        return self.train(False).merge()

    @torch.no_grad()
    def _add_delta(self, sign):
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("the LoRA update holds NaN or infinite values (the training diverged); "
                             "refusing to add it to the weights")
        self.weight.copy_(self.weight.float() + sign * delta)

    def _unmerged_weight(self):
        if not self.has_weights_merged:
            return self.weight.detach()
        return (self.weight.detach().float() - self.delta_weight()).to(self.weight.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_weights_merged:
            destination[prefix + "weight"] = self._unmerged_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merged = self.has_weights_merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._after_load(state_dict, prefix)
        if merged:
            self.merge()

    def _after_load(self, state_dict, prefix):
        """What a variant derives from loaded weights (DoRA: its magnitudes)."""

    def extra_repr(self):
        return (f"{super().extra_repr()}, lora_rank={self.lora_rank}, lora_scaling={self.lora_scaling:g}, "
                f"lora_dropout={self.lora_dropout.p:g}")


class LoRASlicedLinear(AdaptedLinear):
    """
    LoRA on some of the output's equal slices only, each with an update of its own: lora_slices=(True,
    False, True) adapts the query and value of GPT-2's fused query/key/value projection and leaves the
    key alone, as the LoRA paper did. The slices' A are stacked in lora_A, their B in lora_B.
    """

    def __init__(self, in_features, out_features, lora_slices, **kwargs):
        self.lora_slices = tuple(lora_slices)  # read by _lora_shapes during __init__
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
        return super().extra_repr() + f", lora_slices={self.lora_slices}"


class DoRALinear(AdaptedLinear):
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
        """A DoRALinear with a LoRA layer's W, b, A, B, scaling and dropout (any layer with lora_A and lora_B,
        un-merged); m from its weights."""
        rank = layer.lora_A.shape[0]
        new = _copy_of(layer, cls, lora_rank=rank, lora_alpha=layer.lora_scaling * rank,
                       lora_dropout=layer.lora_dropout.p)
        with torch.no_grad():
            new.lora_A.copy_(layer.lora_A)
            new.lora_B.copy_(layer.lora_B)
        new.lora_scaling = layer.lora_scaling  # exactly, rsLoRA's too
        new.reset_magnitude()
        new.lora_magnitude.requires_grad_(layer.lora_A.requires_grad)
        return new

    def __init__(self, *args, **kwargs):
        self._factor = None  # m / ||W + s B A|| while merged
        super().__init__(*args, **kwargs)
        self.lora_magnitude = nn.Parameter(self._norm(), requires_grad=False)

    def reset_magnitude(self):
        """m = ||W + s B A||: the layer computes what W + s B A does (after new weights are loaded)."""
        self.lora_magnitude.data.copy_(self._norm())

    @torch.no_grad()
    def _norm(self, weight=None):
        """||W + s B A|| of each output feature's row, in float32."""
        W = self._unmerged_weight() if weight is None else weight
        # a row of zeros has no direction: its norm kept off zero, so it stays zeros instead of NaN
        return torch.linalg.vector_norm(W.float() + super().delta_weight(), dim=1).clamp_min(1e-12)

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
            return self.weight.detach()
        W = self.weight.detach().float() / self._factor[:, None] - super().delta_weight()
        return W.to(self.weight.dtype)

    def delta_weight(self):
        """What merging adds to W: m / ||W + s B A|| * (W + s B A) - W, in float32."""
        W = self._unmerged_weight().float()
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

    def _after_load(self, state_dict, prefix):
        if prefix + "lora_magnitude" not in state_dict and prefix + "weight" in state_dict:
            self.reset_magnitude()  # new weights without magnitudes: m from them

    def extra_repr(self):
        return super().extra_repr() + ", dora"


def use_dora(model):
    """Every LoRA layer of model (a GPT's, after its LoRA settings), in place, a DoRALinear; the model."""
    from lorakit.adapters import lora_layers, replace_layer
    for name, m in lora_layers(model):
        replace_layer(model, name, DoRALinear.from_lora(m))
    return model


def _copy_of(layer, cls, **kwargs):
    """A new layer of cls with layer's shape, W and b, in its mode."""
    new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.weight.device,
              dtype=layer.weight.dtype, **kwargs)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return new.train(layer.training)


def slice_qv(model, lora_rank, lora_alpha, lora_dropout):
    """Each block's c_attn as a LoRASlicedLinear that adapts the query and value only, and its c_proj a plain
    nn.Linear, as in the LoRA paper; W and b kept."""
    for block in model.transformer.h:
        attn = block.attn
        attn.c_attn = _copy_of(attn.c_attn, LoRASlicedLinear, lora_slices=(True, False, True), lora_rank=lora_rank,
                               lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        attn.c_proj = _copy_of(attn.c_proj, nn.Linear)
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
    alone rebuilds the residual from the original base (load_pissa). The model.
    """
    from lorakit.adapters import lora_layers
    for name, m in lora_layers(model):
        if isinstance(m, LoRASlicedLinear):
            raise ValueError("PiSSA starts from the singular vectors of a whole weight, not of slices of it: "
                             "use lora_targets attn or attn_mlp")
        W, r = m.weight.float(), m.lora_A.shape[0]
        if r > min(W.shape):
            raise ValueError(f"PiSSA of rank {r} needs a layer at least that wide, and {name} is {tuple(W.shape)}: "
                             f"use --lora_rank={min(W.shape)} or less")
        if niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:
            U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
            Vh = V.t()
        root = torch.sqrt(S[:r] / m.lora_scaling)
        m.lora_A.copy_(root[:, None] * Vh[:r])
        m.lora_B.copy_(U[:, :r] * root[None, :])
        m.register_buffer("lora_A0", m.lora_A.detach().clone())
        m.register_buffer("lora_B0", m.lora_B.detach().clone())
        m.weight.copy_(W - _pissa_update(m))
    return model


def load_pissa(model, state):
    """
    model.load_state_dict(state, strict=False) for a state that holds PiSSA's initial A and B: their
    buffers made first, and where the state has no W (an adapter alone, on the original base) the
    residual W - s B0 A0 rebuilt. The load's result.
    """
    layers = {name: model.get_submodule(name) for name in
              {k.rsplit(".", 1)[0] for k in state if k.endswith(".lora_A0")}}
    for m in layers.values():
        if getattr(m, "lora_A0", None) is None:
            m.register_buffer("lora_A0", torch.empty_like(m.lora_A))
            m.register_buffer("lora_B0", torch.empty_like(m.lora_B))
    result = model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for name, m in layers.items():
            if f"{name}.weight" not in state:
                m.weight.copy_(m.weight.float() - _pissa_update(m))
    return result

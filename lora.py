"""
LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) for linear layers.

LoRALinear is an nn.Linear with a trainable low-rank update: y = W x + b + (alpha/r) * B A x,
where A is (r, in) and B is (out, r). B starts at zero, so a fresh layer computes exactly what the
pretrained nn.Linear computed. For inference the update can be folded into W ("merged"), which makes
a LoRA model exactly as fast as the model without LoRA. Two options beyond the paper's layer:
rslora=True scales by alpha / sqrt(r) instead (rank-stabilised LoRA, Kalajdzievski 2023), and
lora_slices gives each of some equal slices of the output its own update and the others none (the
query and value of GPT-2's fused query/key/value projection, as the LoRA paper adapted them).

Merging is explicit, idempotent and safe (an update holding NaN is refused; the sum is computed in
float32 and rounded once, also for half-precision weights):
    layer.merge()    W <- W + scaling * B @ A   (once; calling it again does nothing)
    layer.unmerge()  W <- W - scaling * B @ A   (once)
and it follows the module's mode, as the homework asks: model.eval() merges, model.train() un-merges.
nn.Module.eval() calls train(False) on every child and never a child's eval(), so overriding
train() is what makes model.eval() merge too (loralib only overrode eval(): microsoft/LoRA#61).
For a loss estimate in the middle of training, `with evaluating(model):` switches dropout off
and keeps LoRA un-merged, so W is never rounded by merging and un-merging at every evaluation.

What a state_dict() means: it always holds the *un-merged* base weight W next to lora_A and lora_B,
whatever mode the layer is in. A checkpoint saved from a model in eval mode therefore loads into a
fresh model (in either mode) with the same outputs, and the update is never added twice. Loading
into a merged layer keeps it merged, with the loaded A and B; that includes loading only the LoRA
tensors (lora_state_dict) with strict=False.

    model = mark_only_lora_as_trainable(model)        # only lora_A and lora_B train
    trainable, total, percent = parameter_summary(model)
    torch.save(lora_state_dict(model), "adapter.pt")  # a few MB
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, lora_slices=None, rslora=False):
        """
        lora_slices: which of the output's equal slices get an update of their own, e.g. (True, False,
        True) for the query and value of GPT-2's fused query/key/value projection; None: the whole
        output, one update. rslora: scale by alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r.
        """
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_rank = lora_rank
        self.has_weights_merged = False
        self.merge_on_eval = True  # eval() merges; see evaluating()
        if lora_rank > 0:
            self.lora_alpha = lora_alpha
            self.lora_scaling = lora_alpha / (math.sqrt(lora_rank) if rslora else lora_rank)
            self.lora_dropout = nn.Dropout(lora_dropout)
            self.lora_slices = tuple(lora_slices or (True,))
            n, self.slice_size = sum(self.lora_slices), out_features // len(self.lora_slices)
            # one (r, in) A and one (slice, r) B per adapted slice, stacked; frozen until
            # mark_only_lora_as_trainable() turns them on, as in the homework
            self.lora_A = nn.Parameter(torch.empty(n * lora_rank, in_features, device=device, dtype=dtype),
                                       requires_grad=False)
            self.lora_B = nn.Parameter(torch.empty(n * self.slice_size, lora_rank, device=device, dtype=dtype),
                                       requires_grad=False)
            self._reset_lora_parameters()

    def is_lora(self):
        return self.lora_rank > 0

    def reset_parameters(self):
        # nn.Linear.__init__ calls this before the LoRA tensors exist; W and b are initialised
        # exactly as nn.Linear does, so a rank-0 layer is an nn.Linear to the last bit
        super().reset_parameters()
        if getattr(self, "lora_A", None) is not None:
            self._reset_lora_parameters()

    def _reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear does for its weight
        nn.init.zeros_(self.lora_B)  # B A = 0: training starts from the pretrained function
        self.has_weights_merged = False

    def _assemble(self, parts, dim):
        """The adapted slices' parts (B_i A_i x, or B_i A_i) in their places along dim, zeros in the others."""
        if len(self.lora_slices) == 1:
            return parts[0]
        shape = list(parts[0].shape)
        shape[dim] = self.slice_size
        zeros, parts = parts[0].new_zeros(shape), iter(parts)
        return torch.cat([next(parts) if on else zeros for on in self.lora_slices], dim)

    def delta_weight(self):
        """scaling * B @ A in float32 (per adapted slice), the update merging adds to W (no autograd history)."""
        A, B = self.lora_A.detach().float(), self.lora_B.detach().float()
        parts = [b @ a for a, b in zip(A.split(self.lora_rank), B.split(self.slice_size))]
        return self.lora_scaling * self._assemble(parts, 0)

    @torch.no_grad()
    def _add_delta(self, sign):
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("the LoRA update holds NaN or infinite values (the training diverged); "
                             "refusing to add it to the weights")
        # in float32 and rounded once, also when W is kept in half precision
        self.weight.copy_(self.weight.float() + sign * delta)

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
        super().train(mode)
        if mode:
            self.unmerge()
        elif self.merge_on_eval:
            self.merge()
        return self

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.is_lora() and not self.has_weights_merged:
            h = F.linear(self.lora_dropout(x), self.lora_A)
            parts = [F.linear(h_i, b) for h_i, b in zip(h.split(self.lora_rank, -1), self.lora_B.split(self.slice_size))]
            y = y + self.lora_scaling * self._assemble(parts, -1)
        return y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_weights_merged:  # see the module docstring: W is always saved un-merged
            destination[prefix + "weight"] = (self.weight.detach().float() - self.delta_weight()).to(self.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        merged = self.has_weights_merged
        self.unmerge()  # load W, A, B as the un-merged tensors they are ...
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if merged:
            self.merge()  # ... then fold the loaded update back in

    def extra_repr(self):
        s = super().extra_repr()
        if self.is_lora():
            s += f", lora_rank={self.lora_rank}, lora_scaling={self.lora_scaling:g}, lora_dropout={self.lora_dropout.p:g}"
            if len(self.lora_slices) > 1:
                s += f", lora_slices={self.lora_slices}"
        return s


def is_lora_param(name):
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def mark_only_lora_as_trainable(model):
    """Freeze everything except the LoRA matrices (biases, LayerNorms and embeddings included)."""
    for name, p in model.named_parameters():
        p.requires_grad = is_lora_param(name)
    return model


def lora_state_dict(model):
    """Only the LoRA tensors of model.state_dict(): a few MB instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


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

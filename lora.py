"""
LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685): a linear layer plus a trainable low-rank update,

    y = W x + b + (alpha / r) * B A dropout(x)        A: (r, in), B: (out, r)

where W and b are the pretrained weights, frozen. B starts at zero, so a fresh layer computes what
the pretrained one did. For inference the update is folded into W once (eval() merges it), so a LoRA
model evaluates as fast as one without LoRA; train() takes it out again.

    layer = LoRALinear(768, 2304, lora_rank=16, lora_alpha=64.0, lora_dropout=0.05)
    model = mark_only_lora_as_trainable(model)       # only lora_A and lora_B train
    layer.eval()                                     # W += (alpha / r) B A, once
    layer.train()                                    # W -= (alpha / r) B A

This file is the course's API alone; what builds on it (adapters, DoRA, PiSSA, ...) is in lorakit/.
"""

import torch
import torch.nn as nn
# BEGIN SOLUTION LoRALinear.reset_parameters
import math
# END SOLUTION
# BEGIN SOLUTION LoRALinear.forward
import torch.nn.functional as F
# END SOLUTION


class LoRALinear(nn.Linear):
    """nn.Linear with a LoRA update of rank lora_rank; with lora_rank=0, exactly an nn.Linear."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 lora_rank=0, lora_alpha=0.0, lora_dropout=0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)  # draws W and b
        self.has_weights_merged = False
        if lora_rank > 0:
            # BEGIN SOLUTION LoRALinear.__init__
            # STUB: # TODO: the LoRA part of the layer (section 4.1 of the paper):
            # STUB: #   - self.lora_dropout, an nn.Dropout of probability lora_dropout for the update's input;
            # STUB: #   - self.lora_scaling, the factor alpha / r the update is multiplied by;
            # STUB: #   - self.lora_A of shape (r, in_features) and self.lora_B of shape (out_features, r), as
            # STUB: #     nn.Parameters on the layer's device and dtype, frozen (requires_grad=False) until
            # STUB: #     mark_only_lora_as_trainable lets them train.
            # STUB: raise NotImplementedError("LoRALinear.__init__: create lora_dropout, lora_scaling, lora_A, lora_B")
            self.lora_dropout = nn.Dropout(lora_dropout)
            self.lora_scaling = lora_alpha / lora_rank
            self.lora_A = nn.Parameter(torch.empty(lora_rank, in_features, device=device, dtype=dtype),
                                       requires_grad=False)
            self.lora_B = nn.Parameter(torch.empty(out_features, lora_rank, device=device, dtype=dtype),
                                       requires_grad=False)
            # END SOLUTION
            self.reset_parameters()  # the starter's order of random draws: W and b again, then A

    def is_lora(self):
        return hasattr(self, "lora_A")

    def reset_parameters(self):
        # nn.Linear.__init__ calls this before lora_A exists: W and b are drawn as nn.Linear draws them,
        # so a layer without LoRA is an nn.Linear to the last bit
        nn.Linear.reset_parameters(self)
        if self.is_lora():
            # BEGIN SOLUTION LoRALinear.reset_parameters
            # STUB: # TODO: initialise lora_A and lora_B as the paper does, so that the update B A starts at zero:
            # STUB: # A random (Kaiming-uniform with a=sqrt(5), as nn.Linear initialises its weight), B zero.
            # STUB: raise NotImplementedError("LoRALinear.reset_parameters: initialise lora_A and lora_B")
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)  # B A = 0: training starts from the pretrained function
            self.has_weights_merged = False  # W was drawn afresh
            # END SOLUTION

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # BEGIN SOLUTION LoRALinear.forward
        # STUB: # TODO: return W x + b, plus the scaled update (alpha / r) B A dropout(x) unless it is already
        # STUB: # merged into W. Dropout goes on the update's input only: the frozen path sees x itself.
        # STUB: raise NotImplementedError("LoRALinear.forward: add the low-rank update")
        y = F.linear(input, self.weight, self.bias)
        if self.is_lora() and not self.has_weights_merged:
            y = y + self.lora_scaling * F.linear(F.linear(self.lora_dropout(input), self.lora_A), self.lora_B)
        return y
        # END SOLUTION

    def train(self, mode: bool = True) -> "LoRALinear":
        # BEGIN SOLUTION LoRALinear.train
        # STUB: # TODO: set the layer's mode as nn.Module does; for training (mode=True), take a merged update
        # STUB: # back out of W (W -= (alpha / r) B A) so that A and B train again. Return the layer.
        # STUB: nn.Linear.train(self, mode)
        # STUB: if self.is_lora():
        # STUB:     raise NotImplementedError("LoRALinear.train: un-merge the update")
        # STUB: return self
        nn.Linear.train(self, mode)
        if mode and self.is_lora() and self.has_weights_merged:
            self._add_update(-1)
        return self
        # END SOLUTION

    def eval(self) -> "LoRALinear":
        # BEGIN SOLUTION LoRALinear.eval
        # STUB: # TODO: put the layer in eval mode and fold the update into W once (W += (alpha / r) B A), so
        # STUB: # that inference costs what nn.Linear costs; a second eval() must not add it again. Return the layer.
        # STUB: raise NotImplementedError("LoRALinear.eval: merge the update into W")
        self.train(False)
        if self.is_lora() and not self.has_weights_merged:
            self._add_update(1)
        return self
        # END SOLUTION

    def extra_repr(self):
        out = nn.Linear.extra_repr(self)
        if self.is_lora():
            out += (f", lora_rank={self.lora_A.shape[0]}, lora_scaling={self.lora_scaling:g}, "
                    f"lora_dropout={self.lora_dropout.p:g}")
        return out

    # BEGIN SOLUTION LoRALinear.eval
    def _update(self):
        return self.lora_scaling * (self.lora_B.detach().float() @ self.lora_A.detach().float())  # in float32

    @torch.no_grad()
    def _add_update(self, sign):
        """W +/- (alpha / r) B A, added in float32 and rounded once (a half-precision W too); an update that
        holds NaN or inf (a diverged run) is refused rather than spread into W."""
        delta = self._update()
        if not torch.isfinite(delta).all():
            raise ValueError("the LoRA update holds NaN or infinite values (the training diverged); "
                             "refusing to add it to the weights")
        self.weight.copy_(self.weight.float() + sign * delta)
        self.has_weights_merged = sign > 0

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # a state dict holds the un-merged W next to A and B in either mode: loaded anywhere, the update
        # is never counted twice
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.has_weights_merged:
            W = destination[prefix + "weight"].detach()
            destination[prefix + "weight"] = (W.float() - self._update()).to(W.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        merged = self.has_weights_merged
        if merged:  # load W, A and B as the un-merged tensors they are, then fold the loaded update in
            self._add_update(-1)
        super()._load_from_state_dict(*args, **kwargs)
        if merged:
            self._add_update(1)
    # END SOLUTION


def mark_only_lora_as_trainable(model):
    """Let only the LoRA matrices train: W, biases, LayerNorms and embeddings are frozen. Returns the model."""
    # BEGIN SOLUTION mark_only_lora_as_trainable
    # STUB: # TODO: set requires_grad on every parameter of the model: True for the LoRA matrices (lora_A and
    # STUB: # lora_B of its LoRALinear layers), False for everything else.
    # STUB: raise NotImplementedError("mark_only_lora_as_trainable")
    for name, p in model.named_parameters():
        p.requires_grad = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
    # END SOLUTION
    return model

"""
A lora.py as a student writes it for the course's starter, for tests/test_course.py: the course's API
and nothing else (no import from this repository, no lora_rank attribute, no merge helpers), train()
un-merging in either mode and eval() merging in the weight's own dtype, as the course's hints suggest.
"""
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Linear):

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.has_weights_merged = False
        if lora_rank > 0:
            self.lora_dropout = nn.Dropout(lora_dropout)
            self.lora_scaling = lora_alpha / lora_rank
            self.lora_A = nn.Parameter(torch.empty((lora_rank, in_features), device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.empty((out_features, lora_rank), device=device, dtype=dtype))
            self.lora_A.requires_grad = False
            self.lora_B.requires_grad = False
            self.reset_parameters()

    def is_lora(self) -> bool:
        return hasattr(self, 'lora_A')

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)
        if self.is_lora():
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            torch.nn.init.zeros_(self.lora_B)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(input, self.weight, self.bias)
        if self.is_lora() and not self.has_weights_merged:
            out = out + self.lora_scaling * (self.lora_dropout(input) @ self.lora_A.T @ self.lora_B.T)
        return out

    def train(self, mode: bool = True) -> "LoRALinear":
        super().train(mode)
        if self.is_lora() and self.has_weights_merged:
            self.weight.data -= self.lora_scaling * self.lora_B.data @ self.lora_A.data
            self.has_weights_merged = False
        return self

    def eval(self) -> "LoRALinear":
        super().eval()
        if self.is_lora() and not self.has_weights_merged:
            self.weight.data += self.lora_scaling * self.lora_B.data @ self.lora_A.data
            self.has_weights_merged = True
        return self

    def extra_repr(self) -> str:
        out = nn.Linear.extra_repr(self)
        if self.is_lora():
            out += f', lora_rank={self.lora_A.shape[0]}, lora_scaling={self.lora_scaling}, ' \
                   f'lora_dropout={self.lora_dropout.p}'
        return out


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad = False
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.is_lora():
            m.lora_A.requires_grad = True
            m.lora_B.requires_grad = True
    return model

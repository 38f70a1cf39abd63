"""
GPT-2 in one file, after nanoGPT (karpathy/nanoGPT model.py), with LoRA in the attention.

    python model.py     # trainable parameters of LoRA r=16/128/196 on every GPT-2 size (question 2.3)
    python model.py --lora_targets=qv

As the homework asks, the attention's fused query/key/value projection `c_attn` and its output
projection `c_proj` are LoRALinear layers (lora.py), one rank-r update for q, k and v together. Beyond
the homework, lorakit/adapters.py makes lora_targets "qv" adapt only the query and value slices of
c_attn (the LoRA paper's choice) and "attn_mlp" the MLP's c_fc and c_proj too. With lora_rank=0 this
is plain GPT-2.

    model = GPT.from_pretrained("gpt2-medium", dict(lora_rank=16, lora_alpha=64))
    logits, loss = model(idx, targets)      # targets of -1 are ignored

from_pretrained takes gpt2 .. gpt2-xl, any hub id of a GPT-2 checkpoint, or a local directory that
holds one. Generation (lorakit/decoding.py) uses a key/value cache and left-padded batches.
"""

import inspect
import math
import sys
from dataclasses import dataclass

from configurator import check, configure, one_of, run_cli, settings_of  # first: --help skips torch
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from lorakit import decoding
from lorakit.adapters import apply_lora_settings, is_lora_param
# BEGIN SOLUTION model.py attention
# STUB: # TODO (model.py attention, in CausalSelfAttention below): import LoRALinear from lora.py to use there.
from lora import LoRALinear
# END SOLUTION

# shapes of OpenAI's four GPT-2 checkpoints, for counting parameters without downloading them
PRETRAINED_SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
OVERRIDABLE = ("dropout", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_scaling", "lora_variant")
# where LoRA goes: the handout's attention projections c_attn and c_proj; the LoRA paper's query and
# value only (slices of the fused c_attn); or the attention and the MLP (lorakit/adapters.py)
LORA_TARGETS = ("attn", "qv", "attn_mlp")
LORA_SCALINGS = ("standard", "rslora")
LORA_VARIANTS = ("lora", "dora")  # the update: W + s B A, or DoRA's magnitude and direction (lorakit/variants.py)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # GPT-2's BPE; nanoGPT pads it to 50304 for speed, a checkpoint can't
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2 has them
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 0.0  # scaling of the update is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the LoRA branch's input
    lora_targets: str = "attn"  # one of LORA_TARGETS
    lora_scaling: str = "standard"  # alpha / r, or "rslora": alpha / sqrt(r)
    lora_variant: str = "lora"  # one of LORA_VARIANTS

    def __post_init__(self):
        assert self.lora_targets in LORA_TARGETS, f"lora_targets must be one of {LORA_TARGETS}"
        assert self.lora_scaling in LORA_SCALINGS, f"lora_scaling must be one of {LORA_SCALINGS}"
        assert self.lora_variant in LORA_VARIANTS, f"lora_variant must be one of {LORA_VARIANTS}"
        assert not (self.lora_variant == "dora" and self.lora_targets == "qv"), "DoRA adapts whole weights, not qv's slices"


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # BEGIN SOLUTION model.py attention
        # STUB: # TODO: make both projections LoRALinear layers (lora.py) of the same shapes, with the config's
        # STUB: # lora_rank, lora_alpha and lora_dropout.
        # STUB: self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # STUB: self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_attn = LoRALinear(config.n_embd, 3 * config.n_embd, bias=config.bias, lora_rank=config.lora_rank,
                                 lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
        self.c_proj = LoRALinear(config.n_embd, config.n_embd, bias=config.bias, lora_rank=config.lora_rank,
                                 lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
        # END SOLUTION
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, past=None, mask=None, start=0):
        """
        past: (k, v) of earlier positions or None; mask: (B, 1, T, S) bool, True = may attend.
        Outputs only positions start.. of x; all of x's keys and values go into the cache.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        q = q[:, :, start:]
        Tq, S = T - start, k.size(2)
        if mask is not None:
            mask = mask[:, :, start:]
        elif Tq > 1 and Tq < S:  # causal, the queries being the last Tq of S positions
            mask = torch.ones(Tq, S, dtype=torch.bool, device=x.device).tril(S - Tq)
        # no mask at all: a plain causal prefix, or one query that may see everything before it
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and Tq > 1,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, Tq, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu = gelu  # GPT.use_fast_gelu() swaps it for inference on a CPU

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def block_output(block, x, mask, start):
    return block(x, None, mask, start)[0]


def gelu(x):
    """GPT-2's GELU ("gelu_new"), the tanh approximation."""
    return F.gelu(x, approximate="tanh")


def gelu_sigmoid(x):
    """
    GPT-2's GELU written as x * sigmoid(2u), which equals 0.5 x (1 + tanh u) with
    u = sqrt(2/pi) (x + 0.044715 x^3); the two differ by a few float32 roundings. For inference on a
    CPU it is twice as fast as F.gelu, whose tanh is slow there; its backward is slower than F.gelu's.
    """
    c = 2 * math.sqrt(2 / math.pi)
    return torch.sigmoid(torch.addcmul(x.new_tensor(c), x, x, value=0.044715 * c) * x) * x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, past=None, mask=None, start=0):
        a, present = self.attn(self.ln_1(x), past, mask, start)
        x = x[:, start:] + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


def target_positions(targets, trim=True):
    """
    Where a (B, T) target tensor (-1 = none) has targets: (start, index) with start the first column
    that holds one (0 unless trim) and index their flat positions in targets[:, start:].
    """
    keep = targets != -1
    columns = keep.any(0).nonzero()
    start = int(columns[0]) if trim and len(columns) else 0
    return start, keep[:, start:].reshape(-1).nonzero().squeeze(1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.grad_checkpoint = False  # use_grad_checkpoint()
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        apply_lora_settings(self, config)  # lora_targets, lora_scaling, lora_variant beyond the homework's

    def _init_weights(self, module):
        # only W, b and embeddings: lora_A keeps its Kaiming init and lora_B its zeros
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, pos=None, mask=None, past=None, start=0):
        """
        Final-LayerNorm output (B, T - start, C) of positions start.. of idx, and each layer's (k, v).
        The last block computes only those positions: the earlier ones matter to it only as keys and
        values, which the blocks before it have already given it.
        """
        B, T = idx.size()
        if pos is None:
            assert T <= self.config.block_size, f"sequence of {T} tokens, block size is {self.config.block_size}"
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        presents = []
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            f = start if i == last else 0
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # the block's output alone: its keys and values (the cache) would keep what is recomputed
                x, kv = checkpoint(block_output, block, x, mask, f, use_reentrant=False), None
            else:
                x, kv = block(x, None if past is None else past[i], mask, f)
            presents.append(kv)
        return self.transformer.ln_f(x), presents

    def forward(self, idx, targets=None, positions=None):
        """
        (logits, loss), as in nanoGPT. Without targets: the logits of the last position (inference).
        With targets (-1 = ignore): the logits of every position and the mean loss of the targets.
        positions=target_positions(targets) asks for label_loss instead (the same loss, computed only
        where the targets are); it goes through forward so that DDP and torch.compile see it.
        """
        if positions is not None:
            return self.label_loss(idx, targets, positions)
        if targets is None:
            x, _ = self.hidden_states(idx, start=idx.size(1) - 1)
            return self.lm_head(x), None
        x, _ = self.hidden_states(idx)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def label_loss(self, idx, targets, positions):
        """
        (logits (N, vocab) of the N target positions, their mean loss): forward's loss at a fraction of
        its cost when few tokens are targets, as in fine-tuning on the label word. The LM head (50,257
        outputs) runs at the targets only, the last block from the first column that holds one.
        positions: target_positions(targets), found wherever the targets are (train.py does it on the
        host before a batch moves, so the GPU never waits to learn them).
        """
        start, index = positions
        x, _ = self.hidden_states(idx, start=start)
        logits = self.lm_head(x.reshape(-1, x.size(-1))[index])
        return logits, F.cross_entropy(logits, targets[:, start:].reshape(-1)[index])

    def use_grad_checkpoint(self, on=True):
        """
        Activation checkpointing in training: each block keeps only its input and recomputes the rest
        in the backward pass (with the same dropout masks), so activation memory shrinks from every
        block's to about one block's, for about one more forward pass of compute.
        """
        self.grad_checkpoint = on
        return self

    def use_fast_gelu(self, on=True):
        """
        For inference on a CPU: GPT-2's GELU in the form gelu_sigmoid, twice as fast there; its
        backward is slower, so training keeps F.gelu. generate.py turns it on when it runs on a CPU.
        """
        for block in self.transformer.h:
            block.mlp.gelu = gelu_sigmoid if on else gelu
        return self

    def frozen_weights_to(self, dtype):
        """
        Keep the frozen weights of the linear layers in dtype (the autocast one): half the memory, and no
        float32-to-half cast of them in every step. The LoRA matrices, their gradients and AdamW's state
        stay float32; so do embeddings and LayerNorms, which feed the float32 residual stream.
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad and name != "lm_head":
                module.weight.data = module.weight.data.to(dtype)
        return self

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to save memory when fine-tuning on short texts)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """
        GPT-2 from a Hugging Face checkpoint: gpt2 .. gpt2-xl, a hub id, or a local directory.
        override_args may set dropout and the LoRA settings; the rest comes from the checkpoint.
        """
        # Hugging Face's libraries only when a checkpoint is read
        from lorakit.hf_checkpoint import copy_gpt2_weights, read_hf_checkpoint
        override_args = dict(override_args or {})
        unknown = sorted(set(override_args) - set(OVERRIDABLE))
        if unknown:
            raise ValueError(f"from_pretrained cannot override {', '.join(unknown)}; "
                             f"only {', '.join(OVERRIDABLE)} can be set, the rest comes from the checkpoint")
        config_args, sd_hf = read_hf_checkpoint(model_type)
        return copy_gpt2_weights(cls(GPTConfig(**config_args, **override_args)), sd_hf, model_type)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, lora_plus_ratio=1.0):
        """
        AdamW over the trainable parameters only; matrices decay, biases and LayerNorms don't. Every
        group has an lr_scale: the LoRA B matrices' is lora_plus_ratio (LoRA+), the others' 1.
        """
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [dict(params=[p for n, p in params if p.dim() >= 2 and not is_lora_param(n, "lora_B")],
                       weight_decay=weight_decay, lr_scale=1.0),
                  dict(params=[p for n, p in params if is_lora_param(n, "lora_B")], weight_decay=weight_decay,
                       lr_scale=lora_plus_ratio),
                  dict(params=[p for n, p in params if p.dim() < 2], weight_decay=0.0, lr_scale=1.0)]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas,
                                 **(dict(fused=True) if fused else {}))

    # inference with a key/value cache, left-padded batches and a shared prefix (lorakit/decoding.py)
    generate = decoding.generate
    continuation_logprobs = decoding.continuation_logprobs
    prefix_cache = decoding.prefix_cache


def print_parameter_table(argv):
    from lorakit.adapters import lora_parameter_counts
    c = configure(settings_of(globals()), argv)
    ranks = [r.strip() for r in c.ranks.split(",")]
    check([one_of("lora_targets", c.lora_targets, LORA_TARGETS),
           (not all(r.isdecimal() and r.isascii() for r in ranks), f"ranks must be whole numbers >= 0, comma-separated "
                                                                   f"(like 16,128,196), not {c.ranks!r}")])
    print(f"LoRA on {c.lora_targets}")
    print(f"{'model':<12} {'rank':>4} {'trainable':>12} {'total':>15} {'trainable %':>12}")
    for name in PRETRAINED_SHAPES:
        for r in map(int, ranks):
            trainable, total, pct = lora_parameter_counts(name, r, c.lora_targets)
            print(f"{name:<12} {r:>4} {trainable:>12,} {total:>15,} {pct:>11.2f}%")


# -----------------------------------------------------------------------------
# what `python model.py` prints
lora_targets = "attn"  # attn, qv or attn_mlp (see GPTConfig)
ranks = "16,128,196"
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(run_cli(print_parameter_table, sys.argv[1:], __file__))

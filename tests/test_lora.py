"""LoRALinear against the formula W x + b + (alpha/r) B A x, merging, state dicts, trainability; lorakit's
adapters (add_lora, merge_lora, rsLoRA) and the sliced layer, which use the course's API of lora.py alone."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear, mark_only_lora_as_trainable
from lorakit.adapters import add_lora, lora_state_dict, merge_lora
from lorakit.variants import LoRASlicedLinear
from model import GPT, GPTConfig


def lora_layer(seed=0, in_f=12, out_f=10, r=4, alpha=8.0, **kw):
    torch.manual_seed(seed)
    layer = LoRALinear(in_features=in_f, out_features=out_f, lora_rank=r, lora_alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained-looking, non-zero update
    return layer


def reference(layer, x):
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    return x @ W.T + b + layer.lora_scaling * (x @ A.T @ B.T)


def test_rank_zero_is_exactly_nn_linear():
    torch.manual_seed(3)
    ref = nn.Linear(7, 5)
    torch.manual_seed(3)
    layer = LoRALinear(in_features=7, out_features=5)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    x = torch.randn(3, 7)
    assert torch.equal(layer(x), ref(x))
    layer.eval()
    assert torch.equal(layer(x), ref(x))
    assert not layer.is_lora()


def starter_order_reference(seed, in_features, out_features, rank):
    """W, b and A as the course's starter draws them: nn.Linear's init, then reset_parameters() once A and B
    exist (W and b again, then A Kaiming-uniform)."""
    import math
    torch.manual_seed(seed)
    ref = nn.Linear(in_features, out_features)
    ref.reset_parameters()
    A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return ref.weight, ref.bias, A


def test_shapes_init_and_frozen_after_construction():
    W, b, A = starter_order_reference(0, 12, 10, 4)  # the random draws follow the starter's order
    layer = lora_layer(seed=0)
    assert torch.equal(layer.weight, W) and torch.equal(layer.bias, b) and torch.equal(layer.lora_A, A)
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (10, 4)
    assert layer.lora_scaling == 2.0
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    assert isinstance(layer.lora_dropout, nn.Dropout)
    fresh = LoRALinear(in_features=12, out_features=10, lora_rank=4, lora_alpha=8.0)
    assert torch.count_nonzero(fresh.lora_B) == 0
    assert fresh.eval() is fresh and fresh.has_weights_merged and not fresh.training  # the starter's eval()
    # kaiming_uniform_(a=sqrt(5)) draws from U(-1/sqrt(in), 1/sqrt(in))
    assert fresh.lora_A.abs().max() <= 1 / math.sqrt(12) and fresh.lora_A.std() > 0.1 / math.sqrt(12)
    torch.manual_seed(5)
    a = LoRALinear(in_features=12, out_features=10, lora_rank=4, lora_alpha=8.0)
    torch.manual_seed(5)
    b = LoRALinear(in_features=12, out_features=10, lora_rank=4, lora_alpha=8.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert "lora_rank=4" in repr(a) and "lora_scaling=2" in repr(a) and "lora_dropout=0" in repr(a)


def test_fresh_layer_computes_the_base_linear():
    layer = LoRALinear(in_features=12, out_features=10, lora_rank=4, lora_alpha=8.0)
    x = torch.randn(2, 3, 12)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_forward_matches_formula_merged_and_unmerged():
    layer = lora_layer()
    x = torch.randn(2, 5, 12)
    expected = reference(layer, x)
    torch.testing.assert_close(layer(x), expected)
    W = layer.weight.detach().clone()
    layer.eval()
    assert layer.has_weights_merged
    torch.testing.assert_close(layer.weight, W + 2.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not layer.has_weights_merged
    torch.testing.assert_close(layer.weight, W)


def test_merge_is_idempotent_and_has_no_autograd_history():
    layer = lora_layer()
    mark_only_lora_as_trainable(layer)
    layer.eval()
    once = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.weight, once)
    assert layer.weight.grad_fn is None and layer.weight.is_leaf
    layer.train()
    back = layer.weight.detach().clone()
    layer.train()
    assert torch.equal(layer.weight, back)


def test_model_eval_leaves_lora_unmerged_and_merge_lora_merges_every_layer():
    # nn.Module.eval() calls train(False) on children, never their eval(): as in the course's API, that
    # does not merge, so evaluation merges each LoRA layer itself (merge_lora)
    torch.manual_seed(0)
    model = nn.Sequential(lora_layer(seed=1), nn.ReLU(), nn.Sequential(lora_layer(seed=2, in_f=10)))
    layers = [model[0], model[2][0]]
    x = torch.randn(4, 12)
    y = model(x)
    model.eval()
    assert not any(lyr.has_weights_merged for lyr in layers)
    assert merge_lora(model) is model and all(lyr.has_weights_merged for lyr in layers)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    model.train()
    assert not any(lyr.has_weights_merged for lyr in layers)


def test_dropout_only_on_the_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(in_features=12, out_features=10, lora_rank=4, lora_alpha=8.0, lora_dropout=0.9)
    x = torch.randn(6, 12)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # B = 0: dropout changes nothing
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # the branch is dropped at random while training
    expected = reference(layer, x)
    layer.eval()  # no dropout at inference
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("save_mode", ["train", "eval"])
@pytest.mark.parametrize("load_mode", ["train", "eval"])
def test_state_dict_means_the_same_in_either_mode(save_mode, load_mode):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, lora_rank=4, lora_alpha=8.0)
    model = GPT(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.5)
    idx = torch.randint(0, 50, (2, 10))
    merge_lora(model.eval())
    expected, _ = model(idx)
    merge_lora(model) if save_mode == "eval" else model.train()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = GPT(cfg)
    merge_lora(fresh.eval()) if load_mode == "eval" else fresh.train()
    fresh.load_state_dict(sd)
    merge_lora(fresh.eval())
    got, _ = fresh(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the update is added once, not twice


def test_loading_only_the_adapter_into_a_merged_model():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, lora_rank=4, lora_alpha=8.0)
    trained = GPT(cfg)
    base = GPT(cfg)
    base.load_state_dict(trained.state_dict())
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.5)
    idx = torch.randint(0, 50, (2, 10))
    merge_lora(trained.eval())
    expected, _ = trained(idx)
    merge_lora(base.eval())  # merged with B = 0
    adapter = lora_state_dict(trained)
    assert adapter and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    base.load_state_dict(adapter, strict=False)
    got, _ = base(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mark_only_lora_as_trainable():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, lora_rank=4, lora_alpha=4.0))
    for p in model.parameters():
        p.requires_grad = True
    assert mark_only_lora_as_trainable(model) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"transformer.h.{i}.attn.{proj}.lora_{m}" for i in range(2)
                for proj in ("c_attn", "c_proj") for m in "AB"}
    assert trainable == expected


def test_slices_adapt_only_their_part_of_the_output():
    # GPT-2's fused c_attn with the LoRA paper's choice: query and value adapted, key untouched
    torch.manual_seed(0)
    layer = LoRASlicedLinear(in_features=8, out_features=3 * 6, lora_rank=2, lora_alpha=4.0,
                             lora_slices=(True, False, True))
    assert layer.lora_A.shape == (2 * 2, 8) and layer.lora_B.shape == (2 * 6, 2)  # (A_q; A_v), (B_q; B_v)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    A_q, A_v = layer.lora_A.split(2)
    B_q, B_v = layer.lora_B.split(6)
    base = F.linear(x, layer.weight, layer.bias)
    expected = base + 2.0 * torch.cat([x @ A_q.T @ B_q.T, torch.zeros(5, 6), x @ A_v.T @ B_v.T], dim=1)
    torch.testing.assert_close(layer(x), expected)
    W = layer.weight.detach().clone()
    layer.eval()
    assert torch.equal(layer.weight[6:12], W[6:12])  # the key rows are not touched by merging
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.testing.assert_close(layer.weight, W, rtol=0, atol=1e-6)


def test_rslora_scales_by_the_square_root_of_the_rank():
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, lora_rank=16, lora_alpha=8.0)
    standard, rs = GPT(cfg), GPT(GPTConfig(**{**cfg.__dict__, "lora_scaling": "rslora"}))
    assert standard.transformer.h[0].attn.c_attn.lora_scaling == 0.5  # 8 / 16
    assert rs.transformer.h[0].attn.c_attn.lora_scaling == 2.0  # 8 / sqrt(16)
    layer = add_lora(nn.Sequential(nn.Linear(8, 4)), ["0"], lora_rank=16, lora_alpha=8.0, rslora=True)[0]
    assert layer.lora_scaling == 2.0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T))


class Encoder(torch.nn.Module):
    """Not a GPT: a block of another shape, with layers named as many models name theirs."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, 8) for _ in range(3))
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = self.norm(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x))
        return self.head(h)


def test_add_lora_adapts_the_named_linears_of_any_model():
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(4, 8)
    before = model(x)
    add_lora(model, r"(q|v)_proj", lora_rank=2, lora_alpha=4)
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == ["q_proj", "v_proj"]
    assert torch.equal(model(x), before)  # B = 0: the same function, the same weights
    mark_only_lora_as_trainable(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == \
        ["q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).zero_grad()
    model(x).square().sum().backward()
    for p in model.parameters():
        if p.requires_grad:
            p.data -= 0.5 * p.grad
    trained = model(x)
    assert not torch.allclose(trained, before)
    torch.testing.assert_close(merge_lora(model.eval())(x), trained, atol=1e-6, rtol=0)  # merged
    assert model.q_proj.has_weights_merged
    # the adapter alone makes a fresh copy compute the same
    fresh = add_lora(Encoder(), ["q_proj", "v_proj"], lora_rank=2, lora_alpha=4)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()})
    torch.testing.assert_close(fresh.train()(x), trained, atol=1e-6, rtol=0)
    assert set(lora_state_dict(model)) == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}


def test_add_lora_names_the_layers_there_are_when_nothing_matches():
    with pytest.raises(ValueError, match="names no nn.Linear or Conv1D of the model; it has: q_proj, k_proj, v_proj, head"):
        add_lora(Encoder(), r"attn\..*")
    with pytest.raises(ValueError, match=r"\(norm is none\)"):
        add_lora(Encoder(), ["q_proj", "norm"])


def test_add_lora_on_transformers_gpt2_whose_projections_are_conv1d():
    """transformers' GPT-2 keeps its projections as Conv1D, W stored (in, out): LoRA on them starts from the
    model's own outputs, trains, and merged gives what it gives un-merged."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        before = hf(input_ids=idx).logits
    add_lora(hf, r"transformer\.h\.\d+\.attn\.c_attn", lora_rank=4, lora_alpha=8)
    assert isinstance(hf.transformer.h[1].attn.c_attn, LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=idx).logits, before, atol=1e-6, rtol=0)
    mark_only_lora_as_trainable(hf).train()
    optimizer = torch.optim.SGD([p for p in hf.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        hf(input_ids=idx, labels=idx).loss.backward()
        optimizer.step()
    hf.eval()
    with torch.no_grad():
        trained = hf(input_ids=idx).logits
        assert not torch.allclose(trained, before)
        torch.testing.assert_close(merge_lora(hf)(input_ids=idx).logits, trained, atol=1e-5, rtol=0)

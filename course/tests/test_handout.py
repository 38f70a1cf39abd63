"""
The handout tests: one group per TODO, each test marked with its task (conftest.TASKS gives the points).
They use only the starter's API, so any correct solution passes. Run them with python -m pytest -q.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

task = pytest.mark.task
POSITIVE, NEGATIVE = 3967, 4633  # GPT-2's tokens " positive" and " negative"
# LoRALinear(4, 3, lora_rank=2, lora_alpha=4.0) built under torch.manual_seed(2024): the starter's draws
SEEDED_W = [[-0.093904, -0.195501, 0.407318, 0.263732], [0.110117, 0.391379, 0.40895, 0.165173],
            [0.178626, -0.273172, 0.003074, -0.284942]]
SEEDED_B = [0.298815, -0.421625, -0.429441]
SEEDED_A = [[-0.202817, -0.43084, 0.482738, 0.19695], [0.190665, -0.059405, 0.06462, -0.308622]]


def layer(rank=2, alpha=4.0, seed=0, trained=True, **kw):
    """A LoRALinear(6, 5) whose B is non-zero (as after training) unless trained=False."""
    from lora import LoRALinear
    torch.manual_seed(seed)
    m = LoRALinear(6, 5, lora_rank=rank, lora_alpha=alpha, **kw)
    if trained:
        with torch.no_grad():
            m.lora_B.normal_()
    return m


def by_hand(m, x, W=None):
    """W x + b + (alpha / r) B A x, written out."""
    W = m.weight if W is None else W
    return x @ W.T + m.bias + (m.lora_alpha / m.lora_rank) * (x @ m.lora_A.T @ m.lora_B.T)


# --- LoRALinear.__init__ -----------------------------------------------------------------------------

@task("LoRALinear.__init__")
def test_init_creates_frozen_lora_matrices_of_the_right_shapes():
    from lora import LoRALinear
    m = LoRALinear(in_features=6, out_features=5, lora_rank=3, lora_alpha=12.0)
    assert isinstance(m, nn.Linear), "LoRALinear must stay an nn.Linear"
    assert tuple(m.lora_A.shape) == (3, 6), f"lora_A must be (rank, in_features), it is {tuple(m.lora_A.shape)}"
    assert tuple(m.lora_B.shape) == (5, 3), f"lora_B must be (out_features, rank), it is {tuple(m.lora_B.shape)}"
    assert not m.lora_A.requires_grad and not m.lora_B.requires_grad, "lora_A and lora_B start frozen"
    assert math.isclose(m.lora_scaling, 4.0), f"the scaling is alpha / r = 4.0, not {m.lora_scaling}"
    torch.manual_seed(1)
    ref = nn.Linear(6, 5)
    torch.manual_seed(1)
    plain = LoRALinear(6, 5)
    assert [n for n, _ in plain.named_parameters()] == ["weight", "bias"], "a rank-0 layer has no LoRA matrices"
    assert torch.equal(plain.weight, ref.weight) and torch.equal(plain.bias, ref.bias), "rank 0: an nn.Linear"




@task("LoRALinear.__init__")
def test_init_draws_in_the_starters_order():
    from lora import LoRALinear
    torch.manual_seed(2024)
    m = LoRALinear(4, 3, lora_rank=2, lora_alpha=4.0)
    msg = "under a seed, W, b and A must be drawn as the starter does: nn.Linear's init, then reset_parameters()"
    torch.testing.assert_close(m.weight.detach(), torch.tensor(SEEDED_W), atol=1e-5, rtol=0, msg=msg)
    torch.testing.assert_close(m.bias.detach(), torch.tensor(SEEDED_B), atol=1e-5, rtol=0, msg=msg)
    torch.testing.assert_close(m.lora_A.detach(), torch.tensor(SEEDED_A), atol=1e-5, rtol=0, msg=msg)
    assert torch.count_nonzero(m.lora_B) == 0, "lora_B starts at zero"


# --- LoRALinear.reset_parameters ---------------------------------------------------------------------

@task("LoRALinear.reset_parameters")
def test_reset_makes_b_zero_and_a_kaiming_uniform():
    m = layer(rank=4)
    m.reset_parameters()
    assert torch.count_nonzero(m.lora_B) == 0, "lora_B must be zero after reset_parameters (B A = 0)"
    bound = 1 / math.sqrt(6)  # Kaiming-uniform with a=sqrt(5), as nn.Linear's weight
    assert torch.count_nonzero(m.lora_A) == m.lora_A.numel(), "lora_A must be random, not zero (A and B swapped?)"
    assert m.lora_A.abs().max() <= bound, f"lora_A must lie within +-1/sqrt(in_features) = {bound:.3f}"


@task("LoRALinear.reset_parameters")
def test_reset_draws_w_b_then_a():
    m = layer(trained=False)
    torch.manual_seed(5)
    m.reset_parameters()
    torch.manual_seed(5)
    ref = nn.Linear(6, 5)  # its init is W, then b
    A = torch.empty(2, 6)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    assert torch.equal(m.weight, ref.weight) and torch.equal(m.bias, ref.bias), "W and b as nn.Linear draws them"
    assert torch.equal(m.lora_A, A), "then A, Kaiming-uniform with a=sqrt(5)"


# --- LoRALinear.forward ------------------------------------------------------------------------------

@task("LoRALinear.forward")
def test_forward_adds_the_scaled_update_and_keeps_the_bias():
    m = layer()
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), by_hand(m, x), msg="forward must be W x + b + (alpha / r) B A x")


@task("LoRALinear.forward")
def test_a_fresh_layer_computes_the_pretrained_function():
    m = layer(trained=False)
    x = torch.randn(3, 6)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), msg="with B = 0, forward is W x + b")


@task("LoRALinear.forward")
def test_forward_skips_the_update_once_it_is_merged():
    m = layer()
    x = torch.randn(3, 6)
    m.has_weights_merged = True
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias),
                               msg="a merged layer's W already holds the update: forward must not add it again")


@task("LoRALinear.forward")
def test_gradients_reach_a_and_b():
    m = layer()
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    m(torch.randn(3, 6)).sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None, "the update must be part of the graph"


# --- LoRALinear.train and LoRALinear.eval ------------------------------------------------------------

@task("LoRALinear.train")
def test_train_false_merges_and_train_true_unmerges():
    m = layer()
    W0 = m.weight.detach().clone()
    m.train(False)
    assert m.has_weights_merged, "train(False) must merge"
    torch.testing.assert_close(m.weight.detach(), W0 + 2.0 * m.lora_B.detach() @ m.lora_A.detach(),
                               msg="merging adds (alpha / r) B A to W")
    m.train(True)
    assert not m.has_weights_merged, "train(True) must un-merge"
    torch.testing.assert_close(m.weight.detach(), W0, msg="un-merging must give W back")


@task("LoRALinear.train")
def test_merging_twice_adds_the_update_once_and_trains_on():
    m = layer()
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    W0, x = m.weight.detach().clone(), torch.randn(3, 6)
    m.train(False)
    m.train(False)
    torch.testing.assert_close(m.weight.detach(), W0 + 2.0 * m.lora_B.detach() @ m.lora_A.detach(),
                               msg="a second merge must change nothing")
    m.train(True)
    m(x).sum().backward()  # a merge done in place under autograd breaks this
    assert m.lora_B.grad is not None


@task("LoRALinear.eval")
def test_eval_merges_and_returns_the_layer():
    m = layer()
    W0 = m.weight.detach().clone()
    assert m.eval() is m, "eval() returns the layer"
    assert m.has_weights_merged and not m.training, "eval() merges and leaves training mode"
    torch.testing.assert_close(m.weight.detach(), W0 + 2.0 * m.lora_B.detach() @ m.lora_A.detach(),
                               msg="eval() adds (alpha / r) B A to W")


# --- mark_only_lora_as_trainable ---------------------------------------------------------------------

@task("mark_only_lora_as_trainable")
def test_only_lora_matrices_train():
    from lora import mark_only_lora_as_trainable

    class Adapted(nn.Module):  # parameters named as LoRA layers name theirs, no LoRALinear needed
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
            self.lora_A, self.lora_B = nn.Parameter(torch.zeros(1, 2)), nn.Parameter(torch.zeros(2, 1))
            self.norm = nn.LayerNorm(2)

    model = nn.Sequential(Adapted(), nn.Embedding(3, 2))
    model[0].lora_A.requires_grad_(False)
    assert mark_only_lora_as_trainable(model) is model, "it returns the model"
    trains = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trains == ["0.lora_A", "0.lora_B"], f"only lora_A and lora_B train, not {trains}"


# --- model.py attention ------------------------------------------------------------------------------

@task("model.py attention")
def test_attention_projections_are_lora_layers():
    from lora import LoRALinear
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=64))
    attn = model.transformer.h[0].attn
    assert isinstance(attn.c_attn, LoRALinear) and isinstance(attn.c_proj, LoRALinear), \
        "c_attn and c_proj must be LoRALinear layers"
    assert (attn.c_attn.in_features, attn.c_attn.out_features) == (8, 24) and attn.c_proj.out_features == 8


@task("model.py attention")
def test_attention_layers_take_the_configs_lora_settings():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=64, lora_rank=2, lora_alpha=4.0))
    attn = model.transformer.h[0].attn
    for name in ("c_attn", "c_proj"):
        assert getattr(attn, name).lora_rank == 2 and math.isclose(getattr(attn, name).lora_scaling, 2.0), \
            f"{name} must use the config's lora_rank and lora_alpha"


# --- CustomDataLoader._add_instruction_finetuning ----------------------------------------------------

def loader(reviews, **kw):
    import tiktoken
    from dataloader import CustomDataLoader, load_splits
    return CustomDataLoader(load_splits(reviews)["train"], tiktoken.get_encoding("gpt2"), batch_size=4, **kw)


@task("CustomDataLoader._add_instruction_finetuning")
def test_the_text_is_the_prompt_then_the_label_word_then_end_of_text(reviews):
    data = loader(reviews)
    pos = data._add_instruction_finetuning({"text": "a gorgeous film", "label": 1})["instr_tuned_text"]
    neg = data._add_instruction_finetuning({"text": "a dull film", "label": 0})["instr_tuned_text"]
    assert "a gorgeous film" in pos and pos.startswith("Classify the sentiment"), "the prompt holds the review"
    assert pos.endswith("Sentiment: positive<|endoftext|>"), f"label 1 reads ' positive', then end-of-text: {pos[-40:]!r}"
    assert neg.endswith("Sentiment: negative<|endoftext|>"), f"label 0 reads ' negative', not a number: {neg[-40:]!r}"


@task("CustomDataLoader._add_instruction_finetuning")
def test_batches_learn_the_label_word(reviews):
    x, y = next(iter(loader(reviews).get_loader(shuffle=False)))
    assert x.shape == y.shape and x.shape[0] == 4
    learned = [row[row != -1].tolist() for row in y]
    assert [r[0] for r in learned] == [POSITIVE, NEGATIVE, POSITIVE, NEGATIVE], "the targets are the label words"


# --- train.py LoRA ----------------------------------------------------------------------------------

@task("train.py LoRA")
def test_the_training_model_has_lora_and_only_lora_trains(tiny_gpt2, reviews):
    import train
    c, _ = train.read_settings([f"--init_from={tiny_gpt2}", f"--dataset={reviews}", "--rank=2", "--alpha=4"])
    model, _ = train.build_model(c, None)
    assert model.transformer.h[0].attn.c_attn.lora_rank == 2, "the model must be loaded with the run's LoRA rank"
    trains = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {"lora_A", "lora_B"}, f"only the LoRA matrices train, not {sorted(trains)}"


@task("train.py LoRA")
def test_rank_zero_trains_every_weight(tiny_gpt2, reviews):
    import train
    c, _ = train.read_settings([f"--init_from={tiny_gpt2}", f"--dataset={reviews}", "--rank=0"])
    model, _ = train.build_model(c, None)
    assert all(p.requires_grad for p in model.parameters()), "lora_rank=0 is full fine-tuning"


# --- ModelSampler.get_accuracy ------------------------------------------------------------------------

def sampler(path, reviews, tmp_path):
    from generate import ModelSampler
    return ModelSampler(str(tmp_path), path, "cpu", 3, 0.0, 0, dataset=reviews)  # the starter's order


@task("ModelSampler.get_accuracy")
def test_a_model_that_always_answers_positive(reviews, tmp_path):
    from conftest import save_gpt2
    acc, pos, neg = sampler(save_gpt2(tmp_path / "m", answer=POSITIVE), reviews, tmp_path).get_accuracy()
    assert (acc, pos, neg) == (0.5, 12, 0), f"half the 12 test reviews are positive: (0.5, 12, 0), not {(acc, pos, neg)}"


@task("ModelSampler.get_accuracy")
def test_unparseable_generations_count_as_wrong(reviews, tmp_path):
    from conftest import save_gpt2
    acc, pos, neg = sampler(save_gpt2(tmp_path / "m", answer=13), reviews, tmp_path).get_accuracy()  # "."
    assert (acc, pos, neg) == (0.0, 0, 0), f"no generation names a label: (0.0, 0, 0), not {(acc, pos, neg)}"

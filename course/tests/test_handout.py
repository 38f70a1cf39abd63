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
# LoRALinear(4, 3, lora_rank=2, lora_alpha=4.0) built under torch.manual_seed(2024): the starter's draws
SEEDED_W = [[-0.093904, -0.195501, 0.407318, 0.263732], [0.110117, 0.391379, 0.40895, 0.165173],
            [0.178626, -0.273172, 0.003074, -0.284942]]
SEEDED_B = [0.298815, -0.421625, -0.429441]
SEEDED_A = [[-0.202817, -0.43084, 0.482738, 0.19695], [0.190665, -0.059405, 0.06462, -0.308622]]


def layer(rank=2, scaling=0.75, dropout=0.0, seed=0, trained=True):
    """
    A LoRALinear(6, 5) with A, B and the scaling set here, as the course's tests set them: a forward, train or
    eval test then grades that method alone, whatever __init__ and reset_parameters do (a layer built without
    LoRA gets its LoRA part attached when they are not written yet). B is non-zero unless trained=False.
    """
    from lora import LoRALinear
    torch.manual_seed(seed)
    try:
        m = LoRALinear(6, 5, lora_rank=rank, lora_alpha=1.0)
    except NotImplementedError:
        m = LoRALinear(6, 5)
    with torch.no_grad():
        m.lora_A = nn.Parameter(torch.randn(rank, 6) / 3, requires_grad=False)
        m.lora_B = nn.Parameter(torch.randn(5, rank) if trained else torch.zeros(5, rank), requires_grad=False)
    m.lora_scaling, m.lora_dropout, m.has_weights_merged = scaling, nn.Dropout(dropout), False
    return m


def update(m):
    return m.lora_scaling * m.lora_B.detach() @ m.lora_A.detach()


def by_hand(m, x, lora_input=None):
    """W x + b + scaling B A x (the update's input lora_input, x unless given), written out."""
    lora_input = x if lora_input is None else lora_input
    return x @ m.weight.T + m.bias + m.lora_scaling * (lora_input @ m.lora_A.T @ m.lora_B.T)


def close(got, want, msg):
    torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5, msg=msg)


# --- LoRALinear.__init__ -----------------------------------------------------------------------------

@task("LoRALinear.__init__")
def test_init_creates_frozen_lora_matrices_of_the_right_shapes():
    from lora import LoRALinear
    m = LoRALinear(in_features=6, out_features=5, lora_rank=3, lora_alpha=12.0, lora_dropout=0.1)
    assert isinstance(m, nn.Linear), "LoRALinear must stay an nn.Linear"
    assert tuple(m.lora_A.shape) == (3, 6), f"lora_A must be (rank, in_features), it is {tuple(m.lora_A.shape)}"
    assert tuple(m.lora_B.shape) == (5, 3), f"lora_B must be (out_features, rank), it is {tuple(m.lora_B.shape)}"
    assert isinstance(m.lora_A, nn.Parameter) and isinstance(m.lora_B, nn.Parameter), "A and B are nn.Parameters"
    assert not m.lora_A.requires_grad and not m.lora_B.requires_grad, "lora_A and lora_B start frozen"
    assert math.isclose(m.lora_scaling, 4.0), f"the scaling is alpha / r = 12 / 3 = 4.0, not {m.lora_scaling}"
    assert isinstance(m.lora_dropout, nn.Dropout) and m.lora_dropout.p == 0.1, "lora_dropout is nn.Dropout(lora_dropout)"
    assert m.is_lora() and not m.has_weights_merged, "a new layer has LoRA, un-merged"
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
    close(m(x), by_hand(m, x), "forward must be W x + b + lora_scaling * B A x")
    x3 = torch.randn(2, 4, 6)
    close(m(x3), by_hand(m, x3), "forward must take inputs of any leading shape (batch, time, features)")


@task("LoRALinear.forward")
def test_a_fresh_layer_computes_the_pretrained_function():
    m = layer(trained=False)
    x = torch.randn(3, 6)
    close(m(x), F.linear(x, m.weight, m.bias), "with B = 0, forward is W x + b")


@task("LoRALinear.forward")
def test_forward_skips_the_update_once_it_is_merged():
    m = layer()
    x = torch.randn(3, 6)
    m.has_weights_merged = True
    close(m(x), F.linear(x, m.weight, m.bias),
          "a merged layer's W already holds the update: forward must not add it again")


@task("LoRALinear.forward")
def test_gradients_reach_a_and_b():
    m = layer()
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    m(torch.randn(3, 6)).sum().backward()
    assert m.lora_A.grad is not None and m.lora_B.grad is not None, "the update must be part of the graph"


@task("LoRALinear.forward")
def test_dropout_goes_on_the_updates_input_only():
    x = torch.randn(8, 6)
    m = layer(dropout=0.5, trained=False).train()
    close(m(x), F.linear(x, m.weight, m.bias),
          "dropout belongs on the LoRA branch's input alone: W x + b must see x itself, not dropout(x)")
    m = layer(dropout=0.5).train()
    torch.manual_seed(7)
    got = m(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # the mask self.lora_dropout(x) draws under the same seed
    close(got, by_hand(m, x, dropped), "in training, forward must be W x + b + lora_scaling * B A lora_dropout(x)")


# --- LoRALinear.train and LoRALinear.eval ------------------------------------------------------------
# The course's API: eval() merges the update into W, train() takes it out again. nn.Module.eval() calls
# train(False) on each layer, never its eval(), so evaluation calls each LoRA layer's eval() itself.

def merged(m):
    """m as eval() leaves it: W holding the update, the flag set, dropout off."""
    with torch.no_grad():
        m.weight += update(m)
    m.has_weights_merged, m.training = True, False
    return m


@task("LoRALinear.train")
def test_train_unmerges_and_returns_the_layer():
    m = layer()
    W0 = m.weight.detach().clone()
    assert merged(m).train() is m, "train() returns the layer"
    assert m.training, "train() puts the layer in training mode"
    assert not m.has_weights_merged, "train() must un-merge a merged layer (has_weights_merged = False)"
    close(m.weight, W0, "un-merging must take lora_scaling * B A out of W again")
    m.train()
    close(m.weight, W0, "a second train() must change nothing")


@task("LoRALinear.train")
def test_an_unmerged_layer_trains_on():
    m = layer()
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    W0, x = m.weight.detach().clone(), torch.randn(3, 6)
    m.train()
    close(m.weight, W0, "train() on a layer that is not merged must leave W alone")
    merged(m).train()
    F.linear(x, m.weight, m.bias).sum().backward()  # a change of W under autograd breaks this
    assert m.weight.grad_fn is None, "un-merge W without autograd history (torch.no_grad() or .data)"


@task("LoRALinear.eval")
def test_eval_merges_and_returns_the_layer():
    m = layer()
    W0 = m.weight.detach().clone()
    assert m.eval() is m, "eval() returns the layer"
    assert m.has_weights_merged and not m.training, "eval() merges (has_weights_merged = True) and leaves training mode"
    close(m.weight, W0 + update(m), "eval() adds lora_scaling * B A to W")
    assert m.weight.grad_fn is None, "merge W without autograd history (torch.no_grad() or .data)"


@task("LoRALinear.eval")
def test_eval_twice_adds_the_update_once():
    m = layer()
    W0 = m.weight.detach().clone()
    m.eval()
    m.eval()
    close(m.weight, W0 + update(m), "a second eval() must not add the update again")
    x = torch.randn(3, 6)
    close(F.linear(x, m.weight, m.bias), by_hand(layer(), x), "the merged layer computes what the un-merged one did")


# --- mark_only_lora_as_trainable ---------------------------------------------------------------------

@task("mark_only_lora_as_trainable")
def test_only_lora_matrices_train():
    from lora import mark_only_lora_as_trainable

    class Small(nn.Module):  # what the course's code passes: a model with LoRALinear layers among others
        def __init__(self):
            super().__init__()
            self.wte, self.ln = nn.Embedding(10, 6), nn.LayerNorm(6)
            self.c_attn, self.c_proj = layer(seed=1), layer(seed=2)
            self.head = nn.Linear(5, 10, bias=False)

    model = Small()
    model.c_attn.lora_A.requires_grad_(True)  # whatever they were before
    assert mark_only_lora_as_trainable(model) is model, "it returns the model"
    trains = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trains == ["c_attn.lora_A", "c_attn.lora_B", "c_proj.lora_A", "c_proj.lora_B"], \
        f"only the LoRA matrices train, not {trains}"


@task("mark_only_lora_as_trainable")
def test_every_other_parameter_is_frozen():
    from lora import mark_only_lora_as_trainable
    model = nn.Sequential(nn.Embedding(10, 6), layer(seed=3), nn.LayerNorm(5))
    mark_only_lora_as_trainable(model)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["0.weight", "1.bias", "1.weight", "2.bias", "2.weight"], \
        f"W, biases, LayerNorms and embeddings are frozen; frozen now: {frozen}"


# --- model.py attention ------------------------------------------------------------------------------

class Recorder(nn.Linear):
    """Stands in for lora.LoRALinear in model.py's tests, so they grade model.py whatever lora.py does: an
    nn.Linear that keeps the LoRA settings it was given."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, lora_rank=0, lora_alpha=0.0,
                 lora_dropout=0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.given = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)

    def is_lora(self):
        return False


def attention(monkeypatch, **lora):
    import lora as lora_py
    import model
    for where in (model, lora_py):  # model.py may name it either way
        monkeypatch.setattr(where, "LoRALinear", Recorder, raising=False)
    return model.GPT(model.GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=64, **lora)).transformer.h[0].attn


@task("model.py attention")
def test_attention_projections_are_lora_layers(monkeypatch):
    attn = attention(monkeypatch)
    assert isinstance(attn.c_attn, Recorder) and isinstance(attn.c_proj, Recorder), \
        "c_attn and c_proj must be LoRALinear layers (model.py's LoRALinear, from lora.py)"
    assert (attn.c_attn.in_features, attn.c_attn.out_features) == (8, 24), "c_attn maps n_embd to 3 * n_embd"
    assert (attn.c_proj.in_features, attn.c_proj.out_features) == (8, 8), "c_proj maps n_embd to n_embd"
    assert attn.c_attn.bias is not None, "with bias=config.bias, as nn.Linear had it"


@task("model.py attention")
def test_attention_layers_take_the_configs_lora_settings(monkeypatch):
    attn = attention(monkeypatch, lora_rank=2, lora_alpha=4.0, lora_dropout=0.1)
    for name in ("c_attn", "c_proj"):
        given = getattr(getattr(attn, name), "given", {})
        assert given == dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1), \
            f"{name} must get the config's lora_rank, lora_alpha and lora_dropout, not {given}"


# --- CustomDataLoader._add_instruction_finetuning ----------------------------------------------------

def loader(reviews, **kw):
    import tiktoken
    from dataloader import CustomDataLoader
    from lorakit.data import load_splits
    return CustomDataLoader(load_splits(reviews)["train"], tiktoken.get_encoding("gpt2"), batch_size=4, **kw)


def texts(data, review):
    """The instr_tuned_text of a review with label 0 and with label 1."""
    return [data._add_instruction_finetuning({"text": review, "label": y})["instr_tuned_text"] for y in (0, 1)]


@task("CustomDataLoader._add_instruction_finetuning")
def test_the_text_is_the_prompt_then_the_label_word_then_end_of_text(reviews):
    from lorakit.prompts import prompt_of
    data = loader(reviews)
    neg, pos = texts(data, "a gorgeous film")
    assert "a gorgeous film" in pos and "a dull film" in texts(data, "a dull film")[0], \
        f"the instruction must hold the review: {pos!r}"
    assert pos.endswith("<|endoftext|>") and neg.endswith("<|endoftext|>"), \
        f"the text ends with the label word, then end-of-text (<|endoftext|>): {pos[-40:]!r}"
    prompt = prompt_of(data._add_instruction_finetuning)  # the words where the two labels' texts part
    assert all(w.replace(" ", "").isalpha() for w in prompt.words), \
        f"label 0 and label 1 are answered with words, not {prompt.words}"
    assert pos.endswith(prompt.words[1] + "<|endoftext|>") and neg.endswith(prompt.words[0] + "<|endoftext|>"), \
        "the same instruction for both labels, then the label's word"


@task("CustomDataLoader._add_instruction_finetuning")
def test_batches_learn_the_label_word(reviews):
    import tiktoken
    from lorakit.prompts import prompt_of
    data = loader(reviews)
    x, y = next(iter(data.get_loader(shuffle=False)))
    assert x.shape == y.shape and x.shape[0] == 4
    enc, words = tiktoken.get_encoding("gpt2"), prompt_of(data._add_instruction_finetuning).words
    answers = [enc.encode_ordinary(" " + words[label]) + [enc.eot_token] for label in (1, 0, 1, 0)]  # the reviews'
    learned = [row[row != -1].tolist() for row in y]
    assert learned == answers, "the model learns each review's label word and end-of-text"


# --- train.py LoRA ----------------------------------------------------------------------------------

def build(monkeypatch, tiny_gpt2, reviews, *flags):
    """train.py's model for these flags, with what it asked of GPT.from_pretrained and mark_only_lora_as_trainable
    recorded (the model built with Recorder layers): these tests grade train.py, whatever lora.py does."""
    import model
    import train
    asked = {}
    for where in (model, train):
        monkeypatch.setattr(where, "LoRALinear", Recorder, raising=False)
    real = model.GPT.from_pretrained.__func__

    def from_pretrained(cls, model_type, override_args=None):
        asked["from_pretrained"] = (model_type, dict(override_args or {}))
        return real(cls, model_type, override_args)

    def mark_only(m):
        asked["mark_only_lora_as_trainable"] = m
        return m

    monkeypatch.setattr(model.GPT, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(train, "mark_only_lora_as_trainable", mark_only, raising=False)
    c, _ = train.read_settings([f"--init_from={tiny_gpt2}", f"--dataset={reviews}", *flags])
    built, _ = train.build_model(c, None)
    return built, asked


@task("train.py LoRA")
def test_the_pretrained_model_is_loaded_with_the_runs_lora_settings(monkeypatch, tiny_gpt2, reviews):
    built, asked = build(monkeypatch, tiny_gpt2, reviews, "--rank=2", "--alpha=4", "--lora_dropout=0.1")
    model_type, override = asked.get("from_pretrained", (None, {}))
    assert model_type == tiny_gpt2, "load the pretrained model init_from names with GPT.from_pretrained"
    assert {k: override.get(k) for k in ("lora_rank", "lora_alpha", "lora_dropout")} == \
        dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1), \
        f"from_pretrained's override_args must carry the run's lora_rank, lora_alpha and lora_dropout, not {override}"
    assert asked.get("mark_only_lora_as_trainable") is built, "with LoRA, mark_only_lora_as_trainable(model)"


@task("train.py LoRA")
def test_rank_zero_trains_every_weight(monkeypatch, tiny_gpt2, reviews):
    built, asked = build(monkeypatch, tiny_gpt2, reviews, "--rank=0")
    assert "mark_only_lora_as_trainable" not in asked, "lora_rank=0 is full fine-tuning: no LoRA matrices to pick"
    assert all(p.requires_grad for p in built.parameters()), "lora_rank=0 is full fine-tuning: every weight trains"


# --- ModelSampler.get_accuracy ------------------------------------------------------------------------

def sampler(path, reviews, tmp_path, monkeypatch):
    """generate.py's ModelSampler asking "Review: ...\nSentiment:", answered " bad" or " good": these tests grade
    get_accuracy, whatever dataloader.py's prompt is."""
    import generate
    import model
    from lorakit.prompts import Prompt
    monkeypatch.setattr(generate, "run_prompt", lambda *args: Prompt("bare", "bad,good"))
    monkeypatch.setattr(model, "LoRALinear", Recorder, raising=False)  # whatever lora.py does
    return generate.ModelSampler(str(tmp_path), path, "cpu", 3, 0.0, 0, dataset=reviews)  # the starter's order


def token(word):
    import tiktoken
    (t,) = tiktoken.get_encoding("gpt2").encode_ordinary(word)
    return t


@task("ModelSampler.get_accuracy")
def test_a_model_that_always_answers_positive(reviews, tmp_path, monkeypatch):
    from conftest import save_gpt2
    m = sampler(save_gpt2(tmp_path / "m", answer=token(" good")), reviews, tmp_path, monkeypatch)
    got = m.get_accuracy()
    assert tuple(got) == (0.5, 12, 0), f"half the 12 test reviews are positive: (0.5, 12, 0), not {got}"


@task("ModelSampler.get_accuracy")
def test_a_model_that_always_answers_negative_in_capitals(reviews, tmp_path, monkeypatch):
    from conftest import save_gpt2
    m = sampler(save_gpt2(tmp_path / "m", answer=token(" BAD")), reviews, tmp_path, monkeypatch)
    got = m.get_accuracy()
    assert tuple(got) == (0.5, 0, 12), f"' BAD' reads as the label word 'bad' (case aside): (0.5, 0, 12), not {got}"


@task("ModelSampler.get_accuracy")
def test_unparseable_generations_count_as_wrong(reviews, tmp_path, monkeypatch):
    from conftest import save_gpt2
    m = sampler(save_gpt2(tmp_path / "m", answer=token(".")), reviews, tmp_path, monkeypatch)
    got = m.get_accuracy()
    assert tuple(got) == (0.0, 0, 0), f"no generation names a label: (0.0, 0, 0), not {got}"

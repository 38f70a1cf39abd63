"""
The handout tests' judging side: for each test, the inputs its probe (probes.py) gets and what the
values it returns must be. Inputs are drawn from a generator: test_handout.py seeds it with 0, the
grader with a secret seed of its own, so a test's expected values are never known in advance.

    Test(task, name, probe, inputs(g, files) -> dict, check(inputs, values) raising AssertionError)

TASKS gives each TODO's points, shared by its tests; HIDDEN, the points of the hidden tests that only
the grader has (course/hidden_checks.py: the same TODOs on other shapes and seeds).
"""

import csv
import math
import os
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = {
    "LoRALinear.__init__": 4, "LoRALinear.reset_parameters": 2, "LoRALinear.forward": 4, "LoRALinear.train": 3,
    "LoRALinear.eval": 2, "mark_only_lora_as_trainable": 2, "model.py attention": 2,
    "CustomDataLoader._add_instruction_finetuning": 3, "train.py LoRA": 3, "ModelSampler.get_accuracy": 3,
}
HIDDEN = {"LoRALinear.__init__": 1, "LoRALinear.forward": 2, "LoRALinear.train": 1, "LoRALinear.eval": 1,
          "mark_only_lora_as_trainable": 1, "ModelSampler.get_accuracy": 1}
# one pytest marker per task, to run one task's tests: python -m pytest -m lora_forward
MARKERS = {
    "LoRALinear.__init__": "lora_init", "LoRALinear.reset_parameters": "lora_reset", "LoRALinear.forward": "lora_forward",
    "LoRALinear.train": "lora_train", "LoRALinear.eval": "lora_eval", "mark_only_lora_as_trainable": "mark_only",
    "model.py attention": "model_attention", "CustomDataLoader._add_instruction_finetuning": "instruction",
    "train.py LoRA": "train_lora", "ModelSampler.get_accuracy": "get_accuracy",
}
EOT = "<|endoftext|>"


class Test(NamedTuple):
    task: str
    name: str
    probe: str  # a function of probes.py
    inputs: Callable
    check: Callable
    hidden: bool = False


def close(got, want, msg):
    assert isinstance(got, torch.Tensor), f"{msg} (got {type(got).__name__}, not a tensor)"
    assert got.shape == want.shape, f"{msg} (shape {tuple(got.shape)}, expected {tuple(want.shape)})"
    torch.testing.assert_close(got.detach().float(), want.detach().float(), atol=1e-5, rtol=1e-5, msg=msg)


def lora_inputs(g, out_f=5, in_f=6, rank=2, scaling=0.75, trained=True, **more):
    """W, b, A, B and a scaling for a layer of these shapes, B non-zero unless trained=False."""
    return dict(W=torch.randn(out_f, in_f, generator=g) / 3, b=torch.randn(out_f, generator=g) / 3,
                A=torch.randn(rank, in_f, generator=g) / 3,
                B=torch.randn(out_f, rank, generator=g) if trained else torch.zeros(out_f, rank), scaling=scaling, **more)


def by_hand(i, x, lora_input=None):
    """W x + b + scaling B A x (the update's input lora_input, x unless given), written out."""
    lora_input = x if lora_input is None else lora_input
    return x @ i["W"].T + i["b"] + i["scaling"] * (lora_input @ i["A"].T @ i["B"].T)


def update(i):
    return i["scaling"] * i["B"] @ i["A"]


def seeded_linear(seed, in_f, out_f, rank=0):
    """W, b and A as the starter draws them under a seed: nn.Linear's init, then reset_parameters() once A and B
    exist (W and b again, then A Kaiming-uniform with a=sqrt(5))."""
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f)
    if rank:
        ref.reset_parameters()
    A = torch.empty(rank, in_f)
    if rank:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return ref.weight.detach(), ref.bias.detach(), A


# --- LoRALinear.__init__ and reset_parameters ---------------------------------------------------------

def init_inputs(in_f=6, out_f=5, rank=3, alpha=12.0):
    return lambda g, files: dict(in_f=in_f, out_f=out_f, rank=rank, alpha=alpha, dropout=0.1,
                                 seed=int(torch.randint(1 << 30, (1,), generator=g)))


def check_init(i, v):
    r, shapes = i["rank"], ((i["rank"], i["in_f"]), (i["out_f"], i["rank"]))
    assert v["is_linear"], "LoRALinear must stay an nn.Linear"
    for name, shape, what in (("lora_A", shapes[0], "(rank, in_features)"), ("lora_B", shapes[1], "(out_features, rank)")):
        assert v[name] is not None, f"{name} must be an nn.Parameter of the layer"
        assert tuple(v[name].shape) == shape, f"{name} must be {what}, {shape}, it is {tuple(v[name].shape)}"
    assert not v["lora_A_trains"] and not v["lora_B_trains"], "lora_A and lora_B start frozen (requires_grad=False)"
    assert math.isclose(v["scaling"], i["alpha"] / r), \
        f"the scaling is alpha / r = {i['alpha']} / {r} = {i['alpha'] / r:g}, not {v['scaling']}"
    assert v["dropout_p"] == i["dropout"], "lora_dropout is nn.Dropout(lora_dropout)"
    assert v["is_lora"] and not v["merged"], "a new layer has LoRA, un-merged"
    W, b, _ = seeded_linear(i["seed"], i["in_f"], i["out_f"])
    assert v["plain_names"] == ["weight", "bias"], "a rank-0 layer has no LoRA matrices"
    assert torch.equal(v["plain_W"], W) and torch.equal(v["plain_b"], b), "rank 0: an nn.Linear, drawn as nn.Linear draws"


def check_init_draws(i, v):
    W, b, A = seeded_linear(i["seed"], i["in_f"], i["out_f"], i["rank"])
    msg = "under a seed, W, b and A must be drawn as the starter does: nn.Linear's init, then reset_parameters()"
    assert v["lora_A"] is not None and v["lora_B"] is not None, "lora_A and lora_B must be nn.Parameters of the layer"
    close(v["W"], W, msg)
    close(v["b"], b, msg)
    close(v["lora_A"], A, msg)
    assert torch.count_nonzero(v["lora_B"]) == 0, "lora_B starts at zero"


def reset_inputs(g, files):
    return lora_inputs(g, rank=4, seed=int(torch.randint(1 << 30, (1,), generator=g)))


def check_reset_zero_kaiming(i, v):
    assert torch.count_nonzero(v["B"]) == 0, "lora_B must be zero after reset_parameters (B A = 0)"
    bound = 1 / math.sqrt(i["A"].shape[1])  # Kaiming-uniform with a=sqrt(5), as nn.Linear's weight
    assert torch.count_nonzero(v["A"]) == v["A"].numel(), "lora_A must be random, not zero (A and B swapped?)"
    assert v["A"].abs().max() <= bound, f"lora_A must lie within +-1/sqrt(in_features) = {bound:.3f}"


def check_reset_draws(i, v):
    torch.manual_seed(i["seed"])
    ref = nn.Linear(i["A"].shape[1], i["W"].shape[0])  # reset_parameters alone: W, b, then A
    A = torch.empty_like(i["A"])
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    assert torch.equal(v["W"], ref.weight) and torch.equal(v["b"], ref.bias), "W and b as nn.Linear draws them"
    assert torch.equal(v["A"], A), "then A, Kaiming-uniform with a=sqrt(5)"


# --- LoRALinear.forward --------------------------------------------------------------------------------

def forward_inputs(shape=(3, 6), out_f=5, in_f=6, rank=2, scaling=0.75, trained=True, **probe_args):
    """A forward probe's inputs: a layer of these shapes, x of shape (..., in_f), a seed; probe_args as they are
    (merged_flag, dropout, requires_grad)."""
    def make(g, files):
        i = lora_inputs(g, out_f, in_f, rank, scaling, trained)
        x = torch.randn(*shape[:-1], in_f, generator=g)
        return dict(i, x=x, **probe_args, seed=int(torch.randint(1 << 30, (1,), generator=g)))
    return make


def check_forward(i, v):
    close(v["y"], by_hand(i, i["x"]), "forward must be W x + b + lora_scaling * B A x, for inputs of any leading shape")


def check_fresh(i, v):
    close(v["y"], F.linear(i["x"], i["W"], i["b"]), "with B = 0, forward is W x + b")


def check_merged_skips(i, v):
    close(v["y"], F.linear(i["x"], i["W"], i["b"]),
          "a merged layer's W already holds the update: forward must not add it again")


def check_gradients(i, v):
    assert v["A_grad"] is not None and v["B_grad"] is not None, \
        "the update must be part of the graph: lora_A and lora_B get gradients"
    A, B = i["A"].clone().requires_grad_(), i["B"].clone().requires_grad_()
    by_hand(dict(i, A=A, B=B), i["x"]).sum().backward()
    close(v["A_grad"], A.grad, "lora_A's gradient must be that of lora_scaling * B A x")
    close(v["B_grad"], B.grad, "lora_B's gradient must be that of lora_scaling * B A x")


def check_dropout(i, v):
    torch.manual_seed(i["seed"])
    dropped = F.dropout(i["x"], i["dropout"], training=True)  # the mask self.lora_dropout(x) draws under the seed
    if not i["B"].any():
        close(v["y"], F.linear(i["x"], i["W"], i["b"]),
              "dropout belongs on the LoRA branch's input alone: W x + b must see x itself, not dropout(x)")
    else:
        close(v["y"], by_hand(i, i["x"], dropped), "in training, forward must be W x + b + lora_scaling * B A "
                                                   "lora_dropout(x), the dropout on the update's input only")


# --- LoRALinear.train and LoRALinear.eval ---------------------------------------------------------------
# The course's API: eval() merges the update into W, train() takes it out again. nn.Module.eval() calls
# train(False) on each layer, never its eval(), so evaluation calls each LoRA layer's eval() itself.

def check_train_unmerges(i, v):
    assert v["returns_self"], "train() returns the layer"
    assert v["training"], "train() puts the layer in training mode"
    assert not v["merged"], "train() must un-merge a merged layer (has_weights_merged = False)"
    close(v["W"], i["W"], "un-merging must take lora_scaling * B A out of W again")
    close(v["W_again"], i["W"], "a second train() must change nothing")


def check_trains_on(i, v):
    close(v["W_unmerged"], i["W"], "train() on a layer that is not merged must leave W alone")
    assert not v["history"], "un-merge W without autograd history (torch.no_grad() or .data)"


def check_eval(i, v):
    assert v["returns_self"], "eval() returns the layer"
    assert v["merged"] and not v["training"], "eval() merges (has_weights_merged = True) and leaves training mode"
    close(v["W"], i["W"] + update(i), "eval() adds lora_scaling * B A to W" +
          (", once: a second eval() must not add it again" if i["times"] > 1 else ""))
    assert not v["history"], "merge W without autograd history (torch.no_grad() or .data)"


# --- mark_only_lora_as_trainable ------------------------------------------------------------------------

def check_only_lora_trains(i, v):
    assert v["returns_model"], "it returns the model"
    assert v["trains"] == ["c_attn.lora_A", "c_attn.lora_B", "c_proj.lora_A", "c_proj.lora_B"], \
        f"only the LoRA matrices train, not {v['trains']}"


def check_rest_frozen(i, v):
    want = ["c_attn.bias", "c_attn.weight", "c_proj.bias", "c_proj.weight", "head.weight", "ln.bias", "ln.weight",
            "wte.weight"]
    assert v["frozen"] == want, f"W, biases, LayerNorms and embeddings are frozen; frozen now: {v['frozen']}"


# --- model.py attention ---------------------------------------------------------------------------------

def check_projections(i, v):
    n = i["n_embd"]
    assert v["c_attn"]["recorder"] and v["c_proj"]["recorder"], \
        "c_attn and c_proj must be LoRALinear layers (model.py's LoRALinear, from lora.py)"
    assert v["c_attn"]["shape"] == [n, 3 * n], "c_attn maps n_embd to 3 * n_embd"
    assert v["c_proj"]["shape"] == [n, n], "c_proj maps n_embd to n_embd"
    assert v["c_attn"]["bias"], "with bias=config.bias, as nn.Linear had it"


def check_settings_given(i, v):
    for name in ("c_attn", "c_proj"):
        assert v[name]["given"] == i["lora"], \
            f"{name} must get the config's lora_rank, lora_alpha and lora_dropout, not {v[name]['given']}"


# --- CustomDataLoader._add_instruction_finetuning -------------------------------------------------------

def check_texts(i, v):
    from lorakit.prompts import prompt_from_texts
    (neg, pos), (other, _) = v
    assert i["reviews"][0] in pos and i["reviews"][1] in other, f"the instruction must hold the review: {pos!r}"
    assert pos.endswith(EOT) and neg.endswith(EOT), \
        f"the text ends with the label word, then end-of-text ({EOT}): {pos[-40:]!r}"
    words = prompt_from_texts(neg, pos)[1].split(",")  # the words where the two labels' texts part
    assert all(w.replace(" ", "").isalpha() for w in words), f"label 0 and label 1 are answered with words, not {words}"
    assert pos.endswith(words[1] + EOT) and neg.endswith(words[0] + EOT), \
        "the same instruction for both labels, then the label's word"


def check_batches(i, v):
    import tiktoken
    from lorakit.prompts import prompt_from_texts
    assert v["x_shape"] == v["y_shape"] and v["x_shape"][0] == i["batch_size"], "batches of (x, y), batch_size rows"
    enc, words = tiktoken.get_encoding("gpt2"), prompt_from_texts(*v["texts"])[1].split(",")
    answers = [enc.encode_ordinary(" " + words[label]) + [enc.eot_token] for label in (1, 0, 1, 0)]  # the reviews'
    assert v["learned"] == answers, "the model learns each review's label word and end-of-text"


# --- train.py LoRA -------------------------------------------------------------------------------------

def check_loaded_with_lora(i, v):
    assert v["model_type"] == i["model_dir"], "load the pretrained model init_from names with GPT.from_pretrained"
    assert v["override"] == dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1), \
        f"from_pretrained's override_args must carry the run's lora_rank, lora_alpha and lora_dropout, not {v['override']}"
    assert v["mark_only_got_model"], "with LoRA, mark_only_lora_as_trainable(model)"


def check_rank_zero(i, v):
    assert not v["mark_only"], "lora_rank=0 is full fine-tuning: no LoRA matrices to pick"
    assert v["all_train"], "lora_rank=0 is full fine-tuning: every weight trains"


# --- ModelSampler.get_accuracy --------------------------------------------------------------------------

def accuracy_check(expected, why):
    def check(i, v):
        assert tuple(v) == expected, f"{why}: {expected}, not {tuple(v)}"
    return check


# -----------------------------------------------------------------------------
w = lora_inputs
TESTS = [
    Test("LoRALinear.__init__", "init creates frozen lora matrices of the right shapes", "init_layer", init_inputs(),
         check_init),
    Test("LoRALinear.__init__", "init draws in the starters order", "init_layer", init_inputs(4, 3, 2, 4.0),
         check_init_draws),
    Test("LoRALinear.reset_parameters", "reset makes b zero and a kaiming uniform", "reset_layer", reset_inputs,
         check_reset_zero_kaiming),
    Test("LoRALinear.reset_parameters", "reset draws w b then a", "reset_layer", reset_inputs, check_reset_draws),
    Test("LoRALinear.forward", "forward adds the scaled update and keeps the bias", "forward",
         forward_inputs((2, 4, 6)), check_forward),
    Test("LoRALinear.forward", "a fresh layer computes the pretrained function", "forward",
         forward_inputs(trained=False), check_fresh),
    Test("LoRALinear.forward", "forward skips the update once it is merged", "forward",
         forward_inputs(merged_flag=True), check_merged_skips),
    Test("LoRALinear.forward", "gradients reach a and b", "forward", forward_inputs(requires_grad=True),
         check_gradients),
    Test("LoRALinear.forward", "dropout leaves the frozen path alone", "forward",
         forward_inputs((8, 6), dropout=0.5, trained=False), check_dropout),
    Test("LoRALinear.forward", "dropout goes on the updates input only", "forward",
         forward_inputs((8, 6), dropout=0.5), check_dropout),
    Test("LoRALinear.train", "train unmerges and returns the layer", "train_merged", lambda g, f: w(g),
         check_train_unmerges),
    Test("LoRALinear.train", "an unmerged layer trains on", "train_unmerged",
         lambda g, f: w(g, x=torch.randn(3, 6, generator=g)), check_trains_on),
    Test("LoRALinear.eval", "eval merges and returns the layer", "eval_layer", lambda g, f: w(g, times=1), check_eval),
    Test("LoRALinear.eval", "eval twice adds the update once", "eval_layer", lambda g, f: w(g, times=2), check_eval),
    Test("mark_only_lora_as_trainable", "only lora matrices train", "mark_only", lambda g, f: w(g, vocab=10),
         check_only_lora_trains),
    Test("mark_only_lora_as_trainable", "every other parameter is frozen", "mark_only", lambda g, f: w(g, vocab=10),
         check_rest_frozen),
    Test("model.py attention", "attention projections are lora layers", "attention",
         lambda g, f: dict(n_embd=8, n_head=2, lora={}), check_projections),
    Test("model.py attention", "attention layers take the configs lora settings", "attention",
         lambda g, f: dict(n_embd=8, n_head=2, lora=dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1)),
         check_settings_given),
    Test("CustomDataLoader._add_instruction_finetuning", "the text is the prompt then the label word then end of text",
         "instruction_texts", lambda g, f: dict(reviews_dir=f["reviews_dir"], reviews=["a gorgeous film", "a dull film"]),
         check_texts),
    Test("CustomDataLoader._add_instruction_finetuning", "batches learn the label word", "first_batch",
         lambda g, f: dict(reviews_dir=f["reviews_dir"], batch_size=4), check_batches),
    Test("train.py LoRA", "the pretrained model is loaded with the runs lora settings", "build_model",
         lambda g, f: dict(model_dir=f["model_dir"], reviews_dir=f["reviews_dir"],
                           flags=["--rank=2", "--alpha=4", "--lora_dropout=0.1"]), check_loaded_with_lora),
    Test("train.py LoRA", "rank zero trains every weight", "build_model",
         lambda g, f: dict(model_dir=f["model_dir"], reviews_dir=f["reviews_dir"], flags=["--rank=0"]), check_rank_zero),
    Test("ModelSampler.get_accuracy", "a model that always answers positive", "accuracy",
         lambda g, f: dict(model_dir=f["answers_good"], reviews_dir=f["reviews_dir"], template="bare",
                           label_words="bad,good"),
         accuracy_check((0.5, 12, 0), "half the 12 test reviews are positive")),
    Test("ModelSampler.get_accuracy", "a model that always answers negative in capitals", "accuracy",
         lambda g, f: dict(model_dir=f["answers_BAD"], reviews_dir=f["reviews_dir"], template="bare",
                           label_words="bad,good"),
         accuracy_check((0.5, 0, 12), "' BAD' reads as the label word 'bad' (case aside)")),
    Test("ModelSampler.get_accuracy", "unparseable generations count as wrong", "accuracy",
         lambda g, f: dict(model_dir=f["answers_dot"], reviews_dir=f["reviews_dir"], template="bare",
                           label_words="bad,good"),
         accuracy_check((0.0, 0, 0), "no generation names a label")),
]
ANSWERS = {"answers_good": " good", "answers_BAD": " BAD", "answers_dot": "."}  # files: models that answer these


# --- the files the tests read: tiny GPT-2 checkpoints and a few reviews ----------------------------------------

def save_gpt2(path, seed=0, answer=None):
    """A tiny GPT-2 checkpoint (transformers' format, GPT-2's vocabulary). With answer (a token id) it is
    built to generate that token after any text: its last LayerNorm outputs that token's embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257,
                                    bos_token_id=50256, eos_token_id=50256))
    if answer is not None:
        with torch.no_grad():
            hf.transformer.wte.weight[answer] = 10.0
            hf.transformer.ln_f.weight.zero_()
            hf.transformer.ln_f.bias.copy_(hf.transformer.wte.weight[answer])
    hf.save_pretrained(path)
    return str(path)


def write_reviews(path):
    """Train, validation and test splits of 12 short reviews each as CSV files, labels alternating."""
    os.makedirs(path, exist_ok=True)
    texts = ["a gorgeous , moving film", "a dull mess", "funny and warm", "tedious and far too long"]
    for split in ("train", "validation", "test"):
        with open(os.path.join(path, f"{split}.csv"), "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["text", "label"])
            for i in range(12):
                out.writerow([f"{texts[i % 4]} , take {i}", 1 - i % 2])
    return str(path)


def make_files(folder, answers=ANSWERS, models=True):
    """The files the tests read, made in folder: {name: path}; the tiny models only with models."""
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    files = dict(reviews_dir=write_reviews(os.path.join(folder, "reviews")))
    if not models:
        return files
    files["model_dir"] = save_gpt2(os.path.join(folder, "tiny-gpt2"))
    for name, word in answers.items():
        (token,) = enc.encode_ordinary(word)
        files[name] = save_gpt2(os.path.join(folder, name), answer=token)
    return files

"""
The handout tests' student side: each probe runs the submission's code on inputs it is given and
returns what came out (tensors, numbers, strings), nothing judged. course/tests/checks.py says what
each test gives a probe and what it expects back; the grader runs probes in a worker process of their
own and judges the values itself, and test_handout.py runs both in one process for students.

Probes use the course's API alone (LoRALinear, mark_only_lora_as_trainable, GPT, GPTConfig,
CustomDataLoader, ModelSampler) and each grades one file: where a test needs another handout file,
a stand-in takes its place (Recorder for LoRALinear, a fixed prompt for dataloader.py's).
"""

from contextlib import ExitStack, contextmanager

import torch
import torch.nn as nn


class Recorder(nn.Linear):
    """Stands in for lora.LoRALinear where a test grades model.py, train.py or generate.py: an nn.Linear that
    keeps the LoRA settings it was given."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, lora_rank=0, lora_alpha=0.0,
                 lora_dropout=0.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.given = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)

    def is_lora(self):
        return False


@contextmanager
def replaced(*changes):
    """(object, attribute, value) set for the with block, as they were after it."""
    with ExitStack() as stack:
        for obj, name, value in changes:
            missing, old = not hasattr(obj, name), getattr(obj, name, None)
            stack.callback(lambda o=obj, n=name, v=old, m=missing: delattr(o, n) if m else setattr(o, n, v))
            setattr(obj, name, value)
        yield


def recorded(*modules):
    """LoRALinear in these modules is Recorder for the with block."""
    return replaced(*[(m, "LoRALinear", Recorder) for m in modules])


def layer(W, b, A, B, scaling, dropout=0.0):
    """A LoRALinear with these W, b, A, B and scaling, as the course's tests set them: a forward, train or eval
    probe then runs that method alone, whatever __init__ and reset_parameters do (a layer built without LoRA gets
    its LoRA part attached when they are not written yet)."""
    from lora import LoRALinear
    out_f, in_f = W.shape
    try:
        m = LoRALinear(in_f, out_f, lora_rank=A.shape[0], lora_alpha=1.0)
    except NotImplementedError:
        m = LoRALinear(in_f, out_f)
    with torch.no_grad():
        m.weight.copy_(W)
        m.bias.copy_(b)
    m.lora_A = nn.Parameter(A.clone(), requires_grad=False)
    m.lora_B = nn.Parameter(B.clone(), requires_grad=False)
    m.lora_scaling, m.lora_dropout, m.has_weights_merged = scaling, nn.Dropout(dropout), False
    return m


def merged(m):
    """m as eval() leaves it: W holding the update, the flag set, dropout off."""
    with torch.no_grad():
        m.weight += m.lora_scaling * m.lora_B @ m.lora_A
    m.has_weights_merged, m.training = True, False
    return m


# --- LoRALinear.__init__ and reset_parameters ---------------------------------------------------------

def init_layer(in_f, out_f, rank, alpha, dropout, seed):
    from lora import LoRALinear
    torch.manual_seed(seed)
    m = LoRALinear(in_features=in_f, out_features=out_f, lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout)
    drop = getattr(m, "lora_dropout", None)
    out = dict(is_linear=isinstance(m, nn.Linear), is_lora=m.is_lora(), merged=m.has_weights_merged,
               scaling=float(getattr(m, "lora_scaling", float("nan"))),
               dropout_p=drop.p if isinstance(drop, nn.Dropout) else None, W=m.weight, b=m.bias)
    for name in ("lora_A", "lora_B"):
        p = getattr(m, name, None)
        out[name] = p if isinstance(p, nn.Parameter) else None
        out[name + "_trains"] = bool(p is not None and p.requires_grad)
    torch.manual_seed(seed)
    plain = LoRALinear(in_f, out_f)
    out.update(plain_names=[n for n, _ in plain.named_parameters()], plain_W=plain.weight, plain_b=plain.bias)
    return out


def reset_layer(W, b, A, B, scaling, seed):
    m = layer(W, b, A, B, scaling)
    torch.manual_seed(seed)
    m.reset_parameters()
    return dict(W=m.weight, b=m.bias, A=m.lora_A, B=m.lora_B)


# --- LoRALinear.forward --------------------------------------------------------------------------------

def forward(W, b, A, B, scaling, x, merged_flag=False, dropout=0.0, seed=0, train=True, requires_grad=False):
    m = layer(W, b, A, B, scaling, dropout)
    m.training = train
    m.has_weights_merged = merged_flag
    m.lora_A.requires_grad_(requires_grad)
    m.lora_B.requires_grad_(requires_grad)
    torch.manual_seed(seed)
    y = m(x)
    out = dict(y=y.detach())
    if requires_grad:
        y.sum().backward()
        out.update(A_grad=m.lora_A.grad, B_grad=m.lora_B.grad)
    return out


# --- LoRALinear.train and LoRALinear.eval ---------------------------------------------------------------

def train_merged(W, b, A, B, scaling):
    m = merged(layer(W, b, A, B, scaling))
    returned = m.train()
    out = dict(returns_self=returned is m, training=m.training, merged=m.has_weights_merged, W=m.weight.detach().clone())
    m.train()
    return dict(out, W_again=m.weight.detach())


def train_unmerged(W, b, A, B, scaling, x):
    m = layer(W, b, A, B, scaling)
    m.lora_A.requires_grad_(True)
    m.lora_B.requires_grad_(True)
    m.train()
    W_after = m.weight.detach().clone()
    merged(m).train()
    torch.nn.functional.linear(x, m.weight, m.bias).sum().backward()
    return dict(W_unmerged=W_after, history=m.weight.grad_fn is not None)


def eval_layer(W, b, A, B, scaling, times):
    m = layer(W, b, A, B, scaling)
    returned = [m.eval() for _ in range(times)]
    return dict(returns_self=all(r is m for r in returned), merged=m.has_weights_merged, training=m.training,
                W=m.weight.detach(), history=m.weight.grad_fn is not None)


# --- mark_only_lora_as_trainable ------------------------------------------------------------------------

def mark_only(W, b, A, B, scaling, vocab):
    from lora import mark_only_lora_as_trainable

    class Small(nn.Module):  # what the course's code passes: a model with LoRALinear layers among others
        def __init__(self):
            super().__init__()
            self.wte, self.ln = nn.Embedding(vocab, W.shape[1]), nn.LayerNorm(W.shape[1])
            self.c_attn, self.c_proj = layer(W, b, A, B, scaling), layer(W, b, A, B, scaling)
            self.head = nn.Linear(W.shape[0], vocab, bias=False)

    model = Small()
    model.c_attn.lora_A.requires_grad_(True)  # whatever they were before
    returned = mark_only_lora_as_trainable(model)
    return dict(returns_model=returned is model,
                trains=sorted(n for n, p in model.named_parameters() if p.requires_grad),
                frozen=sorted(n for n, p in model.named_parameters() if not p.requires_grad))


# --- model.py attention ---------------------------------------------------------------------------------

def attention(n_embd, n_head, lora):
    import lora as lora_py
    import model
    with recorded(model, lora_py):  # model.py may name it either way
        attn = model.GPT(model.GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=16, vocab_size=64,
                                         **lora)).transformer.h[0].attn
    return {name: dict(recorder=isinstance(m, Recorder), shape=[m.in_features, m.out_features],
                       bias=m.bias is not None, given=getattr(m, "given", {}))
            for name, m in (("c_attn", attn.c_attn), ("c_proj", attn.c_proj))}


# --- CustomDataLoader._add_instruction_finetuning -------------------------------------------------------

def instruction_texts(reviews_dir, reviews):
    """Each review's instr_tuned_text for label 0 and for label 1."""
    import tiktoken
    from dataloader import CustomDataLoader
    from lorakit.data import load_splits
    data = CustomDataLoader(load_splits(reviews_dir)["train"], tiktoken.get_encoding("gpt2"), batch_size=4)
    return [[data._add_instruction_finetuning({"text": r, "label": y})["instr_tuned_text"] for y in (0, 1)]
            for r in reviews]


def first_batch(reviews_dir, batch_size):
    """The targets (-1 dropped) of each row of the first batch of get_loader(shuffle=False), and the batch's shape."""
    import tiktoken
    from dataloader import CustomDataLoader
    from lorakit.data import load_splits
    data = CustomDataLoader(load_splits(reviews_dir)["train"], tiktoken.get_encoding("gpt2"), batch_size=batch_size)
    x, y = next(iter(data.get_loader(shuffle=False)))
    texts = [data._add_instruction_finetuning({"text": "a film", "label": label})["instr_tuned_text"] for label in (0, 1)]
    return dict(x_shape=list(x.shape), y_shape=list(y.shape), learned=[row[row != -1].tolist() for row in y],
                texts=texts)


# --- train.py LoRA -------------------------------------------------------------------------------------

def build_model(model_dir, reviews_dir, flags):
    """train.py's model for these flags, with what it asked of GPT.from_pretrained and mark_only_lora_as_trainable
    (the model built with Recorder layers, so that only train.py is graded)."""
    import model
    import train
    asked = {}
    real = model.GPT.from_pretrained.__func__

    def from_pretrained(cls, model_type, override_args=None):
        asked["from_pretrained"] = [model_type, dict(override_args or {})]
        return real(cls, model_type, override_args)

    def mark_only(m):
        asked["mark_only"] = m
        return m

    with recorded(model, train), replaced((model.GPT, "from_pretrained", classmethod(from_pretrained)),
                                          (train, "mark_only_lora_as_trainable", mark_only)):
        c, _ = train.read_settings([f"--init_from={model_dir}", f"--dataset={reviews_dir}", *flags])
        built, _ = train.build_model(c, None)
    model_type, override = asked.get("from_pretrained", (None, {}))
    return dict(model_type=model_type, override={k: override.get(k) for k in ("lora_rank", "lora_alpha", "lora_dropout")},
                mark_only="mark_only" in asked, mark_only_got_model=asked.get("mark_only") is built,
                all_train=all(p.requires_grad for p in built.parameters()))


# --- ModelSampler.get_accuracy --------------------------------------------------------------------------

def accuracy(model_dir, reviews_dir, template, label_words):
    """get_accuracy() of a ModelSampler over model_dir asking the prompt given (not dataloader.py's)."""
    import generate
    import model
    from lorakit.prompts import Prompt
    with recorded(model), replaced((generate, "run_prompt", lambda *args: Prompt(template, label_words))):
        sampler = generate.ModelSampler("out", model_dir, "cpu", 3, 0.0, 0, dataset=reviews_dir)  # the starter's order
        return [float(v) for v in sampler.get_accuracy()]

"""DoRA and PiSSA beside LoRA: DoRA's layer against PEFT's (outputs and gradients), merging that stays exact;
PiSSA's start computes what the base did, its adapter alone resumes and evaluates on the unchanged base;
both export to transformers and PEFT with this repository's logits, and refuse what they cannot do."""
import hashlib
import os

import pytest
import torch
import torch.nn as nn

import export
import generate
import train
from lorakit.checkpoint import load_checkpoint
from configurator import ConfigError
from lora import LoRALinear, mark_only_lora_as_trainable
from lorakit.adapters import lora_state_dict, train_adapter_extras
from lorakit.variants import DoRALinear, load_pissa, pissa_init
from model import GPT, GPTConfig

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=100, lora_rank=4, lora_alpha=8.0)


def trained_dora(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layer = DoRALinear.from_lora(LoRALinear(12, 10, lora_rank=3, lora_alpha=6.0, lora_dropout=dropout))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(torch.linspace(0.5, 1.5, 10))
    return layer


def test_dora_merged_and_unmerged_agree_and_merging_is_exact_and_idempotent():
    layer, x = trained_dora(), torch.randn(5, 12)
    W = layer.weight.detach().clone()
    y = layer.train()(x)
    delta = layer.delta_weight()
    layer.eval()
    layer.merge()  # twice: nothing more
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight, W + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-6, rtol=0)  # its meaning, merged or not
    torch.testing.assert_close(layer.state_dict()["weight"], W, atol=1e-6, rtol=0)  # always the un-merged W
    layer.train()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=0)


def test_a_fresh_dora_layer_computes_what_w_does():
    torch.manual_seed(0)
    plain = nn.Linear(12, 10)
    layer = DoRALinear.from_lora(LoRALinear(12, 10, lora_rank=3, lora_alpha=6.0))
    layer.load_state_dict(plain.state_dict(), strict=False)  # new weights: the magnitudes follow them
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_outputs_and_gradients_equal_pefts(dropout):
    """PEFT's DoRA on an nn.Linear with the same W, b, A, B and m: the same output and the same gradients for
    A, B and m (the norm a constant in the backward pass in both); with dropout, the same mask."""
    from peft import LoraConfig, get_peft_model
    ours = trained_dora(dropout=dropout)
    holder = nn.Sequential()
    holder.add_module("fc", nn.Linear(12, 10))
    holder.fc.load_state_dict({k: ours.state_dict()[k] for k in ("weight", "bias")})
    peft = get_peft_model(holder, LoraConfig(r=3, lora_alpha=6.0, lora_dropout=dropout, target_modules=["fc"],
                                             use_dora=True))
    fc = peft.base_model.model.fc
    with torch.no_grad():
        fc.lora_A["default"].weight.copy_(ours.lora_A)
        fc.lora_B["default"].weight.copy_(ours.lora_B)
        fc.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
    train_adapter_extras(mark_only_lora_as_trainable(ours))  # DoRA's m trains too
    x = torch.randn(6, 12)
    ours.train(), peft.train()
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)
    y_peft = peft(x)
    torch.testing.assert_close(y_ours, y_peft, atol=1e-5, rtol=0)
    g = torch.randn_like(y_ours)
    (y_ours * g).sum().backward()
    (y_peft * g).sum().backward()
    for name, theirs in (("lora_A", fc.lora_A["default"].weight), ("lora_B", fc.lora_B["default"].weight),
                         ("lora_magnitude", fc.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(getattr(ours, name).grad, theirs.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_pissas_start_computes_what_the_base_did_and_its_a_b_are_ws_top_singular_part():
    torch.manual_seed(0)
    model, x = GPT(GPTConfig(**SMALL)), torch.randint(0, 100, (2, 16))
    before = model(x)[0]
    W = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    pissa_init(model)
    torch.testing.assert_close(model(x)[0], before, atol=1e-5, rtol=0)
    layer = model.transformer.h[0].attn.c_attn
    U, S, Vh = torch.linalg.svd(W)
    torch.testing.assert_close(layer.lora_scaling * layer.lora_B @ layer.lora_A, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5,
                               rtol=0)
    assert {"lora_A0", "lora_B0"} <= {k.rsplit(".", 1)[1] for k in lora_state_dict(model)}


def flags(base, reviews, out_dir, *more):
    return [f"--init_from={base}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu", "--batch_size=4",
            "--eval_iters=1", "--rank=4", "--alpha=16", "--lr=1e-2", "--warmup_iters=0", "--max_iters=3",
            "--eval_interval=3", *more]


def digest(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module", params=["dora", "pissa"])
def variant_run(request, tiny_ckpt, reviews, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    base_before = digest(tiny_ckpt)
    flag = "--lora_variant=dora" if request.param == "dora" else "--lora_init=pissa"
    train.main(flags(tiny_ckpt, reviews, out, flag))
    assert digest(tiny_ckpt) == base_before  # the base model is never written
    return request.param, out


def logits_of(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx, idx)[0] if isinstance(model, GPT) else model(input_ids=idx).logits


def test_the_adapter_alone_resumes_and_evaluates_on_the_unchanged_base(variant_run, tiny_ckpt):
    name, run = variant_run
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    kinds = {k.rsplit(".", 1)[1] for k in ckpt["model"]}
    assert ckpt["adapter_only"] and kinds == ({"lora_A", "lora_B", "lora_magnitude"} if name == "dora" else
                                              {"lora_A", "lora_B", "lora_A0", "lora_B0"})
    assert generate.main([f"--out_dir={run}", "--device=cpu", "--num_samples=4"])["n"] == 4
    resumed = run.parent / "resumed"
    import shutil
    shutil.copytree(run, resumed)
    train.main([f"--out_dir={resumed}", "--init_from=resume", "--max_iters=5"])
    assert torch.load(resumed / "ckpt.pt", weights_only=True)["iter_num"] == 5
    if name == "pissa":  # the residual rebuilt from the base: the adapter model computes what the trained one did
        model, _ = load_checkpoint(run / "ckpt.pt")
        base = GPT.from_pretrained(tiny_ckpt, dict(lora_rank=4, lora_alpha=16.0))
        load_pissa(base, ckpt["model"])  # the buffers made, the residual rebuilt
        idx = torch.randint(0, 50257, (2, 12))
        torch.testing.assert_close(logits_of(model, idx), logits_of(base, idx), atol=1e-5, rtol=0)


def test_both_export_to_transformers_and_peft_with_our_logits(variant_run, tiny_ckpt):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    name, run = variant_run
    export.main([f"--out_dir={run}", "--format=hf", "--overwrite=True"])
    export.main([f"--out_dir={run}", "--format=peft", "--overwrite=True"])
    ours, _ = load_checkpoint(run / "ckpt.pt")
    idx = torch.randint(0, 50257, (2, 12))
    expected = logits_of(ours, idx)
    merged = GPT2LMHeadModel.from_pretrained(run / "hf")
    torch.testing.assert_close(logits_of(merged, idx), expected, atol=1e-4, rtol=0)
    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_ckpt), run / "peft")
    torch.testing.assert_close(logits_of(peft, idx), expected, atol=1e-4, rtol=0)
    if name == "dora":  # and back: a DoRA adapter imports
        export.main(["--format=import_peft", f"--adapter={run / 'peft'}", f"--out_dir={run.parent / 'back'}"])
        back, _ = load_checkpoint(run.parent / "back" / "ckpt.pt")
        torch.testing.assert_close(logits_of(back, idx), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("more, message", [
    (["--rank=0", "--lora_variant=dora"], "lora_variant=dora changes LoRA's update: it needs lora_rank > 0"),
    (["--rank=0", "--lora_init=pissa"], "lora_init=pissa changes LoRA's update: it needs lora_rank > 0"),
    (["--lora_targets=qv", "--lora_init=pissa"], "DoRA and PiSSA adapt whole weights, not qv's slices"),
    (["--lora_targets=qv", "--lora_variant=dora"], "DoRA and PiSSA adapt whole weights, not qv's slices"),
    (["--lora_variant=dora", "--fsdp=True"], "DoRA with fsdp=True is not supported"),
    (["--lora_init=pissa_niter_x"], "lora_init must be default, pissa or pissa_niter_N"),
    (["--lora_variant=vera"], "lora_variant must be one of lora, dora"),
])
def test_what_a_variant_cannot_do_is_one_line_before_any_work(tiny_ckpt, reviews, tmp_path, more, message):
    with pytest.raises(ConfigError, match=message):
        train.main(flags(tiny_ckpt, reviews, tmp_path / "run", *more))
    assert not (tmp_path / "run").exists()

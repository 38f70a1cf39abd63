"""Adapter-only checkpoints, and round trips through transformers and PEFT, on tiny random GPT-2s."""
import os

import pytest
import torch

import export
from conftest import SHARED, results_of
import generate
import train
from lorakit.checkpoint import load_checkpoint
from model import GPT


def tiny_run(tiny_ckpt, reviews, out_dir, *flags):
    train.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu",
                "--batch_size=4", "--eval_iters=1", "--eval_interval=2", "--rank=4", "--alpha=8", "--lr=3e-2",
                "--max_iters=4", "--lr_decay_iters=4", *flags])


@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, reviews, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    tiny_run(tiny_ckpt, reviews, out, "--checkpoint=full")
    return out


def hf_export_logit_gap(model, run_dir, export_dir, *flags):
    """Largest |logit| difference between model and run_dir exported to transformers in export_dir."""
    from transformers import GPT2LMHeadModel
    export.main([f"--out_dir={run_dir}", "--format=hf", f"--export_dir={export_dir}", *flags])
    hf = GPT2LMHeadModel.from_pretrained(str(export_dir)).eval()
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        return (hf(idx).logits - model.eval()(idx, idx)[0]).abs().max().item()


def test_adapter_only_checkpoint_is_small_and_equivalent(tiny_ckpt, reviews, lora_run, tmp_path):
    tiny_run(tiny_ckpt, reviews, tmp_path / "adapter", "--checkpoint=adapter", "--max_iters=2")
    tiny_run(tiny_ckpt, reviews, tmp_path / "adapter", "--init_from=resume")  # resume keeps the format
    ckpt = torch.load(tmp_path / "adapter" / "ckpt.pt", weights_only=True)
    assert ckpt["adapter_only"] and all(k.endswith(("lora_A", "lora_B")) for k in ckpt["model"])
    full_size = os.path.getsize(lora_run / "ckpt.pt")
    assert os.path.getsize(tmp_path / "adapter" / "ckpt.pt") < full_size / 20
    a, _ = load_checkpoint(str(lora_run / "ckpt.pt"))
    b, _ = load_checkpoint(str(tmp_path / "adapter" / "ckpt.pt"))
    for k, v in a.state_dict().items():  # same training, stored two ways
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6)
    kw = dict(dataset=reviews, device="cpu", num_samples=8)
    full_preds = results_of(generate.ModelSampler(out_dir=str(lora_run), **kw))
    adapter_preds = results_of(generate.ModelSampler(out_dir=str(tmp_path / "adapter"), **kw))
    assert [p["generation"] for p in full_preds] == [p["generation"] for p in adapter_preds]


def test_export_hf_loads_in_transformers_with_equal_logits(lora_run, tmp_path):
    tokenizer = SHARED / "assets" / "gpt2_tokenizer"
    ours, _ = load_checkpoint(str(lora_run / "ckpt.pt"))
    assert hf_export_logit_gap(ours, lora_run, tmp_path, f"--tokenizer_dir={tokenizer if tokenizer.is_dir() else ''}") < 1e-4
    if tokenizer.is_dir():
        from transformers import GPT2TokenizerFast
        assert GPT2TokenizerFast.from_pretrained(str(tmp_path)).encode(" positive") == [3967]


def test_export_peft_loads_in_peft_with_equal_logits_and_imports_back(tiny_ckpt, lora_run, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    export.main([f"--out_dir={lora_run}", "--format=peft", f"--export_dir={tmp_path / 'peft'}"])
    ours, _ = load_checkpoint(str(lora_run / "ckpt.pt"))
    ours.eval()
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_ckpt), str(tmp_path / "peft")).eval()
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == 2 * 2 and not any(".mlp." in n for n in adapted)  # attention only, not MLP c_proj
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        expected = ours(idx, idx)[0]
        assert (peft_model(input_ids=idx).logits - expected).abs().max().item() < 1e-4
        assert (expected - GPT.from_pretrained(tiny_ckpt).eval()(idx, idx)[0]).abs().max() > 1e-3  # LoRA matters
    export.main(["--format=import_peft", f"--adapter={tmp_path / 'peft'}", f"--out_dir={tmp_path / 'back'}"])
    back, _ = load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))
    with torch.no_grad():
        assert (back.eval()(idx, idx)[0] - expected).abs().max().item() < 1e-5


def test_import_adapter_trained_by_peft(tiny_ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_ckpt), LoraConfig(
        r=2, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    export.main(["--format=import_peft", f"--adapter={tmp_path / 'adapter'}", f"--init_from={tiny_ckpt}",
                 f"--out_dir={tmp_path / 'run'}"])
    model, _ = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (model.eval()(idx, idx)[0] - peft_model.eval()(input_ids=idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("targets", ["qv", "attn_mlp"])
def test_adapter_checkpoints_of_other_targets_round_trip(tiny_ckpt, reviews, tmp_path, targets):
    tiny_run(tiny_ckpt, reviews, tmp_path / "full", f"--lora_targets={targets}", "--lora_scaling=rslora",
             "--checkpoint=full")
    tiny_run(tiny_ckpt, reviews, tmp_path / "adapter", f"--lora_targets={targets}", "--lora_scaling=rslora",
             "--max_iters=2")
    tiny_run(tiny_ckpt, reviews, tmp_path / "adapter", "--init_from=resume")
    a, ckpt = load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    b, _ = load_checkpoint(str(tmp_path / "adapter" / "ckpt.pt"))
    assert (b.config.lora_targets, b.config.lora_scaling) == (targets, "rslora")
    adapted = {k.rsplit(".", 1)[0] for k in ckpt["model"] if k.endswith("lora_A")}
    expected = {"attn.c_attn", "mlp.c_fc", "mlp.c_proj", "attn.c_proj"} if targets == "attn_mlp" else {"attn.c_attn"}
    assert {k.split(".", 3)[3] for k in adapted} == expected
    for k, v in a.state_dict().items():  # the same training, stored two ways, resumed halfway in one
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6)
    assert hf_export_logit_gap(b, tmp_path / "adapter", tmp_path / "hf") < 1e-4


def test_export_peft_of_attention_and_mlp_with_rslora_loads_in_peft(tiny_ckpt, reviews, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    tiny_run(tiny_ckpt, reviews, tmp_path / "run", "--lora_targets=attn_mlp", "--lora_scaling=rslora")
    export.main([f"--out_dir={tmp_path / 'run'}", "--format=peft", f"--export_dir={tmp_path / 'peft'}"])
    ours, _ = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_ckpt), str(tmp_path / "peft")).eval()
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]) == 2 * 4
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        expected = ours.eval()(idx, idx)[0]
        assert (peft_model(input_ids=idx).logits - expected).abs().max().item() < 1e-4
    export.main(["--format=import_peft", f"--adapter={tmp_path / 'peft'}", f"--out_dir={tmp_path / 'back'}"])
    back, _ = load_checkpoint(str(tmp_path / "back" / "ckpt.pt"))
    assert (back.config.lora_targets, back.config.lora_scaling) == ("attn_mlp", "rslora")
    with torch.no_grad():
        assert (back.eval()(idx, idx)[0] - expected).abs().max().item() < 1e-5


def test_export_peft_of_query_and_value_slices_is_one_clear_error(tiny_ckpt, reviews, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    tiny_run(tiny_ckpt, reviews, tmp_path / "run", "--lora_targets=qv", "--max_iters=1")
    p = subprocess.run([sys.executable, "export.py", f"--out_dir={tmp_path / 'run'}", "--format=peft"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr == (
        "error: PEFT cannot adapt only the query and value slices of GPT-2's fused c_attn (lora_targets=qv); export "
        "the merged model with --format=hf instead\n")
    assert not (tmp_path / "run" / "peft").exists()

"""GPT against transformers' GPT2LMHeadModel on the same checkpoints, parameter counts, generation."""
import pytest
import torch

from conftest import STANDIN, needs_standin, save_random_hf_gpt2
from lora import mark_only_lora_as_trainable
from lorakit.adapters import parameter_summary
from lorakit.adapters import lora_parameter_counts
from model import GPT, target_positions

SHAPES = [
    dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97),
    dict(n_layer=3, n_head=4, n_embd=48, n_positions=128, vocab_size=211),
]


def perturb_lora_B(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("shape", SHAPES, ids=["2x32", "3x48"])
def test_logits_and_loss_match_transformers(tmp_path, shape):
    hf = save_random_hf_gpt2(tmp_path, bos_token_id=0, eos_token_id=0, **shape)
    model = GPT.from_pretrained(str(tmp_path), dict(lora_rank=8, lora_alpha=16)).eval()
    assert model.config.n_layer == shape["n_layer"] and model.config.block_size == shape["n_positions"]
    idx = torch.randint(0, shape["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(0))
    targets = idx[:, 1:].clone()
    targets[:, :10] = -1  # ignored positions
    with torch.no_grad():
        ref = hf(idx[:, :-1])
        ref_last = hf(idx).logits[:, -1:]
        logits, loss = model(idx[:, :-1], targets)
        last, no_loss = model(idx)
    hf_loss = torch.nn.functional.cross_entropy(ref.logits.reshape(-1, shape["vocab_size"]), targets.reshape(-1),
                                                ignore_index=-1)
    assert (logits - ref.logits).abs().max() < 1e-4
    assert abs(loss.item() - hf_loss.item()) < 1e-5
    assert last.shape == (3, 1, shape["vocab_size"]) and no_loss is None
    assert (last - ref_last).abs().max() < 1e-4


def test_nonzero_lora_merged_equals_unmerged(tmp_path):
    save_random_hf_gpt2(tmp_path, **SHAPES[1])
    model = GPT.from_pretrained(str(tmp_path), dict(lora_rank=4, lora_alpha=32))
    perturb_lora_B(model)
    idx = torch.randint(0, SHAPES[1]["vocab_size"], (2, 30))
    with torch.no_grad():
        unmerged, _ = model(idx, torch.zeros_like(idx))
        model.eval()
        merged, _ = model(idx, torch.zeros_like(idx))
        base = GPT.from_pretrained(str(tmp_path)).eval()
        plain, _ = base(idx, torch.zeros_like(idx))
    assert (merged - unmerged).abs().max() < 1e-4
    assert (merged - plain).abs().max() > 1e-2  # the update really changes the function


@needs_standin
def test_standin_matches_transformers():
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(str(STANDIN)).eval()
    model = GPT.from_pretrained(str(STANDIN), dict(lora_rank=16, lora_alpha=32)).eval()
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (6, 256, 4)
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(idx, idx)
        assert (logits - hf(idx).logits).abs().max() < 1e-4


def test_gpt2_medium_r128_trainable_parameters():
    # 24 layers x 128 x (1024 + 3072 + 1024 + 1024), from shapes alone
    trainable, total, pct = lora_parameter_counts("gpt2-medium", 128)
    assert trainable == 24 * 128 * (1024 + 3072 + 1024 + 1024) == 18_874_368
    assert total == 354_823_168 + trainable  # GPT-2 medium's own parameter count, plus LoRA
    assert pct == pytest.approx(100 * trainable / total)
    assert lora_parameter_counts("gpt2", 0)[0] == lora_parameter_counts("gpt2", 0)[1] == 124_439_808


@pytest.mark.parametrize("targets, per_layer", [
    ("attn", lambda r, C: r * (C + 3 * C) + r * (C + C)),
    ("qv", lambda r, C: 2 * r * (C + C)),  # A and B for the query and for the value, nothing for the key
    ("attn_mlp", lambda r, C: r * (C + 3 * C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)),
])
def test_trainable_parameters_of_each_target_on_gpt2_medium(targets, per_layer):
    trainable, total, _ = lora_parameter_counts("gpt2-medium", 128, targets)
    assert trainable == 24 * per_layer(128, 1024) and total == 354_823_168 + trainable


@pytest.mark.parametrize("targets", ["attn", "qv", "attn_mlp"])
@pytest.mark.parametrize("scaling", ["standard", "rslora"])
def test_merged_equals_unmerged_for_every_target_and_scaling(tmp_path, targets, scaling):
    save_random_hf_gpt2(tmp_path, **SHAPES[1])
    model = GPT.from_pretrained(str(tmp_path), dict(lora_rank=4, lora_alpha=8, lora_targets=targets, lora_scaling=scaling))
    perturb_lora_B(model)
    idx = torch.randint(0, SHAPES[1]["vocab_size"], (2, 30))
    with torch.no_grad():
        unmerged, _ = model(idx, idx)
        merged, _ = model.eval()(idx, idx)
        plain, _ = GPT.from_pretrained(str(tmp_path)).eval()(idx, idx)
    assert (merged - unmerged).abs().max() < 1e-4
    assert (merged - plain).abs().max() > 1e-2


def test_parameter_summary_follows_trainability(tiny_ckpt):
    model = GPT.from_pretrained(tiny_ckpt, dict(lora_rank=2, lora_alpha=2))
    trainable, total, _ = parameter_summary(mark_only_lora_as_trainable(model))
    assert trainable == 2 * 2 * ((32 + 96) + (32 + 32))
    assert total == sum(p.numel() for p in model.parameters())
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable


def test_override_args_are_checked(tiny_ckpt):
    with pytest.raises(ValueError, match="cannot override n_layer"):
        GPT.from_pretrained(tiny_ckpt, dict(n_layer=3))
    model = GPT.from_pretrained(tiny_ckpt, dict(dropout=0.1, lora_rank=3, lora_alpha=6, lora_dropout=0.05))
    attn = model.transformer.h[0].attn.c_attn
    assert (attn.lora_A.shape[0], attn.lora_scaling, attn.lora_dropout.p) == (3, 2.0, 0.05)
    assert model.config.dropout == 0.1


def test_unknown_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load a GPT-2 checkpoint from"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))


def test_crop_block_size(tiny_ckpt):
    model = GPT.from_pretrained(tiny_ckpt)
    idx = torch.randint(0, 50257, (1, 16))
    before, _ = model(idx)
    model.crop_block_size(16)
    after, _ = model(idx)
    assert model.transformer.wpe.weight.shape[0] == 16
    torch.testing.assert_close(before, after)


def test_greedy_generation_matches_transformers(tmp_path):
    hf = save_random_hf_gpt2(tmp_path, bos_token_id=0, eos_token_id=0, **SHAPES[1])
    model = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(1, SHAPES[1]["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(2))
    ours = model.generate(idx, 8, temperature=0)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours, theirs)


def merged_lora_model(path):
    """A random 3-layer GPT-2 with a nonzero LoRA update, merged (eval mode)."""
    save_random_hf_gpt2(path, **SHAPES[1])
    model = GPT.from_pretrained(str(path), dict(lora_rank=4, lora_alpha=8))
    perturb_lora_B(model)
    return model.eval()


def left_padded(rows):
    """(batch, attention mask) of token rows of different lengths, padded on the left."""
    T = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return batch, mask


def test_left_padded_batch_generates_what_each_prompt_generates(tmp_path):
    model = merged_lora_model(tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=g) for n in (5, 17, 11, 1)]
    batch, mask = left_padded(prompts)
    T = batch.size(1)
    out = model.generate(batch, 6, temperature=0, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], 6, temperature=0)
        assert torch.equal(out[i, T:], alone[0, len(p):])


def test_sampling_is_reproducible_with_a_generator(tiny_ckpt):
    model = GPT.from_pretrained(tiny_ckpt).eval()
    idx = torch.randint(0, 50257, (2, 5))
    a = model.generate(idx, 5, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 5, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_openai_style_checkpoint_without_prefix_as_pytorch_bin(tmp_path):
    # OpenAI's GPT-2 repositories hold GPT2Model tensors ("h.0.attn...", no "transformer.") and
    # older ones only pytorch_model.bin
    hf = save_random_hf_gpt2(tmp_path / "lm", **SHAPES[0])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "lm" / "config.json").read_text())
    torch.save(hf.transformer.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model = GPT.from_pretrained(str(tmp_path / "bin")).eval()
    idx = torch.randint(0, SHAPES[0]["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (model(idx, idx)[0] - hf(idx).logits).abs().max() < 1e-4


def test_shared_prefix_cache_gives_what_the_whole_prompts_give(tmp_path):
    model = merged_lora_model(tmp_path)
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 211, (9,), generator=g)
    tails = [torch.randint(0, 211, (n,), generator=g) for n in (5, 12, 1, 12)]
    batch, mask = left_padded(tails)
    T = batch.size(1)
    cache = model.prefix_cache(prefix.tolist())
    out = model.generate(batch, 6, temperature=0, attention_mask=mask, prefix=cache)
    # a one-token and a three-token continuation, scored from the cache against whole forward passes
    scores = model.continuation_logprobs(batch, [[3], [7, 5, 7]], mask, prefix=cache)
    for i, t in enumerate(tails):
        whole = torch.cat((prefix, t))[None]
        alone = model.generate(whole, 6, temperature=0)
        assert torch.equal(out[i, T:], alone[0, whole.size(1):])
        longer = torch.cat((whole[0], torch.tensor([7, 5])))[None]
        logprobs = model(longer, longer)[0][0].log_softmax(-1)
        n = whole.size(1)
        torch.testing.assert_close(scores[i, 0], logprobs[n - 1, 3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores[i, 1], logprobs[n - 1, 7] + logprobs[n, 5] + logprobs[n + 1, 7],
                                   rtol=1e-5, atol=1e-5)
    # equal-length rows need no padding mask: the causal mask must still hold after the prefix
    same = torch.stack([tails[1], tails[3]])
    out = model.generate(same, 3, temperature=0, prefix=cache)
    for i in range(2):
        whole = torch.cat((prefix, same[i]))[None]
        assert torch.equal(out[i], model.generate(whole, 3, temperature=0)[0, len(prefix):])


def test_label_only_loss_skips_work_but_not_gradients(tmp_path):
    # label_loss computes the last block only from the first target on; loss and every LoRA
    # gradient must be what forward's full computation gives
    save_random_hf_gpt2(tmp_path, **SHAPES[1])
    model = mark_only_lora_as_trainable(GPT.from_pretrained(str(tmp_path), dict(lora_rank=4, lora_alpha=8)))
    perturb_lora_B(model)
    idx = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(5))
    targets = torch.full_like(idx, -1)
    targets[0, 15:17], targets[1, 11:13], targets[2, 18:] = idx[0, 16:18], idx[1, 12:14], 7
    grads = []
    for positions in (None, target_positions(targets)):
        model.zero_grad()
        loss = model(idx, targets, positions=positions)[1]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fast_inference_gelu_matches_torch():
    from torch.nn import functional as F

    from model import gelu_sigmoid
    x = torch.cat((torch.randn(10000) * 3, torch.tensor([0.0, -0.0, 30.0, -30.0, 1e4, -1e4])))
    torch.testing.assert_close(gelu_sigmoid(x), F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path, lora_rank):
    # dropout on: the recomputation must draw the masks the first pass drew
    save_random_hf_gpt2(tmp_path, **SHAPES[1])
    model = GPT.from_pretrained(str(tmp_path), dict(lora_rank=lora_rank, lora_alpha=8, lora_dropout=0.1, dropout=0.1))
    if lora_rank:
        perturb_lora_B(mark_only_lora_as_trainable(model))
    model.train()
    calls = []
    model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
    idx = torch.randint(0, 211, (3, 20), generator=torch.Generator().manual_seed(5))
    targets = torch.roll(idx, -1, 1)
    runs = []
    for on in (False, True):
        model.use_grad_checkpoint(on).zero_grad()
        calls.clear()
        torch.manual_seed(3)
        loss = model(idx, targets, positions=target_positions(targets))[1]
        loss.backward()
        runs.append((len(calls), loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert (runs[0][0], runs[1][0]) == (1, 2)  # checkpointed: the block ran again in the backward pass
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    for a, b in zip(runs[0][2], runs[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_imports_stay_light():
    """model.py needs only torch, lora.py and lorakit's plain parts at import (configurator, the standard library's,
    first, so that --help needs no torch); a one-process train.py never imports FSDP or DTensor."""
    import subprocess
    import sys
    from conftest import ROOT
    code = ("import sys, model; bad = [m for m in sys.modules if m.split('.')[0] in ('huggingface_hub', "
            "'transformers', 'safetensors', 'datasets') or m == 'lorakit.hf_checkpoint']; assert not bad, bad; import train; "
            "bad = [m for m in sys.modules if m.startswith(('torch.distributed.fsdp', 'torch.distributed.tensor'))]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

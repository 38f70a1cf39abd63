"""train.py end to end on a tiny random GPT-2 and a small data set: checkpoints, resume, metrics, wandb (DDP and FSDP:
test_distributed.py)."""
import json
import os

import pytest
import torch

from lorakit import runlog
import train
from configurator import ConfigError, Settings
from lorakit.checkpoint import load_checkpoint


def run(tiny_ckpt, reviews, out_dir, *flags):
    train.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--batch_size=4",
                "--max_iters=6", "--eval_interval=3", "--eval_iters=2", "--log_interval=1", "--lr=3e-2",
                "--warmup_iters=0", "--rank=4", "--alpha=8", "--device=cpu", *flags])


def weights(path):
    return torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)["model"]


def test_lora_run_writes_checkpoint_metrics_and_plot(tiny_ckpt, reviews, tmp_path, capsys):
    run(tiny_ckpt, reviews, tmp_path)
    out = capsys.readouterr().out
    assert "LoRA r=4, alpha=8: 1,536 trainable parameters of" in out
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["model_args"]["lora_rank"] == 4 and ckpt["base_model"] == tiny_ckpt
    assert ckpt["optimizer"]["state"] and ckpt["config"]["learning_rate"] == 3e-2
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in records] == [0, 3, 6]
    assert set(records[0]) == {"iter", "train_loss", "val_loss", "lr", "elapsed_s"}
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3  # it learns the label words
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    # only LoRA tensors changed
    model, _ = load_checkpoint(str(tmp_path / "ckpt.pt"))
    from model import GPT
    base = GPT.from_pretrained(tiny_ckpt).state_dict()
    for k, v in model.state_dict().items():
        if k.endswith(("lora_A", "lora_B")):
            continue
        assert torch.equal(v, base[k]), k


def test_resume_gives_the_same_weights(tiny_ckpt, reviews, tmp_path):
    run(tiny_ckpt, reviews, tmp_path / "full", "--lora_dropout=0.1", "--lr_decay_iters=6")
    run(tiny_ckpt, reviews, tmp_path / "split", "--lora_dropout=0.1", "--lr_decay_iters=6", "--max_iters=3")
    # activation checkpointing, a machine setting, may differ on resume: it changes no result
    run(tiny_ckpt, reviews, tmp_path / "split", "--init_from=resume", "--grad_checkpoint=True")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    iters = [json.loads(line)["iter"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert iters == [0, 3, 6]


def test_full_finetuning_trains_everything(tiny_ckpt, reviews, tmp_path, capsys):
    run(tiny_ckpt, reviews, tmp_path, "--rank=0", "--max_iters=2", "--eval_interval=2")
    n = sum(v.numel() for k, v in weights(tmp_path).items() if k != "lm_head.weight")  # tied to wte
    assert f"full fine-tuning: {n:,} trainable parameters of {n:,} (100.00%)" in capsys.readouterr().out
    from model import GPT
    base = GPT.from_pretrained(tiny_ckpt).state_dict()
    after = weights(tmp_path)
    assert not any(k.endswith("lora_A") for k in after)
    assert not torch.equal(after["transformer.wte.weight"], base["transformer.wte.weight"])
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])


def test_refuses_to_overwrite_another_runs_checkpoint(tiny_ckpt, reviews, tmp_path):
    run(tiny_ckpt, reviews, tmp_path, "--max_iters=1")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run's checkpoint.*--init_from=resume.*--overwrite=True"):
        run(tiny_ckpt, reviews, tmp_path, "--max_iters=1")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    run(tiny_ckpt, reviews, tmp_path, "--max_iters=1", "--overwrite=True", "--seed=5")
    assert (tmp_path / "ckpt.pt").read_bytes() != before


def test_wandb_offline_run(tiny_ckpt, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tiny_ckpt, reviews, tmp_path / "out", "--wandb_log=True", "--wandb_project=test-project", "--max_iters=3")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # an offline run keeps its config and logged values in the run's .wandb record file
    records = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"lora_rank" in records and b"val/loss" in records and b"train/loss" in records
    assert b"lora-r4-a8-lr0.03" in records  # the default run name


def test_lora_on_a_reloadable_base_saves_only_the_adapter(tiny_ckpt, reviews, tmp_path):
    from conftest import save_random_hf_gpt2
    run(tiny_ckpt, reviews, tmp_path / "lora", "--max_iters=2")
    ckpt = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)
    assert ckpt["adapter_only"] and ckpt["config"]["checkpoint"] == "adapter"
    assert set(ckpt["model"]) == {f"transformer.h.{i}.attn.{p}.lora_{m}" for i in range(2) for p in ("c_attn", "c_proj")
                                  for m in "AB"}
    assert ckpt["base_model"] == tiny_ckpt and len(ckpt["base_fingerprint"]) == 64
    run(tiny_ckpt, reviews, tmp_path / "full", "--max_iters=2", "--checkpoint=full")
    assert not torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["adapter_only"]
    run(tiny_ckpt, reviews, tmp_path / "ft", "--max_iters=2", "--rank=0")
    assert not torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)["adapter_only"]
    # a base model that changed under the adapter is refused, not silently combined
    changed = tmp_path / "changed-base"
    save_random_hf_gpt2(changed, seed=1)
    run(str(changed), reviews, tmp_path / "on-changed", "--max_iters=1")
    save_random_hf_gpt2(changed, seed=2)
    with pytest.raises(ValueError, match="has other weights than the one the adapter .* was trained on"):
        load_checkpoint(str(tmp_path / "on-changed" / "ckpt.pt"))


def tiny_lora_model(seed=0):
    from lora import mark_only_lora_as_trainable
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    return mark_only_lora_as_trainable(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, lora_rank=4,
                                                     lora_alpha=8.0)))


def trainer(model, loader, device, ctx=None, compiled=None, **flags):
    """A train.Trainer of model on loader's batches, with these flags, on device, with no gradient scaler."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    from configurator import configure
    c = configure(train.DEFAULTS, [f"--{k}={v}" for k, v in flags.items()]).frozen()
    rt = SimpleNamespace(distributed=False, fsdp=False, world=1, rank=0, device=device, ctx=ctx or nullcontext())
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), device)
    return train.Trainer(c, rt, model, model if compiled is None else compiled, optimizer,
                         torch.amp.GradScaler("cpu", enabled=False), loader)


def varied_reviews(n=200):
    import random
    rng = random.Random(0)
    words = ["good", "bad", "film", "remarkably", "the", "tedious"]
    return [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 70))), "label": i % 2} for i in range(n)]


def test_a_training_step_never_waits_for_the_device():
    # on the meta device a tensor has no values: reading one (.item(), .tolist(), nonzero(), if tensor:)
    # fails, so a step that runs there never makes the host wait for its device
    import tiktoken
    from conftest import batches_of
    model = tiny_lora_model().to("meta")
    loader = batches_of(varied_reviews(), tiktoken.get_encoding("gpt2"), 4, block_size=128)
    sums, tokens, grad_norm = trainer(model, loader, "meta", gradient_accumulation_steps=2).step(0)
    assert grad_norm.device.type == "meta" and sums.device.type == "meta"
    assert tokens == sum(int((loader.get_batch(i)[0] != loader.tokenizer.eot_token).sum()) for i in (0, 1))
    with pytest.raises(Exception):
        sums.tolist()  # the check itself can fail


@pytest.mark.parametrize("pad_multiple, most_graphs", [(32, 3), (1, 12)])
def test_compiled_training_compiles_once_per_padded_length(pad_multiple, most_graphs):
    import tiktoken
    from torch._dynamo.utils import counters
    from conftest import batches_of
    torch._dynamo.reset()
    counters.clear()
    loader = batches_of(varied_reviews(), tiktoken.get_encoding("gpt2"), 4, block_size=128,
                              pad_multiple=pad_multiple)
    lengths = {loader.get_batch(i)[0].size(1) for i in range(12)}
    model = tiny_lora_model()
    compiled = torch.compile(model, backend="eager", dynamic=False)  # dynamo's tracing, without code generation
    t = trainer(model, loader, "cpu", compiled=compiled, compile=True)
    for i in range(12):
        t.step(i)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert len(lengths) <= most_graphs
    if pad_multiple > 1:
        assert graphs == len(lengths)  # one compilation per length, none per step
    else:
        assert graphs >= 8  # a length per batch: recompiles until dynamo gives up (its limit is 8)


def test_frozen_weights_in_half_precision_train_lora_as_float32_does():
    from lorakit.adapters import merge_lora
    from lorakit.common import autocast
    import tiktoken
    from conftest import batches_of
    loader = batches_of(varied_reviews(40), tiktoken.get_encoding("gpt2"), 4, block_size=128)
    models = [tiny_lora_model(), tiny_lora_model()]
    models[1].frozen_weights_to(torch.bfloat16)
    attn = models[1].transformer.h[0].attn.c_attn
    assert attn.weight.dtype == models[1].transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert attn.lora_A.dtype == models[1].transformer.wte.weight.dtype == models[1].lm_head.weight.dtype == torch.float32
    states = []
    for model in models:
        t = trainer(model, loader, "cpu", ctx=autocast("cpu", "bfloat16"))
        for i in range(2):
            t.step(i)
        states.append(t.optimizer.state_dict()["state"])
        assert all(v.dtype == torch.float32 for s in t.optimizer.state.values() for k, v in s.items() if k != "step")
    # autocast rounds float32 weights to bfloat16 in every step: stored that way, training is the same
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # merging adds a float32 update to the bfloat16 weight, rounded once
    expected = (attn.weight.float() + attn.lora_scaling * attn.lora_B.float() @ attn.lora_A.float()).to(torch.bfloat16)
    merge_lora(models[1].eval())
    assert torch.equal(attn.weight, expected)


def test_the_loss_plot_reads_at_a_glance(tiny_ckpt, reviews, tmp_path):
    run(tiny_ckpt, reviews, tmp_path, "--max_iters=5", "--eval_interval=5")
    steps = [json.loads(line) for line in open(tmp_path / "steps.jsonl")]
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["iter"] for r in steps] == [0, 1, 2, 3, 4] and [r["iter"] for r in evals] == [0, 5]
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    fig = runlog.loss_figure(steps, evals, runlog.run_title(Settings(config)))
    ax, later = fig.axes  # the whole run on a log scale, and from the second evaluation on, linear
    training, validation = ax.get_lines()
    assert list(training.get_xdata()) == [0, 1, 2, 3, 4] and training.get_linestyle() == "-"
    assert list(validation.get_xdata()) == [0, 5] and validation.get_marker() == "o"
    assert ax.get_yscale() == "log" and later.get_yscale() == "linear"
    assert [list(line.get_xdata()) for line in later.get_lines()] == [[5]]  # no training step at 5 or later
    assert fig._suptitle.get_text() == "LoRA r=4, alpha=8, lr 0.03"
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels and not any("^" in t or "$" in t for t in labels)  # 5, not 5x10^0


def test_lora_plus_gives_every_B_its_multiple_of_the_learning_rate(tiny_ckpt, reviews, tmp_path):
    run(tiny_ckpt, reviews, tmp_path, "--max_iters=2", "--lora_plus_ratio=16", "--decay_lr=False")
    optimizer = torch.load(tmp_path / "ckpt.pt", weights_only=True)["optimizer"]
    # a parameter's AdamW moment has its shape: A is (r, in) = (4, 32), B is (out, r)
    shapes = {g["lr"]: sorted(tuple(optimizer["state"][i]["exp_avg"].shape) for i in g["params"])
              for g in optimizer["param_groups"]}
    assert shapes == {3e-2: [(4, 32)] * 4, 16 * 3e-2: [(32, 4), (32, 4), (96, 4), (96, 4)]}


def test_a_run_says_where_it_starts_how_far_it_is_and_what_it_wrote(tiny_ckpt, reviews, tmp_path, capsys):
    train.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path}", "--batch_size=4",
                "--max_iters=7", "--eval_interval=7", "--eval_iters=1", "--log_interval=3", "--rank=4", "--device=cpu"])
    out = capsys.readouterr().out
    assert f"base {tiny_ckpt}; 48 train and 16 validation reviews; cpu, float32" in out
    changed = next(line for line in out.splitlines() if line.startswith("settings changed from the defaults: "))
    assert {"eval_interval=7", "eval_iters=1", "log_interval=3", "batch_size=4", "lora_rank=4", "max_iters=7",
            "device=cpu"} <= set(changed.split(": ", 1)[1].split(", "))
    # the default warmup of 20 iterations is the whole of a 7-iteration run
    assert "note: warmup_iters=20 is most of max_iters=7: the learning rate never reaches 0.0005" in out
    steps = [line for line in out.splitlines() if line.startswith("iter ")]
    assert [line.split(":")[0] for line in steps] == ["iter 0", "iter 3", "iter 6"]  # the last step too
    assert all(" left" in line for line in steps) and steps[-1].endswith("7/7 0s left")
    assert out.rstrip().splitlines()[-1].startswith(f"wrote ckpt.pt, metrics.jsonl, steps.jsonl, run.json, "
                                                     f"loss_curve.png in {tmp_path} (")
    assert json.load(open(tmp_path / "run.json"))["peak_memory_mb"] > 0
    # resuming a run saved with a W&B name, and logging off: no warning, the name is the run's own
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"]["wandb_run_name"] = "mine"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train.main([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=8", "--wandb_log=False"])
    assert "warning" not in capsys.readouterr().out

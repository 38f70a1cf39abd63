"""train.py end to end on a tiny random GPT-2 and a small data set: checkpoints, resume, metrics, wandb, DDP."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT
from configurator import ConfigError
from checkpoint import load_checkpoint


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
    run(tiny_ckpt, reviews, tmp_path / "split", "--init_from=resume")
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


def test_ddp_step_equals_one_process_on_the_same_examples(tiny_ckpt, reviews, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [f"--init_from={tiny_ckpt}", f"--dataset={reviews}", "--max_iters=1", "--eval_iters=1",
              "--rank=4", "--alpha=8", "--device=cpu", "--lr=1e-2", "--warmup_iters=0", "--loss_on=all", "--lora_dropout=0"]
    one = subprocess.run([sys.executable, "train.py", *common, f"--out_dir={tmp_path / 'one'}", "--batch_size=6"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *common, f"--out_dir={tmp_path / 'two'}", "--batch_size=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    norm = [next(line for line in p.stdout.splitlines() if line.startswith("iter 0:")).split("grad norm ")[1].split(",")[0]
            for p in (one, two)]
    assert abs(float(norm[0]) - float(norm[1])) < 1e-5 * float(norm[0])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

"""sweep.py: one command gives results.md and val_loss.png; failures are reported; finished runs are
reused only when their settings are the current ones; several seeds give a mean and a spread."""
import json
import os

import pytest
import torch

import generate
import sweep
from configurator import ConfigError


def smoke(tiny_ckpt, reviews, out_dir, *extra):
    return sweep.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu",
                       "--ranks=4", "--num_shots=2", "--max_iters=2", "--eval_interval=1", "--eval_iters=1",
                       "--batch_size=4", "--num_samples=4", "--eval_batch_size=4", *extra])


def test_smoke_grid(tiny_ckpt, reviews, tmp_path, capsys):
    rows = smoke(tiny_ckpt, reviews, tmp_path)
    shown = capsys.readouterr().out  # each run's progress as it comes, not only in its log.txt
    assert "  step 2: train loss" in shown and "  Accuracy: " in shown and "  iter 1: loss" in shown
    assert [r["name"] for r in rows] == ["zero-shot", "few-shot-2", "lora-r4", "full"]
    assert all(r["error"] is None and r["accuracy"] is not None for r in rows), [r["error"] for r in rows]
    table = (tmp_path / "results.md").read_text()
    for r in rows:
        line = next(line for line in table.splitlines() if line.startswith(f"| {r['name']} |"))
        assert f"{r['accuracy']:.4f}" in line
    lora_r4 = next(r for r in rows if r["name"] == "lora-r4")
    assert lora_r4["alpha"] == 16 and lora_r4["trainable"] == 2 * 4 * ((32 + 96) + (32 + 32))
    assert "--lora_rank=4" in table and "--lora_alpha=16" in table and "--prompt_style=few_shot" in table
    assert (tmp_path / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    # kept for generate.py and export.py: the adapter whole, full fine-tuning without its optimizer state
    kept = {name: torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("lora-r4", "full")}
    assert "optimizer" in kept["lora-r4"] and "optimizer" not in kept["full"]
    assert generate.main([f"--out_dir={tmp_path / 'full'}", "--device=cpu", "--num_samples=2"])["n"] == 2
    assert [m["iter"] for m in lora_r4["metrics"]] == [0, 1, 2]

    # a second run reuses what finished with the same settings
    stamp = os.path.getmtime(tmp_path / "full" / "results.json")
    capsys.readouterr()
    smoke(tiny_ckpt, reviews, tmp_path)
    assert os.path.getmtime(tmp_path / "full" / "results.json") == stamp
    assert capsys.readouterr().out.count("finished before with these settings, reused") == 4


def test_a_sweep_asked_to_drop_checkpoints_says_so_where_one_is_looked_for(tiny_ckpt, reviews, tmp_path):
    smoke(tiny_ckpt, reviews, tmp_path, "--keep_checkpoints=False", "--zero_shot=False", "--few_shot=False",
          "--full_finetune=False")
    assert not (tmp_path / "lora-r4" / "ckpt.pt").exists()
    with pytest.raises(ConfigError, match="sweep.py removed it after evaluating the run .*--keep_checkpoints=False"):
        generate.main([f"--out_dir={tmp_path / 'lora-r4'}", "--device=cpu"])
    smoke(tiny_ckpt, reviews, tmp_path, "--keep_checkpoints=False", "--zero_shot=False", "--few_shot=False",
          "--full_finetune=False")  # a finished run is still reused


def test_failed_runs_are_reported_the_rest_go_on_and_the_sweep_fails(tiny_ckpt, reviews, tmp_path):
    # the tiny model's context is 128 tokens: a failure only the run itself can find
    with pytest.raises(sweep.RunsFailed) as e:
        smoke(tiny_ckpt, reviews, tmp_path, "--train_args=--block_size=4096", "--few_shot=False", "--full_finetune=False")
    assert str(e.value).startswith("1 of 2 runs failed (lora-r4), e.g. lora-r4: block_size=4096 is larger")
    by_name = {r["name"]: r for r in e.value.rows}
    assert by_name["zero-shot"]["error"] is None and by_name["zero-shot"]["accuracy"] is not None
    assert by_name["lora-r4"]["error"].startswith("error: block_size=4096 is larger than the model's context")
    table = (tmp_path / "results.md").read_text()
    assert "failed: error: block_size=4096" in table
    assert not (tmp_path / "lora-r4" / "results.json").exists()
    json.loads((tmp_path / "zero-shot" / "results.json").read_text())


@pytest.mark.parametrize("flag, message", [
    ("--train_args=--lora_dropout=1.5", "run lora-r4: lora_dropout must be in [0, 1), not 1.5"),
    ("--train_args=--bogus=1", "run lora-r4: unknown setting 'bogus'"),
    ("--train_args=--lr='3e-4", "train_args cannot be split into flags (No closing quotation): close its quotes"),
    ("--ranks=-4", "ranks must be >= 1, not '-4'"),
])
def test_what_every_run_would_refuse_stops_the_sweep_before_any_run(tiny_ckpt, reviews, tmp_path, flag, message):
    with pytest.raises(ConfigError) as e:
        smoke(tiny_ckpt, reviews, tmp_path / "sweep", flag)
    assert str(e.value).startswith(message) and not (tmp_path / "sweep").exists()


def test_runs_made_with_other_settings_are_never_reused(tiny_ckpt, reviews, tmp_path):
    few = ["--zero_shot=False", "--few_shot=False", "--full_finetune=False"]
    smoke(tiny_ckpt, reviews, tmp_path, *few)
    before = (tmp_path / "lora-r4" / "results.json").read_text()
    with pytest.raises(ConfigError) as e:
        smoke(tiny_ckpt, reviews, tmp_path, *few, "--num_samples=2", "--max_iters=3")
    message = str(e.value)
    assert "lora-r4 holds a run made with other settings" in message and "\n" not in message
    assert "max_iters: 2 -> 3" in message and "num_samples: 4 -> 2" in message and "--overwrite=True" in message
    assert (tmp_path / "lora-r4" / "results.json").read_text() == before  # nothing was touched

    rows = smoke(tiny_ckpt, reviews, tmp_path, *few, "--num_samples=2", "--max_iters=3", "--overwrite=True")
    assert [r["n_test"] for r in rows] == [2]
    assert [m["iter"] for m in rows[0]["metrics"]] == [0, 1, 2, 3]
    table = (tmp_path / "results.md").read_text()
    assert "Accuracy is on 2 test reviews (a random sample" in table and "--num_samples=2" in table
    commands = table.split("## Commands")[1]
    assert "--num_samples=2" in commands and "--num_samples=4" not in commands and "| full |" not in table


def test_several_seeds_give_a_mean_and_a_spread(tiny_ckpt, reviews, tmp_path):
    rows = smoke(tiny_ckpt, reviews, tmp_path, "--zero_shot=False", "--few_shot=False", "--full_finetune=False",
                 "--seeds=1337,7")
    assert [r["name"] for r in rows] == ["lora-r4", "lora-r4-seed7"]
    assert "--seed=7" in rows[1]["commands"][0] and "--seed" not in rows[0]["commands"][0]
    table = (tmp_path / "results.md").read_text()
    line = next(line for line in table.splitlines() if line.startswith("| lora-r4 | 4 |"))
    accuracies = [100 * r["accuracy"] for r in rows]
    mean = sum(accuracies) / 2
    assert f"| 1337, 7 | {mean:.1f} ± " in line and f"({min(accuracies):.1f}-{max(accuracies):.1f})" in line


def test_every_curve_of_the_sweep_plot_can_be_told_apart():
    def row(group, losses):
        return dict(group=group, metrics=[dict(iter=50 * i, val_loss=v) for i, v in enumerate(losses)])
    rows = [row("lora-r16", [9.4, 0.50, 0.40]), row("lora-r128", [9.4, 0.45, 0.41]),
            row("lora-r196", [9.4, 0.45, 0.41]), row("full", [9.4, 0.35, 0.30]), row("full", [9.4, 0.37, 0.32])]
    fig = sweep.val_loss_figure(rows)
    whole, zoomed = fig.axes
    styles = [(line.get_marker(), line.get_linestyle()) for line in zoomed.get_lines()]
    assert len(styles) == 4 and len(set(styles)) == 4  # equal curves still differ in marker and line style
    assert [line.get_label() for line in zoomed.get_lines()][-1] == "full (mean of 2 seeds)"
    assert zoomed.get_ylim()[1] < 1  # the first drop (9.4 -> 0.5) does not flatten the rest
    assert whole.get_yscale() == "log" and len(whole.get_lines()) == 4


def test_the_lora_options_grid_names_and_flags_its_runs():
    from configurator import configure
    c = configure(sweep.DEFAULTS, ["--ranks=16,128", "--targets=attn,qv", "--scalings=rslora", "--lora_plus_ratios=1,16",
                                   "--fixed_alpha=16", "--zero_shot=False", "--few_shot=False", "--seeds=1337,7"])
    runs = {r["name"]: r for r in sweep.plan(c)}
    assert len(runs) == 2 * 2 * 2 * 2 + 2  # ranks x targets x ratios x seeds, and full fine-tuning's seeds
    r = runs["lora-r128-a16-qv-rslora-plus16-seed7"]
    assert r["method"] == "LoRA (qv, rsLoRA, LoRA+ 16)" and r["group"] == "lora-r128-a16-qv-rslora-plus16"
    assert r["train"][-5:] == ["--lora_alpha=16", "--lora_targets=qv", "--lora_scaling=rslora", "--lora_plus_ratio=16",
                               "--seed=7"]
    assert runs["lora-r16-a16-rslora"]["method"] == "LoRA (rsLoRA)" and "full-seed7" in runs
    with pytest.raises(ConfigError, match="each of targets must be one of attn, qv, attn_mlp, not 'mlp'"):
        sweep.main(["--targets=mlp"])

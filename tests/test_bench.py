"""The benchmark scripts run here on a tiny model: bench/gpu.py (prepared for a lent GPU) on the CPU."""
import json

from bench.gpu import main as gpu_checks


def test_gpu_script_runs_the_default_run_on_cpu(reviews, tmp_path):
    out = tmp_path / "gpu.json"
    res = gpu_checks(["--n_layer=2", "--n_head=2", "--n_embd=32", "--variants=float32", "--max_iters=6",
                      f"--dataset={reviews}", "--device=cpu", f"--out={out}", "--peak_tflops=0.1",
                      "--train_args=--eval_interval=3 --eval_iters=1 --log_interval=1 --batch_size=4"])
    assert json.loads(out.read_text()) == res
    assert res["generation_matches_cpu"] is True
    r = res["float32"]
    assert "error" not in r, r
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["wall_s"] > 0 and r["final_val_loss"] > 0
    assert 0 < r["mfu"] < 1 and r["step_over_flop_floor"] > 1
    assert r["checkpoint_mb"] < 1  # adapter-only: the base is a local checkpoint
    full, adapter = res["checkpoint"]["full"], res["checkpoint"]["adapter"]
    assert adapter["mb"] < full["mb"] / 5


def test_peft_parity_trains_both_the_same_way(tiny_ckpt, reviews, tmp_path):
    from bench.peft_parity import main as parity, save
    results = tmp_path / "parity.json"
    result = parity([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path / 'run'}",
                     "--max_iters=6", "--batch_size=4", "--eval_interval=3", "--eval_iters=2", "--learning_rate=3e-2",
                     "--warmup_iters=0", "--lora_rank=4", f"--results={results}"])
    assert json.loads(results.read_text()) == {"runs": [result]}
    assert [v["iter"] for v in result["val_loss"]] == [0, 3, 6]
    assert min(v["ours"] for v in result["val_loss"][1:]) < result["val_loss"][0]["ours"] - 0.3  # it learned ...
    assert result["max_relative_val_loss_difference"] < 1e-4  # ... exactly as PEFT did
    assert 0 <= result["ours_accuracy"] <= 1 and result["settings"]["init_from"] == tiny_ckpt
    # a run with other settings is added; one with the same settings replaces the old one
    other = dict(result, settings=dict(result["settings"], lora_rank=8))
    save(other, results)
    save(dict(result, ours_accuracy=-1), results)
    assert [(r["settings"]["lora_rank"], r["ours_accuracy"]) for r in json.loads(results.read_text())["runs"]] == \
        [(8, result["ours_accuracy"]), (4, -1)]


def test_after_one_adam_step_doubling_alpha_is_doubling_the_learning_rate(tiny_ckpt, reviews, tmp_path):
    # B starts at 0, so the first step moves B only, by lr * g / |g| whatever g's scale: doubling alpha
    # or the learning rate doubles the update alike; later steps move A too, and the two part ways
    from bench.lr_vs_alpha import main as lr_vs_alpha
    res = lr_vs_alpha([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path}", "--max_iters=1",
                       "--eval_interval=1", "--lora_rank=4", "--lora_alpha=8", "--device=cpu",
                       f"--results={tmp_path / 'r.json'}", "--train_args=--batch_size=4 --eval_iters=1"])
    assert abs(res["distance"]["alpha x2 vs baseline"] - 1.0) < 1e-3  # ||2 dW - dW|| / ||dW||
    assert abs(res["update_norm"]["lr x2"] / res["update_norm"]["baseline"] - 2.0) < 1e-4
    # equal but for Adam's eps (1e-8), which the tiny random model's small gradients come close to
    assert res["distance"]["alpha x2 vs lr x2"] < 1e-2

"""sweep.py: one command gives results.md and val_loss.png; failures are reported; finished runs are skipped."""
import json
import os

import sweep


def smoke(tiny_ckpt, reviews, out_dir, *extra):
    return sweep.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu",
                       "--ranks=4", "--num_shots=2", "--max_iters=2", "--eval_interval=1", "--eval_iters=1",
                       "--batch_size=4", "--num_samples=4", "--eval_batch_size=4", *extra])


def test_smoke_grid(tiny_ckpt, reviews, tmp_path, capsys):
    rows = smoke(tiny_ckpt, reviews, tmp_path)
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
    assert not (tmp_path / "lora-r4" / "ckpt.pt").exists()  # keep_checkpoints=False
    assert [m["iter"] for m in lora_r4["metrics"]] == [0, 1, 2]

    # a second run skips what finished
    stamp = os.path.getmtime(tmp_path / "full" / "results.json")
    capsys.readouterr()
    smoke(tiny_ckpt, reviews, tmp_path)
    assert os.path.getmtime(tmp_path / "full" / "results.json") == stamp
    assert capsys.readouterr().out.count("finished before, skipped") == 4


def test_failed_runs_are_reported_and_the_rest_go_on(tiny_ckpt, reviews, tmp_path):
    rows = smoke(tiny_ckpt, reviews, tmp_path, "--train_args=--lora_dropout=1.5", "--few_shot=False",
                 "--full_finetune=False")
    by_name = {r["name"]: r for r in rows}
    assert by_name["zero-shot"]["error"] is None and by_name["zero-shot"]["accuracy"] is not None
    assert by_name["lora-r4"]["error"] == "error: lora_dropout must be in [0, 1), not 1.5"
    table = (tmp_path / "results.md").read_text()
    assert "failed: error: lora_dropout must be in [0, 1), not 1.5" in table
    assert not (tmp_path / "lora-r4" / "results.json").exists()
    json.loads((tmp_path / "zero-shot" / "results.json").read_text())

"""bench/gpu.py, the script prepared for a lent GPU, runs its float32 path here on the CPU."""
import json

from bench.gpu import main as gpu_checks


def test_gpu_script_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    res = gpu_checks(["--model=gpt2", "--batch_size=1", "--seq_len=16", "--steps=2", "--warmup=1",
                      "--variants=float32", "--device=cpu", f"--out={out}", "--peak_tflops=0.1"])
    assert json.loads(out.read_text()) == res
    assert res["generation_matches_cpu"] is True
    r = res["float32"]
    assert "error" not in r and r["all_losses_finite"] and r["tokens_per_s"] > 0
    assert 0 < r["mfu"] < 1 and r["counted_flops_per_s"] > 0

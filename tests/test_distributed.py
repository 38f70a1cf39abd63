"""train.py under torchrun with two gloo processes on the CPU: DDP and FSDP give a one-process run's
weights on the same examples, and FSDP's checkpoint resumes with and without it."""
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import generate
import train
from lorakit.common import hold_out_dir
from configurator import ConfigError
from conftest import ROOT


def torchrun(*flags, timeout=240, ok=True):
    """train.py's output on two processes. --standalone rendezvouses on a free port. Output goes to files,
    not pipes, and past timeout torchrun and its workers (each in a session of its own) are killed, so a
    process that fails or hangs cannot hold the suite."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", *flags], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             stdout=out, stderr=err, text=True)
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for pid in [*descendants(p.pid), p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()
        out.seek(0), err.seek(0)
        out, err = out.read(), err.read()
    assert not timed_out, f"torchrun ran past {timeout} s:\n{err[-3000:]}"
    assert (p.returncode == 0) == ok, err[-3000:]
    return out if ok else err


def descendants(pid):
    """The processes started by pid, and by them, and so on (Linux's /proc)."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            parent = int(open(stat).read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def flags(tiny_ckpt, reviews, out_dir, *more):
    return [f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--eval_iters=1",
            "--log_interval=1", "--rank=4", "--alpha=8", "--device=cpu", "--lr=1e-2", "--warmup_iters=0",
            "--lora_dropout=0", *more]


def ckpt(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


def assert_same_run(a, b, atol=1e-6):
    """Two checkpoints at the same iteration with the same weights and AdamW state."""
    assert a["iter_num"] == b["iter_num"] and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=atol, msg=k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(v, b["optimizer"]["state"][i][k], rtol=0, atol=atol, msg=f"{i} {k}")


def losses(out):
    """The training losses printed at the log steps."""
    return [line.split("loss ")[1].split(",")[0] for line in out.splitlines() if line.startswith("iter ")]


def test_ddp_step_equals_one_process_on_the_same_examples(tiny_ckpt, reviews, tmp_path, capsys):
    common = flags(tiny_ckpt, reviews, tmp_path / "one", "--max_iters=1", "--loss_on=all", "--eval_iters=3")
    train.main([*common, "--batch_size=6"])
    one = capsys.readouterr().out
    two = torchrun(*common, f"--out_dir={tmp_path / 'two'}", "--batch_size=3")
    norm = [next(line for line in p.splitlines() if line.startswith("iter 0:")).split("grad norm ")[1].split(",")[0]
            for p in (one, two)]
    assert abs(float(norm[0]) - float(norm[1])) < 1e-5 * float(norm[0])
    assert losses(one) == losses(two)  # the logged loss is every process's, not rank 0's share
    assert_same_run(ckpt(tmp_path / "one"), ckpt(tmp_path / "two"))
    # evaluations too: each process its share of the same global batches, before the step and after it
    evals = [[(m["train_loss"], m["val_loss"]) for m in map(json.loads, open(tmp_path / run / "metrics.jsonl"))]
             for run in ("one", "two")]
    assert len(evals[0]) == 2 and len(evals[1]) == 2
    for a, b in zip(*evals):
        assert a == pytest.approx(b, rel=1e-6)


def test_fsdp_lora_equals_one_process_and_resumes_across_layouts(tiny_ckpt, reviews, tmp_path, capsys):
    """Four steps on one process; the same run sharded for two steps, then on one; on one, then sharded."""
    def run(name, *more):
        return flags(tiny_ckpt, reviews, tmp_path / name, "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2",
                     *more)
    train.main([*run("one"), "--batch_size=6"])
    train.main([*run("half"), "--batch_size=6", "--max_iters=2"])
    shutil.copytree(tmp_path / "half", tmp_path / "then-sharded")
    sharded = torchrun(*run("sharded"), "--batch_size=3", "--fsdp=True", "--max_iters=2")
    assert "LoRA r=4, alpha=8: 1,536 trainable parameters" in sharded
    assert_same_run(ckpt(tmp_path / "half"), ckpt(tmp_path / "sharded"), atol=1e-5)  # Adam magnifies rounding
    sharded_ckpt = ckpt(tmp_path / "sharded")
    assert sharded_ckpt["adapter_only"] and sharded_ckpt["world_size"] == 2
    assert set(sharded_ckpt["model"]) == set(ckpt(tmp_path / "half")["model"])  # still only the adapter
    capsys.readouterr()
    # a step of 3 reviews on each of 2 processes is the step of 6 on one: the same run, and no note says otherwise
    train.main([*run("sharded"), "--init_from=resume", "--batch_size=6"])
    assert "note:" not in capsys.readouterr().out
    resumed = torchrun(*run("then-sharded"), "--init_from=resume", "--batch_size=3", "--fsdp=True")
    assert "note:" not in resumed and "resuming" in resumed
    for name in ("sharded", "then-sharded"):
        assert_same_run(ckpt(tmp_path / "one"), ckpt(tmp_path / name), atol=1e-5)
    # the sharded run's checkpoint is the one generate.py reads
    results = generate.main([f"--out_dir={tmp_path / 'then-sharded'}", "--device=cpu", "--num_samples=8"])
    assert results["n"] == 8


def test_fsdp_full_finetuning_with_accumulation_and_checkpointing_equals_one_process(tiny_ckpt, reviews, tmp_path,
                                                                                    capsys):
    common = flags(tiny_ckpt, reviews, tmp_path / "one", "--rank=0", "--lr=1e-3", "--max_iters=3", "--eval_interval=3",
                   "--gradient_accumulation_steps=2", "--grad_checkpoint=True")
    train.main([*common, "--batch_size=6"])
    one = capsys.readouterr().out
    two = torchrun(*common, f"--out_dir={tmp_path / 'two'}", "--batch_size=3", "--fsdp=True")
    assert losses(one) == losses(two)
    a, b = ckpt(tmp_path / "one"), ckpt(tmp_path / "two")
    assert_same_run(a, b, atol=1e-5)
    # the head's weight is the embedding's, stored once, as one process stores it
    assert b["model"]["lm_head.weight"].data_ptr() == b["model"]["transformer.wte.weight"].data_ptr()


def test_fsdp_without_torchrun_is_one_clear_error(tiny_ckpt, reviews, tmp_path):
    with pytest.raises(ConfigError, match="fsdp=True shards the model over torchrun's processes: start it with torchrun"):
        train.main(flags(tiny_ckpt, reviews, tmp_path / "out", "--fsdp=True"))
    assert not (tmp_path / "out").exists()


def test_when_one_process_fails_the_other_is_stopped(tiny_ckpt, reviews, tmp_path):
    """Rank 0 finds out_dir in use and stops with one line; rank 1, already on its way to the first
    collective, is stopped by torchrun, and nothing is written."""
    out = tmp_path / "busy"
    with hold_out_dir(str(out), "another run"):
        err = torchrun(*flags(tiny_ckpt, reviews, out, "--fsdp=True", "--max_iters=2"), timeout=120, ok=False)
        assert os.listdir(out) == [".lock"]  # ours
    assert f"error: {out} is in use by process {os.getpid()} (another run" in err

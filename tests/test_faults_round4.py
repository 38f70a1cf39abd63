"""Faults, round four: each case works, or is one line saying what is wrong, a non-zero exit, and nothing lost or
overwritten (the starter writer's --overwrite, add_lora on layers it cannot keep, the sweep's grid, PiSSA's
checkpoints, files that never end, settings that read as no value, PEFT adapters of other kinds)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, cli
from lorakit.adapters import add_lora


def one_line(code, err, message):
    assert code == 2 and err.count("\n") == 1 and message in err, (code, err)


# --- course/make_starter.py --overwrite -------------------------------------------------------------------

def test_overwrite_replaces_only_a_starter_it_wrote(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    code, _, err = cli("course/make_starter.py", f"--out_dir={home}", "--overwrite=True")
    one_line(code, err, "holds no starter written by this command")
    assert (home / "notes.txt").read_text() == "mine"
    for inside in (ROOT / "docs", ROOT):
        code, _, err = cli("course/make_starter.py", f"--out_dir={inside}", "--overwrite=True")
        one_line(code, err, "is this repository, holds it or lies inside it")
    link = tmp_path / "link"
    os.symlink(ROOT, link)
    code, _, err = cli("course/make_starter.py", f"--out_dir={link}", "--overwrite=True")
    one_line(code, err, "is this repository, holds it or lies inside it")
    starter = tmp_path / "starter"
    assert cli("course/make_starter.py", f"--out_dir={starter}")[0] == 0
    (starter / "lora.py").write_text("edited")
    runs = [subprocess.Popen([sys.executable, "course/make_starter.py", f"--out_dir={starter}", "--overwrite=True"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for p in runs:
        out, err = p.communicate(timeout=120)
        assert "Traceback" not in err and (p.returncode == 0 or err.count("\n") == 1), err
    assert "raise NotImplementedError" in (starter / "lora.py").read_text()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".starter.")]  # no staging folder left


def test_make_starter_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    code, _, err = cli("course/make_starter.py", f"--out_dir={tmp_path / 'starter'}", limit_bytes=2000)
    one_line(code, err, "cannot write the starter")
    assert os.listdir(tmp_path) == []


def test_make_starter_into_a_read_only_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, _, err = cli("course/make_starter.py", f"--out_dir={ro / 'starter'}")
    one_line(code, err, "cannot write")


# --- lorakit.adapters.add_lora ----------------------------------------------------------------------------

def test_add_lora_keeps_the_function_and_ties_or_refuses_naming_the_layer():
    from torch.nn.utils import prune
    pruned = nn.Sequential(nn.Linear(4, 4))
    prune.l1_unstructured(pruned[0], "weight", 0.5)
    normed = nn.Sequential(torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    for model in (pruned, normed):
        with pytest.raises(ValueError, match="0 computes its weight .*pruned or weight-normalised"):
            add_lora(model, ["0"])

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

    with pytest.raises(ValueError, match="head's weight is shared with emb.weight"):
        add_lora(Tied(), ["head"])
    for rank in (0, -1, 2.5):
        with pytest.raises(ValueError, match="lora_rank must be a whole number >= 1"):
            add_lora(nn.Sequential(nn.Linear(2, 2)), ["0"], lora_rank=rank)
    with pytest.raises(ValueError, match="target_modules is empty"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), "")
    shared = nn.Module()
    shared.a = shared.b = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    before = shared.a(x)
    add_lora(shared, ["a"])
    assert shared.a is shared.b and torch.equal(shared.b(x), before)  # one layer, under both names


def test_dora_on_a_row_of_zeros_stays_finite():
    from lorakit.variants import DoRALinear
    from lora import LoRALinear
    layer = LoRALinear(4, 3, lora_rank=2, lora_alpha=2.0)
    with torch.no_grad():
        layer.weight[1].zero_()
    dora = DoRALinear.from_lora(layer)
    x = torch.randn(5, 4)
    assert torch.isfinite(dora(x)).all() and torch.isfinite(dora.eval()(x)).all()


# --- sweep.py -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--variants=pissa", "--train_args=--lora_init=default"], "train_args sets lora_init, which the sweep sets"),
    (["--ranks=4", "--train_args=--lora_rank=2 --lora_alpha=8"], "train_args sets lora_rank"),
    (["--ranks=4", "--train_args=--rank=2"], "train_args sets lora_rank"),
    (["--variants=pissa", "--train_args=--lora-init=default"], "train_args sets lora_init"),  # dashes, as train.py reads
    (["--variants=dora,dora"], "variants names a choice twice"),
])
def test_the_sweeps_grid_is_what_it_trains(flags, message, tmp_path):
    code, _, err = cli("sweep.py", *flags, f"--out_dir={tmp_path / 'sweep'}")
    one_line(code, err, message)
    assert not (tmp_path / "sweep").exists()


def test_the_sweep_runs_from_another_folder_and_reads_past_damaged_results(tiny_ckpt, reviews, tmp_path):
    flags = [f"--init_from={tiny_ckpt}", f"--dataset={reviews}", "--ranks=", "--full_finetune=False",
             "--few_shot=False", "--num_samples=4", "--device=cpu", f"--out_dir={tmp_path / 'sweep'}"]
    code, _, err = cli(str(ROOT / "sweep.py"), *flags, cwd=tmp_path)
    assert code == 0, err
    (tmp_path / "sweep" / "zero-shot" / "results.json").write_text("[1, 2]")  # JSON of another form
    code, _, err = cli(str(ROOT / "sweep.py"), *flags, cwd=tmp_path)
    assert code == 0 and "Traceback" not in err, err


# --- PiSSA's checkpoints, and checkpoints of other settings ---------------------------------------------------

def test_a_pissa_checkpoint_without_its_start_or_of_an_unknown_variant_is_one_line(tiny_ckpt, reviews, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train.py", f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={run}", "--rank=4",
                       "--alpha=8", "--max_iters=2", "--eval_iters=1", "--batch_size=2", "--lora_init=pissa",
                       "--device=cpu")
    assert code == 0, err
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    for name in ("no-start", "vera"):
        broken = tmp_path / name
        broken.mkdir()
        damaged = {**ckpt, "model": dict(ckpt["model"]), "model_args": dict(ckpt["model_args"])}
        if name == "no-start":
            damaged["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith(("lora_A0", "lora_B0"))}
        else:
            damaged["model_args"]["lora_variant"] = "vera"
        torch.save(damaged, broken / "ckpt.pt")
        code, _, err = cli("generate.py", f"--out_dir={broken}", "--device=cpu", "--num_samples=2")
        one_line(code, err, "PiSSA run's checkpoint without its initial A and B" if name == "no-start"
                 else "does not match its own model settings")
        assert not (broken / "results.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lora_init=pissa_niter_²"], "lora_init must be default, pissa or pissa_niter_N"),
    (["--lora_init=pissa_niter_1000000000"], "N from 1 to 100"),
    (["--rank=0", "--lora_scaling=rslora"], "lora_scaling=rslora changes LoRA's update"),
    (["--rank=0", "--lora_plus_ratio=16"], "lora_plus_ratio=16.0 changes LoRA's update"),
    (["--out_dir=None"], "reads as no folder"),
])
def test_settings_no_run_can_use_are_one_line(flags, message, tmp_path):
    code, _, err = cli("train.py", *flags, f"--dataset={tmp_path}", *([] if any("out_dir" in f for f in flags)
                                                                      else [f"--out_dir={tmp_path / 'out'}"]))
    one_line(code, err, message)
    assert not (tmp_path / "out").exists() and not (ROOT / "None").exists()


def test_pissa_of_a_rank_above_the_layer_is_one_line(tiny_ckpt, reviews, tmp_path):
    code, _, err = cli("train.py", f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path / 'r'}",
                       "--rank=64", "--alpha=64", "--lora_init=pissa", "--device=cpu")
    one_line(code, err, "PiSSA of rank 64 needs a layer at least that wide")
    assert not (tmp_path / "r" / "ckpt.pt").exists()


# --- generate.py, model.py, export.py ----------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--prompt=FILE:/dev/zero"], "is not a regular file"),
    (["--temperature=1e-320", "--prompt=The film"], "temperature must be 0 (greedy) or at least 1e-6"),
    (["--prompt=The film", "--review=a gem"], "give one of them"),
])
def test_generate_reads_regular_files_and_refuses_what_overflows(flags, message):
    one_line(*cli("generate.py", *flags)[::2], message)


def test_a_fifo_prompt_file_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    one_line(*cli("generate.py", f"--prompt=FILE:{tmp_path / 'fifo'}", timeout=60)[::2], "is not a regular file")


def test_model_py_ranks_must_be_numbers():
    code, _, err = cli("model.py", "--ranks=abc")
    one_line(code, err, "ranks must be whole numbers")


def test_peft_adapters_of_other_kinds_are_refused_naming_the_field(tmp_path):
    from safetensors.torch import save_file
    base = {"r": 4, "lora_alpha": 8, "peft_type": "LORA", "target_modules": ["c_attn"]}
    for name, extra, message in (("nan", {"lora_alpha": float("nan")}, "lora_alpha (a finite number > 0)"),
                                 ("pissa", {"init_lora_weights": "pissa"}, "init_lora_weights='pissa' and not converted"),
                                 ("pattern", {"rank_pattern": {"c_attn": 8}}, "rank_pattern"),
                                 ("dropout", {"lora_dropout": "0.1x"}, "lora_dropout must be a number in [0, 1)")):
        adapter = tmp_path / name
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({**base, **extra}))
        save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 8)},
                  str(adapter / "adapter_model.safetensors"))
        code, _, err = cli("export.py", "--format=import_peft", f"--adapter={adapter}", "--init_from=gpt2",
                           f"--out_dir={tmp_path / ('out-' + name)}")
        one_line(code, err, message)
        assert not (tmp_path / ("out-" + name) / "ckpt.pt").exists()
    home = tmp_path / "home"
    (home / "a").mkdir(parents=True)
    code, _, err = cli("export.py", "--format=import_peft", "--adapter=~/a", "--init_from=gpt2",
                       f"--out_dir={tmp_path / 'out-home'}", env=dict(os.environ, HOME=str(home)))
    assert code == 2 and str(home / "a") in err, err  # ~ is the home folder
    shutil.rmtree(home)


# --- --help -----------------------------------------------------------------------------------------------

HELPED = ["train.py", "generate.py", "sweep.py", "export.py", "model.py", "course/make_starter.py", "course/grade.py",
          "course/make_autograder.py", "bench/perf.py", "bench/gpu.py", "bench/faults.py", "bench/peft_parity.py",
          "bench/lr_vs_alpha.py", "bench/merge_latency.py"]


@pytest.mark.parametrize("script", HELPED)
def test_help_imports_no_torch_datasets_or_transformers(script):
    code, out, err = cli("-X", "importtime", script, "--help")
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert code == 0 and f"python {script}" in out and "settings (--key=value" in out
    assert not imported & {"torch", "datasets", "transformers", "tiktoken", "peft"}, sorted(imported)


def test_a_busy_cpu_gets_the_one_thread_note(monkeypatch):
    from lorakit.runlog import busy_cpu_note
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert busy_cpu_note(4.6, 2, 2) == ("note: the CPU is busy (load 4.6 on 2 cores): OMP_NUM_THREADS=1 before the "
                                        "command can make each step several times faster")
    assert busy_cpu_note(1.5, 2, 2) is None and busy_cpu_note(4.6, 2, 1) is None  # quiet, or one thread already
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose
    assert busy_cpu_note(4.6, 2, 2) is None

"""What a scheduler, a full disk, a second process or a bad setting does to a command: one line, a
non-zero exit, nothing lost, nothing left behind."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import export
import generate
import train
from lorakit.common import WriteError, hold_out_dir, save_atomic
from configurator import ConfigError
from conftest import ROOT, cli, save_random_hf_gpt2


def flags(base, reviews, out_dir, *more):
    return [f"--init_from={base}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu", "--batch_size=4",
            "--eval_iters=1", "--rank=4", "--alpha=8", *more]


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".tmp") or p == ".lock")


# --- signals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])  # USR1: Slurm's warning
def test_sigterm_sighup_and_sigusr1_save_like_ctrl_c(tiny_ckpt, reviews, tmp_path, sig):
    p = subprocess.Popen([sys.executable, "train.py", *flags(tiny_ckpt, reviews, tmp_path, "--max_iters=100000",
                                                             "--eval_interval=100000", "--log_interval=1")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("iter 2:"):
            break
    signalled = time.time()
    p.send_signal(sig)
    out = p.stdout.read()
    assert p.wait(timeout=120) == 128 + sig
    assert os.path.getmtime(tmp_path / "loss_curve.png") >= signalled  # redrawn to the checkpoint's iteration
    name = signal.Signals(sig).name
    assert "Traceback" not in out and f"interrupted ({name}): saved checkpoint at iteration" in out
    n = int(out.split("saved checkpoint at iteration ")[1].split()[0])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == n >= 3
    assert leftovers(tmp_path) == []
    if sig == signal.SIGTERM:  # an unfinished run is evaluated with a warning, and results.json says where it stood
        code, out, _ = cli("generate.py", f"--out_dir={tmp_path}", f"--dataset={reviews}", "--device=cpu")
        assert code == 0 and f"is at iteration {n} of the 100000 its run was set up for: an unfinished run" in out
        assert {k: json.load(open(tmp_path / "results.json"))[k] for k in ("iter_num", "max_iters")} == \
            dict(iter_num=n, max_iters=100000)


def test_a_second_signal_stops_at_once_without_a_traceback(tiny_ckpt, reviews, tmp_path):
    p = subprocess.Popen([sys.executable, "train.py", *flags(tiny_ckpt, reviews, tmp_path, "--rank=0",
                                                             "--max_iters=100000", "--eval_interval=1")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "ckpt.pt").exists():
        time.sleep(0.05)
    # two signals that land while Python is inside one long C call reach its handler once; so the second
    # is sent again until the process ends
    p.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
        p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("interrupted (SIGINT)")
    torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the last complete checkpoint
    assert leftovers(tmp_path) == []


def test_non_finite_weights_are_never_saved(tiny_ckpt, reviews, tmp_path):
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--max_iters=1"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    c, ckpt = train.read_settings(flags(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--max_iters=2"))
    model, base = train.build_model(c, ckpt)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.lora_B.fill_(float("nan"))
    run = train.Progress(base, None, ckpt)
    with pytest.raises(FloatingPointError, match=r"weights became non-finite \(transformer.h.0.attn.c_attn.lora_B\)"
                                                 r".*the last good checkpoint .* is kept"):
        train.save_checkpoint(str(tmp_path / "ckpt.pt"), model, torch.optim.AdamW(model.parameters()),
                              torch.amp.GradScaler("cpu", enabled=False), c, run, train.setup_runtime(c))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# --- storage -------------------------------------------------------------------------------------

def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_old_checkpoint(tiny_ckpt, reviews, tmp_path):
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--rank=0", "--max_iters=1"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert len(before) > 2**20
    code, out, err = cli("train.py", *flags(tiny_ckpt, reviews, tmp_path, "--rank=0", "--init_from=resume",
                                            "--max_iters=3"), limit_bytes=2**20)
    assert code == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {tmp_path / 'ckpt.pt'}: File too large (it needs about")
    assert "MB free there" in last
    assert (tmp_path / "ckpt.pt").read_bytes() == before and leftovers(tmp_path) == []


def test_save_atomic_removes_its_temporary_and_names_the_space(tmp_path):
    path = str(tmp_path / "f.bin")
    save_atomic(b"old", path)

    def full(obj, f):
        f.write(b"x" * 100)
        raise OSError(28, "No space left on device")
    with pytest.raises(WriteError, match=r"cannot write .*f.bin: No space left on device \(it needs about 4.0 MB"):
        save_atomic({"w": torch.zeros(2**20)}, path, write=full)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    with pytest.raises(KeyboardInterrupt):  # a signal in mid-write leaves no temporary either
        save_atomic({}, path, write=lambda obj, f: (_ for _ in ()).throw(KeyboardInterrupt))
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_planted_symlink_is_never_written_through(tiny_ckpt, reviews, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt.tmp", "run.json.tmp", "metrics.jsonl.tmp", "loss_curve.png.tmp", ".lock"):
        (out / name).symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot write to out_dir"):  # .lock is opened with O_NOFOLLOW
        train.main(flags(tiny_ckpt, reviews, out, "--max_iters=1"))
    (out / ".lock").unlink()
    train.main(flags(tiny_ckpt, reviews, out, "--max_iters=1"))
    assert victim.read_text() == "precious" and (out / "ckpt.pt").is_file() and not (out / "ckpt.pt").is_symlink()


# --- concurrency ---------------------------------------------------------------------------------

def test_a_live_command_holds_its_out_dir(tiny_ckpt, reviews, tmp_path):
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--max_iters=1"))
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    with hold_out_dir(str(tmp_path), "train.py --out_dir=elsewhere"):
        refusals = [
            lambda: train.main(flags(tiny_ckpt, reviews, tmp_path, "--max_iters=2", "--init_from=resume")),
            lambda: train.main(flags(tiny_ckpt, reviews, tmp_path, "--max_iters=1", "--overwrite=True")),
            lambda: generate.main([f"--out_dir={tmp_path}", f"--dataset={reviews}", "--device=cpu"]),
            lambda: export.main([f"--out_dir={tmp_path}", "--format=peft"]),
        ]
        for refused in refusals:
            with pytest.raises(ConfigError, match=rf"{tmp_path} is in use by process {os.getpid()} "
                                                  r"\(train.py --out_dir=elsewhere, since .*\): wait for it"):
                refused()
        assert {p: (tmp_path / p).read_bytes() for p in before} == before
        assert not (tmp_path / "peft").exists()
    assert ".lock" not in os.listdir(tmp_path)


def test_a_killed_holders_lock_is_taken_over(tiny_ckpt, reviews, tmp_path):
    p = subprocess.Popen([sys.executable, "train.py", *flags(tiny_ckpt, reviews, tmp_path, "--max_iters=100000")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (tmp_path / "ckpt.pt").exists():
        time.sleep(0.05)
    code, _, err = cli("train.py", *flags(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--max_iters=100001"))
    assert code == 2 and f"is in use by process {p.pid} (train.py" in err and err.count("\n") == 1
    p.kill()
    p.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == p.pid  # left behind by the kill
    (tmp_path / ".ckpt.pt.k1ll3d.tmp").write_bytes(b"half")  # as a kill in mid-save leaves it
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--max_iters=100000", "--eval_only=True"))
    assert leftovers(tmp_path) == []


# --- a run's logs --------------------------------------------------------------------------------

def test_resume_reads_what_it_can_of_damaged_logs(tiny_ckpt, reviews, tmp_path, capsys):
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--max_iters=4", "--eval_interval=2", "--log_interval=1"))
    metrics = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(metrics + "\n\n")  # trailing blank lines
    steps = (tmp_path / "steps.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "steps.jsonl").write_text("".join(steps[:2]) + "garbage\n" + "".join(steps[2:]) + '{"iter": 4, "lo')
    capsys.readouterr()
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--max_iters=6", "--eval_interval=2",
                     "--log_interval=1"))
    out = capsys.readouterr().out
    assert f"note: dropped 2 unreadable lines of {tmp_path / 'steps.jsonl'}" in out
    assert f"unreadable lines of {tmp_path / 'metrics.jsonl'}" not in out
    assert [json.loads(line)["iter"] for line in open(tmp_path / "metrics.jsonl")] == [0, 2, 4, 6]
    assert [json.loads(line)["iter"] for line in open(tmp_path / "steps.jsonl")] == [0, 1, 2, 3, 4, 5]


def test_a_refused_resume_writes_nothing(tiny_ckpt, reviews, tmp_path):
    train.main(flags(tiny_ckpt, reviews, tmp_path, "--max_iters=2"))
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    (tmp_path / "metrics.jsonl").write_text("torn {")
    before["metrics.jsonl"] = b"torn {"
    with pytest.raises(ConfigError, match="lora_rank=8 differs from the resumed run's 4"):
        train.main(flags(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--rank=8"))
    with pytest.raises(ConfigError, match="label 5 of review"):
        bad = tmp_path / "bad"
        bad.mkdir()
        for split in ("train", "validation"):
            (bad / f"{split}.csv").write_text("text,label\nfine,1\nodd,5\n")
        train.main(flags(tiny_ckpt, reviews, tmp_path, "--init_from=resume", f"--dataset={bad}", "--max_iters=4"))
    import shutil
    shutil.rmtree(bad)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


# --- export.py -----------------------------------------------------------------------------------

def test_exports_never_replace_what_exists(tmp_path, reviews):
    base = tmp_path / "base"
    save_random_hf_gpt2(base)
    base_files = {p: (base / p).read_bytes() for p in os.listdir(base)}
    run = tmp_path / "run"
    train.main(flags(base, reviews, run, "--max_iters=1"))
    with pytest.raises(ConfigError, match="inside the run's base model folder"):
        export.main([f"--out_dir={run}", "--format=hf", f"--export_dir={base}", "--overwrite=True"])
    assert {p: (base / p).read_bytes() for p in os.listdir(base)} == base_files
    export.main([f"--out_dir={run}", "--format=peft"])
    with pytest.raises(ConfigError, match=r"peft/adapter_config.json already exists: .*--overwrite=True"):
        export.main([f"--out_dir={run}", "--format=peft"])
    export.main([f"--out_dir={run}", "--format=peft", "--overwrite=True"])
    ckpt = (run / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"ckpt.pt already exists: pick another --out_dir"):
        export.main(["--format=import_peft", f"--adapter={run / 'peft'}", f"--out_dir={run}"])
    assert (run / "ckpt.pt").read_bytes() == ckpt
    with pytest.raises(ConfigError, match="is not a readable PEFT adapter"):
        export.main(["--format=import_peft", f"--adapter={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'imp'}"])
    assert not (tmp_path / "imp").exists()


# --- the base fingerprint ------------------------------------------------------------------------

def test_one_changed_base_weight_is_noticed(tmp_path, reviews):
    base = tmp_path / "base"
    save_random_hf_gpt2(base)
    run = tmp_path / "run"
    train.main(flags(base, reviews, run, "--max_iters=1"))
    weights = load_file(base / "model.safetensors")
    weights["transformer.h.1.mlp.c_fc.weight"][3, 7] += 1e-3  # one element a sample would likely miss
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    for command in (lambda: train.main(flags(base, reviews, run, "--init_from=resume", "--max_iters=2")),
                    lambda: generate.main([f"--out_dir={run}", f"--dataset={reviews}", "--device=cpu"])):
        with pytest.raises(ConfigError, match="has other weights than the one the adapter"):
            command()


# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("learning_rate = float('nan')", "setting 'learning_rate' must be a finite number, not nan"),
    ("lora_alpha = float('inf')", "setting 'lora_alpha' must be a finite number, not inf"),
    ("max_iters = 10\nbatch_size = = 4", "line 2: invalid syntax"),
    ("max_iters = undefined_name", "line 1: NameError: name 'undefined_name' is not defined"),
    ("beta1 = 2.0", "beta1 and beta2 must be in [0, 1)"),
])
def test_config_files_get_the_checks_flags_get(tiny_ckpt, reviews, tmp_path, text, message):
    config = tmp_path / "config.py"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        train.main([str(config), *flags(tiny_ckpt, reviews, tmp_path / "out")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, message", [
    ("--learning_rate=nan", "must be a finite number"),
    ("--beta1=2", "beta1 and beta2 must be in [0, 1)"),
    ("--beta2=-0.5", "beta1 and beta2 must be in [0, 1)"),
    ("--weight_decay=-1", "weight_decay must be >= 0"),
    ("--grad_clip=-1", "grad_clip must be >= 0"),
    ("--warmup_iters=-5", "warmup_iters must be >= 0"),
    ("--min_lr=-1e-4", "min_lr must be >= 0"),
    ("--device=gpu", "device must be auto, cpu, cuda, cuda:N or mps, not 'gpu'"),
])
def test_training_flags_are_checked_before_anything_is_written(tiny_ckpt, reviews, tmp_path, flag, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.main(flags(tiny_ckpt, reviews, tmp_path / "out", flag))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("more, message", [
    (["--max_new_tokens=1000"], "max_new_tokens=1000 leaves no room for a prompt in the model's context of 128"),
    (["--prompt_style=few_shot", "--num_shots=100"], "num_shots=100 needs 50 reviews of each label"),
    (["--prompt_style=few_shot", "--num_shots=20"], "no review fits the model's context of 128 tokens"),
])
def test_generation_limits_are_checked_before_evaluating(tiny_ckpt, reviews, tmp_path, more, message):
    with pytest.raises(ConfigError, match=message):
        generate.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path / 'out'}",
                       "--device=cpu", *more])
    assert not (tmp_path / "out").exists()


# --- data, and failing before working ------------------------------------------------------------

@pytest.mark.parametrize("label", [-1, 2])
def test_a_bad_test_label_stops_generate_before_it_evaluates(tiny_ckpt, reviews, tmp_path, label):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation", "test"):
        (data / f"{split}.csv").write_text(f"text,label\ngreat,1\nawful,0\nodd,{label if split == 'test' else 1}\n")
    with pytest.raises(ConfigError, match=rf"label {label} of review 'odd' \(row 2 of the 'test' split"):
        generate.main([f"--init_from={tiny_ckpt}", f"--dataset={data}", f"--out_dir={tmp_path / 'out'}",
                       "--device=cpu"])
    assert not (tmp_path / "out").exists()


def test_generate_fails_on_an_unwritable_out_dir_before_evaluating(tiny_ckpt, reviews, tmp_path):
    (tmp_path / "file").write_text("x")
    t0 = time.time()
    with pytest.raises(ConfigError, match="cannot write to out_dir"):
        generate.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path / 'file' / 'o'}",
                       "--device=cpu"])
    assert time.time() - t0 < 5  # before loading the model and evaluating


def test_a_failed_command_leaves_no_out_dir_and_the_first_bad_loss_says_no_checkpoint(tiny_ckpt, reviews, tmp_path):
    with pytest.raises(ConfigError):
        train.main(flags(tiny_ckpt, str(tmp_path / "no-data"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(FloatingPointError, match="no checkpoint was saved yet"):
        train.main(flags(tiny_ckpt, reviews, tmp_path / "out", "--max_iters=8", "--eval_interval=1",
                         "--learning_rate=1e30", "--warmup_iters=0", "--decay_lr=False", "--grad_clip=0",
                         "--always_save_checkpoint=False"))


def test_a_log_line_that_does_not_fit_leaves_the_log_as_it_was(tmp_path):
    code = ("import resource, signal, sys; from lorakit.common import WriteError, append_line\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"append_line({str(tmp_path / 'log.jsonl')!r}, {{'iter': 1}})\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20))\n"
            f"try:\n    append_line({str(tmp_path / 'log.jsonl')!r}, {{'iter': 2, 'pad': 'x' * 50}})\n"
            "except WriteError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "File too large; raise the file size limit (ulimit -f)" in p.stdout, p.stdout + p.stderr
    assert (tmp_path / "log.jsonl").read_text() == '{"iter": 1}\n'  # no torn line

"""Values that are not what their type says, text that looks like a control token, results replaced
without a word, exports that stop half way, files nobody else can read: each a one-line refusal or work
that goes on, never a traceback or a lost result."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import export
import generate
import train
from lorakit.common import save_atomic
from configurator import ConfigError, Settings, configure
from conftest import ROOT, cli, save_random_hf_gpt2
from conftest import batches_of
from lorakit.data import check_labels


def flags(base, reviews, out_dir, *more):
    return [f"--init_from={base}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu", "--batch_size=4",
            "--eval_iters=1", "--rank=4", "--alpha=8", *more]


@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, reviews, tmp_path_factory):
    """A finished two-step LoRA run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("faults3") / "run"
    train.main(flags(tiny_ckpt, reviews, out, "--max_iters=2", "--eval_interval=2"))
    return out


def copy_of(run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


# --- values that are not what their type says ---------------------------------------------------------

DEFAULTS = Settings(max_iters=20, learning_rate=3e-4, out_dir="out", seed=1337, review="")


@pytest.mark.parametrize("argv, message", [
    (["--max_iters=None"], "setting 'max_iters' expects int (like 20), got None"),
    (["--lr=None"], "setting 'learning_rate' expects float (like 0.0003), got None"),
    (["--seed=99999999999999999999999"], "setting 'seed' is out of range: 99999999999999999999999"),
    (["--max_iters=True"], "setting 'max_iters' expects int (like 20), got True"),
])
def test_a_flag_value_must_have_the_defaults_type(argv, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        configure({**DEFAULTS, "learning_rate": 3e-4}, [a.replace("lr=", "learning_rate=") for a in argv])


@pytest.mark.parametrize("text, message", [
    ("max_iters = None\n", "setting 'max_iters' expects int (like 20), got None"),
    ("learning_rate = lambda: 3\n", "setting 'learning_rate' expects float (like 0.0003), got <function"),
])
def test_a_config_files_value_must_have_the_defaults_type(tmp_path, text, message):
    (tmp_path / "cfg.py").write_text("def helper():\n    return 1\n" + text)  # a helper of its own is fine
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, [str(tmp_path / "cfg.py")])
    assert str(e.value).startswith(message)


def test_text_settings_are_never_parsed_and_a_long_one_costs_linear_time():
    review = " ".join(["great"] * 3000)  # ast.literal_eval runs out of memory on this
    assert configure(DEFAULTS, [f"--review={review}"]).review == review
    assert configure(DEFAULTS, ["--review=<|endoftext|> (1, 2)"]).review == "<|endoftext|> (1, 2)"
    assert configure(DEFAULTS, ["--out_dir=None"]).out_dir == "None"
    with pytest.raises(ConfigError, match=r"got 'great great .*\.\.\.'$"):
        configure(DEFAULTS, [f"--max_iters={review}"])


def test_a_leading_tilde_is_the_home_folder_in_path_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    c = configure(DEFAULTS, ["--out_dir=~/runs/a", "--review=~/not a path"])
    assert c.out_dir == str(tmp_path / "runs" / "a") and c.review == "~/not a path"
    assert generate.configure(generate.DEFAULTS, ["--dataset=~/data"]).dataset == str(tmp_path / "data")


@pytest.mark.parametrize("label", [1.0, 0.0, True])
def test_labels_stored_as_floats_or_bools_are_refused(label):
    with pytest.raises(ValueError, match=f"label {label!r} of review 'fine' .* is not 0"):
        check_labels([0, label], ["bad", "fine"])


# --- review text that looks like a control token ----------------------------------------------------

def test_a_review_holding_the_end_of_text_marker_trains_and_is_classified(tiny_ckpt, tmp_path, capsys):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    rows = [{"text": "great <|endoftext|> film", "label": 1}, {"text": "dull", "label": 0}]
    loader = batches_of(rows, enc, batch_size=2, block_size=64)
    ids = list(loader.records[0]["ids"])
    assert ids.count(enc.eot_token) == 1 and ids[-1] == enc.eot_token  # the review's marker is text, not the token
    generate.main([f"--init_from={tiny_ckpt}", "--review=a <|endoftext|> b", "--device=cpu"])
    assert capsys.readouterr().out.rstrip().endswith("a <|endoftext|> b")


# --- a closed output pipe -----------------------------------------------------------------------------

def test_a_closed_output_pipe_never_stops_a_run(tiny_ckpt, reviews, tmp_path):
    p = subprocess.Popen([sys.executable, "train.py", *flags(tiny_ckpt, reviews, tmp_path / "run", "--max_iters=6",
                                                             "--eval_interval=3", "--log_interval=1")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert p.stderr.read() == b""
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == 6


# --- files that are not what they should be -----------------------------------------------------------

def edit_checkpoint(run, change):
    path = run / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def nan_adapter(ckpt):
    ckpt["model"][next(k for k in ckpt["model"] if k.endswith("lora_B"))][0, 0] = float("nan")


@pytest.mark.parametrize("change, message", [
    (nan_adapter, "holds non-finite values (NaN or inf) in transformer.h.0.attn.c_attn.lora_B"),
    (lambda c: c.update(config=[1, 2]), "is not a train.py checkpoint: 'config' is list, not dict"),
    (lambda c: c.update(model=3), "is not a train.py checkpoint: 'model' is int, not dict"),
    (lambda c: c.pop("base_model"), "an adapter-only checkpoint without its 'base_model'"),
])
def test_a_checkpoint_is_checked_where_it_enters(lora_run, reviews, tmp_path, change, message):
    run = copy_of(lora_run, tmp_path)
    edit_checkpoint(run, change)
    for script, argv in ((generate, [f"--out_dir={run}", "--device=cpu", "--num_samples=2"]),
                         (export, [f"--out_dir={run}", "--format=hf"]),
                         (train, [f"--out_dir={run}", "--init_from=resume", "--max_iters=4"])):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            script.main(argv)
    assert not (run / "hf").exists() and not (run / "results.json").exists()


def test_unpickling_refusals_never_advise_weights_only_false(tmp_path):
    (tmp_path / "run").mkdir()
    torch.save({"model": {}, "model_args": {}, "evil": object()}, tmp_path / "run" / "ckpt.pt")
    code, out, err = cli("generate.py", f"--out_dir={tmp_path / 'run'}", "--device=cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weights_only" not in err
    assert "holds Python objects other than tensors, which are not loaded" in err


def test_a_truncated_weights_file_in_the_base_folder_is_one_line(tmp_path, reviews):
    base = tmp_path / "base"
    save_random_hf_gpt2(base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:len(data) // 2])  # what an interrupted download leaves
    code, _, err = cli("train.py", *flags(base, reviews, tmp_path / "run"))
    assert code == 2 and err.startswith(f"error: cannot load a GPT-2 checkpoint from '{base}': {base}/model.safetensors "
                                        f"cannot be read (SafetensorError") and "interrupted download" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_metrics_that_cannot_be_read_are_one_line(lora_run, tiny_ckpt, reviews, tmp_path):
    run = copy_of(lora_run, tmp_path)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    with pytest.raises(ConfigError, match="cannot read .*metrics.jsonl: Is a directory; move it out of the way"):
        train.main([f"--out_dir={run}", "--init_from=resume", "--max_iters=4"])


# --- results and runs replaced without a word ----------------------------------------------------------

def test_every_evaluation_is_kept_and_a_replaced_one_is_named(lora_run, tmp_path, capsys):
    run = copy_of(lora_run, tmp_path)
    first = generate.main([f"--out_dir={run}", "--device=cpu"])
    capsys.readouterr()
    generate.main([f"--out_dir={run}", "--device=cpu", "--num_samples=4", "--temperature=1.0"])
    out = capsys.readouterr().out
    assert (f"replaced the results of an earlier evaluation (accuracy {first['accuracy']:.4f} on {first['n']} "
            f"reviews of resume, zero_shot, greedy)") in out
    history = [json.loads(line) for line in open(run / "results_history.jsonl")]
    assert [(h["n"], h["temperature"]) for h in history] == [(first["n"], 0.0), (4, 1.0)]


def test_a_new_run_refuses_another_runs_logs_and_resume_past_max_iters_refuses(lora_run, tiny_ckpt, reviews, tmp_path):
    run = copy_of(lora_run, tmp_path)
    (run / "ckpt.pt").unlink()  # what a sweep leaves
    logs = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="metrics.jsonl holds another run's logs .*--overwrite=True"):
        train.main(flags(tiny_ckpt, reviews, run, "--max_iters=2"))
    assert (run / "metrics.jsonl").read_bytes() == logs
    run = copy_of(lora_run, tmp_path / "again")
    with pytest.raises(ConfigError, match=r"ckpt.pt is at iteration 2, past max_iters=1: give a larger --max_iters"):
        train.main([f"--out_dir={run}", "--init_from=resume", "--max_iters=1"])


# --- files others can read ----------------------------------------------------------------------------

def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic(b"x", tmp_path / "f")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644


# --- exports that stop half way, imports that do not fit ----------------------------------------------

def test_an_export_appears_whole_or_not_at_all_and_always_has_a_tokenizer(lora_run, tmp_path):
    run = copy_of(lora_run, tmp_path)
    code, _, err = cli("export.py", f"--out_dir={run}", "--format=hf", limit_bytes=200_000)  # a full disk
    assert code == 1 and err.startswith("error: cannot write") and len(err.strip().splitlines()) == 1
    assert not (run / "hf").exists()  # nothing half written, so the next export needs no --overwrite
    export.main([f"--out_dir={run}", "--format=hf"])
    from transformers import GPT2TokenizerFast
    import tiktoken
    enc, tok = tiktoken.get_encoding("gpt2"), GPT2TokenizerFast.from_pretrained(run / "hf")
    for text in ["Hello world!", "  a moving, funny film \n\n", "naïve café — 東京 🤖", "don't I'll 3.14", "\ttabs"]:
        assert tok.encode(text) == enc.encode_ordinary(text), text


@pytest.mark.parametrize("more, message", [
    (["--tokenizer_dir=/nonexistent"], "tokenizer_dir /nonexistent has no vocab.json and merges.txt"),
    (["--export_dir={run}/log.txt"], "{run}/log.txt is a file, not a folder: pick another --export_dir"),
])
def test_export_destinations_are_checked(lora_run, tmp_path, more, message):
    run = copy_of(lora_run, tmp_path)
    (run / "log.txt").write_text("x")
    with pytest.raises(ConfigError, match="^" + message.format(run=run)):
        export.main([f"--out_dir={run}", *[m.format(run=run) for m in more]])
    assert not (run / "hf").exists()


def test_an_adapter_is_checked_against_its_base_before_import(lora_run, tmp_path):
    run = copy_of(lora_run, tmp_path)
    export.main([f"--out_dir={run}", "--format=peft"])
    deeper = tmp_path / "deeper"
    save_random_hf_gpt2(deeper, n_layer=3)
    with pytest.raises(ConfigError, match="has no transformer.h.2.attn.c_attn.lora_A, though .* has that layer"):
        export.main(["--format=import_peft", f"--adapter={run / 'peft'}", f"--init_from={deeper}",
                     f"--out_dir={tmp_path / 'imported'}"])
    config = json.loads((run / "peft" / "adapter_config.json").read_text())
    (run / "peft" / "adapter_config.json").write_text(json.dumps(dict(config, r=8)))
    with pytest.raises(ConfigError, match="adapter_config.json says r=8, but transformer.h.0.attn.c_attn.lora_A has rank 4"):
        export.main(["--format=import_peft", f"--adapter={run / 'peft'}", f"--out_dir={tmp_path / 'imported'}"])
    assert not (tmp_path / "imported").exists()


# --- signals a cluster sends --------------------------------------------------------------------------

def test_removing_out_dir_under_a_run_is_one_line(tiny_ckpt, reviews, tmp_path):
    p = subprocess.Popen([sys.executable, "train.py", *flags(tiny_ckpt, reviews, tmp_path / "run", "--max_iters=100000",
                                                             "--eval_interval=5", "--log_interval=1")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("iter 2:"):
            break
    shutil.rmtree(tmp_path / "run")
    assert p.wait(timeout=120) == 1
    err = p.stderr.read()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: cannot write")

"""What a new user meets: --help, the handout's config path, subsets with both labels, resume that
remembers the run, fast failures without a network, warnings, output folders git ignores."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

import generate
import train
from conftest import ROOT, cli, write_reviews
from configurator import ConfigError, help_text

SCRIPTS = ["train.py", "generate.py", "sweep.py", "export.py", "model.py", "bench/perf.py", "bench/merge_latency.py",
           "bench/peft_parity.py", "bench/gpu.py", "bench/lr_vs_alpha.py", "bench/faults.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_default(script):
    text = help_text(str(ROOT / script))
    lines = text.splitlines()
    assert lines[2] == "usage:" and f"python {script}" in text
    assert lines[0].endswith((".", "?")), lines[0]  # the docstring's whole first paragraph, not its first line
    usage = lines[3:lines.index("", 3)]
    assert all(u.startswith(("  python", "  torchrun")) and "  " not in u[2:] for u in usage), usage
    defaults = getattr(importlib.import_module(script[:-3].replace("/", ".")), "DEFAULTS", {})
    for key in defaults:
        assert re.search(rf"^    --{key}=", text, re.M), key
    assert "settings (--key=value" in text


def test_help_exits_0_and_scripts_reject_what_they_do_not_use():
    code, out, err = cli("train.py", "--help")
    assert code == 0 and err == ""
    assert "    --lora_rank=128  (0: full fine-tuning)" in out and "    --dataset='cornell-movie-review-data/rotten_tomatoes'" in out
    assert "rank=lora_rank" in out  # the handout's short names
    code, out, _ = cli("model.py", "-h")
    assert code == 0 and "python model.py" in out and '--lora_targets="attn"' in out
    code, out, err = cli("model.py", "--init_from=x")  # used to be ignored
    assert code == 2 and err.startswith("error: unknown setting 'init_from'") and err.count("\n") == 1


def test_the_handouts_config_path_points_to_configs(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"^config file 'config/finetune_params_config.py' not found; did you mean "
                                          r"configs/finetune_params_config.py\?$"):
        train.main(["config/finetune_params_config.py", "--device=cpu"])


def positives_first(path, n_pos, n_neg):
    """A data set whose test split lists every positive review first, as Rotten Tomatoes' does."""
    write_reviews(path)
    rows = [f"great film number {i} ,1" for i in range(n_pos)] + [f"dull film number {i} ,0" for i in range(n_neg)]
    (path / "test.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


def test_num_samples_draws_each_label_in_its_share(tiny_ckpt, tmp_path):
    data = positives_first(tmp_path / "data", 15, 9)
    kw = dict(init_from=tiny_ckpt, dataset=data, device="cpu", num_samples=8)
    sampler = generate.ModelSampler(**kw)
    assert sorted(r["label"] for r in sampler.records) == [0] * 3 + [1] * 5  # 15:9 of 8
    assert sampler.indices == generate.ModelSampler(**kw).indices  # the same reviews for every model
    assert sampler.indices != generate.ModelSampler(**kw, seed=1).indices
    summary = generate.main([f"--init_from={tiny_ckpt}", f"--dataset={data}", "--device=cpu", "--num_samples=8",
                             f"--out_dir={tmp_path / 'out'}"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["reviews"] == sampler.indices and summary["n"] == 8
    results_all = generate.main([f"--init_from={tiny_ckpt}", f"--dataset={data}", "--device=cpu",
                                 f"--out_dir={tmp_path / 'all'}"])
    assert results_all["reviews"] == "all" and results_all["n"] == 24


def test_resume_continues_the_run_as_it_was_set_up(tiny_ckpt, reviews, tmp_path, capsys):
    out = f"--out_dir={tmp_path}"
    train.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", out, "--device=cpu", "--batch_size=4",
                "--eval_iters=1", "--rank=4", "--alpha=8", "--lr=2e-2", "--warmup_iters=0", "--decay_lr=False",
                "--log_interval=1", "--max_iters=2"])
    capsys.readouterr()
    train.main(["--init_from=resume", out, "--max_iters=4", "--device=cpu"])  # no --dataset, no --lr
    printed = capsys.readouterr().out
    assert "iter 3: " in printed and "lr 2.00e-02" in printed and "note:" not in printed
    assert "lr 5.00e-04" not in printed  # not the default
    summary = generate.main([out, "--device=cpu", "--num_samples=4"])  # the data set is the run's
    assert summary["dataset"] == reviews

    # a change that makes the run differ from an uninterrupted one is said in one line
    train.main(["--init_from=resume", out, "--max_iters=6", "--batch_size=2", "--device=cpu"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: resuming with batch_size 4 -> 2: the run will differ from one that was never interrupted"]
    with pytest.raises(ConfigError, match="lora_rank=8 differs from the resumed run's 4: a resumed run keeps its model"):
        train.main(["--init_from=resume", out, "--max_iters=8", "--rank=8", "--device=cpu"])


def offline_env(tmp_path):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))  # nothing listens
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(k, None)
    return env


def test_without_a_network_the_hub_fails_at_once_with_advice(tiny_ckpt, reviews, tmp_path):
    env = offline_env(tmp_path)
    code, _, err = cli("train.py", "--init_from=gpt2-medium", f"--dataset={reviews}", f"--out_dir={tmp_path / 'a'}",
                       "--device=cpu", env=env)
    assert code == 2 and err.count("\n") == 1  # no retries, no warnings: one line
    assert "cannot load the GPT-2 checkpoint 'gpt2-medium': the Hugging Face Hub (127.0.0.1) cannot be reached " \
           "and it is not in the local cache" in err and "pass its local directory with --init_from=DIR" in err
    code, _, err = cli("generate.py", f"--init_from={tiny_ckpt}", "--dataset=cornell-movie-review-data/rotten_tomatoes",
                       f"--out_dir={tmp_path / 'b'}", "--device=cpu", env=env)
    assert code == 2 and err.count("\n") == 1
    assert "cannot load the data set 'cornell-movie-review-data/rotten_tomatoes': the Hugging Face Hub (127.0.0.1) " \
           "cannot be reached and it is not in the local cache" in err and "with --dataset=DIR" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_tests_find_the_shared_tokenizer_by_themselves_and_say_in_one_line_when_it_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "LORA_GPT2_SHARED")}
    collect = [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_lora.py"]
    if (ROOT.parent / "shared" / "assets" / "tiktoken_cache").is_dir():  # ../shared beside the clone is found
        p = subprocess.run(collect, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run(collect, cwd=ROOT, env=dict(env, LORA_GPT2_SHARED=str(tmp_path)), capture_output=True,
                       text=True, timeout=300)
    lines = [line for line in (p.stdout + "\n" + p.stderr).splitlines() if line.strip()]
    assert p.returncode == 2 and lines and "TIKTOKEN_CACHE_DIR" in lines[0]
    assert all("the tests need tiktoken's GPT-2 encoding" in line for line in lines)  # pytest says it on both streams


@pytest.mark.parametrize("script", ["train.py", "generate.py"])
def test_every_download_that_cannot_happen_is_named_in_one_line(tmp_path, script):
    env = dict(offline_env(tmp_path), TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"))
    code, _, err = cli(script, "--init_from=gpt2-medium", "--dataset=cornell-movie-review-data/rotten_tomatoes",
                       f"--out_dir={tmp_path / 'out'}", "--device=cpu", env=env)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: cannot load 3 things, none in the local cache: ")
    for fix in ("--dataset=DIR", "--init_from=DIR", "set TIKTOKEN_CACHE_DIR to the folder of its cached files"):
        assert fix in err
    assert not (tmp_path / "out").exists()


def test_wandb_settings_without_wandb_log_are_pointed_out(tiny_ckpt, reviews, tmp_path, capsys):
    train.main([f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path}", "--device=cpu",
                "--batch_size=4", "--eval_iters=1", "--max_iters=1", "--wandb_run_name=lora-r4"])
    assert "warning: wandb_run_name='lora-r4' without wandb_log=True: nothing is logged to Weights & Biases; " \
           "add --wandb_log=True" in capsys.readouterr().out
    assert not (tmp_path / "wandb").exists()


def test_output_folders_of_the_readme_and_notebook_are_ignored_by_git():
    text = (ROOT / "README.md").read_text() + (ROOT / "run_in_colab.ipynb").read_text()
    folders = sorted(set(re.findall(r"--(?:out_dir|export_dir)=([\w./-]+)", text)))
    assert len(folders) >= 6, folders
    files = [f"{folder}/ckpt.pt" for folder in folders]  # git tells a folder's pattern only for what is in it
    p = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert sorted(p.stdout.split()) == sorted(files)


def test_tiktoken_cache_dir_is_absolute_for_scripts_run_elsewhere():
    path = os.environ.get("TIKTOKEN_CACHE_DIR")
    assert path is None or os.path.isabs(path)


def test_the_readmes_todo_links_point_at_the_code_they_name():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| \[([\w./]+)#L(\d+)\]\(\2#L\3\) \|", readme, re.M)
    assert len(rows) >= 10
    for code, path, line in rows:
        assert code in (ROOT / path).read_text().splitlines()[int(line) - 1], (code, path, line)


def test_every_relative_link_of_the_readme_and_docs_names_a_file_that_exists():
    pages = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("course/*.md")]
    broken = [(str(page.relative_to(ROOT)), target) for page in pages
              for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
              if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()]
    assert len(pages) > 5 and not broken, broken

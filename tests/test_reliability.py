"""Bad input is one clear line and a non-zero exit; killed or interrupted runs lose nothing; loading is safe."""
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate
import train
from conftest import ROOT, cli
from configurator import ConfigError
from lorakit.checkpoint import load_checkpoint


def tiny_run(tiny_ckpt, reviews, out_dir, *flags):
    return [f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={out_dir}", "--device=cpu",
            "--batch_size=4", "--eval_iters=1", "--rank=4", "--alpha=8", *flags]


BAD_TRAIN_FLAGS = [
    (["--lora_rnk=4"], "unknown setting 'lora_rnk'; did you mean lora_rank"),
    (["--max_iters=ten"], "setting 'max_iters' expects int (like 400), got 'ten'"),
    (["--lora_rank"], "'--lora_rank' is not a setting: write --key=value"),
    (["configs/nope.py"], "config file 'configs/nope.py' not found"),
    (["--lora_rank=-1"], "lora_rank must be >= 0"),
    (["--lora_alpha=0"], "lora_alpha must be > 0 when lora_rank > 0"),
    (["--lora_dropout=1.0"], "lora_dropout must be in [0, 1)"),
    (["--batch_size=0"], "batch_size must be >= 1"),
    (["--max_iters=0"], "max_iters must be >= 1"),
    (["--learning_rate=0"], "learning_rate must be > 0"),
    (["--block_size=4096"], "block_size=4096 is larger than the model's context of 128 tokens"),
    (["--init_from=/no/such/model"], "cannot load a GPT-2 checkpoint from '/no/such/model': no such directory"),
    (["--init_from=resume"], "no checkpoint at"),
    (["--device=cuda"], "no CUDA GPU is available here"),
    (["--loss_on=everything"], "loss_on must be one of label, all, not 'everything'"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN_FLAGS, ids=[f[0][0] for f in BAD_TRAIN_FLAGS])
def test_bad_training_input(tiny_ckpt, reviews, tmp_path, flags, message):
    if torch.cuda.is_available() and flags == ["--device=cuda"]:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as e:
        train.main(tiny_run(tiny_ckpt, reviews, tmp_path / "out", *flags))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_cli_error_is_one_line_on_stderr_with_status_2(tmp_path):
    code, out, err = cli("train.py", "--learnig_rate=1e-3")
    assert code == 2 and err == "error: unknown setting 'learnig_rate'; did you mean learning_rate?\n"
    code, out, err = cli("generate.py", f"--out_dir={tmp_path}")
    assert code == 2 and err.startswith("error: no checkpoint at") and err.count("\n") == 1
    code, out, err = cli("sweep.py", "--ranks=1,x")
    assert code == 2 and "ranks must be comma-separated integers" in err


def test_bad_data(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("text,label\ngood,1\nbad,7\n")
    (bad / "validation.csv").write_text("text,label\nok,0\n")
    with pytest.raises(ConfigError, match=r"label 7 of review 'bad' \(row 1 of the 'train' split of .*\) is not 0"):
        train.main(tiny_run(tiny_ckpt, str(bad), tmp_path / "o1"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    empty = tmp_path / "empty"
    empty.mkdir()
    for split, n in (("train", 0), ("validation", 1)):
        pq.write_table(pa.table({"text": ["fine"] * n, "label": [1] * n}, schema=pa.schema(
            [("text", pa.string()), ("label", pa.int64())])), empty / f"{split}.parquet")
    with pytest.raises(ConfigError, match="cannot load data set .*empty.*BatchSize must be greater than 0"):
        train.main(tiny_run(tiny_ckpt, str(empty), tmp_path / "o2"))
    (bad / "validation.csv").unlink()
    with pytest.raises(ConfigError, match="has no 'validation' split"):
        train.main(tiny_run(tiny_ckpt, str(bad), tmp_path / "o3"))


def test_empty_long_and_non_ascii_reviews_train(tiny_ckpt, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    rows = ['"",1', '"ÉPOUSTOUFLANT ! 素晴らしい映画 🎬",1', '"' + "interminable " * 300 + '",0', '"meh",0']
    for split in ("train", "validation"):
        (odd / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    train.main(tiny_run(tiny_ckpt, str(odd), tmp_path / "out", "--max_iters=2"))
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))[1]["iter_num"] == 2


def test_unwritable_out_dir(tiny_ckpt, reviews, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot write to out_dir"):
        train.main(tiny_run(tiny_ckpt, reviews, tmp_path / "file" / "out"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled object", "wrong shapes"])
def test_damaged_or_unsafe_checkpoints_are_refused(tiny_ckpt, reviews, tmp_path, damage):
    train.main(tiny_run(tiny_ckpt, reviews, tmp_path, "--max_iters=1"))
    path = tmp_path / "ckpt.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 10)
    elif damage == "pickled object":
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"] = ValueError("arbitrary object")  # anything weights_only refuses
        torch.save(ckpt, path)
    else:
        ckpt = torch.load(path, weights_only=True)
        ckpt["model_args"]["lora_rank"] = 8  # weights of rank 4
        torch.save(ckpt, path)
    before = path.read_bytes()
    expected = "does not match its own model settings" if damage == "wrong shapes" else "cannot be loaded as a checkpoint"
    with pytest.raises(ConfigError, match=expected):
        train.main(tiny_run(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--max_iters=2"))
    with pytest.raises(ConfigError, match=expected):
        generate.main([f"--out_dir={tmp_path}", f"--dataset={reviews}", "--device=cpu"])
    assert path.read_bytes() == before


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_ckpt, reviews, tmp_path):
    train.main(tiny_run(tiny_ckpt, reviews, tmp_path, "--max_iters=2", "--eval_interval=1"))
    good = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    with pytest.raises(FloatingPointError, match="non-finite .*iteration 3.*last good checkpoint"):
        train.main(tiny_run(tiny_ckpt, reviews, tmp_path, "--init_from=resume", "--max_iters=8", "--eval_interval=1",
                            "--learning_rate=1e30", "--warmup_iters=0", "--decay_lr=False", "--grad_clip=0"))
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["iter_num"] == 2 and all(torch.equal(good[k], after["model"][k]) for k in good)


def start(flags):
    return subprocess.Popen([sys.executable, "train.py", *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_resume_finishes(tiny_ckpt, reviews, tmp_path):
    # full fine-tuning with a checkpoint every iteration: much of the time is spent saving
    flags = tiny_run(tiny_ckpt, reviews, tmp_path, "--rank=0", "--eval_interval=1", "--max_iters=400")
    last = -1
    for delay in (1.0, 2.3, 3.7):
        p = start(flags if last < 0 else flags + ["--init_from=resume"])
        while not (tmp_path / "ckpt.pt").exists():
            time.sleep(0.05)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        model, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))  # complete and loadable
        assert ckpt["iter_num"] >= max(last, 1)
        last = ckpt["iter_num"]
    code, out, err = cli("train.py", *flags, "--init_from=resume", "--max_iters=" + str(last + 3))
    assert code == 0, err
    assert f"resuming {tmp_path / 'ckpt.pt'} at iteration {last}" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == last + 3


def test_sigint_saves_and_exits_cleanly(tiny_ckpt, reviews, tmp_path):
    p = start(tiny_run(tiny_ckpt, reviews, tmp_path, "--max_iters=100000", "--eval_interval=100000",
                       "--log_interval=1"))
    for line in p.stdout:
        if line.startswith("iter 3:"):
            break
    p.send_signal(signal.SIGINT)
    out = p.stdout.read()
    assert p.wait(timeout=120) == 130
    assert "Traceback" not in out and "interrupted (SIGINT): saved checkpoint at iteration" in out
    n = int(out.split("interrupted (SIGINT): saved checkpoint at iteration ")[1].split()[0])
    assert n >= 4 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == n


def test_no_secret_is_saved_or_printed(tiny_ckpt, reviews, tmp_path, monkeypatch, capsys):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train.main(tiny_run(tiny_ckpt, reviews, tmp_path / "out", "--max_iters=1", "--wandb_log=True"))
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    for path in (tmp_path / "out").iterdir():
        assert secret.encode() not in path.read_bytes(), path

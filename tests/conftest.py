import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests run scripts from other folders (the notebook's from a copy): a relative cache would be lost there
if os.environ.get("TIKTOKEN_CACHE_DIR"):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
# the offline assets (../shared/README.md): LORA_GPT2_SHARED names their folder, ../shared by default
SHARED = Path(os.path.abspath(os.environ.get("LORA_GPT2_SHARED", ROOT.parent / "shared")))
if not os.environ.get("TIKTOKEN_CACHE_DIR") and (SHARED / "assets" / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "assets" / "tiktoken_cache")
STANDIN = SHARED / "models" / "gpt2-imdb-standin"
DATA = SHARED / "data" / "rotten_tomatoes"


def pytest_sessionstart(session):
    """Without tiktoken's GPT-2 encoding nearly every test fails: say so once, before collecting them."""
    import tiktoken
    try:
        tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.exit(f"the tests need tiktoken's GPT-2 encoding and its download failed ({type(e).__name__}): set "
                    f"TIKTOKEN_CACHE_DIR to the folder of its cached files, or LORA_GPT2_SHARED to a folder with "
                    f"assets/tiktoken_cache ({SHARED} has none), or connect to the internet", returncode=2)


needs_standin = pytest.mark.skipif(not STANDIN.is_dir(), reason=f"stand-in model not found at {STANDIN}")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"Rotten Tomatoes files not found at {DATA}")


def cli(*args, cwd=ROOT, env=None, timeout=300, limit_bytes=None):
    """(exit status, stdout, stderr) of python with these arguments (a script and its flags), run in cwd;
    limit_bytes: the largest file it may write, as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                       preexec_fn=limit if limit_bytes else None)
    return p.returncode, p.stdout, p.stderr


def save_random_hf_gpt2(path, seed=0, **shape):
    """A randomly initialised transformers GPT2LMHeadModel saved as a checkpoint directory."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257,
                bos_token_id=50256, eos_token_id=50256)
    args.update(shape)
    hf = GPT2LMHeadModel(GPT2Config(**args))
    hf.save_pretrained(path)
    return hf.eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a tiny random GPT-2 checkpoint with the real vocabulary (usable with tiktoken)."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    save_random_hf_gpt2(path)
    return str(path)


POSITIVE = ["a moving , funny and beautifully acted film", "one of the best movies of the year",
            "a delightful , warm comedy", "smart , sharp and wonderfully made", "an absolute joy to watch"]
NEGATIVE = ["a dull , lifeless mess", "the worst script in years", "boring , predictable and far too long",
            "a tedious waste of a fine cast", "nothing here works at all"]


def write_reviews(path, n_train=48, n_val=16, n_test=16):
    """A small Rotten-Tomatoes-like data set as CSV split files (train/validation/test)."""
    import csv
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        with open(path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                label = i % 2
                words = (POSITIVE if label else NEGATIVE)[i // 2 % 5]
                w.writerow([f"{words} , take {i} .", label])
    return str(path)


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    return write_reviews(tmp_path_factory.mktemp("reviews"))


def results_of(sampler):
    """The per-review dicts (text, label, prompt, generation, prediction) of a ModelSampler's get_accuracy()."""
    sampler.get_accuracy(progress=False)
    return sampler.results


def batches_of(dataset, tokenizer, batch_size=8, **options):
    """lorakit.data.Batches of dataloader.py's CustomDataLoader: the texts its _add_instruction_finetuning writes."""
    from dataloader import CustomDataLoader
    return CustomDataLoader(dataset, tokenizer, batch_size, **options).batches


def homework_prompt():
    """The Prompt of dataloader.py's own instruction and label words."""
    import tiktoken
    from lorakit.prompts import own_instruction, prompt_of
    return prompt_of(own_instruction(tiktoken.get_encoding("gpt2")))


import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LORA_GPT2_SHARED", ROOT.parent / "shared"))
STANDIN = SHARED / "models" / "gpt2-imdb-standin"
DATA = SHARED / "data" / "rotten_tomatoes"

needs_standin = pytest.mark.skipif(not STANDIN.is_dir(), reason=f"stand-in model not found at {STANDIN}")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"Rotten Tomatoes files not found at {DATA}")


def save_random_hf_gpt2(path, seed=0, **shape):
    """A randomly initialised transformers GPT2LMHeadModel saved as a checkpoint directory."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257,
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

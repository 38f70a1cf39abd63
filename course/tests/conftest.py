"""Fixtures of the handout tests: the repository on the path, tiny GPT-2 checkpoints, a few reviews."""

import csv
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
if os.environ.get("TIKTOKEN_CACHE_DIR"):  # a relative cache would be lost when a test changes folder
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])

# the handout's TODOs and their points; a task's points are shared equally by its tests
TASKS = {
    "LoRALinear.__init__": 4, "LoRALinear.reset_parameters": 2, "LoRALinear.forward": 4, "LoRALinear.train": 3,
    "LoRALinear.eval": 2, "mark_only_lora_as_trainable": 2, "model.py attention": 2,
    "CustomDataLoader._add_instruction_finetuning": 3, "train.py LoRA": 3, "ModelSampler.get_accuracy": 3,
}


# one pytest marker per task, to run one task's tests: python -m pytest -m lora_forward
MARKERS = {
    "LoRALinear.__init__": "lora_init", "LoRALinear.reset_parameters": "lora_reset", "LoRALinear.forward": "lora_forward",
    "LoRALinear.train": "lora_train", "LoRALinear.eval": "lora_eval", "mark_only_lora_as_trainable": "mark_only",
    "model.py attention": "model_attention", "CustomDataLoader._add_instruction_finetuning": "instruction",
    "train.py LoRA": "train_lora", "ModelSampler.get_accuracy": "get_accuracy",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "task(name): the handout TODO a test grades (course/tests/conftest.py TASKS)")
    for task, marker in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: the tests of {task}")


def pytest_collection_modifyitems(items):
    for item in items:
        for mark in item.iter_markers("task"):
            item.add_marker(MARKERS[mark.args[0]])


def save_gpt2(path, seed=0, answer=None):
    """A tiny GPT-2 checkpoint (transformers' format, GPT-2's vocabulary). With answer (a token id) it is
    built to generate that token after any text: its last LayerNorm outputs that token's embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257,
                                    bos_token_id=50256, eos_token_id=50256))
    if answer is not None:
        with torch.no_grad():
            hf.transformer.wte.weight[answer] = 10.0
            hf.transformer.ln_f.weight.zero_()
            hf.transformer.ln_f.bias.copy_(hf.transformer.wte.weight[answer])
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def reviews(tmp_path_factory):
    """Train, validation and test splits of 12 short reviews each as CSV files, labels alternating."""
    path = tmp_path_factory.mktemp("reviews")
    texts = ["a gorgeous , moving film", "a dull mess", "funny and warm", "tedious and far too long"]
    for split in ("train", "validation", "test"):
        with open(path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(12):
                w.writerow([f"{texts[i % 4]} , take {i}", 1 - i % 2])
    return str(path)

"""run_in_colab.ipynb runs top to bottom in a real Jupyter kernel ("Run all") as a user gets it, its first
cell's settings set to the folder it runs in, QUICK, a tiny model and local reviews; and the first failed
command stops it."""
import os

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT


def test_run_all_works_after_setting_only_the_way_in(tiny_ckpt, reviews, tmp_path):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    model = tmp_path / "my models" / "stand in"  # a path with spaces: every command must keep it whole
    model.parent.mkdir()
    os.symlink(tiny_ckpt, model)
    nbformat.validate(nb)
    for name in os.listdir(ROOT):  # a working copy whose outputs land in tmp_path
        if name.endswith(".py") or name in ("configs", "bench", "lorakit", "requirements.txt"):
            os.symlink(ROOT / name, tmp_path / name)
    first = next(c for c in nb.cells if c.cell_type == "code")
    settings = {'WAY_IN = "drive"': 'WAY_IN = "here"', "QUICK = False": "QUICK = True",
                'MODEL = "gpt2-medium"': f'MODEL = "{model}"', 'SMALL_MODEL = "gpt2"': f'SMALL_MODEL = "{model}"',
                'DATASET = "cornell-movie-review-data/rotten_tomatoes"': f'DATASET = "{reviews}"'}
    for line, ours in settings.items():  # the first cell's settings: the rest runs as a user gets it
        assert line in first.source, line
        first.source = first.source.replace(line, ours)
    assert all(not c.source.startswith(("!", "%")) for c in nb.cells if c.cell_type == "code")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"working in {tmp_path}" in outputs
    assert "P(negative)" in outputs and "Accuracy:" in outputs and "Sentiment:" in outputs
    assert "x no LoRA (" in outputs  # question 2.1's ratios come with their spread
    name = model.name  # the untouched model's folders are named after it
    for path in ("gpt-lora-default/loss_curve.png", f"{name}-4-shot/results.json", "sweep/results.md",
                 "gpt-lora-default/hf/model.safetensors", "gpt-lora-default/peft/adapter_config.json"):
        assert (tmp_path / f"quick-{path}").is_file(), path  # QUICK's runs keep out of the real runs' folders
        assert not (tmp_path / path.split("/")[0]).exists(), path


def test_quick_must_be_true_or_false(tmp_path):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = first.source.replace('WAY_IN = "drive"', 'WAY_IN = "here"').replace("QUICK = False", 'QUICK = "False"')
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            os.symlink(ROOT / name, tmp_path / name)
    nb.cells = [first]
    with pytest.raises(CellExecutionError, match="QUICK must be True or False, without quotes"):
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_run_all_stops_at_the_first_failed_command(tmp_path):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = first.source.replace('WAY_IN = "drive"', 'WAY_IN = "here"')
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("configs", "bench", "lorakit", "requirements.txt"):
            os.symlink(ROOT / name, tmp_path / name)
    nb.cells = [first, nbformat.v4.new_code_cell('run("python train.py --max_iters=-1")'),
                nbformat.v4.new_code_cell('print("went on")')]
    with pytest.raises(CellExecutionError) as e:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "CommandFailed" in str(e.value) and "max_iters must be" in str(e.value)
    assert not nb.cells[2].get("outputs")

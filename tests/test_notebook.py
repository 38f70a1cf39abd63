"""run_in_colab.ipynb is a valid notebook, and every command in it runs (on a tiny model, briefly)."""
import os
import re
import shlex
import subprocess
import sys

import nbformat

from conftest import ROOT

SMOKE = {
    "train.py": ["--max_iters=2", "--eval_interval=1", "--eval_iters=1", "--batch_size=2"],
    "generate.py": ["--num_samples=4"],
    "sweep.py": ["--ranks=2", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--batch_size=2",
                 "--num_samples=2", "--num_shots=2"],
    "model.py": [],
}


def test_every_notebook_command_runs(tiny_ckpt, reviews, tmp_path):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    nbformat.validate(nb)
    for name in os.listdir(ROOT):  # a working copy whose outputs land in tmp_path
        if name.endswith(".py") or name in ("configs", "requirements.txt"):
            os.symlink(ROOT / name, tmp_path / name)
    ran = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "colab-only" in cell.metadata.get("tags", []):
            continue
        for line in cell.source.splitlines():
            if line.startswith("!pip install"):
                assert (tmp_path / shlex.split(line)[-1]).is_file()
            elif line.startswith("!python"):
                args = shlex.split(line[1:].replace("gpt2-medium", tiny_ckpt))
                script = args[1]
                extra = [f"--dataset={reviews}", "--device=cpu"] if script != "model.py" else []
                p = subprocess.run([sys.executable, *args[1:], *extra, *SMOKE[script]], cwd=tmp_path,
                                   capture_output=True, text=True, timeout=600)
                assert p.returncode == 0, f"{line}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
                ran.append(script)
            else:  # Python that shows results: the files it opens must have been written
                for path in re.findall(r'"([^"]+\.(?:png|md))"', line):
                    assert (tmp_path / path).is_file(), path
    assert sorted(set(ran)) == ["generate.py", "model.py", "sweep.py", "train.py"]

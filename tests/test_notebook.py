"""run_in_colab.ipynb runs top to bottom in a real Jupyter kernel ("Run all"), on a tiny model, briefly,
with its first cell set to the folder it runs in."""
import os
import re
import sys

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

# flags that make each command brief; they come last, so they win over the cell's own
SMOKE = {
    "train.py": ["--max_iters=2", "--eval_interval=1", "--eval_iters=1", "--batch_size=2"],
    "generate.py": ["--num_samples=4", "--num_shots=2"],
    "sweep.py": ["--ranks=2", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--batch_size=2",
                 "--num_samples=2", "--num_shots=2"],
    "model.py": [],
    "export.py": [],
    "bench/merge_latency.py": ["--model=gpt2", "--lora_rank=2", "--seq_len=8", "--rounds=1"],
    "bench/lr_vs_alpha.py": ["--lora_rank=2", "--max_iters=2", "--eval_interval=1",
                             "--train_args='--eval_iters=1 --batch_size=2'"],
}
USES_DATA = ("train.py", "generate.py", "sweep.py", "bench/lr_vs_alpha.py")


def smoke(line, tiny_ckpt, reviews):
    """A notebook shell line made brief, and checked: IPython ignores a failed `!` command."""
    script = line.split()[1]
    line = re.sub(r"--init_from=gpt2(-medium)?\b", f"--init_from={tiny_ckpt}", line)
    extra = [f"--dataset={reviews}", "--device=cpu"] if script in USES_DATA else []
    extra += ["--device=cpu"] if script == "bench/merge_latency.py" else []
    return (f"!{sys.executable} {line[len('!python '):]} {' '.join(extra + SMOKE[script])}\n"
            f"assert _exit_code == 0, {line!r}")


def test_run_all_works_after_setting_only_the_way_in(tiny_ckpt, reviews, tmp_path):
    nb = nbformat.read(ROOT / "run_in_colab.ipynb", as_version=4)
    nbformat.validate(nb)
    for name in os.listdir(ROOT):  # a working copy whose outputs land in tmp_path
        if name.endswith(".py") or name in ("configs", "bench", "requirements.txt"):
            os.symlink(ROOT / name, tmp_path / name)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'WAY_IN = "drive"' in first.source
    first.source = first.source.replace('WAY_IN = "drive"', 'WAY_IN = "here"')
    scripts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = []
        for line in cell.source.splitlines():
            if line.startswith("!pip install"):  # no installing in the tests: the file it names must be there
                lines.append(f"assert os.path.isfile({line.split()[-1]!r})")
            elif line.startswith("!python"):
                scripts.append(line.split()[1])
                lines.append(smoke(line, tiny_ckpt, reviews))
            else:
                assert not line.startswith(("!", "%")), f"a shell line the test does not know: {line}"
                lines.append(line)
        cell.source = "\n".join(lines)
    assert sorted(set(scripts)) == sorted(SMOKE)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"working in {tmp_path}" in outputs
    assert "P(negative)" in outputs and "Accuracy:" in outputs
    for path in ("gpt-lora-default/loss_curve.png", "gpt2-medium-4-shot/results.json", "sweep/results.md",
                 "gpt-lora-default/hf/model.safetensors", "gpt-lora-default/peft/adapter_config.json"):
        assert (tmp_path / path).is_file(), path

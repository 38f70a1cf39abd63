"""The course loop: the starter emitted from the solution markers, its handout tests, and the grader on the
solution, the starter and broken submissions."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, cli

HANDOUT = ["lora.py", "model.py", "dataloader.py", "train.py", "generate.py"]


@pytest.fixture(scope="module")
def starter(tmp_path_factory):
    dest = tmp_path_factory.mktemp("course") / "starter"
    code, _, err = cli("course/make_starter.py", f"--out_dir={dest}")
    assert code == 0, err
    return dest


def grade(submission, tmp_path, *flags):
    results = tmp_path / "results.json"
    code, table, err = cli("course/grade.py", f"--submission={submission}", f"--results={results}", *flags, timeout=600)
    assert code == 0, err
    out = json.loads(results.read_text())
    lost = {t["name"].split(":")[0] for t in out["tests"] if t["score"] < t["max_score"]}
    return out, lost, table


def test_the_starter_has_no_solution_and_stops_at_its_todos(starter, tiny_ckpt, reviews, tmp_path):
    texts = {p: p.read_text() for p in starter.rglob("*") if p.is_file()}
    assert not [p for p, t in texts.items() if re.search(r"BEGIN SOLUTION|END SOLUTION|# STUB:", t)]
    assert not (starter / "docs").exists() and "| TODO |" not in texts[starter / "README.md"]
    lora = texts[starter / "lora.py"]
    assert "raise NotImplementedError(\"LoRALinear.forward" in lora and "self.lora_dropout(input)" not in lora
    assert not (starter / "lorakit" / "variants.py").exists()  # its layers merge updates: the solution's only
    code, _, err = cli("-c", "import lora, model, dataloader, train, generate", cwd=starter)
    assert code == 0, err
    code, _, err = cli("train.py", "configs/finetune_params_config.py", f"--init_from={tiny_ckpt}", f"--dataset={reviews}",
                       f"--out_dir={tmp_path / 'run'}", "--device=cpu", cwd=starter)
    assert code != 0 and "NotImplementedError: train.py LoRA" in err
    code, _, err = cli("generate.py", f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path / 'zs'}",
                       "--device=cpu", cwd=starter)
    # the prompt comes first, read off dataloader.py's TODO
    assert code != 0 and err.strip().endswith("NotImplementedError: CustomDataLoader._add_instruction_finetuning")
    code, out, _ = cli("generate.py", f"--init_from={tiny_ckpt}", "--prompt=The film", "--device=cpu", cwd=starter)
    assert code == 0 and out.startswith("The film")  # what needs no TODO works as in the solution
    code, _, err = cli("course/make_starter.py", f"--out_dir={starter}")
    assert code == 2 and "is not empty" in err


def test_the_starters_handout_tests_fail_every_task(starter):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf"], cwd=starter, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and " passed" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def broken(tmp_path, name, changes):
    """The solution's handout files with (file, old, new) changes: a submission that gets some TODOs wrong."""
    sub = tmp_path / name
    sub.mkdir()
    for f in HANDOUT:
        shutil.copyfile(ROOT / f, sub / f)
    for f, old, new in changes:
        assert old in (sub / f).read_text(), (f, old)
        (sub / f).write_text((sub / f).read_text().replace(old, new))
    return sub


def test_broken_submissions_lose_only_their_tasks(tmp_path):
    """(the solution's full marks and the starter's zero: tests/test_grader.py, through Gradescope's package)"""
    sub = broken(tmp_path, "three-wrong", [
        ("lora.py", "y = F.linear(input, self.weight, self.bias)", "y = F.linear(input, self.weight)"),  # no bias
        ("dataloader.py", 'LABEL_WORDS[rec["label"]] + EOT', 'str(rec["label"]) + EOT'),  # numbers for words
        ("generate.py", "predicted = [read_label(g, self.prompt.words) for g in generations]",
         "predicted = [read_label(g, self.prompt.words) or 0 for g in generations]")])  # unparseable as negative
    _, lost, table = grade(sub, tmp_path)
    assert lost == {"LoRALinear.forward", "CustomDataLoader._add_instruction_finetuning", "ModelSampler.get_accuracy"}, table
    for name, new in (("no-dropout", "y = y + self.lora_scaling * F.linear(F.linear(input, self.lora_A), self.lora_B)"),
                      ("dropout-on-everything", "y = self.lora_scaling * F.linear(F.linear(self.lora_dropout(input), "
                                                "self.lora_A), self.lora_B) + F.linear(self.lora_dropout(input), "
                                                "self.weight, self.bias)")):
        old = "y = y + self.lora_scaling * F.linear(F.linear(self.lora_dropout(input), self.lora_A), self.lora_B)"
        out, lost, table = grade(broken(tmp_path, name, [("lora.py", old, new)]), tmp_path, "--tasks=LoRALinear.forward")
        assert lost == {"LoRALinear.forward"} and 0 < out["score"] < 8, (name, table)


def test_a_course_style_lora_py_drops_in_scores_full_marks_and_trains_evaluates_and_exports(tiny_ckpt, reviews,
                                                                                           tmp_path):
    """A lora.py written for the course's starter (tests/course_style/lora.py: the course's API alone) with this
    repository's other handout files: full marks, and a LoRA run trained, resumed, evaluated and exported with it."""
    sub = tmp_path / "submission"
    sub.mkdir()
    for f in HANDOUT:
        shutil.copyfile(ROOT / ("tests/course_style/lora.py" if f == "lora.py" else f), sub / f)
    lora_tasks = "LoRALinear.__init__,LoRALinear.reset_parameters,LoRALinear.forward,LoRALinear.train,LoRALinear.eval," \
                 "mark_only_lora_as_trainable"  # the other files' tests stand in for lora.py (Recorder): the same
    out, lost, table = grade(sub, tmp_path, f"--tasks={lora_tasks}")
    assert out["score"] == 23 and not lost, table  # all of lora.py's points, public and hidden
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "docs", "bench"))
    shutil.copyfile(sub / "lora.py", repo / "lora.py")
    run = tmp_path / "run"
    common = [f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={run}", "--device=cpu", "--batch_size=4",
              "--eval_iters=1", "--rank=4", "--alpha=16", "--lr=1e-2", "--warmup_iters=0", "--eval_interval=2"]
    code, _, err = cli("train.py", *common, "--max_iters=2", cwd=repo)
    assert code == 0, err
    code, _, err = cli("train.py", f"--out_dir={run}", "--init_from=resume", "--max_iters=4", cwd=repo)
    assert code == 0, err
    code, _, err = cli("generate.py", f"--out_dir={run}", "--device=cpu", "--num_samples=6", cwd=repo)
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["n"] == 6
    code, _, err = cli("export.py", f"--out_dir={run}", "--format=hf", cwd=repo)
    assert code == 0, err
    import torch
    from transformers import GPT2LMHeadModel
    from lorakit.checkpoint import load_checkpoint
    from lorakit.adapters import merge_lora
    ours, _ = load_checkpoint(str(run / "ckpt.pt"))  # this repository's lora.py reads the student's checkpoint
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        expected = merge_lora(ours.eval())(idx, idx)[0]
        got = GPT2LMHeadModel.from_pretrained(run / "hf")(input_ids=idx).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

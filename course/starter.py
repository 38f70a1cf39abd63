"""
The starter repository, made from this solution. The marker grammar, in any .py file:

    # BEGIN SOLUTION <task>          the handout's name of the TODO, e.g. LoRALinear.forward
    # STUB: <line>                   the starter's line in its place (indented as the marker is)
    <the solution's lines>
    # END SOLUTION

In the starter each region becomes its STUB lines ("# STUB: " removed): #TODO / #Hint comments and a
raise NotImplementedError, or plain code that keeps the rest of the repository working. A task may
have several regions. Nothing else of the solution changes.
"""

import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the handout's files, the package below them but its solution-only part, the commands the notebook runs, the
# notebook, and the public handout tests. lorakit/variants.py is the solution's only: its layers merge updates,
# a TODO's answer.
SOLUTION_ONLY = ["lorakit/variants.py"]
FILES = ["lora.py", "model.py", "dataloader.py", "train.py", "generate.py", "configurator.py",
         "configs/finetune_params_config.py", "requirements.txt", "requirements-dev.txt",
         *sorted(f"lorakit/{n}" for n in os.listdir(os.path.join(ROOT, "lorakit"))
                 if n.endswith(".py") and f"lorakit/{n}" not in SOLUTION_ONLY),
         "sweep.py", "export.py", "bench/timing.py", "bench/merge_latency.py", "bench/lr_vs_alpha.py",
         "run_in_colab.ipynb", ".gitignore", "course/tests/conftest.py", "course/tests/test_handout.py",
         "course/tests/checks.py", "course/tests/probes.py"]
HANDOUT_FILES = ["lora.py", "model.py", "dataloader.py", "train.py", "generate.py"]  # what a student submits
BEGIN = re.compile(r"^(\s*)# BEGIN SOLUTION (.+?)\s*$")
STUB = re.compile(r"^\s*# STUB: ?(.*)$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
LEFTOVER = re.compile(r"BEGIN SOLUTION|END SOLUTION|# STUB:")


def strip_solutions(text, where="text"):
    """text with every solution region replaced by its stub; a ValueError for a region left open or unopened."""
    out, region = [], None
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        begin = BEGIN.match(line)
        if begin:
            if region is not None:
                raise ValueError(f"{where}, line {n}: BEGIN SOLUTION inside the region of line {region[0]}")
            region = (n, begin.group(1))
        elif END.match(line):
            if region is None:
                raise ValueError(f"{where}, line {n}: END SOLUTION without BEGIN SOLUTION")
            region = None
        elif region is not None:
            stub = STUB.match(line)
            if stub:
                out.append((region[1] + stub.group(1)).rstrip() + "\n")
        else:
            out.append(line)
    if region is not None:
        raise ValueError(f"{where}, line {region[0]}: BEGIN SOLUTION without END SOLUTION")
    return "".join(out)


def tasks(text):
    """The task names of text's solution regions, in order of first appearance."""
    names = [m.group(2) for m in map(BEGIN.match, text.splitlines()) if m]
    return list(dict.fromkeys(names))


def write_starter(dest, root=ROOT, tests=True):
    """The starter in dest (a folder that must not exist yet): FILES with their solutions stripped, and
    README.md for students; without the handout tests unless tests (a grader's worker gets none)."""
    os.makedirs(dest)
    for name in FILES if tests else [f for f in FILES if not f.startswith("course/tests/")]:
        src, out = os.path.join(root, name), os.path.join(dest, name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if name.endswith(".py"):
            with open(src, encoding="utf-8") as f:
                text = strip_solutions(f.read(), name)
            if LEFTOVER.search(text):
                raise ValueError(f"{name}: a solution marker is left in the starter")
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copyfile(src, out)
    shutil.copyfile(os.path.join(root, "course", "STUDENT_README.md"), os.path.join(dest, "README.md"))
    with open(os.path.join(dest, "pytest.ini"), "w") as f:
        f.write("[pytest]\ntestpaths = course/tests\naddopts = -p no:cacheprovider\n")

"""
course/grade.py against hostile submissions: each attack is added to the bare starter's lora.py, which
earns nothing, so anything above zero is a forged score. The grader runs from a private copy of the
repository (as run_autograder's chmod makes /autograder/source), as root with its workers unprivileged;
after it: the score is zero, the repository, HOME and results.json are as they were, no process of the
submission is alive. Also: the inputs checked first, Gradescope's fields, a hang's cost, the package.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, cli

MARK = "hostile-submission-marker"
COPY = ["lora.py", "model.py", "dataloader.py", "train.py", "generate.py", "configurator.py", "sweep.py", "export.py",
        "requirements.txt", "requirements-dev.txt", "run_in_colab.ipynb", ".gitignore", "configs", "lorakit", "course",
        "bench"]


def _isolation():
    """Why the workers cannot have a user of their own here, or None: it needs root (as on Gradescope and CI) and a
    Python that user can run (not one under /root)."""
    if os.geteuid() != 0:
        return "the workers' own user needs root"
    sys.path[:0] = [str(ROOT / "course"), str(ROOT / "course" / "tests")]
    import grade
    drop, notes = grade.privileges()
    return None if drop else notes[0]


root_only = pytest.mark.skipif(_isolation() is not None, reason=str(_isolation()))


def digest(folder):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(path.encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A private copy of the repository (its grader), the bare starter, and a HOME with a file to keep."""
    base = tmp_path_factory.mktemp("grader")
    os.chmod(base, 0o700)
    repo = base / "repo"
    repo.mkdir()
    for name in COPY:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copyfile)(ROOT / name, repo / name)
    home = base / "home"
    home.mkdir()
    (home / "important.txt").write_text("keep me")
    code, _, err = cli(str(repo / "course/make_starter.py"), f"--out_dir={base / 'starter'}")
    assert code == 0, err
    return dict(base=base, repo=repo, home=home, starter=base / "starter")


def grade(s, submission, *flags, timeout=600):
    results = s["base"] / "results.json"
    env = dict(os.environ, HOME=str(s["home"]))
    code, out, err = cli(str(s["repo"] / "course/grade.py"), f"--submission={submission}", f"--results={results}",
                         *flags, env=env, timeout=timeout)
    assert code == 0, err
    return json.loads(results.read_text()), out, results


def hostile(s, name, attack):
    """A submission folder: the bare starter's lora.py with attack run at its import."""
    sub = s["base"] / name
    sub.mkdir()
    (sub / "lora.py").write_text((s["starter"] / "lora.py").read_text() + "\n" + attack)
    return sub


def alive():
    """Processes whose command line carries the attack's marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if MARK.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


# Every attack of the issue at once, at import: each worker that imports lora.py runs them all, then dies.
ATTACKS = r'''
import atexit, glob, os, subprocess, sys, time
MARK, HOME, LEFT, REPO = "@MARK@", "@HOME@", "@LEFT@", "@REPO@"

def places():
    """Folders the grader may live in: ours, our parents', what /proc tells of the grader."""
    out = {os.getcwd(), os.path.dirname(os.getcwd())}
    for pid in (os.getppid(), 1):
        for what in ("cwd", "root"):
            try:
                out.add(os.readlink(f"/proc/{pid}/{what}"))
            except OSError:
                pass
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                for arg in f.read().split(b"\0"):
                    arg = arg.decode(errors="ignore").split("=", 1)[-1]
                    if arg.endswith(".py"):
                        out.add(os.path.dirname(os.path.dirname(arg)))
        except OSError:
            pass
    return [p for p in out | {REPO} if p]

def write(path, text, mode="a"):
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError:
        pass

PASS = "\ndef pytest_runtest_makereport(item, call):\n    call.excinfo = None\n"
for place in places():
    for name in ("course/tests/test_handout.py", "course/tests/checks.py", "course/hidden_checks.py"):
        write(os.path.join(place, name), "\nassert True\n", "w")  # rewrite the tests
    write(os.path.join(place, "course/tests/conftest.py"), PASS)  # a pass-everything hook
    write(os.path.join(place, "conftest.py"), PASS)
    try:  # read the solution and run it
        if os.path.realpath(place) != os.path.realpath(os.getcwd()):  # not this file itself
            exec(open(os.path.join(place, "lora.py")).read(), globals())
    except Exception:
        pass
try:  # pytest's reporters and runner
    import _pytest.junitxml, _pytest.python
    _pytest.junitxml._NodeReporter.append_failure = lambda *a: None
    _pytest.python.Function.runtest = lambda self: None
except Exception:
    pass
atexit.register(write, ".report.xml", '<testsuite><testcase name="x"/></testsuite>', "w")
write(os.path.join(os.path.expanduser("~"), "pwned"), "pwned")
write(os.path.join(HOME, "pwned"), "pwned")
for target in (os.path.join(os.path.expanduser("~"), "important.txt"), os.path.join(HOME, "important.txt")):
    try:
        os.remove(target)
    except OSError:
        pass
results = [a.split("=", 1)[1] for a in open(f"/proc/{os.getppid()}/cmdline").read().split("\0") if a.startswith("--results=")]
forged = '{"score": 99, "tests": []}'
daemon = (f"import os, sys, time\nif os.fork(): sys.exit()\nos.setsid()\nif os.fork(): sys.exit()\n"
          f"for _ in range(600):\n    time.sleep(0.1)\n    [open(p, 'w').write({forged!r}) for p in {results!r}]\n"
          f"    open({LEFT!r}, 'a').write('x')\n")
subprocess.Popen([sys.executable, "-c", daemon, MARK], start_new_session=True)  # outlives its parent, forges results
if os.fork() == 0:  # a child that keeps writing
    os.execv(sys.executable, [sys.executable, "-c", f"import time\nwhile True:\n    open({LEFT!r}, 'a').write('y')\n    time.sleep(0.1)", MARK])
'''
# ... and the grading cut short at import, after the tests were rewritten (a re-run would read them)
EXIT = ATTACKS.split("try:  # pytest's")[0] + "os._exit(1)\n"


@root_only
def test_every_attack_scores_zero_and_leaves_nothing_behind(setup):
    s = setup
    shared = tempfile.mkdtemp(prefix="attack-")
    os.chmod(shared, 0o777)  # the workers may write here: what they write after the grading must not change
    left = pathlib.Path(shared) / "left-behind"
    before = digest(s["repo"])
    for name, attack, tasks in (("everything", ATTACKS, []), ("exit", EXIT, ["--tasks=LoRALinear.forward"])):
        sub = hostile(s, name, attack.replace("@MARK@", MARK).replace("@HOME@", str(s["home"]))
                      .replace("@LEFT@", str(left)).replace("@REPO@", str(s["repo"])))
        result, out, results = grade(s, sub, *tasks)
        assert "isolation not given" not in result["output"], result["output"]
        assert result["score"] == 0, out
    time.sleep(2)  # a survivor would forge results.json or write on now
    assert json.loads(results.read_text())["score"] == 0
    assert alive() == [], "a process of the submission outlived its grading"
    size = left.stat().st_size if left.exists() else 0
    time.sleep(1)
    assert (left.stat().st_size if left.exists() else 0) == size
    assert digest(s["repo"]) == before, "the submission changed the grader's repository"
    assert sorted(os.listdir(s["home"])) == ["important.txt"]  # (an unchanged grader grades later ones as before)
    shutil.rmtree(shared)


@root_only
def test_links_to_the_solution_are_refused_and_graded_as_missing(setup):
    s = setup
    sub = s["base"] / "links"
    sub.mkdir()
    for name in ("lora.py", "model.py", "dataloader.py", "train.py", "generate.py"):
        os.symlink(ROOT / name, sub / name)
    result, out, _ = grade(s, sub, "--tasks=LoRALinear.__init__")
    assert result["score"] == 0 and out.count("is a symbolic link") == 5
    assert "lora.py refused: is a symbolic link" in result["output"]


def test_a_hang_costs_one_timeout_per_task_within_the_budget(setup):
    s = setup
    sub = hostile(setup, "hang", "while True:\n    pass\n")
    t0 = time.time()
    result, _, _ = grade(s, sub, "--timeout=3", "--budget=7")
    took = time.time() - t0
    outputs = {r["output"] for r in result["tests"]}
    assert result["score"] == 0 and "timed out after 3 s" in outputs
    assert "not run: the grading's time budget ran out" in outputs
    assert took < 7 + 30, took  # the budget, plus making the files and starting Python


def test_the_inputs_are_checked_before_any_grading(setup, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lora.py").write_text("")
    for flag, message in ((f"--results={tmp_path}", "is a folder"),
                          (f"--results={tmp_path / 'nowhere' / 'r.json'}", "cannot be written"),
                          ("--submission=~/no-such-folder", "must be a folder"),
                          ("--tasks=LoRALinear.merge", "is no TODO of the handout")):
        args = [f"--submission={tmp_path / 'sub'}", f"--results={tmp_path / 'r.json'}", flag]
        code, _, err = cli(str(setup["repo"] / "course/grade.py"), *args)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.json").exists()


def gradescopes(result, full):
    """The fields Gradescope reads, and full marks (35: 28 public, 7 hidden) or none."""
    assert {"score", "execution_time", "output", "output_format", "visibility", "stdout_visibility", "tests"} <= set(result)
    assert result["score"] == (35 if full else 0)
    assert sum(t["max_score"] for t in result["tests"]) == pytest.approx(35, abs=1e-3)
    for i, t in enumerate(result["tests"], 1):
        assert set(t) == {"name", "number", "score", "max_score", "status", "output", "visibility"}
        assert t["number"] == str(i) and t["status"] == ("passed" if full else "failed")
        assert t["visibility"] in ("visible", "after_published")
    assert sum(t["max_score"] for t in result["tests"] if t["visibility"] == "after_published") == pytest.approx(7)


def test_the_autograder_package_grades_the_solution_and_the_starter(setup, tmp_path):
    s = setup
    code, _, err = cli(str(s["repo"] / "course/make_autograder.py"), f"--out_dir={tmp_path / 'pkg'}")
    assert code == 0, err
    assert (tmp_path / "pkg" / "autograder.zip").is_file()
    for name, source, full in (("solution", ROOT, True), ("starter", s["starter"], False)):
        fake = tmp_path / name
        shutil.copytree(tmp_path / "pkg" / "autograder" / "source", fake / "source")
        shutil.copytree(source, fake / "submission", ignore=shutil.ignore_patterns(".venv", ".git", "docs", "bench"))
        env = dict(os.environ, AUTOGRADER_ROOT=str(fake))
        p = subprocess.run(["bash", str(fake / "source" / "run_autograder")], env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        gradescopes(json.loads((fake / "results" / "results.json").read_text()), full)

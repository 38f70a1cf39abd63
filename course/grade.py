"""
Grade a submission (any of lora.py, model.py, dataloader.py, train.py, generate.py in a folder) and
write Gradescope's results.json:

    python course/grade.py --submission=DIR --results=results.json

The grader trusts nothing a submission can touch. The submission's code runs only in worker processes
(course/worker.py), one per TODO, in a folder holding the starter, the submission's files, the probes
and the small files they read, never the checks or the solution; a worker returns values (tensors,
numbers, strings) and this process, which never imports submitted code, judges them against inputs it
drew from a secret seed. Each worker is killed with everything it started once its TODO is done. As root
(Gradescope, CI) a worker also runs as an unprivileged user of its own, owning only its folder, with
limits on memory, processes, file size and time; without root, the grader says what it could not give.
"""

import concurrent.futures
import ctypes
import json
import os
import queue
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(HERE, "tests")]

from configurator import ConfigError, configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)

import torch  # noqa: E402

import checks  # noqa: E402
from lorakit.common import WriteError, write_json  # noqa: E402
from starter import HANDOUT_FILES, write_starter  # noqa: E402
from worker import decode, encode  # noqa: E402

# -----------------------------------------------------------------------------
submission = ''  # a folder holding the student's handout files
results = 'results.json'  # where Gradescope's results go
timeout = 120  # seconds one TODO's tests may take
budget = 600  # seconds the whole grading may take (Gradescope's default limit); a result is always written
memory_mb = 768  # each worker's memory (Gradescope's default)
tasks = ''  # the TODOs to grade, comma-separated (as the table names them); '': every one
parallel = 2  # workers side by side (as root: each its own user); Gradescope's machines have 2 CPUs
# -----------------------------------------------------------------------------
OUTPUT_LIMIT = 2000  # characters of a test's output kept in results.json
READ_LIMIT = 16 << 20  # bytes of a worker's answers read at most
FILE_LIMIT = 64 << 20  # bytes a worker may write to one file
PROCESSES = 512  # processes and threads of the worker's user (torch starts threads)
MODEL_PROBES = ("build_model", "accuracy")  # the probes that read the tiny models
WORKER_UID = 61000 + os.getpid() % 4000  # as root: an unprivileged user no one else is


def hidden_tests():
    """The hidden tier, where the grader has it (Gradescope's package, this repository)."""
    try:
        import hidden_checks
    except ImportError:
        return [], {}
    return hidden_checks.TESTS, hidden_checks.ANSWERS


# --- the inputs, checked before anything is graded ------------------------------------------------------

def check_inputs(c):
    """(submission folder, results path, [handout files it holds], {handout file: why it is refused}), or a
    ConfigError."""
    folder = os.path.abspath(os.path.expanduser(c.submission)) if c.submission else ''
    if not folder or not os.path.isdir(folder):
        raise ConfigError(f"submission must be a folder holding the handout files, not {c.submission!r}")
    out = os.path.abspath(os.path.expanduser(c.results))
    if os.path.isdir(out):
        raise ConfigError(f"results {c.results} is a folder: name a file, e.g. --results={os.path.join(c.results, 'results.json')}")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"results {c.results} cannot be written: {parent} is not a folder this user can write to")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise ConfigError(f"results {c.results} cannot be written: the file is read-only")
    for name, value in (("timeout", c.timeout), ("budget", c.budget), ("memory_mb", c.memory_mb)):
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, not {value}")
    unknown = [t for t in chosen_tasks(c) if t not in checks.TASKS]
    if unknown:
        raise ConfigError(f"tasks: {unknown[0]!r} is no TODO of the handout; they are: {', '.join(checks.TASKS)}")
    refused, present = {}, []
    for name in HANDOUT_FILES:
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            refused[name] = "is a symbolic link: submit the file itself"
        elif not stat.S_ISREG(mode):
            refused[name] = "is not a regular file"
        else:
            present.append(name)
    if not present and not refused:
        raise ConfigError(f"{c.submission} holds none of {', '.join(HANDOUT_FILES)}")
    for name, why in refused.items():
        print(f"refused: {name} {why}; graded as missing")
    return folder, out, present, refused


def chosen_tasks(c):
    return [t.strip() for t in c.tasks.split(",") if t.strip()] or list(checks.TASKS)


def read_regular(path):
    """The bytes of a regular file, never through a link (it may have changed since it was checked)."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


# --- the worker's folder and process --------------------------------------------------------------------

def make_sandbox(work, folder, present, answers, models=True):
    """The worker's folder: the starter without its tests, the submission's handout files, probes.py, worker.py
    and the files the tests read; and the files' paths, relative to the folder."""
    sandbox = os.path.join(work, "sandbox")
    write_starter(sandbox, tests=False)
    for name in present:
        with open(os.path.join(sandbox, name), "wb") as f:
            f.write(read_regular(os.path.join(folder, name)))
    for name in ("worker.py", "tests/probes.py"):
        shutil.copyfile(os.path.join(HERE, name), os.path.join(sandbox, os.path.basename(name)))
    files = checks.make_files(os.path.join(sandbox, "files"), {**checks.ANSWERS, **answers}, models)
    return sandbox, {k: os.path.relpath(v, sandbox) for k, v in files.items()}  # a worker's folder is its cwd


def privileges():
    """(drop to WORKER_UID, [what isolation is missing]): as root, when that user can run this Python."""
    if os.geteuid() != 0:
        return False, ["not root: the workers run as this user, so they can read what it reads and write where it "
                       "writes (a container, or running as root, gives them a user of their own)"]
    code = (f"import importlib.util, os, sys; importlib.util.find_spec('torch').loader.get_data(importlib.util."
            f"find_spec('torch').origin); sys.exit(3 if os.access({os.path.join(ROOT, 'course')!r}, os.R_OK) else 0)")
    try:
        status = subprocess.run([sys.executable, "-c", code], preexec_fn=lambda: drop(WORKER_UID), cwd="/",
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    except OSError:
        status = 1
    if status not in (0, 3):
        return False, [f"the unprivileged worker user cannot run {sys.executable} with torch (it lies where only root "
                       f"can read); install Python where every user can run it, as Gradescope does"]
    return True, [f"the workers can read {ROOT}: make it private (chmod o-rx), as run_autograder does"] * (status == 3)


def drop(uid):
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def memory_cgroup(limit, name):
    """A memory cgroup of limit bytes for a slot's workers (as root, cgroup v1 or v2), or None where none can be made."""
    if os.geteuid() != 0:
        return None
    for base, files in (("/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")),
                        ("/sys/fs/cgroup", ("memory.max", "memory.swap.max"))):
        path = os.path.join(base, f"lora-grade-{os.getpid()}-{name}")
        try:
            os.mkdir(path)
        except OSError:
            continue
        if not os.path.exists(os.path.join(path, files[0])):  # a folder, not a cgroup with a memory controller
            os.rmdir(path)
            continue
        try:
            with open(os.path.join(path, files[0]), "w") as f:
                f.write(str(limit))
            if os.path.exists(os.path.join(path, files[1])):  # no swap beyond it
                with open(os.path.join(path, files[1]), "w") as f:
                    f.write(str(limit) if "memsw" in files[1] else "0")
            return path
        except OSError:
            os.rmdir(path)
    return None


def limits(uid, memory, cgroup):
    """The worker's limits, set in the child before it runs anything: its resident memory in a cgroup where there
    is one, else its address space (a few times the memory: torch and Arrow reserve far more than they use)."""
    def apply():
        os.setsid()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (4 * memory, 4 * memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if uid is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (PROCESSES, PROCESSES))
            drop(uid)
    return apply


def processes():
    """{pid: (parent pid, uid)} of every live process (not the dead ones waiting to be reaped)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
                if state not in "ZX":
                    out[int(name)] = (int(ppid), os.stat(f"/proc/{name}").st_uid)
            except (OSError, ValueError, IndexError):
                pass
    return out


def kill_all(uid, cgroup=None):
    """Killed until none is left: as root every process of the worker's user and cgroup; without root every
    descendant of this grader (its subreaper: orphans come back to it)."""
    me = os.getpid()
    for _ in range(100):
        table = processes()
        ours = {pid for pid, (_, owner) in table.items() if uid is not None and owner == uid}
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs")) as f:
                ours |= {int(pid) for pid in f.read().split()}
        if uid is None:
            for pid in table:
                p, seen = pid, set()
                while p in table and p not in seen and p != me:
                    seen.add(p)
                    p = table[p][0]
                if p == me and pid != me:
                    ours.add(pid)
        if not ours:
            break
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap what came back to us
                pass
        except ChildProcessError:
            pass
        time.sleep(0.05)


def become_subreaper():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def run_worker(slot, requests, seconds, memory):
    """{request id: ('value', value) or ('error', text)} of one worker over these requests in a slot, why an answer
    may be missing, and what the worker printed."""
    sandbox, uid, cgroup = slot.sandbox, slot.uid, slot.cgroup
    read_end, write_end = os.pipe()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": sandbox, "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ANSWER_FD": str(write_end),
           "ARROW_DEFAULT_MEMORY_POOL": "system"}
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        env["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
    chunks, size = [], [0]

    def reader():
        with os.fdopen(read_end, "rb") as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    return
                if size[0] < READ_LIMIT:
                    chunks.append(chunk)
                size[0] += len(chunk)

    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen([sys.executable, "worker.py"], cwd=sandbox, env=env, stdin=subprocess.PIPE,
                                stdout=output, stderr=output, pass_fds=(write_end,), preexec_fn=limits(uid, memory, cgroup),
                                close_fds=True)
        os.close(write_end)
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        timed_out = False
        try:
            proc.stdin.write(json.dumps(requests).encode())
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        kill_all(uid, cgroup)
        proc.wait()
        thread.join(timeout=5)
        output.seek(0)
        printed = output.read(OUTPUT_LIMIT).decode(errors="replace")
    answers = {}
    for line in b"".join(chunks)[:READ_LIMIT].decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
            rid = record["id"]
            answers.setdefault(rid, ("value", decode(record["value"])) if "value" in record
                               else ("error", str(record["error"])))
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError):
            continue  # not an answer: whatever else came down the pipe
    why = f"timed out after {seconds:.0f} s" if timed_out else "the worker ended before answering"
    return answers, why, printed


# --- grading --------------------------------------------------------------------------------------------

class Slot:
    """Where one worker runs: its folder, and as root its user and its memory cgroup. Workers of different slots
    run side by side, each killed by its user and cgroup; without root there is one slot, whose workers are
    killed as the grader's descendants."""

    def __init__(self, sandbox, uid, memory, n):
        self.sandbox, self.uid, self.cgroup = sandbox, uid, memory_cgroup(memory, n)
        if uid is not None:
            for dirpath, dirnames, filenames in os.walk(sandbox):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.lchown(name, uid, uid)

    def close(self):
        kill_all(self.uid, self.cgroup)
        if self.cgroup:
            for _ in range(50):  # the last killed process leaves the cgroup a moment after it dies
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)


def grade(folder, present, refused, c):
    """Gradescope's results dict for a submission folder."""
    t0 = time.time()
    become_subreaper()
    hidden, answers = hidden_tests()
    chosen = chosen_tasks(c)
    tests = [t for t in list(checks.TESTS) + list(hidden) if t.task in chosen]
    g = torch.Generator().manual_seed(secrets.randbits(62))  # inputs no submission can know in advance
    drop_to, notes = privileges()
    work, slots = tempfile.mkdtemp(prefix="grade-"), []
    try:
        os.chmod(work, 0o711)
        # the tiny models only where a chosen TODO's tests read them
        sandbox, files = make_sandbox(work, folder, present, answers, any(t.probe in MODEL_PROBES for t in tests))
        inputs = [t.inputs(g, files) for t in tests]
        for n in range(c.parallel if drop_to else 1):
            copy = sandbox if n == 0 else shutil.copytree(sandbox, f"{sandbox}-{n}", symlinks=True)
            slots.append(Slot(copy, WORKER_UID + n if drop_to else None, c.memory_mb << 20, n))
        if slots[0].cgroup is None:
            notes.append(f"no memory cgroup: a worker's address space is limited to {4 * c.memory_mb} MB, not its "
                         f"resident memory to {c.memory_mb} MB")
        free, outcome = queue.Queue(), {}
        for slot in slots:
            free.put(slot)

        def run(task):
            ids = [k for k, t in enumerate(tests) if t.task == task]
            slot, left = free.get(), c.budget - (time.time() - t0)
            try:
                if left < 1:
                    return {k: (False, "not run: the grading's time budget ran out") for k in ids}
                requests = [dict(id=k, probe=tests[k].probe, inputs=encode(inputs[k])) for k in ids]
                got, why, printed = run_worker(slot, requests, min(c.timeout, left), c.memory_mb << 20)
                return {k: judge(tests[k], inputs[k], got.get(k), why, printed) for k in ids}
            finally:
                free.put(slot)

        with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
            for result in pool.map(run, chosen):
                outcome.update(result)
        rows = []
        for task in chosen:
            for tier, points in ((False, checks.TASKS[task]), (True, checks.HIDDEN.get(task, 0))):
                ids = [k for k, t in enumerate(tests) if t.task == task and t.hidden == tier]
                for k in ids:
                    passed, why = outcome[k]
                    share = points / len(ids)
                    rows.append(dict(name=f"{task}: {tests[k].name}", number=str(len(rows) + 1),
                                     score=round(share if passed else 0.0, 4), max_score=round(share, 4),
                                     status="passed" if passed else "failed", output=why[:OUTPUT_LIMIT],
                                     visibility="after_published" if tier else "visible"))
    finally:
        for slot in slots:
            slot.close()
        kill_all(None)
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"isolation not given: {n}" for n in notes]
    lines += [f"{name} refused: {why}" for name, why in refused.items()]
    return dict(score=round(sum(r["score"] for r in rows), 2), execution_time=round(time.time() - t0, 1),
                output="\n".join(lines) or "graded in isolated workers", output_format="text",
                visibility="visible", stdout_visibility="hidden", tests=rows)


def judge(test, inputs, answer, why, printed):
    """(passed, what to fix) of one test from its worker's answer, judged here."""
    if answer is None:
        return False, why + (f"; it printed: {printed[-500:]}" if printed.strip() else "")
    kind, value = answer
    if kind == "error":
        return False, value
    try:
        test.check(inputs, value)
    except AssertionError as e:
        return False, str(e).strip().splitlines()[0] if str(e).strip() else "a check failed"
    except Exception as e:  # a value of the wrong kind (a string where a tensor was due, a missing key)
        return False, f"the value returned does not fit the test: {type(e).__name__}: {e}"
    return True, ""


def main(argv):
    c = configure(settings_of(globals()), argv)
    folder, out, present, refused = check_inputs(c)
    result = grade(folder, present, refused, c)
    width = max(len(r["name"]) for r in result["tests"])
    for r in result["tests"]:
        status = "ok" if r["status"] == "passed" else (r["output"].splitlines() or [""])[0][:100]
        print(f"{r['name']:<{width}}  {r['score']:>5.2f} / {r['max_score']:<5.2f}  {status}")
    total = sum(r["max_score"] for r in result["tests"])
    print(f"score: {result['score']:.2f} / {total:.2f} ({result['execution_time']:.0f} s)")
    for line in result["output"].splitlines():
        if line.startswith("isolation not given"):
            print(line)
    try:
        write_json(result, out)
    except WriteError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], __file__))

"""
Faults a user, a scheduler, a full disk or a second process can cause, tried on the command line of
train.py, generate.py, export.py and sweep.py: each case's exit status, last line and verdict.

    python bench/faults.py                              # this checkout; the table goes to out-bench/
    python bench/faults.py --repo=/path/to/other/clone --out_dir=out-bench/other   # another version

A case is clean when the command keeps the README's promises: bad input gets one line `error: ...`
and a non-zero exit with nothing written, a signal saves and says so, a full disk leaves the old
file and no temporary, a second command on a held folder refuses, nothing is overwritten without
being asked to. The model is a random 2-layer GPT-2 and the data a few made-up reviews, so the run
takes a few minutes on a CPU; tiktoken's GPT-2 encoding must be reachable (TIKTOKEN_CACHE_DIR).
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "tests"))

from configurator import configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)
from lorakit.common import write_json  # noqa: E402

# -----------------------------------------------------------------------------
repo = HERE  # the checkout whose scripts are tried
out_dir = 'out-bench'  # where faults.json and faults.md go
only = ''  # run only the cases whose family or name contains this
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())

CASES = []


def case(family, name):
    def add(f):
        CASES.append((family, name, f))
        return f
    return add


class Result:
    def __init__(self, command, status, out, err):
        self.command, self.status, self.out, self.err = command, status, out, err
        lines = [line for line in (err or out).splitlines() if line.strip()]
        self.last = lines[-1].strip() if lines else ""
        self.traceback = "Traceback" in out + err

    def error_line(self, status=2):
        """The promised refusal: exit status, one line `error: ...`, no traceback."""
        return self.status == status and self.last.startswith("error:") and not self.traceback


class Env:
    """The shared inputs: a tiny model, made-up reviews, a finished LoRA run and a full run."""

    def __init__(self, repo, work):
        from conftest import save_random_hf_gpt2, write_reviews
        self.repo, self.work = repo, work
        self.base = os.path.join(work, "base")
        save_random_hf_gpt2(self.base)
        self.data = write_reviews(Path(work, "reviews"))
        self.long_data = write_reviews(Path(work, "long"), n_test=3000)
        self.lora = os.path.join(work, "lora-run")
        self.full = os.path.join(work, "full-run")
        for run, rank in ((self.lora, 4), (self.full, 0)):
            r = self.cli("train.py", *self.flags(run, f"--rank={rank}", "--max_iters=4", "--eval_interval=2"))
            assert r.status == 0, r.out + r.err

    def flags(self, out_dir, *more):
        return [f"--init_from={self.base}", f"--dataset={self.data}", f"--out_dir={out_dir}", "--device=cpu",
                "--batch_size=4", "--eval_iters=1", "--rank=4", "--alpha=8", *more]

    def cli(self, script, *args, limit_bytes=None, timeout=180, home=None):
        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
        command = " ".join([script, *(a.replace(self.work + "/", "") for a in args)])
        try:
            p = subprocess.run([sys.executable, script, *args], cwd=self.repo, capture_output=True, text=True,
                               timeout=timeout, preexec_fn=limit if limit_bytes else None,
                               env=dict(os.environ, HOME=home) if home else None)
        except subprocess.TimeoutExpired as e:  # its output comes as bytes, whatever text= said
            text = [t.decode(errors="replace") if isinstance(t, bytes) else t or "" for t in (e.stdout, e.stderr)]
            return Result(command, "timeout", *text)
        return Result(command, p.returncode, p.stdout, p.stderr)

    def start(self, script, *args, wait_for="iter 2:"):
        """A running command, once it has printed a line starting with wait_for."""
        p = subprocess.Popen([sys.executable, script, *args], cwd=self.repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.startswith(wait_for):
                break
        p.seen = seen
        return p

    def copy(self, run, w):
        dest = os.path.join(w, "run")
        shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
        return dest


def stopped(p, sig, command, timeout=120):
    p.send_signal(sig)
    try:
        out = p.stdout.read()
        status = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return Result(command, "timeout", "", "")
    return Result(command, status if status >= 0 else f"killed ({signal.Signals(-status).name})",
                  "".join(p.seen) + out, "")


def leftovers(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n] if os.path.isdir(folder) else []


def ckpt_iter(path):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["iter_num"]
    except Exception:
        return None


def same_bytes(path, before):
    return os.path.exists(path) and open(path, "rb").read() == before


# --- signals -------------------------------------------------------------------------------------

def signal_training(e, w, sig, rank=4):
    run = os.path.join(w, "run")
    p = e.start("train.py", *e.flags(run, f"--rank={rank}", "--max_iters=100000", "--eval_interval=100000",
                                      "--log_interval=1"))
    r = stopped(p, sig, f"train.py --rank={rank} ... then {signal.Signals(sig).name} at iteration 2")
    it = ckpt_iter(os.path.join(run, "ckpt.pt"))
    ok = (r.status == 128 + sig and not r.traceback and it is not None and it >= 3
          and "interrupted" in r.last and not leftovers(run))
    return r, ok


for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    case("signals", f"{_sig.name} during LoRA training saves and exits {128 + _sig}")(
        lambda e, w, s=_sig: signal_training(e, w, s))
case("signals", "SIGTERM during full fine-tuning saves and exits 143")(
    lambda e, w: signal_training(e, w, signal.SIGTERM, rank=0))


@case("signals", "two Ctrl-C a moment apart: no traceback, last checkpoint kept")
def _(e, w):
    run = os.path.join(w, "run")
    p = e.start("train.py", *e.flags(run, "--rank=0", "--max_iters=100000", "--eval_interval=1", "--log_interval=1"))
    p.send_signal(signal.SIGINT)
    time.sleep(0.01)
    r = stopped(p, signal.SIGINT, "train.py --rank=0 --eval_interval=1, then SIGINT twice")
    return r, r.status == 130 and not r.traceback and ckpt_iter(os.path.join(run, "ckpt.pt")) is not None


@case("signals", "SIGTERM, then resume continues from the saved iteration")
def _(e, w):
    run = os.path.join(w, "run")
    p = e.start("train.py", *e.flags(run, "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"))
    stopped(p, signal.SIGTERM, "")
    saved = ckpt_iter(os.path.join(run, "ckpt.pt"))
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", f"--max_iters={(saved or 0) + 2}"))
    return r, saved is not None and r.status == 0 and ckpt_iter(os.path.join(run, "ckpt.pt")) == saved + 2


@case("signals", "SIGKILL mid-run leaves a loadable checkpoint")
def _(e, w):
    run = os.path.join(w, "run")
    p = e.start("train.py", *e.flags(run, "--rank=0", "--max_iters=100000", "--eval_interval=1"), wait_for="iter 3")
    r = stopped(p, signal.SIGKILL, "train.py --rank=0 --eval_interval=1, then SIGKILL")
    return r, ckpt_iter(os.path.join(run, "ckpt.pt")) is not None


@case("signals", "SIGTERM during generate.py's evaluation: one line, no results half-written")
def _(e, w):
    out = os.path.join(w, "gen")
    p = e.start("generate.py", f"--init_from={e.base}", f"--dataset={e.long_data}", f"--out_dir={out}",
                "--device=cpu", wait_for="evaluating")
    time.sleep(2)
    r = stopped(p, signal.SIGTERM, "generate.py on 3000 reviews, then SIGTERM")
    return r, (r.status == 143 and not r.traceback and "interrupted" in r.last
               and not os.path.exists(os.path.join(out, "results.json")))


@case("signals", "SIGTERM to sweep.py: its training run stops too, no traceback")
def _(e, w):
    out = os.path.join(w, "sweep")
    p = e.start("sweep.py", f"--init_from={e.base}", f"--dataset={e.data}", f"--out_dir={out}", "--device=cpu",
                "--batch_size=4", "--eval_iters=1", "--ranks=4", "--full_finetune=False", "--zero_shot=False",
                "--few_shot=False", "--max_iters=100000", "--eval_interval=100000", "--train_args=--log_interval=1",
                wait_for="lora")  # "lora-r4...: running (output in ...)"
    time.sleep(8)  # the training run is under way
    r = stopped(p, signal.SIGTERM, "sweep.py --ranks=4 --full_finetune=False ..., then SIGTERM")
    time.sleep(1)
    alive = subprocess.run(["pgrep", "-f", out], capture_output=True).returncode == 0
    subprocess.run(["pkill", "-9", "-f", out])  # a child left running would slow every later case
    return r, r.status == 143 and not r.traceback and not alive


# --- storage -------------------------------------------------------------------------------------

@case("storage", "full disk while saving a new checkpoint: one line, no temporary")
def _(e, w):
    run = os.path.join(w, "run")
    r = e.cli("train.py", *e.flags(run, "--rank=0", "--max_iters=2", "--eval_interval=1"), limit_bytes=2 ** 20)
    return r, r.error_line(1) and "ckpt.pt" in r.last and not leftovers(run)


@case("storage", "full disk while replacing a checkpoint: the old one intact")
def _(e, w):
    run = e.copy(e.full, w)
    before = open(os.path.join(run, "ckpt.pt"), "rb").read()
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--rank=0", "--max_iters=6", "--eval_interval=2"),
              limit_bytes=2 ** 20)
    return r, r.error_line(1) and same_bytes(os.path.join(run, "ckpt.pt"), before) and not leftovers(run)


@case("storage", "full disk during a transformers export: one line, no partial model")
def _(e, w):
    run = e.copy(e.full, w)
    r = e.cli("export.py", f"--out_dir={run}", "--format=hf", limit_bytes=2 ** 20)
    hf = os.path.join(run, "hf")
    return r, r.error_line(1) and not leftovers(hf) and not os.path.exists(os.path.join(hf, "model.safetensors"))


@case("storage", "a disk too full for even the smallest file: one line")
def _(e, w):
    r = e.cli("train.py", *e.flags(os.path.join(w, "run"), "--max_iters=2"), limit_bytes=64)
    return r, r.status in (1, 2) and r.last.startswith("error:") and not r.traceback


for _name in ("ckpt.pt.tmp", "run.json.tmp", "loss_curve.png.tmp", "metrics.jsonl.tmp"):
    @case("storage", f"a symlink planted at {_name} does not redirect the write")
    def _(e, w, name=_name):
        run = e.copy(e.lora, w)
        victim = os.path.join(w, "victim")
        open(victim, "wb").write(b"precious")
        os.symlink(victim, os.path.join(run, name))
        r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=6", "--eval_interval=2"))
        return r, r.status == 0 and open(victim, "rb").read() == b"precious"


@case("storage", "a symlink planted at .lock is not written through")
def _(e, w):
    run = e.copy(e.lora, w)
    victim = os.path.join(w, "victim")
    open(victim, "w").write("precious")
    os.symlink(victim, os.path.join(run, ".lock"))
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=6", "--eval_interval=2"))
    return r, not r.traceback and open(victim, "rb").read() == b"precious"


@case("storage", "out_dir under a file: refused at once")
def _(e, w):
    open(os.path.join(w, "file"), "w").write("x")
    r = e.cli("train.py", *e.flags(os.path.join(w, "file", "run"), "--max_iters=2"))
    return r, r.error_line()


# --- two commands, one folder --------------------------------------------------------------------

def while_held(e, w, script, *args, status=2):
    """script run while a training run holds the copy of the LoRA run it is pointed at."""
    run = e.copy(e.lora, w)
    holder = e.start("train.py", *e.flags(run, "--init_from=resume", "--max_iters=100000",
                                          "--eval_interval=100000", "--log_interval=1"), wait_for="iter 5:")
    try:
        r = e.cli(script, *(a.replace("RUN", run) for a in args), timeout=60)
    finally:
        holder.kill()
        holder.wait()
    return r, r.error_line(status)


case("concurrency", "a second train.py on a live run's out_dir refuses")(
    lambda e, w: while_held(e, w, "train.py", *e.flags("RUN", "--init_from=resume", "--max_iters=8")))
case("concurrency", "a second train.py with --overwrite=True refuses")(
    lambda e, w: while_held(e, w, "train.py", *e.flags("RUN", "--overwrite=True", "--max_iters=2")))
case("concurrency", "generate.py on a live run's out_dir refuses")(
    lambda e, w: while_held(e, w, "generate.py", "--out_dir=RUN", f"--dataset={e.data}", "--device=cpu"))
case("concurrency", "export.py from a live run refuses")(
    lambda e, w: while_held(e, w, "export.py", "--out_dir=RUN", "--format=hf"))
case("concurrency", "sweep.py into a live run's out_dir refuses")(
    lambda e, w: while_held(e, w, "sweep.py", f"--init_from={e.base}", f"--dataset={e.data}", "--out_dir=RUN",
                            "--device=cpu", "--ranks=4", "--full_finetune=False", "--max_iters=2"))


@case("concurrency", "a lock left by a killed process is taken over")
def _(e, w):
    run = e.copy(e.lora, w)
    holder = e.start("train.py", *e.flags(run, "--init_from=resume", "--max_iters=100000",
                                          "--eval_interval=100000", "--log_interval=1"), wait_for="iter 5:")
    holder.kill()
    holder.wait()
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=8", "--eval_interval=2"))
    return r, r.status == 0 and ckpt_iter(os.path.join(run, "ckpt.pt")) == 8


@case("concurrency", "a stale .lock naming a dead process is taken over")
def _(e, w):
    run = e.copy(e.lora, w)
    dead = subprocess.Popen(["true"])
    dead.wait()
    json.dump({"pid": dead.pid, "command": "train.py", "since": "earlier"}, open(os.path.join(run, ".lock"), "w"))
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=6", "--eval_interval=2"))
    return r, r.status == 0


# --- a run's logs --------------------------------------------------------------------------------

def damaged_logs(e, w, name, damage):
    run = e.copy(e.lora, w)
    path = os.path.join(run, name)
    text = open(path).read()
    open(path, "w").write(damage(text))
    before = open(os.path.join(run, "run.json"), "rb").read()
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=6", "--eval_interval=2",
                                   "--log_interval=1"))
    if r.status != 0:  # a refusal must leave the run as it was
        return r, r.error_line() and same_bytes(os.path.join(run, "run.json"), before)
    readable = all(json.loads(line) for line in open(path) if line.strip())
    return r, not r.traceback and readable


case("logs", "trailing blank lines in metrics.jsonl")(
    lambda e, w: damaged_logs(e, w, "metrics.jsonl", lambda t: t + "\n\n"))
case("logs", "a torn last line in steps.jsonl")(
    lambda e, w: damaged_logs(e, w, "steps.jsonl", lambda t: t + '{"iter": 4, "lo'))
case("logs", "a garbage line in the middle of metrics.jsonl")(
    lambda e, w: damaged_logs(e, w, "metrics.jsonl", lambda t: t.replace("\n", "\ngarbage\n", 1)))
case("logs", "a torn last line in metrics.jsonl")(
    lambda e, w: damaged_logs(e, w, "metrics.jsonl", lambda t: t + '{"iter": 6, "val'))
case("logs", "an empty steps.jsonl")(
    lambda e, w: damaged_logs(e, w, "steps.jsonl", lambda t: ""))
case("logs", "a JSON value that is not an object in steps.jsonl")(
    lambda e, w: damaged_logs(e, w, "steps.jsonl", lambda t: t + "[1, 2]\n"))


# --- exports -------------------------------------------------------------------------------------

@case("export", "import_peft into a folder holding a run refuses; its ckpt.pt unchanged")
def _(e, w):
    run = e.copy(e.lora, w)
    peft = os.path.join(w, "run-peft")
    assert e.cli("export.py", f"--out_dir={run}", "--format=peft", f"--export_dir={peft}").status == 0
    before = open(os.path.join(run, "ckpt.pt"), "rb").read()
    r = e.cli("export.py", "--format=import_peft", f"--adapter={peft}", f"--out_dir={run}")
    return r, r.error_line() and same_bytes(os.path.join(run, "ckpt.pt"), before)


def export_twice(e, w, fmt, overwrite):
    run = e.copy(e.lora, w)
    first = e.cli("export.py", f"--out_dir={run}", f"--format={fmt}")
    if first.status != 0:
        return first, False
    r = e.cli("export.py", f"--out_dir={run}", f"--format={fmt}", *(["--overwrite=True"] if overwrite else []))
    return r, r.status == 0 if overwrite else r.error_line()


case("export", "a second --format=hf export refuses to replace the first")(lambda e, w: export_twice(e, w, "hf", False))
case("export", "a second --format=peft export refuses to replace the first")(
    lambda e, w: export_twice(e, w, "peft", False))
case("export", "--overwrite=True replaces an export")(lambda e, w: export_twice(e, w, "hf", True))


@case("export", "--format=hf into the run's base model folder refuses, even with --overwrite=True")
def _(e, w):
    base = os.path.join(w, "base")
    shutil.copytree(e.base, base)
    run = os.path.join(w, "run")
    assert e.cli("train.py", *e.flags(run, "--max_iters=2", f"--init_from={base}")).status == 0
    before = open(os.path.join(base, "model.safetensors"), "rb").read()
    r = e.cli("export.py", f"--out_dir={run}", "--format=hf", f"--export_dir={base}", "--overwrite=True")
    return r, r.error_line() and same_bytes(os.path.join(base, "model.safetensors"), before)


@case("export", "import_peft of a folder that is not an adapter: one line")
def _(e, w):
    os.makedirs(os.path.join(w, "junk"))
    open(os.path.join(w, "junk", "adapter_config.json"), "w").write("{not json")
    r = e.cli("export.py", "--format=import_peft", f"--adapter={os.path.join(w, 'junk')}",
              f"--out_dir={os.path.join(w, 'out')}")
    return r, r.error_line() and not os.path.exists(os.path.join(w, "out"))


@case("export", "export of a folder without a run: one line")
def _(e, w):
    r = e.cli("export.py", f"--out_dir={os.path.join(w, 'nothing')}", "--format=hf")
    return r, r.error_line() and not os.path.exists(os.path.join(w, "nothing"))


# --- the base fingerprint ------------------------------------------------------------------------

def changed_base(e, w, script):
    from safetensors.torch import load_file, save_file
    base = os.path.join(w, "base")
    shutil.copytree(e.base, base)
    run = os.path.join(w, "run")
    assert e.cli("train.py", *e.flags(run, "--max_iters=2", f"--init_from={base}")).status == 0
    weights = load_file(os.path.join(base, "model.safetensors"))
    weights["transformer.h.1.mlp.c_fc.weight"][3, 7] += 1e-3
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(base, "model.safetensors"),
              metadata={"format": "pt"})
    if script == "train.py":
        r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=4"))
    else:
        r = e.cli("generate.py", f"--out_dir={run}", f"--dataset={e.data}", "--device=cpu")
    return r, r.error_line()


case("fingerprint", "resume on a base with one weight changed refuses")(lambda e, w: changed_base(e, w, "train.py"))
case("fingerprint", "generate.py on a base with one weight changed refuses")(
    lambda e, w: changed_base(e, w, "generate.py"))


# --- settings ------------------------------------------------------------------------------------

def bad_config(text):
    def run(e, w):
        path = os.path.join(w, "config.py")
        open(path, "w").write(text + "\n")
        out = os.path.join(w, "out")
        r = e.cli("train.py", path, *e.flags(out, "--max_iters=2"))
        r.command = f"train.py config.py ({text!r})"
        return r, r.error_line() and not os.path.exists(out)
    return run


for _text in ("learning_rate = float('nan')", "lora_alpha = float('nan')", "lora_dropout = float('inf')",
              "max_iters = 10\nbatch_size = = 4", "max_iters = undefined_name", "beta1 = 2.0",
              "weight_decay = -1.0", "eval_interval = 0", "raise SystemExit(3)", "import nonexistent_module"):
    case("settings", f"config file: {_text!r}")(bad_config(_text))


def bad_flag(script, flag):
    def run(e, w):
        out = os.path.join(w, "out")
        if script == "train.py":
            r = e.cli("train.py", *e.flags(out, "--max_iters=2", flag))
        else:
            r = e.cli("generate.py", f"--init_from={e.base}", f"--dataset={e.data}", f"--out_dir={out}",
                      "--device=cpu", *flag.split())
        return r, r.error_line() and not os.path.exists(out)
    return run


for _flag in ("--lr=nan", "--lr=inf", "--beta1=2", "--beta2=-0.5", "--weight_decay=-1", "--grad_clip=-1",
              "--warmup_iters=-5", "--min_lr=-1e-4", "--lora_dropout=1.5", "--batch_size=0", "--max_iters=-1",
              "--gradient_accumulation_steps=0", "--eval_iters=0", "--log_interval=0", "--device=gpu",
              "--lora_targets=everything", "--dtype=float8"):
    case("settings", f"train.py {_flag}")(bad_flag("train.py", _flag))
for _flag in ("--max_new_tokens=1000", "--prompt_style=few_shot --num_shots=100",
              "--prompt_style=few_shot --num_shots=20", "--temperature=-1", "--batch_size=0", "--split=dev"):
    case("settings", f"generate.py {_flag}")(bad_flag("generate.py", _flag))


# --- data, and failing before working ------------------------------------------------------------

def bad_labels(e, w, split, label, script):
    data = os.path.join(w, "data")
    os.makedirs(data)
    for s in ("train", "validation", "test"):
        open(os.path.join(data, f"{s}.csv"), "w").write(
            f"text,label\ngreat,1\nawful,0\nodd,{label if s == split else 1}\n")
    out = os.path.join(w, "out")
    if script == "train.py":
        r = e.cli("train.py", *e.flags(out, "--max_iters=2", f"--dataset={data}"))
    else:
        r = e.cli("generate.py", f"--init_from={e.base}", f"--dataset={data}", f"--out_dir={out}", "--device=cpu")
    return r, r.error_line() and not os.path.exists(out)


case("data", "a test review labelled -1 stops generate.py before it evaluates")(
    lambda e, w: bad_labels(e, w, "test", -1, "generate.py"))
case("data", "a test review labelled 2 stops generate.py before it evaluates")(
    lambda e, w: bad_labels(e, w, "test", 2, "generate.py"))
case("data", "a train review labelled 2 stops train.py")(lambda e, w: bad_labels(e, w, "train", 2, "train.py"))
case("data", "a validation review labelled 'yes' stops train.py")(
    lambda e, w: bad_labels(e, w, "validation", "yes", "train.py"))


@case("data", "a data folder without a test split stops generate.py")
def _(e, w):
    data = os.path.join(w, "data")
    shutil.copytree(e.data, data)
    os.remove(os.path.join(data, "test.csv"))
    out = os.path.join(w, "out")
    r = e.cli("generate.py", f"--init_from={e.base}", f"--dataset={data}", f"--out_dir={out}", "--device=cpu")
    return r, r.error_line() and not os.path.exists(out)


@case("data", "a data set without a text column: one line")
def _(e, w):
    data = os.path.join(w, "data")
    os.makedirs(data)
    for s in ("train", "validation", "test"):
        open(os.path.join(data, f"{s}.csv"), "w").write("review,label\ngreat,1\nawful,0\n")
    r = e.cli("train.py", *e.flags(os.path.join(w, "out"), "--max_iters=2", f"--dataset={data}"))
    return r, r.error_line() and not os.path.exists(os.path.join(w, "out"))


@case("before work", "generate.py with an unwritable out_dir fails before it evaluates")
def _(e, w):
    open(os.path.join(w, "file"), "w").write("x")
    t0 = time.time()
    r = e.cli("generate.py", f"--init_from={e.base}", f"--dataset={e.long_data}",
              f"--out_dir={os.path.join(w, 'file', 'out')}", "--device=cpu")
    return r, r.error_line() and time.time() - t0 < 30


for _what, _flag in (("a missing data set", "--dataset=no/such/folder"), ("a missing model", "--init_from=no/such"),
                     ("a bad device string", "--device=cuda:x")):
    @case("before work", f"train.py with {_what} leaves no out_dir")
    def _(e, w, flag=_flag):
        out = os.path.join(w, "out")
        r = e.cli("train.py", *e.flags(out, "--max_iters=2", flag))
        return r, r.error_line() and not os.path.exists(out)


@case("before work", "a NaN loss before any checkpoint does not claim one is kept")
def _(e, w):
    out = os.path.join(w, "out")
    r = e.cli("train.py", *e.flags(out, "--max_iters=8", "--eval_interval=1", "--learning_rate=1e30",
                                   "--warmup_iters=0", "--decay_lr=False", "--grad_clip=0",
                                   "--always_save_checkpoint=False"))
    return r, r.status != 0 and not r.traceback and "last good checkpoint" not in r.last


@case("before work", "resume of a folder without a run: one line, nothing created")
def _(e, w):
    out = os.path.join(w, "nothing")
    r = e.cli("train.py", *e.flags(out, "--init_from=resume"))
    return r, r.error_line() and not os.path.exists(out)


# -----------------------------------------------------------------------------

# --- round three: values, text, pipes, loaded files, replaced results, modes, exports, sweeps ---------

def edited_run(e, w, change, run=None):
    """A copy of the LoRA run with its ckpt.pt changed by change(ckpt)."""
    import torch
    run = e.copy(run or e.lora, w)
    path = os.path.join(run, "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return run


def refused(r, status=2, says=""):
    return r.error_line(status) and says in r.last


def write_config(w, text):
    path = os.path.join(w, "cfg.py")
    open(path, "w").write(text)
    return path


for _script, _flag, _says in (
        ("train.py", "--max_iters=None", "expects int"), ("train.py", "--lr=None", "expects float"),
        ("train.py", "--batch_size=None", "expects int"), ("train.py", "--max_iters=True", "expects int"),
        ("train.py", "--eval_interval=1e3", "expects int"), ("train.py", "--lora_dropout=[0.1]", "expects float"),
        ("train.py", "--seed=99999999999999999999999", "out of range"),
        ("generate.py", "--num_samples=None", "expects int"), ("generate.py", "--temperature=None", "expects float"),
        ("export.py", "--overwrite=None", "expects bool"), ("sweep.py", "--max_iters=None", "expects int"),
        ("sweep.py", "--seeds=1,99999999999999999999999", "out of range")):
    case("types", f"{_script} {_flag}: one line")(
        lambda e, w, s=_script, f=_flag, says=_says: (lambda r: (r, refused(r, says=says)))(
            e.cli(s, f"--out_dir={os.path.join(w, 'out')}", f, *(e.flags(os.path.join(w, 'out'))[:2]
                                                                  if s == "train.py" else []))))

for _text, _says in (("batch_size = None", "expects int"), ("learning_rate = lambda: 3", "expects float"),
                     ("max_iters = 2**70", "out of range")):
    case("types", f"a config file's `{_text}`: one line")(
        lambda e, w, t=_text, says=_says: (lambda r: (r, refused(r, says=says) and not os.path.exists(
            os.path.join(w, "run"))))(e.cli("train.py", write_config(w, t + "\n"), *e.flags(os.path.join(w, "run")))))


def float_labels(e, w, script):
    from conftest import write_reviews
    data = write_reviews(Path(w, "data"))
    for split in ("train", "validation", "test"):
        path = os.path.join(data, f"{split}.csv")
        lines = open(path).read().splitlines()
        open(path, "w").write("\n".join([lines[0]] + [ln.rsplit(",", 1)[0] + f",{ln.rsplit(',', 1)[1]}.0"
                                                     for ln in lines[1:]]) + "\n")
    args = (e.flags(os.path.join(w, "run"), f"--dataset={data}") if script == "train.py" else
            [f"--init_from={e.base}", f"--dataset={data}", f"--out_dir={os.path.join(w, 'run')}", "--device=cpu"])
    r = e.cli(script, *args)
    return r, refused(r, says="is not 0 (negative) or 1 (positive)")


case("types", "labels stored as 0.0/1.0 stop train.py")(lambda e, w: float_labels(e, w, "train.py"))
case("types", "labels stored as 0.0/1.0 stop generate.py")(lambda e, w: float_labels(e, w, "generate.py"))


def at_home(e, w, script, *args):
    """script with `~/...` paths, HOME set to w: they land there, and no folder named ~ appears."""
    import shutil as sh
    sh.copytree(e.data, os.path.join(w, "data"))
    open(os.path.join(w, "reviews.txt"), "w").write("a fine film\n")
    open(os.path.join(w, "prompt.txt"), "w").write("The movie was")
    r = e.cli(script, *args, home=w)
    return r, r.status == 0 and not os.path.exists(os.path.join(e.repo, "~"))


case("paths", "train.py --out_dir=~/run --dataset=~/data")(
    lambda e, w: (lambda r: (r[0], r[1] and os.path.exists(os.path.join(w, "run", "ckpt.pt"))))(
        at_home(e, w, "train.py", *e.flags("~/run", "--dataset=~/data", "--max_iters=2"))))
case("paths", "generate.py --reviews_file=~/reviews.txt")(
    lambda e, w: at_home(e, w, "generate.py", f"--init_from={e.base}", "--reviews_file=~/reviews.txt", "--device=cpu"))
case("paths", "generate.py --prompt=FILE:~/prompt.txt")(
    lambda e, w: at_home(e, w, "generate.py", f"--init_from={e.base}", "--prompt=FILE:~/prompt.txt", "--device=cpu"))
case("paths", "export.py --export_dir=~/exported")(
    lambda e, w: (lambda r: (r[0], r[1] and os.path.exists(os.path.join(w, "exported", "model.safetensors"))))(
        at_home(e, w, "export.py", f"--out_dir={e.copy(e.lora, w)}", "--export_dir=~/exported")))


def eot_data(e, w):
    from conftest import write_reviews
    data = write_reviews(Path(w, "eot"))
    for split in ("train", "test"):
        path = os.path.join(data, f"{split}.csv")
        lines = open(path).read().splitlines()
        lines[1] = lines[1].replace(" , take", " <|endoftext|> take", 1)
        open(path, "w").write("\n".join(lines) + "\n")
    return data


case("text", "a train review holding <|endoftext|> trains")(
    lambda e, w: (lambda r: (r, r.status == 0))(e.cli("train.py", *e.flags(os.path.join(w, "run"),
                                                                           f"--dataset={eot_data(e, w)}", "--max_iters=2"))))
case("text", "a test review holding <|endoftext|> is evaluated")(
    lambda e, w: (lambda r: (r, r.status == 0))(e.cli("generate.py", f"--init_from={e.base}", f"--dataset={eot_data(e, w)}",
                                                      f"--out_dir={os.path.join(w, 'out')}", "--device=cpu")))
for _text in ("a fine <|endoftext|> film", " ".join(["great"] * 3000), "<|endoftext|>", "<|fim_prefix|> x"):
    case("text", f"--review={_text[:30]!r}{'...' if len(_text) > 30 else ''} is classified")(
        lambda e, w, t=_text: (lambda r: (r, r.status == 0 and not r.traceback))(
            e.cli("generate.py", f"--init_from={e.base}", f"--review={t}", "--device=cpu")))
case("text", "--prompt='<|endoftext|> The movie' is continued")(
    lambda e, w: (lambda r: (r, r.status == 0))(e.cli("generate.py", f"--init_from={e.base}",
                                                      "--prompt=<|endoftext|> The movie", "--device=cpu")))
case("text", "a 3,000-word value for an int setting: one short line")(
    lambda e, w: (lambda r: (r, refused(r, says="...") and len(r.last) < 200))(
        e.cli("train.py", "--max_iters=" + " ".join(["great"] * 3000))))


def into_closed_pipe(e, w, script, *args):
    p = subprocess.Popen([sys.executable, script, *args], cwd=e.repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    try:
        status = p.wait(timeout=180)
    except subprocess.TimeoutExpired:
        p.kill()
        return Result(f"{script} ... | head -1", "timeout", "", ""), False
    return Result(f"{script} ... | head -1", status, "", p.stderr.read().decode()), status == 0


case("pipes", "train.py ... | head -1 trains on and saves")(
    lambda e, w: (lambda r: (r[0], r[1] and ckpt_iter(os.path.join(w, "run", "ckpt.pt")) == 6))(
        into_closed_pipe(e, w, "train.py", *e.flags(os.path.join(w, "run"), "--max_iters=6", "--log_interval=1"))))
case("pipes", "generate.py ... | head -1 writes its results")(
    lambda e, w: (lambda r: (r[0], r[1] and os.path.exists(os.path.join(w, "out", "results.json"))))(
        into_closed_pipe(e, w, "generate.py", f"--init_from={e.base}", f"--dataset={e.data}",
                         f"--out_dir={os.path.join(w, 'out')}", "--device=cpu")))
case("pipes", "train.py --help | head -1")(lambda e, w: into_closed_pipe(e, w, "train.py", "--help"))


def nan_in(key_end, value=float("nan")):
    def change(ckpt):
        ckpt["model"][next(k for k in ckpt["model"] if k.endswith(key_end))].view(-1)[0] = value
    return change


def refused_use(e, w, change, script, *args, run=None):
    run = edited_run(e, w, change, run)
    r = e.cli(script, *(a.replace("RUN", run) for a in args))
    return r, refused(r) and "last good checkpoint" not in r.last and not os.path.exists(os.path.join(run, "hf"))


for _name, _change in (("NaN", nan_in("lora_B")), ("inf", nan_in("lora_A", float("inf")))):
    case("loaded weights", f"generate.py on an adapter holding {_name}: one line")(
        lambda e, w, ch=_change: refused_use(e, w, ch, "generate.py", "--out_dir=RUN", "--device=cpu"))
case("loaded weights", "export --format=hf of an adapter holding NaN: refused, nothing exported")(
    lambda e, w: refused_use(e, w, nan_in("lora_B"), "export.py", "--out_dir=RUN", "--format=hf"))
case("loaded weights", "export --format=peft of an adapter holding NaN: refused")(
    lambda e, w: refused_use(e, w, nan_in("lora_B"), "export.py", "--out_dir=RUN", "--format=peft"))
case("loaded weights", "resume of an adapter holding NaN: refused, no claim of a good checkpoint")(
    lambda e, w: refused_use(e, w, nan_in("lora_B"), "train.py", "--out_dir=RUN", "--init_from=resume",
                             "--max_iters=8", f"--dataset={e.data}", "--device=cpu"))
case("loaded weights", "generate.py on a full run holding NaN in wte: one line")(
    lambda e, w: refused_use(e, w, nan_in("wte.weight"), "generate.py", "--out_dir=RUN", "--device=cpu", run=e.full))

for _name, _change in (("its config a list", lambda c: c.update(config=[1])), ("its model an int", lambda c: c.update(model=3)),
                       ("no base_model", lambda c: c.pop("base_model")), ("its iter_num a string", lambda c: c.update(iter_num="2")),
                       ("its model_args a string", lambda c: c.update(model_args="x"))):
    case("files", f"a ckpt.pt with {_name}: one line")(
        lambda e, w, ch=_change: refused_use(e, w, ch, "generate.py", "--out_dir=RUN", "--device=cpu"))


@case("files", "metrics.jsonl a folder: resume is one line")
def _(e, w):
    run = e.copy(e.lora, w)
    os.remove(os.path.join(run, "metrics.jsonl"))
    os.makedirs(os.path.join(run, "metrics.jsonl"))
    r = e.cli("train.py", *e.flags(run, "--init_from=resume", "--max_iters=6"))
    return r, refused(r, says="Is a directory")


def damaged_base(e, w, damage, script):
    base = os.path.join(w, "base")
    shutil.copytree(e.base, base)
    damage(base)
    args = (e.flags(os.path.join(w, "run"), f"--init_from={base}") if script == "train.py" else
            [f"--init_from={base}", f"--dataset={e.data}", f"--out_dir={os.path.join(w, 'run')}", "--device=cpu"])
    r = e.cli(script, *args)
    return r, refused(r) and not os.path.exists(os.path.join(w, "run"))


def truncate(base):
    path = os.path.join(base, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 3])


case("files", "a truncated model.safetensors in init_from: train.py, one line")(
    lambda e, w: damaged_base(e, w, truncate, "train.py"))
case("files", "a truncated model.safetensors in init_from: generate.py, one line")(
    lambda e, w: damaged_base(e, w, truncate, "generate.py"))
case("files", "a config.json that is not JSON in init_from: one line")(
    lambda e, w: damaged_base(e, w, lambda b: open(os.path.join(b, "config.json"), "w").write("{oops"), "train.py"))


@case("files", "a checkpoint refused as unsafe never advises weights_only=False")
def _(e, w):
    import torch
    os.makedirs(os.path.join(w, "run"))
    torch.save({"model": {}, "model_args": {}, "x": object()}, os.path.join(w, "run", "ckpt.pt"))
    r = e.cli("generate.py", f"--out_dir={os.path.join(w, 'run')}", "--device=cpu")
    return r, refused(r) and not any(advice in r.out + r.err for advice in ("weights_only", "can still be loaded"))


@case("results", "a second generate.py keeps the first's results in results_history.jsonl and says so")
def _(e, w):
    run = e.copy(e.lora, w)
    e.cli("generate.py", f"--out_dir={run}", "--device=cpu")
    r = e.cli("generate.py", f"--out_dir={run}", "--device=cpu", "--num_samples=4", "--temperature=1.0")
    history = read_lines(os.path.join(run, "results_history.jsonl"))
    return r, r.status == 0 and len(history) == 2 and "replaced the results of an earlier evaluation" in r.out


@case("results", "a zero-shot evaluation into a fine-tuned run keeps that run's results")
def _(e, w):
    run = e.copy(e.lora, w)
    e.cli("generate.py", f"--out_dir={run}", "--device=cpu")
    r = e.cli("generate.py", f"--init_from={e.base}", f"--dataset={e.data}", f"--out_dir={run}", "--device=cpu")
    history = read_lines(os.path.join(run, "results_history.jsonl"))
    return r, r.status == 0 and [h["init_from"] for h in history] == ["resume", e.base]


def read_lines(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@case("results", "train.py into a folder with another run's logs and no checkpoint refuses")
def _(e, w):
    run = e.copy(e.lora, w)
    os.remove(os.path.join(run, "ckpt.pt"))
    before = open(os.path.join(run, "metrics.jsonl"), "rb").read()
    r = e.cli("train.py", *e.flags(run, "--max_iters=2"))
    return r, refused(r, says="another run's logs") and same_bytes(os.path.join(run, "metrics.jsonl"), before)


case("results", "resume with max_iters below the checkpoint's iteration refuses")(
    lambda e, w: (lambda r: (r, refused(r, says="past max_iters=2")))(
        e.cli("train.py", *e.flags(e.copy(e.lora, w), "--init_from=resume", "--max_iters=2"))))
case("results", "resume at the checkpoint's iteration says there is nothing to train")(
    lambda e, w: (lambda r: (r, r.status == 0 and "nothing to train" in r.out))(
        e.cli("train.py", *e.flags(e.copy(e.lora, w), "--init_from=resume", "--max_iters=4"))))


def mode_of(path):
    return oct(os.stat(path).st_mode & 0o777) if os.path.exists(path) else None


@case("modes", "ckpt.pt, results.json and an export follow the umask (0644 under 022)")
def _(e, w):
    run = e.copy(e.lora, w)
    e.cli("generate.py", f"--out_dir={run}", "--device=cpu")
    r = e.cli("export.py", f"--out_dir={run}", "--format=hf")
    modes = [mode_of(os.path.join(run, n)) for n in ("results.json", os.path.join("hf", "model.safetensors"))]
    fresh = os.path.join(w, "fresh")
    e.cli("train.py", *e.flags(fresh, "--max_iters=2"))
    modes.append(mode_of(os.path.join(fresh, "ckpt.pt")))
    return r, r.status == 0 and modes == ["0o644"] * 3


@case("exports", "a full disk during --format=hf leaves no export, and a re-run needs no --overwrite")
def _(e, w):
    run = e.copy(e.lora, w)
    first = e.cli("export.py", f"--out_dir={run}", "--format=hf", limit_bytes=200_000)
    r = e.cli("export.py", f"--out_dir={run}", "--format=hf")
    return first, first.error_line(1) and r.status == 0 and os.path.exists(os.path.join(run, "hf", "model.safetensors"))


@case("exports", "an hf export of a local base holds vocab.json and merges.txt")
def _(e, w):
    run = e.copy(e.lora, w)
    r = e.cli("export.py", f"--out_dir={run}", "--format=hf")
    return r, r.status == 0 and all(os.path.exists(os.path.join(run, "hf", f)) for f in ("vocab.json", "merges.txt"))


case("exports", "--tokenizer_dir=/nonexistent: one line")(
    lambda e, w: (lambda r: (r, refused(r, says="tokenizer_dir")))(
        e.cli("export.py", f"--out_dir={e.copy(e.lora, w)}", "--tokenizer_dir=/nonexistent")))


@case("exports", "--export_dir=<a file> names --export_dir")
def _(e, w):
    open(os.path.join(w, "file"), "w").write("x")
    r = e.cli("export.py", f"--out_dir={e.copy(e.lora, w)}", f"--export_dir={os.path.join(w, 'file')}")
    return r, refused(r, says="--export_dir")


def import_onto(e, w, edit_config=None, layers=2):
    from conftest import save_random_hf_gpt2
    run = e.copy(e.lora, w)
    e.cli("export.py", f"--out_dir={run}", "--format=peft")
    cfg_path = os.path.join(run, "peft", "adapter_config.json")
    if edit_config:
        cfg = json.load(open(cfg_path))
        open(cfg_path, "w").write(json.dumps(edit_config(cfg)))
    base = e.base
    if layers != 2:
        base = os.path.join(w, "deeper")
        save_random_hf_gpt2(base, n_layer=layers)
    r = e.cli("export.py", "--format=import_peft", f"--adapter={os.path.join(run, 'peft')}", f"--init_from={base}",
              f"--out_dir={os.path.join(w, 'imported')}")
    return r, refused(r) and not os.path.exists(os.path.join(w, "imported"))


case("exports", "import_peft of a 2-layer adapter onto a 3-layer base refuses")(lambda e, w: import_onto(e, w, layers=3))
case("exports", "import_peft of an adapter whose r disagrees with its tensors: one line")(
    lambda e, w: import_onto(e, w, lambda c: dict(c, r=8)))
case("exports", "import_peft of an adapter_config.json without r: one line")(
    lambda e, w: import_onto(e, w, lambda c: {k: v for k, v in c.items() if k != "r"}))
case("exports", "import_peft of an adapter_config.json that is a list: one line")(lambda e, w: import_onto(e, w, lambda c: [c]))


def sweep_with(e, w, *more):
    return e.cli("sweep.py", f"--init_from={e.base}", f"--dataset={e.data}", f"--out_dir={os.path.join(w, 'sweep')}",
                 "--device=cpu", "--batch_size=4", "--eval_iters=1", "--ranks=4", "--full_finetune=False",
                 "--few_shot=False", "--max_iters=2", "--eval_interval=1", "--num_samples=4", *more)


for _flag in ("--ranks=-4", "--ranks=0", "--train_args=--bogus=1", "--train_args=--lr='3e-4",
              "--train_args=--lora_dropout=1.5"):
    case("sweep", f"sweep.py {_flag}: refused before any run")(
        lambda e, w, f=_flag: (lambda r: (r, refused(r) and not os.path.exists(os.path.join(w, "sweep"))))(
            sweep_with(e, w, f)))
case("sweep", "a run that fails at run time: the table is written and the sweep exits 1")(
    lambda e, w: (lambda r: (r, r.error_line(1) and os.path.exists(os.path.join(w, "sweep", "results.md"))))(
        sweep_with(e, w, "--train_args=--block_size=4096")))

case("signals", "SIGUSR1 (Slurm's warning) during training saves and exits 138")(
    lambda e, w: signal_training(e, w, signal.SIGUSR1))


@case("signals", "out_dir removed under a running train.py: one line, no traceback")
def _(e, w):
    run = os.path.join(w, "run")
    p = e.start("train.py", *e.flags(run, "--max_iters=100000", "--eval_interval=5", "--log_interval=1"))
    shutil.rmtree(run)
    try:
        out = p.stdout.read()
        status = p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        return Result("train.py, then rm -rf out_dir", "timeout", "", ""), False
    r = Result("train.py, then rm -rf out_dir", status, "".join(p.seen) + out, "")
    return r, status == 1 and not r.traceback and r.last.startswith("error: cannot write")


@case("layout", "validation loss before any step: 2 processes x 2 reviews equal 1 process x 4")
def _(e, w):
    one = e.cli("train.py", *e.flags(os.path.join(w, "one"), "--max_iters=1", "--eval_iters=3"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *e.flags(os.path.join(w, "two"), "--max_iters=1", "--eval_iters=3", "--batch_size=2")],
                         cwd=e.repo, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    r = Result("torchrun --nproc_per_node=2 train.py --batch_size=2 against train.py --batch_size=4", two.returncode,
               two.stdout, two.stderr)
    losses = [[ln for ln in out.splitlines() if ln.startswith("step 0:")] for out in (one.out, two.stdout)]
    r.last = f"{losses[0]} / {losses[1]}"
    return r, two.returncode == 0 and losses[0] == losses[1] != []


# --- round four: the starter writer, the sweep's grid, settings that change nothing, files that never end --

def refused_leaving(e, w, script, *args, message, untouched=()):
    """(result, verdict) of a command that must be refused with message (refused()), leaving the folders untouched
    names as they were."""
    before = {p: os.listdir(p) if os.path.isdir(p) else None for p in untouched}
    r = e.cli(script, *args)
    return r, refused(r, says=message) and all(
        (os.listdir(p) if os.path.isdir(p) else None) == kept for p, kept in before.items())


@case("round four", "make_starter --overwrite=True into a folder it did not write: refused, its files kept")
def _(e, w):
    Path(w, "mine").mkdir()
    Path(w, "mine", "notes.txt").write_text("mine")
    return refused_leaving(e, w, "course/make_starter.py", f"--out_dir={w}/mine", "--overwrite=True",
                   message="holds no starter written by this command", untouched=[f"{w}/mine"])


@case("round four", "make_starter --overwrite=True into the repository's docs: refused")
def _(e, w):
    return refused_leaving(e, w, "course/make_starter.py", f"--out_dir={e.repo}/docs", "--overwrite=True",
                   message="lies inside it", untouched=[f"{e.repo}/docs"])


@case("round four", "make_starter --overwrite=True into a link to the repository: refused")
def _(e, w):
    os.symlink(e.repo, os.path.join(w, "link"))
    return refused_leaving(e, w, "course/make_starter.py", f"--out_dir={w}/link", "--overwrite=True",
                   message="is this repository", untouched=[e.repo])


for _name, _args, _message in [
        ("train_args that change the grid's method: refused", ["--variants=pissa", "--train_args=--lora_init=default"],
         "train_args sets lora_init"),
        ("train_args that change the grid's rank: refused", ["--ranks=4", "--train_args=--rank=2"],
         "train_args sets lora_rank"),
        ("a variant named twice: refused", ["--variants=dora,dora"], "variants names a choice twice")]:
    case("round four", f"sweep.py {_name}")(
        lambda e, w, a=_args, m=_message: refused_leaving(e, w, "sweep.py", *a, f"--out_dir={w}/sweep", message=m,
                                                  untouched=[w]))

for _name, _args, _message in [
        ("pissa_niter_² (a digit, not an ASCII one)", ["--lora_init=pissa_niter_²"], "pissa_niter_N"),
        ("pissa_niter_1000000000", ["--lora_init=pissa_niter_1000000000"], "N from 1 to 100"),
        ("rslora at rank 0", ["--rank=0", "--lora_scaling=rslora"], "changes LoRA's update"),
        ("LoRA+ at rank 0", ["--rank=0", "--lora_plus_ratio=16"], "changes LoRA's update"),
        ("PiSSA of a rank above the layer's width", ["--lora_init=pissa", "--rank=64"], "needs a layer at least")]:
    case("round four", f"train.py with {_name}: one line")(
        lambda e, w, a=_args, m=_message: refused_leaving(e, w, "train.py", *e.flags(f"{w}/run"), *a, message=m))


@case("round four", "train.py --out_dir=None: one line, no folder named None")
def _(e, w):
    r = e.cli("train.py", *e.flags("None"))
    return r, r.error_line() and "reads as no folder" in r.last and not os.path.exists(os.path.join(e.repo, "None"))


for _name, _args, _message in [
        ("--prompt=FILE:/dev/zero", ["--prompt=FILE:/dev/zero"], "is not a regular file"),
        ("--temperature=1e-320", ["--temperature=1e-320", "--prompt=The film"], "at least 1e-6"),
        ("--prompt with --review", ["--prompt=The film", "--review=a gem"], "give one of them")]:
    case("round four", f"generate.py {_name}: one line")(
        lambda e, w, a=_args, m=_message: refused_leaving(e, w, "generate.py", f"--init_from={e.base}", *a, message=m))


@case("round four", "python model.py --ranks=abc: one line")
def _(e, w):
    return refused_leaving(e, w, "model.py", "--ranks=abc", message="ranks must be whole numbers")


@case("round four", "generate.py --prompt=FILE:a FIFO: refused at once, not left waiting")
def _(e, w):
    os.mkfifo(os.path.join(w, "fifo"))
    return refused_leaving(e, w, "generate.py", f"--prompt=FILE:{w}/fifo", message="is not a regular file")


@case("round four", "make_starter onto a full disk: one line, nothing left")
def _(e, w):
    r = e.cli("course/make_starter.py", f"--out_dir={w}/starter", limit_bytes=2000)
    return r, refused(r, says="cannot write the starter") and os.listdir(w) == []


def damaged_pissa_run(e, w, damage, message):
    """A PiSSA run's checkpoint, damaged, then evaluated: refused with message, no results written."""
    import torch
    r = e.cli("train.py", *e.flags(f"{w}/run", "--max_iters=2", "--lora_init=pissa"))
    if r.status != 0:
        return r, False
    ckpt = torch.load(f"{w}/run/ckpt.pt", weights_only=True)
    damage(ckpt)
    torch.save(ckpt, f"{w}/run/ckpt.pt")
    r = e.cli("generate.py", f"--out_dir={w}/run", "--device=cpu", "--num_samples=2")
    return r, refused(r, says=message) and not os.path.exists(f"{w}/run/results.json")


@case("round four", "a PiSSA checkpoint without lora_A0 and lora_B0: one line, not a different model")
def _(e, w):
    def drop_start(ckpt):
        ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.endswith(("lora_A0", "lora_B0"))}
    return damaged_pissa_run(e, w, drop_start, "without its initial A and B")


@case("round four", "a checkpoint whose lora_variant is 'vera': one line")
def _(e, w):
    return damaged_pissa_run(e, w, lambda ckpt: ckpt["model_args"].update(lora_variant="vera"),
                             "does not match its own model settings")


for _name, _extra, _message in [
        ("lora_alpha NaN", {"lora_alpha": float("nan")}, "lora_alpha (a finite number > 0)"),
        ("PiSSA's start not converted", {"init_lora_weights": "pissa"}, "not converted"),
        ("a rank_pattern", {"rank_pattern": {"c_attn": 8}}, "rank_pattern"),
        ("lora_dropout '0.1x'", {"lora_dropout": "0.1x"}, "lora_dropout must be a number in [0, 1)")]:
    def _peft(e, w, extra=_extra, message=_message):
        from safetensors.torch import save_file
        import torch
        os.makedirs(f"{w}/adapter")
        with open(f"{w}/adapter/adapter_config.json", "w") as f:
            json.dump({"r": 4, "lora_alpha": 8, "peft_type": "LORA", "target_modules": ["c_attn"], **extra}, f)
        prefix = "base_model.model.transformer.h.{}.attn.c_attn.lora_{}.weight"  # a whole adapter: only extra is wrong
        save_file({prefix.format(i, ab): torch.zeros(shape) for i in range(2) for ab, shape in (("A", (4, 32)),
                                                                                                 ("B", (96, 4)))},
                  f"{w}/adapter/adapter_model.safetensors")
        r = e.cli("export.py", "--format=import_peft", f"--adapter={w}/adapter", f"--init_from={e.base}",
                  f"--out_dir={w}/out")
        return r, refused(r, says=message) and not os.path.exists(f"{w}/out")
    case("round four", f"export.py import_peft of an adapter with {_name}: one line naming it")(_peft)


@case("round four", "export.py --adapter=~/a: ~ is the home folder")
def _(e, w):
    os.makedirs(f"{w}/home/a")
    r = e.cli("export.py", "--format=import_peft", "--adapter=~/a", f"--init_from={e.base}", f"--out_dir={w}/out",
              home=f"{w}/home")
    return r, r.error_line() and f"{w}/home/a" in r.err


@case("round four", "sweep.py run from another folder, then again over a results.json that is a list")
def _(e, w):
    flags = [f"--init_from={e.base}", f"--dataset={e.data}", "--ranks=", "--full_finetune=False", "--few_shot=False",
             "--num_samples=4", "--device=cpu", f"--out_dir={w}/sweep"]
    first = subprocess.run([sys.executable, os.path.join(e.repo, "sweep.py"), *flags], cwd=w, capture_output=True,
                           text=True, timeout=300)
    Path(w, "sweep", "zero-shot").mkdir(parents=True, exist_ok=True)
    Path(w, "sweep", "zero-shot", "results.json").write_text("[1, 2]")
    again = subprocess.run([sys.executable, os.path.join(e.repo, "sweep.py"), *flags], cwd=w, capture_output=True,
                           text=True, timeout=300)
    r = Result("cd elsewhere && python /path/to/sweep.py ..., twice", again.returncode, again.stdout, again.stderr)
    return r, first.returncode == 0 and again.returncode == 0 and not r.traceback


ADD_LORA = r"""
import sys, torch, torch.nn as nn
sys.path.insert(0, {repo!r})
try:
    from lorakit.adapters import add_lora
except ImportError:  # a version that kept it in lora.py
    from lora import add_lora
{body}
"""

for _name, _body, _expect in [
        ("add_lora on a pruned nn.Linear: refused naming the layer, not random weights",
         "from torch.nn.utils import prune\nm = nn.Sequential(nn.Linear(4, 4))\nprune.l1_unstructured(m[0], 'weight', 0.5)\n"
         "try:\n    add_lora(m, ['0'])\nexcept ValueError as err:\n    print('refused:', err)",
         "refused: 0 computes its weight"),
        ("add_lora on a head tied to the embedding: refused, the tie kept",
         "class T(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
         "        self.emb, self.head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)\n"
         "        self.head.weight = self.emb.weight\nm = T()\n"
         "try:\n    add_lora(m, ['head'])\nexcept ValueError as err:\n    print('refused:', err, m.head.weight is m.emb.weight)",
         "shared with emb.weight"),
        ("add_lora with rank 2.5: refused with the rule",
         "try:\n    add_lora(nn.Sequential(nn.Linear(2, 2)), ['0'], lora_rank=2.5)\n"
         "except ValueError as err:\n    print('refused:', err)", "lora_rank must be a whole number >= 1"),
        ("add_lora on transformers' Conv1D: the model's function at start",
         "from transformers import GPT2Config, GPT2LMHeadModel\ntorch.manual_seed(0)\n"
         "m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8)).eval()\n"
         "x = torch.randint(0, 50257, (1, 6))\nbefore = m(x).logits\nadd_lora(m, r'.*attn\\.c_(attn|proj)', lora_rank=2)\n"
         "print('largest difference', (m.eval()(x).logits - before).abs().max().item() < 1e-6)",
         "largest difference True"),
        ("add_lora with an empty pattern: refused",
         "m = nn.Linear(2, 2)\ntry:\n    add_lora(m, '')\nexcept ValueError as err:\n    print('refused:', err)\n"
         "print('children', [n for n, _ in m.named_children()])",
         "target_modules is empty: give a regular expression or a list of layer names\nchildren []"),
        ("add_lora on a layer registered under two names: replaced under both",
         "m = nn.Module()\nm.a = m.b = nn.Linear(3, 3)\nx = torch.randn(2, 3)\nbefore = m.a(x)\nadd_lora(m, ['a'])\n"
         "print('shared', m.a is m.b and torch.equal(m.b(x), before))", "shared True"),
        ("DoRA on a weight with a row of zeros: finite",
         "from lora import LoRALinear\ntry:\n    from lorakit.variants import DoRALinear\n"
         "except ImportError:  # a version that kept it in lora.py\n    from lora import DoRALinear\n"
         "layer = LoRALinear(4, 3, lora_rank=2, lora_alpha=2.0)\ntorch.nn.init.zeros_(layer.weight.data[1])\n"
         "dora = DoRALinear.from_lora(layer)\nx = torch.randn(5, 4)\n"
         "print('finite', bool(torch.isfinite(dora(x)).all() and torch.isfinite(dora.eval()(x)).all()))",
         "finite True")]:
    def _add(e, w, body=_body, expect=_expect):
        r = e.cli("-c", ADD_LORA.format(repo=e.repo, body=body))
        r.command = "python -c ..." + next(ln for ln in body.splitlines() if "_lora(" in ln)[:70]
        return r, r.status == 0 and expect in r.out
    case("round four", _name)(_add)


@case("round four", "make_starter --overwrite=True into a home folder of files: refused, the files kept")
def _(e, w):
    Path(w, "home", "notes.txt").parent.mkdir()
    Path(w, "home", "notes.txt").write_text("mine")
    r = e.cli("course/make_starter.py", "--out_dir=~", "--overwrite=True", home=f"{w}/home")
    return r, refused(r, says="holds no starter written by this command") and os.listdir(f"{w}/home") == ["notes.txt"]


@case("round four", "three make_starter --overwrite=True at once into one starter: no traceback, a whole starter")
def _(e, w):
    assert e.cli("course/make_starter.py", f"--out_dir={w}/starter").status == 0
    Path(w, "starter", "lora.py").write_text("edited")
    runs = [subprocess.Popen([sys.executable, "course/make_starter.py", f"--out_dir={w}/starter", "--overwrite=True"],
                             cwd=e.repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in runs]
    r = Result("3 x make_starter --overwrite=True at once", [p.returncode for p in runs], "", "".join(errs))
    r.last = r.last or f"exit statuses {r.status}"
    whole = "raise NotImplementedError" in Path(w, "starter", "lora.py").read_text()
    one_line_each = all(p.returncode == 0 or err.count("\n") == 1 for p, err in zip(runs, errs))
    return r, whole and not r.traceback and one_line_each and not [n for n in os.listdir(w) if n.startswith(".")]


@case("round four", "the notebook with QUICK = \"False\" (a string): stops with what to write")
def _(e, w):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(os.path.join(e.repo, "run_in_colab.ipynb"), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    first.source = first.source.replace('WAY_IN = "drive"', 'WAY_IN = "here"').replace("QUICK = False", 'QUICK = "False"')
    nb.cells = [first]
    r = Result('run_in_colab.ipynb, QUICK = "False"', 0, "", "")
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": e.repo}}).execute()
        r.last = "the notebook went on in QUICK mode"
    except CellExecutionError as err:
        r.status, r.last = 1, re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip().splitlines()[-1])  # no colours
    return r, r.status == 1 and "QUICK must be True or False" in r.last


@case("round four", "--help of every script imports no torch, datasets or transformers")
def _(e, w):
    scripts = ["train.py", "generate.py", "sweep.py", "export.py", "model.py", "course/make_starter.py",
               "course/grade.py", "bench/perf.py", "bench/faults.py"]
    heavy = {"torch", "datasets", "transformers"}
    results = [e.cli("-X", "importtime", script, "--help") for script in scripts]
    slow = [r.command for r in results
            if r.status != 0 or heavy & {ln.rsplit("|", 1)[-1].strip() for ln in r.err.splitlines()}]
    r = Result(f"python -X importtime SCRIPT --help, {len(scripts)} scripts", 0 if not slow else 1, "", "")
    r.last = f"heavy imports in: {slow}" if slow else "none imports them"
    return r, not slow


def main(argv):
    c = configure(DEFAULTS, argv)
    repo = os.path.abspath(c.repo)
    with tempfile.TemporaryDirectory() as work:
        e = Env(repo, work)
        rows = []
        for i, (family, name, f) in enumerate(CASES):
            if c.only and c.only not in family and c.only not in name:
                continue
            w = os.path.join(work, f"case{i}")
            os.makedirs(w)
            try:
                r, ok = f(e, w)
            except Exception as err:  # the harness's own setup failed: the case cannot be judged as clean
                r, ok = Result(name, "harness", "", f"{type(err).__name__}: {err}"), False
            last = ("Traceback ... " if r.traceback else "") + r.last.replace(work + "/", "")
            rows.append(dict(family=family, case=name, command=r.command, status=r.status, last=last[:160],
                             clean=bool(ok)))
            print(f"{'clean' if ok else 'BROKE'}  {family:<12} {name}  [{r.status}] {last[:110]}", flush=True)
    clean = sum(r["clean"] for r in rows)
    print(f"{clean} of {len(rows)} cases clean ({repo})")
    os.makedirs(c.out_dir, exist_ok=True)
    write_json(dict(repo=repo, clean=clean, cases=rows), os.path.join(c.out_dir, "faults.json"))
    table = ["| family | case | exit | last line | verdict |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {r['family']} | {r['case']} | {r['status']} | `{r['last'].replace('|', '/')}` | "
              f"{'clean' if r['clean'] else 'broken'} |" for r in rows]
    with open(os.path.join(c.out_dir, "faults.md"), "w") as f:
        f.write("\n".join(table) + f"\n\n{clean} of {len(rows)} clean\n")


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

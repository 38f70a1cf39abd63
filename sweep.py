"""
Train and evaluate a grid of methods with one command: the homework's table (question 2.6) and
validation-loss plot (questions 2.2 and 2.8).

    python sweep.py --init_from=gpt2-medium --out_dir=sweep
    python sweep.py --init_from=gpt2-medium --ranks=8,32 --full_finetune=False --max_iters=200

By default: the untouched model with the instruction alone (zero-shot), few-shot prompting, LoRA with
r in {16, 128, 196} and alpha = 4r, and full fine-tuning. Each run is a train.py and/or generate.py
command in its own folder under out_dir; out_dir/results.md lists every run with its command, and
out_dir/val_loss.png shows the validation-loss curves of all training runs. A failed run is reported
in the table with its error and the others go on. Running the same command again skips the runs
that finished (their results.json exists) and resumes the ones that did not.
"""

import json
import os
import shlex
import subprocess
import sys
import time

# -----------------------------------------------------------------------------
init_from = 'gpt2-medium'  # the base model of every run
dataset = 'cornell-movie-review-data/rotten_tomatoes'
out_dir = 'sweep'
zero_shot = True  # evaluate the untouched model with the instruction alone
few_shot = True  # ... and with num_shots solved examples
num_shots = 4
ranks = '16,128,196'  # LoRA ranks, comma-separated; '' for none
alpha_per_rank = 4.0  # lora_alpha = alpha_per_rank * rank
lora_lr = 5e-4
full_finetune = True  # also fine-tune every parameter (lora_rank=0)
full_lr = 5e-5
max_iters = 400
batch_size = 16
eval_interval = 50
eval_iters = 20
train_args = ''  # more train.py flags for every training run, e.g. '--loss_on=all --dtype=float16'
mode = 'generate'  # test accuracy by 'generate' (the homework's rule) or 'score'
num_samples = 0  # test reviews; 0: all
eval_batch_size = 32
keep_checkpoints = False  # ckpt.pt of a finished run is deleted unless True (gpt2-medium: 1.4 GB each)
device = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

from configurator import ConfigError, configure, run_cli  # noqa: E402


def plan(c):
    """The runs: name, method, rank, alpha, and the train.py / generate.py flags of each."""
    data = [f'--dataset={c.dataset}', f'--device={c.device}']
    evaluate = [f'--mode={c.mode}', f'--num_samples={c.num_samples}', f'--batch_size={c.eval_batch_size}']
    runs = []
    if c.zero_shot:
        runs.append(dict(name='zero-shot', method='zero-shot prompting', rank=None, alpha=None, train=None,
                         eval=[f'--init_from={c.init_from}', *data, *evaluate]))
    if c.few_shot:
        runs.append(dict(name=f'few-shot-{c.num_shots}', method=f'{c.num_shots}-shot prompting', rank=None,
                         alpha=None, train=None, eval=[f'--init_from={c.init_from}', *data, *evaluate,
                                                       '--prompt_style=few_shot', f'--num_shots={c.num_shots}']))
    try:
        rank_list = [int(r) for r in c.ranks.split(',') if r.strip()]
    except ValueError:
        raise ConfigError(f"ranks must be comma-separated integers like '16,128,196', not {c.ranks!r}") from None
    training = [(f'lora-r{r}', 'LoRA', r, c.alpha_per_rank * r, c.lora_lr) for r in rank_list]
    if c.full_finetune:
        training.append(('full', 'full fine-tuning', 0, None, c.full_lr))
    for name, method, r, alpha, lr in training:
        flags = [f'--init_from={c.init_from}', *data, f'--lora_rank={r}', f'--learning_rate={lr}',
                 f'--max_iters={c.max_iters}', f'--batch_size={c.batch_size}', f'--eval_interval={c.eval_interval}',
                 f'--eval_iters={c.eval_iters}', *([f'--lora_alpha={alpha:g}'] if r else []), *shlex.split(c.train_args)]
        runs.append(dict(name=name, method=method, rank=r, alpha=alpha, train=flags,
                         eval=['--init_from=resume', *data, *evaluate]))
    return runs


def command(script, flags, run_dir):
    return ['python', script, *flags, f'--out_dir={run_dir}']


def execute(cmd, log_path):
    """Run cmd with this Python, its output appended to log_path; the last line of its error, or None."""
    with open(log_path, 'a') as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        p = subprocess.run([sys.executable, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT)
    if p.returncode == 0:
        return None
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return (lines[-1] if lines else f"exit status {p.returncode}")[:300]


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def read_metrics(run_dir):
    try:
        with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def run_one(run, c):
    """Train (or resume) and evaluate one run unless it finished before; its table row."""
    run_dir = os.path.join(c.out_dir, run['name'])
    os.makedirs(run_dir, exist_ok=True)
    results_path = os.path.join(run_dir, 'results.json')
    ckpt = os.path.join(run_dir, 'ckpt.pt')
    train_cmd = None
    if run['train'] is not None:
        flags = run['train']
        if os.path.exists(ckpt):  # an earlier sweep stopped after this run saved: continue it
            flags = ['--init_from=resume'] + [f for f in flags if not f.startswith('--init_from=')]
        train_cmd = command('train.py', flags, run_dir)
    eval_cmd = command('generate.py', run['eval'], run_dir)
    row = dict(run, commands=[shlex.join(cmd) for cmd in (train_cmd, eval_cmd) if cmd], error=None)
    if os.path.exists(results_path):
        print(f"{run['name']}: finished before, skipped")
    else:
        log = os.path.join(run_dir, 'log.txt')
        print(f"{run['name']}: running (output in {log})", flush=True)
        t0 = time.time()
        if train_cmd:
            row['error'] = execute(train_cmd, log)
        if row['error'] is None:
            row['error'] = execute(eval_cmd, log)
        print(f"{run['name']}: {'failed: ' + row['error'] if row['error'] else 'done'} "
              f"({time.time() - t0:.0f} s)", flush=True)
    results = read_json(results_path, {})
    info = read_json(os.path.join(run_dir, 'run.json'), {})
    metrics = read_metrics(run_dir)
    if results and not c.keep_checkpoints and os.path.exists(ckpt):
        os.remove(ckpt)
    row.update(accuracy=results.get('accuracy'), eval_s=results.get('seconds'),
               unparseable=results.get('unparseable'), trainable=info.get('trainable_params', 0 if not run['train'] else None),
               trainable_pct=info.get('trainable_pct', 0.0 if not run['train'] else None),
               best_val_loss=min((m['val_loss'] for m in metrics), default=None),
               train_s=metrics[-1]['elapsed_s'] if metrics else None, metrics=metrics)
    return row


def fmt(value, spec, missing='-'):
    return missing if value is None else format(value, spec)


def write_table(rows, c, argv, path):
    lines = [f"# Sweep: {c.init_from} on {c.dataset}", "",
             f"Produced by `{shlex.join(['python', 'sweep.py', *argv])}`; every run's own commands are listed "
             f"below the table. Accuracy is on {'all' if not c.num_samples else c.num_samples} test reviews "
             f"({c.mode} mode); train seconds include the periodic validation.", "",
             "| run | method | r | alpha | trainable params | trainable % | best val loss | test accuracy | "
             "unparseable | train s | eval s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        accuracy = f"failed: {r['error']}" if r['error'] else fmt(r['accuracy'], '.4f')
        lines.append(f"| {r['name']} | {r['method']} | {fmt(r['rank'], 'd')} | {fmt(r['alpha'], 'g')} | "
                     f"{fmt(r['trainable'], ',')} | {fmt(r['trainable_pct'], '.2f')} | {fmt(r['best_val_loss'], '.4f')} | "
                     f"{accuracy} | {fmt(r['unparseable'], 'd')} | {fmt(r['train_s'], '.0f')} | {fmt(r['eval_s'], '.0f')} |")
    lines += ["", "## Commands", ""]
    for r in rows:
        lines += [f"- {r['name']}:"] + [f"  - `{cmd}`" for cmd in r['commands']]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def plot_val_loss(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r['metrics']:
            ax.plot([m['iter'] for m in r['metrics']], [m['val_loss'] for m in r['metrics']], 'o-', ms=3,
                    label=r['name'])
    ax.set_xlabel('iteration')
    ax.set_ylabel('validation loss')
    ax.set_yscale('log')
    ax.set_title('validation loss')
    ax.grid(alpha=0.3, which='both')
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    from types import SimpleNamespace
    c = SimpleNamespace(**configure(DEFAULTS, argv))
    if c.mode not in ('generate', 'score'):
        raise ConfigError(f"mode must be 'generate' or 'score', not {c.mode!r}")
    runs = plan(c)
    os.makedirs(c.out_dir, exist_ok=True)
    rows = [run_one(run, c) for run in runs]
    write_table(rows, c, argv, os.path.join(c.out_dir, 'results.md'))
    plot_val_loss(rows, os.path.join(c.out_dir, 'val_loss.png'))
    print(f"wrote {os.path.join(c.out_dir, 'results.md')} and val_loss.png")
    return rows


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:]))

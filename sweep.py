"""
Train and evaluate a grid of methods with one command: the homework's table (question 2.6) and
validation-loss plot (questions 2.2 and 2.8).

    python sweep.py --init_from=gpt2-medium --out_dir=sweep
    python sweep.py --init_from=gpt2-medium --ranks=8,32 --full_finetune=False --max_iters=200 --out_dir=sweep-small
    python sweep.py --init_from=gpt2-medium --seeds=1337,1338,1339 --out_dir=sweep   # run-to-run spread
    python sweep.py --init_from=gpt2-medium --templates=instruct,bare --label_words="negative,positive;bad,good" \
        --ranks=16 --full_finetune=False --out_dir=sweep-prompts   # every method with every prompt

By default: the untouched model with the instruction alone (zero-shot), few-shot prompting, LoRA with
r in {16, 128, 196} and alpha = 4r, and full fine-tuning; with several seeds every training run is
repeated once per seed. Each run is a train.py and/or generate.py command in its own folder under
out_dir; out_dir/results.md lists every run with its command (and, with several seeds, each
method's mean and spread), and out_dir/val_loss.png shows the validation-loss curves. A failed run is
reported in the table with its error and the others go on. Running the command again reuses the runs
that finished with exactly these settings and resumes the ones that did not; a folder that holds a
run with other settings is an error, or with --overwrite=True is deleted and run again.
"""

import itertools
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

from configurator import ConfigError, Interrupted, check, configure, one_of, run_cli, setting_name, settings_of  # first: --help skips torch
from lorakit.common import command_line, hold_out_dir, log_scale, read_json, read_jsonl, save_atomic, save_figure, write_json
from lorakit.data import EVAL_MODES
from lorakit.prompts import OWN, TEMPLATES, prompt_errors, split_label_words
from model import LORA_SCALINGS, LORA_TARGETS

# -----------------------------------------------------------------------------
init_from = 'gpt2-medium'  # the base model of every run
dataset = 'cornell-movie-review-data/rotten_tomatoes'
out_dir = 'sweep'
zero_shot = True  # evaluate the untouched model with the instruction alone
few_shot = True  # ... and with num_shots solved examples
num_shots = 4
ranks = '16,128,196'  # LoRA ranks, comma-separated; '' for none
alpha_per_rank = 4.0  # lora_alpha = alpha_per_rank * rank
fixed_alpha = 0.0  # one lora_alpha for every rank instead (as rsLoRA intends); 0: alpha_per_rank * rank
targets = 'attn'  # LoRA targets to compare, comma-separated: attn, qv, attn_mlp (train.py's lora_targets)
variants = 'lora'  # LoRA variants to compare, comma-separated: lora, dora (DoRA), pissa (PiSSA's start)
scalings = 'standard'  # LoRA scaling rules to compare: standard (alpha / r), rslora (alpha / sqrt(r))
lora_plus_ratios = '1'  # LoRA+ ratios to compare (B's learning rate over A's); 1: plain LoRA
templates = 'instruct'  # prompt templates to compare: names (instruct: dataloader.py's own; bare, question, choices), or one text with {review}
label_words = ''  # label-word pairs to compare, ';'-separated: ';bad,good' (an empty pair: dataloader.py's own)
lora_lr = 5e-4
full_finetune = True  # also fine-tune every parameter (lora_rank=0)
full_lr = 1e-4  # every weight moves, and moves far at LoRA's rate: 5x lower
max_iters = 400
batch_size = 16
eval_interval = 50
eval_iters = 20
seeds = '1337'  # training seeds, comma-separated: each training run once per seed (1337 is train.py's default)
train_args = ''  # more train.py flags for every training run, e.g. '--loss_on=all --dtype=float16'
mode = 'generate'  # test accuracy by 'generate' (the homework's rule) or 'score'
num_samples = 0  # test reviews, drawn at random with each label in its share; 0: all
eval_batch_size = 32
keep_checkpoints = True  # keep each finished run's ckpt.pt for generate.py and export.py (full fine-tuning's without its optimizer state); False deletes it
overwrite = False  # redo runs whose folder holds a run with other settings (deleting it first)
device = 'auto'
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
DEFAULT_SEED = 1337  # train.py's: runs with it need no --seed and no suffix
# train.py's settings the grid sets, and the sweep setting that sets each
GRID = dict(init_from='init_from', dataset='dataset', device='device', lora_rank='ranks', lora_alpha='alpha_per_rank',
            learning_rate='lora_lr, full_lr', max_iters='max_iters', batch_size='batch_size',
            eval_interval='eval_interval', eval_iters='eval_iters', seed='seeds', lora_targets='targets',
            lora_scaling='scalings', lora_plus_ratio='lora_plus_ratios', lora_variant='variants', lora_init='variants',
            prompt_template='templates', label_words='label_words', out_dir='out_dir')
VARIANTS = {'lora': ('LoRA', ''), 'dora': ('DoRA', '--lora_variant=dora'), 'pissa': ('PiSSA', '--lora_init=pissa')}


def int_list(text, name):
    try:
        return [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers like '16,128,196', not {text!r}") from None


def float_list(text):
    try:
        return [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise ConfigError(f"lora_plus_ratios must be comma-separated numbers like '1,16', not {text!r}") from None


def lora_variants(c):
    """(name, method, rank, alpha, extra train.py flags) of every LoRA run of the grid, one seed."""
    out = []
    for variant, r, target, scaling, ratio in itertools.product(
            c.variants.split(','), int_list(c.ranks, 'ranks'), c.targets.split(','), c.scalings.split(','),
            float_list(c.lora_plus_ratios)):
        alpha = c.fixed_alpha or c.alpha_per_rank * r
        name, what, flags = f'lora-r{r}' + (f'-a{alpha:g}' if c.fixed_alpha else ''), [], [f'--lora_alpha={alpha:g}']
        if variant != 'lora':
            name, what, flags = f'{name}-{variant}', what + [VARIANTS[variant][0]], flags + [VARIANTS[variant][1]]
        if target != 'attn':
            name, what, flags = f'{name}-{target}', what + [target], flags + [f'--lora_targets={target}']
        if scaling != 'standard':
            name, what, flags = f'{name}-{scaling}', what + ['rsLoRA'], flags + [f'--lora_scaling={scaling}']
        if ratio != 1:
            name, what = f'{name}-plus{ratio:g}', what + [f'LoRA+ {ratio:g}']
            flags = flags + [f'--lora_plus_ratio={ratio:g}']
        out.append((name, 'LoRA' + (f" ({', '.join(what)})" if what else ''), r, alpha, flags))
    return out


def prompt_choices(c):
    """(template, label words) of every prompt the grid compares."""
    templates = [c.templates] if '{review}' in c.templates else [t.strip() for t in c.templates.split(',') if t.strip()]
    words = list(dict.fromkeys(w.strip() for w in c.label_words.split(';')))  # '': dataloader.py's own
    return list(itertools.product(templates, words))


def prompt_variant(template, words):
    """(name suffix, description, flags) of a prompt choice; nothing for the homework's."""
    suffix, what, flags = '', [], []
    if template != OWN:
        name = template if template in TEMPLATES else 'custom'
        suffix, what, flags = f'-{name}', [f'template {name}'], [f'--prompt_template={template}']
    if words:
        pair = split_label_words(words)
        suffix += ''.join('-' + re.sub(r'[^A-Za-z0-9]+', '_', w) for w in pair)
        what, flags = what + ['/'.join(pair)], flags + [f'--label_words={words}']
    return suffix, (f", {', '.join(what)}" if what else ''), flags


def plan(c):
    """The runs: name, group (the name without its seed), method, rank, alpha, lr, seed, and their flags."""
    data = [f'--dataset={c.dataset}', f'--device={c.device}']
    evaluate = [f'--mode={c.mode}', f'--num_samples={c.num_samples}', f'--batch_size={c.eval_batch_size}']
    runs = []
    prompting = [('zero-shot', 'zero-shot prompting', [])] if c.zero_shot else []
    if c.few_shot:
        prompting.append((f'few-shot-{c.num_shots}', f'{c.num_shots}-shot prompting',
                          ['--prompt_style=few_shot', f'--num_shots={c.num_shots}']))
    try:
        train_args = shlex.split(c.train_args)
    except ValueError as e:
        raise ConfigError(f"train_args cannot be split into flags ({e}): close its quotes") from None
    for arg in train_args:  # the grid's settings are the table's: train_args may not change them under it
        key = setting_name(arg)
        if key in GRID:
            raise ConfigError(f"train_args sets {key}, which the sweep sets for each run ({GRID[key]}): drop it from "
                              f"train_args")
    training = [(*variant, c.lora_lr) for variant in lora_variants(c)]
    if c.full_finetune:
        training.append(('full', 'full fine-tuning', 0, None, [], c.full_lr))
    for suffix, about, prompt in itertools.starmap(prompt_variant, prompt_choices(c)):
        for name, method, extra in prompting:
            runs.append(dict(name=name + suffix, group=name + suffix, method=method + about, rank=None, alpha=None,
                             lr=None, seed=None, train=None,
                             eval=[f'--init_from={c.init_from}', *data, *evaluate, *extra, *prompt]))
        for group, method, r, alpha, extra, lr in training:
            for seed in int_list(c.seeds, 'seeds'):
                flags = [f'--init_from={c.init_from}', *data, f'--lora_rank={r}', f'--learning_rate={lr}',
                         f'--max_iters={c.max_iters}', f'--batch_size={c.batch_size}',
                         f'--eval_interval={c.eval_interval}', f'--eval_iters={c.eval_iters}', *extra, *prompt,
                         *([f'--seed={seed}'] if seed != DEFAULT_SEED else []), *train_args]
                name = group + suffix + ('' if seed == DEFAULT_SEED else f'-seed{seed}')
                # the evaluation asks what the run was trained on: its own template and label words
                runs.append(dict(name=name, group=group + suffix, method=method + about, rank=r, alpha=alpha, lr=lr,
                                 seed=seed, train=flags, eval=['--init_from=resume', *data, *evaluate]))
    names = [r['name'] for r in runs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise ConfigError(f"two runs of the grid would share the folder {twice}: list each template and label-word "
                          f"pair once")
    return runs


def flag_values(flags):
    return dict(f.lstrip('-').split('=', 1) if '=' in f else (f, '') for f in flags or [])


def difference(saved, spec):
    """The flags in which two runs' commands differ, as 'key: old -> new'."""
    out = []
    for part in ('train', 'eval'):
        a, b = flag_values(saved.get(part)), flag_values(spec[part])
        out += [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
    return ', '.join(out) or 'a run of another kind'


def clear_stale_runs(runs, c):
    """A folder holding a run made with other settings: an error naming the difference, or (overwrite) deleted."""
    stale = []
    for run in runs:
        run_dir = os.path.join(c.out_dir, run['name'])
        spec = dict(train=run['train'], eval=run['eval'])
        saved = read_json(os.path.join(run_dir, 'sweep_run.json'))
        saved = saved and {k: saved.get(k) for k in spec}  # not what became of its checkpoint
        has_output = any(os.path.exists(os.path.join(run_dir, f)) for f in ('results.json', 'ckpt.pt', 'metrics.jsonl'))
        if saved is not None and saved != spec:
            stale.append((run_dir, difference(saved, spec)))
        elif saved is None and has_output:
            stale.append((run_dir, 'settings that were not recorded'))
    if stale and not c.overwrite:
        more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
        raise ConfigError(f"{stale[0][0]} holds a run made with other settings ({stale[0][1]}){more}: redo such runs "
                          f"with --overwrite=True, or pick another --out_dir")
    for run_dir, _ in stale:
        shutil.rmtree(run_dir)


def command(script, flags, run_dir):
    return ['python', script, *flags, f'--out_dir={run_dir}']


def execute(cmd, log_path):
    """
    Run cmd with this Python, its output appended to log_path and its progress (evaluations, the step lines
    with the time left, the result) shown here as it comes; the last line of its error, or None. The child
    runs in a session of its own and a stop signal reaches it from here alone, so that train.py saves its
    checkpoint and the sweep stops only after it has.
    """
    with open(log_path, 'a') as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), cmd[1])  # beside this one, from anywhere
        p = subprocess.Popen([sys.executable, script, *cmd[2:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
        stop = None
        while True:
            try:
                line = p.stdout.readline()
                if not line:
                    returncode = p.wait()
                    break
                log.write(line)
                log.flush()
                if line.startswith(SHOWN) and '\r' not in line:
                    print(f"  {line.rstrip()}", flush=True)
            except Interrupted as e:
                stop = stop or e
                p.send_signal(e.signum)  # a second signal too: the child then stops at once
        if stop:
            raise Interrupted(stop.signum, f"{cmd[1]} in {os.path.dirname(log_path)} stopped with exit status "
                                           f"{returncode}; run the sweep again to continue")
    if returncode == 0:
        return None
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return (lines[-1] if lines else f"exit status {returncode}")[:300]


# a run's lines the sweep shows: its setup, evaluations, progress, result and errors
SHOWN = ('LoRA r=', 'full fine-tuning:', 'step ', 'iter ', 'Accuracy', 'error:', 'note:', 'warning:')


def read_metrics(run_dir):
    return read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))[0]


def run_one(run, c):
    """Train (or resume) and evaluate one run unless it finished before with these settings; its table row."""
    run_dir = os.path.join(c.out_dir, run['name'])
    os.makedirs(run_dir, exist_ok=True)
    spec_path = os.path.join(run_dir, 'sweep_run.json')
    write_json(dict(read_json(spec_path, {}), train=run['train'], eval=run['eval']), spec_path)
    results_path = os.path.join(run_dir, 'results.json')
    ckpt = os.path.join(run_dir, 'ckpt.pt')
    train_cmd = None
    if run['train'] is not None:
        flags = run['train']
        if os.path.exists(ckpt) and not os.path.exists(results_path):  # stopped after it saved: continue it
            flags = ['--init_from=resume'] + [f for f in flags if not f.startswith('--init_from=')]
        elif os.path.exists(os.path.join(run_dir, 'metrics.jsonl')):  # this run's own logs, of a failed try
            flags = flags + ['--overwrite=True']
        train_cmd = command('train.py', flags, run_dir)
    eval_cmd = command('generate.py', run['eval'], run_dir)
    row = dict(run, commands=[shlex.join(command(s, f, run_dir)) for s, f in (('train.py', run['train']),
                                                                              ('generate.py', run['eval'])) if f],
               error=None)
    if os.path.exists(results_path):
        print(f"{run['name']}: finished before with these settings, reused")
    else:
        log = os.path.join(run_dir, 'log.txt')
        print(f"{run['name']}: running (all its output in {log})", flush=True)
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
    if results and os.path.exists(ckpt):
        slim_or_remove(ckpt, c.keep_checkpoints, run_dir)
    trains = run['train'] is not None
    row.update(accuracy=results.get('accuracy'), eval_s=results.get('seconds'), n_test=results.get('n'),
               unparseable=results.get('unparseable'), trainable=info.get('trainable_params', None if trains else 0),
               trainable_pct=info.get('trainable_pct', None if trains else 0.0),
               best_val_loss=min((m['val_loss'] for m in metrics), default=None),
               train_s=metrics[-1]['elapsed_s'] if metrics else None, metrics=metrics,
               step_ms=median_step_ms(run_dir), peak_memory_mb=info.get('peak_memory_mb'))
    return row


def slim_or_remove(ckpt, keep, run_dir):
    """A finished run's checkpoint as generate.py and export.py need it: full fine-tuning's without its optimizer
    state (two thirds of its size), an adapter's as it is (a few MB); or, unless keep, removed, and its folder
    saying so."""
    if not keep:
        os.remove(ckpt)
        path = os.path.join(run_dir, 'sweep_run.json')
        write_json(dict(read_json(path, {}), checkpoint_removed=True), path)
        return
    import torch
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    if not state.get('adapter_only') and 'optimizer' in state:
        state.pop('optimizer')
        state.pop('scaler', None)
        save_atomic(state, ckpt)


def median_step_ms(run_dir):
    """The median of a run's logged step times (the first, which compiles and warms up, left out)."""
    steps = [r['step_ms'] for r in read_jsonl(os.path.join(run_dir, 'steps.jsonl'))[0][1:] if 'step_ms' in r]
    return statistics.median(steps) if steps else None


def fmt(value, spec, missing='-'):
    return missing if value is None else format(value, spec)


def spread(values, spec, scale=1.0):
    """'mean ± sample standard deviation (min-max)' of values."""
    v = [x * scale for x in values]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{format(statistics.mean(v), spec)} ± {format(sd, spec)} ({format(min(v), spec)}-{format(max(v), spec)})"


def summary_lines(rows):
    """Mean and spread over seeds of every group of training runs that has more than one."""
    groups = {}
    for r in rows:
        if r['train'] is not None and r['accuracy'] is not None:
            groups.setdefault(r['group'], []).append(r)
    if not any(len(g) > 1 for g in groups.values()):
        return []
    lines = ["", "## Mean over seeds", "",
             "Mean ± sample standard deviation, and the range (min-max), over the seeds of each method.", "",
             "Step ms: the median logged step; peak MB: run.json's peak memory; both the mean over the seeds.", "",
             "| method | r | alpha | lr | seeds | test accuracy (%) | best val loss | trainable | step ms | peak MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, g in groups.items():
        r = g[0]
        mean = {k: statistics.mean(v) if v else None for k in ('step_ms', 'peak_memory_mb')
                for v in [[x[k] for x in g if x.get(k) is not None]]}
        lines.append(f"| {name} | {fmt(r['rank'], 'd')} | {fmt(r['alpha'], 'g')} | {r['lr']:g} | "
                     f"{', '.join(str(x['seed']) for x in g)} | {spread([x['accuracy'] for x in g], '.1f', 100)} | "
                     f"{spread([x['best_val_loss'] for x in g if x['best_val_loss'] is not None], '.4f')} | "
                     f"{fmt(r['trainable'], ',')} | {fmt(mean['step_ms'], '.0f')} | {fmt(mean['peak_memory_mb'], '.0f')} |")
    return lines


def write_table(rows, c, argv, path):
    n = {r['n_test'] for r in rows if r['n_test']}
    reviews = (f"{n.pop():,} test reviews" if len(n) == 1 else "the test reviews") + \
        (" (a random sample, each label in its share, the same for every run)" if c.num_samples else " (all of them)")
    lines = [f"# Sweep: {c.init_from} on {c.dataset}", "",
             f"Produced by `{shlex.join(['python', 'sweep.py', *argv])}`; every run's own commands are listed "
             f"below the tables. Training: {c.max_iters} iterations of {c.batch_size} reviews. Accuracy is on "
             f"{reviews}, {c.mode} mode. Train seconds include the periodic validation.", "",
             "| run | method | r | alpha | lr | trainable params | trainable % | best val loss | test accuracy | "
             "unparseable | train s | eval s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        accuracy = f"failed: {r['error']}" if r['error'] else fmt(r['accuracy'], '.4f')
        lines.append(f"| {r['name']} | {r['method']} | {fmt(r['rank'], 'd')} | {fmt(r['alpha'], 'g')} | "
                     f"{fmt(r['lr'], 'g')} | {fmt(r['trainable'], ',')} | {fmt(r['trainable_pct'], '.2f')} | "
                     f"{fmt(r['best_val_loss'], '.4f')} | {accuracy} | {fmt(r['unparseable'], 'd')} | "
                     f"{fmt(r['train_s'], '.0f')} | {fmt(r['eval_s'], '.0f')} |")
    lines += summary_lines(rows) + ["", "## Commands", ""]
    for r in rows:
        lines += [f"- {r['name']}:"] + [f"  - `{cmd}`" for cmd in r['commands']]
    save_atomic(('\n'.join(lines) + '\n').encode(), path)


def val_loss_figure(rows):
    """Validation loss of each method (mean over seeds, their range shaded): all of it, and after the first drop."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter
    groups = {}
    for r in rows:
        if r['metrics']:
            groups.setdefault(r['group'], []).append(r['metrics'])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = [('o', '-'), ('s', '--'), ('^', '-.'), ('D', ':'), ('v', '-'), ('P', '--'), ('X', '-.')]
    for k, (name, runs) in enumerate(groups.items()):
        its = [m['iter'] for m in runs[0]]
        curves = [[m['val_loss'] for m in ms] for ms in runs if [m['iter'] for m in ms] == its]
        mean = [statistics.mean(v) for v in zip(*curves)]
        marker, line = styles[k % len(styles)]
        label = name + (f" (mean of {len(curves)} seeds)" if len(curves) > 1 else "")
        for ax, part in zip(axes, (slice(None), slice(1, None))):
            x, y = its[part], mean[part]
            ax.plot(x, y, linestyle=line, marker=marker, ms=5, mfc='none', lw=1.3, label=label, color=f"C{k}")
            if len(curves) > 1:
                ax.fill_between(x, [min(v) for v in zip(*curves)][part], [max(v) for v in zip(*curves)][part],
                                color=f"C{k}", alpha=0.15)
    log_scale(axes[0])
    axes[0].set_title('validation loss, every evaluation (log scale)')
    axes[1].set_title('after the first evaluation (linear scale)')
    for ax in axes:
        ax.set_xlabel('iteration')
        ax.set_ylabel('validation loss per target token')
        ax.grid(alpha=0.3, which='both')
        ax.yaxis.set_major_formatter(FormatStrFormatter('%g'))
    if groups:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig




def main(argv):
    c = configure(DEFAULTS, argv)
    check([one_of('mode', c.mode, EVAL_MODES),
           (not int_list(c.seeds, 'seeds'), "seeds must name at least one seed, like '1337'"),
           (min(int_list(c.ranks, 'ranks'), default=1) < 1,
            f"ranks must be >= 1, not {c.ranks!r} (full fine-tuning is --full_finetune=True)"),
           *[one_of('each of targets', t, LORA_TARGETS) for t in c.targets.split(',')],
           *[one_of('each of variants', v, VARIANTS) for v in c.variants.split(',')],
           *[one_of('each of scalings', s, LORA_SCALINGS) for s in c.scalings.split(',')],
           *[(len(set(items.split(','))) < len(items.split(',')), f"{name} names a choice twice ({items!r}): list each "
              f"once") for name, items in (('ranks', c.ranks), ('targets', c.targets), ('variants', c.variants),
                                           ('scalings', c.scalings), ('seeds', c.seeds))],
           (not prompt_choices(c), "templates and label_words must each name at least one choice"),
           *[rule for choice in prompt_choices(c) for rule in prompt_errors(*choice)],
           (min(c.max_iters, c.batch_size, c.eval_interval, c.eval_iters, c.num_shots, c.eval_batch_size) < 1,
            "max_iters, batch_size, eval_interval, eval_iters, num_shots and eval_batch_size must be >= 1"),
           (c.num_samples < 0, f"num_samples must be >= 0 (0: the whole split), not {c.num_samples}"),
           (min(c.lora_lr, c.full_lr, c.alpha_per_rank) <= 0 or c.fixed_alpha < 0,
            "lora_lr, full_lr and alpha_per_rank must be > 0, fixed_alpha >= 0")])
    runs = plan(c)
    check_runs(runs)
    with hold_out_dir(c.out_dir, command_line()):
        clear_stale_runs(runs, c)
        rows = [run_one(run, c) for run in runs]
        write_table(rows, c, argv, os.path.join(c.out_dir, 'results.md'))
        save_figure(val_loss_figure(rows), os.path.join(c.out_dir, 'val_loss.png'))
    print(f"wrote {os.path.join(c.out_dir, 'results.md')} and val_loss.png")
    failed = [r for r in rows if r['error']]
    if failed:  # a scheduler or CI must not read the sweep as a success
        raise RunsFailed(rows, f"{len(failed)} of {len(rows)} runs failed ({', '.join(r['name'] for r in failed)}), "
                               f"e.g. {failed[0]['name']}: {failed[0]['error'].removeprefix('error: ')}")
    return rows


class RunsFailed(Exception):
    """Some runs of a finished sweep failed (its table says which): exit status 1."""

    def __init__(self, rows, message):
        super().__init__(message)
        self.rows = rows


def check_runs(runs):
    """Each run's flags as train.py and generate.py will check them, before the first run starts."""
    import generate
    import train
    from lorakit.training import check_settings
    checks = ((train.DEFAULTS, check_settings, 'train'), (generate.DEFAULTS, generate.check_settings, 'eval'))
    for run in runs:
        for defaults, check_flags, which in checks:
            if run[which] is None:
                continue
            try:
                check_flags(configure(defaults, run[which]))
            except ConfigError as e:
                raise ConfigError(f"run {run['name']}: {e}") from None


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__, errors=(RunsFailed,)))

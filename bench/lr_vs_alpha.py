"""
Homework question 2.9, measured: is doubling alpha the same as doubling the learning rate under Adam?

Three LoRA runs of train.py from the same start (seed, initial A, batches): the baseline, alpha
times `factor`, and the learning rate times `factor`. For each: the validation loss at every
evaluation and the test accuracy (generate.py); then how far apart their learned updates
scaling * B @ A are, layer by layer, as ||dW_x - dW_y|| / ||dW_y|| summed over the layers.

    python bench/lr_vs_alpha.py --init_from=../shared/models/gpt2-imdb-12x256 \
        --dataset=../shared/data/rotten_tomatoes --device=cpu

Prints a table and writes it as JSON to out_dir/lr_vs_alpha.json (docs/ quotes bench/lr_vs_alpha.json,
written with --results=bench/lr_vs_alpha.json).
"""

import json
import os
import shlex
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)
from lorakit.checkpoint import load_checkpoint  # noqa: E402
from lorakit.common import write_json  # noqa: E402
from lorakit.adapters import lora_layers  # noqa: E402

# -----------------------------------------------------------------------------
init_from = 'gpt2'
dataset = 'cornell-movie-review-data/rotten_tomatoes'
out_dir = 'out-lr-vs-alpha'  # one folder per run inside it
lora_rank = 16
lora_alpha = 64.0
learning_rate = 5e-4
factor = 2.0
max_iters = 400
eval_interval = 50
seed = 1337
device = 'auto'
train_args = ''  # more train.py flags for every run
num_samples = 0  # test reviews each run is scored on (a stratified sample); 0: all 1,066
results = ''  # the JSON file of the table; '': out_dir/lr_vs_alpha.json
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())


class RunFailed(Exception):
    """A train.py or generate.py run of the comparison failed: one line, exit status 1."""


def script(path, *args):
    """Run one of the repository's scripts; its error line as a RunFailed."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, path), *args], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode:
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        raise RunFailed(f"{path} failed ({lines[-1] if lines else f'exit status {p.returncode}'})")


def train_and_evaluate(c, name, alpha, lr):
    run_dir = os.path.join(c.out_dir, name)
    common = [f'--dataset={c.dataset}', f'--out_dir={run_dir}', f'--device={c.device}']
    script('train.py', f'--init_from={c.init_from}', *common, '--overwrite=True', f'--lora_rank={c.lora_rank}',
           f'--lora_alpha={alpha}', f'--learning_rate={lr}', f'--max_iters={c.max_iters}',
           f'--eval_interval={c.eval_interval}', f'--seed={c.seed}', *shlex.split(c.train_args))
    script('generate.py', '--init_from=resume', *common, f'--num_samples={c.num_samples}')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        val = [json.loads(line)['val_loss'] for line in f]
    with open(os.path.join(run_dir, 'results.json')) as f:
        accuracy = json.load(f)['accuracy']
    model, _ = load_checkpoint(os.path.join(run_dir, 'ckpt.pt'))
    updates = {n: m.lora_scaling * (m.lora_B.detach() @ m.lora_A.detach()) for n, m in lora_layers(model)}
    return dict(lora_alpha=alpha, learning_rate=lr, val_loss=val, accuracy=accuracy), updates


def distance(a, b):
    """sum over layers of ||a - b|| / sum of ||b||: how far update a is from update b, relative to b."""
    return float(sum((a[k] - b[k]).norm() for k in b) / sum(b[k].norm() for k in b))


def main(argv):
    c = configure(DEFAULTS, argv)
    variants = {'baseline': (c.lora_alpha, c.learning_rate),
                f'alpha x{c.factor:g}': (c.lora_alpha * c.factor, c.learning_rate),
                f'lr x{c.factor:g}': (c.lora_alpha, c.learning_rate * c.factor)}
    runs, updates = {}, {}
    for name, (alpha, lr) in variants.items():
        runs[name], updates[name] = train_and_evaluate(c, name.replace(' ', '-'), alpha, lr)
        print(f"{name}: alpha {alpha:g}, lr {lr:g}, final val loss {runs[name]['val_loss'][-1]:.4f}, "
              f"accuracy {runs[name]['accuracy']:.4f}", flush=True)
    a, l = f'alpha x{c.factor:g}', f'lr x{c.factor:g}'
    norms = {k: float(sum(v.norm() for v in u.values())) for k, u in updates.items()}
    result = dict(runs=runs, update_norm=norms, distance={f'{a} vs {l}': distance(updates[a], updates[l]),
                                                          f'{a} vs baseline': distance(updates[a], updates['baseline']),
                                                          f'{l} vs baseline': distance(updates[l], updates['baseline'])},
                  settings=dict(c))
    print(json.dumps({k: result[k] for k in ('update_norm', 'distance')}, indent=2))
    write_json(result, c.results or os.path.join(c.out_dir, 'lr_vs_alpha.json'))
    return result


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__, errors=(RunFailed,)))

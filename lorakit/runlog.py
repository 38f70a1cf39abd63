"""
A training run's record on rank 0: metrics.jsonl (one line per evaluation), steps.jsonl (one line per
log step), run.json (base model, parameter counts, settings), loss_curve.png and, when asked, W&B.

    log = RunLog(c, progress, info, read_logs(c, iter_num))
    log.evaluation(it, {'train': 2.1, 'val': 2.3}, lr); log.step(it, loss, grad_norm, lr, ms, tokens_per_s)

A resumed run keeps its logs up to its checkpoint; a torn line (what a kill in mid-write leaves) is
dropped with a note. Every file is written atomically or appended a whole line at a time.
"""

import json
import os

from lorakit.common import append_line, log_scale, read_jsonl, save_atomic, save_figure, write_json


def read_logs(c, iter_num):
    """The evaluations and log steps a resumed run keeps (those up to its checkpoint); a new run keeps none.
    Lines that cannot be read (torn by a kill, garbled) are dropped, with one line saying so."""
    if c.init_from != 'resume':
        return [], []
    logs = []
    for name in ('metrics.jsonl', 'steps.jsonl'):
        records, dropped = read_jsonl(os.path.join(c.out_dir, name))
        if dropped:
            print(f"note: dropped {dropped} unreadable line{'s' * (dropped > 1)} of {os.path.join(c.out_dir, name)}")
        logs.append([r for r in records if r['iter'] <= iter_num])
    return logs


class RunLog:
    """metrics.jsonl (evaluations), steps.jsonl (log steps), run.json, loss_curve.png and W&B, on rank 0."""

    def __init__(self, c, progress, info, logs):
        self.c, self.progress = c, progress
        self.metrics_path = os.path.join(c.out_dir, 'metrics.jsonl')
        self.steps_path = os.path.join(c.out_dir, 'steps.jsonl')
        self.info = info
        write_json(info, os.path.join(c.out_dir, 'run.json'))
        # a new run starts new files; a resumed one keeps its past up to its checkpoint
        self.evals, self.steps = logs
        for records, path in ((self.evals, self.metrics_path), (self.steps, self.steps_path)):
            save_atomic(''.join(json.dumps(r) + '\n' for r in records).encode(), path)
        self.wandb = None
        if c.wandb_log:
            import wandb
            name = c.wandb_run_name or (f"lora-r{c.lora_rank}-a{c.lora_alpha:g}-lr{c.learning_rate:g}" if c.lora_rank
                                        else f"full-lr{c.learning_rate:g}")
            self.wandb = wandb
            wandb.init(project=c.wandb_project, name=name, config=dict(c))

    def _append(self, records, path, rec):
        append_line(path, rec)
        records.append(rec)

    def evaluation(self, it, losses, lr):
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self._append(self.evals, self.metrics_path, dict(iter=it, train_loss=losses['train'], val_loss=losses['val'],
                                                         lr=lr, elapsed_s=round(self.progress.elapsed(), 3)))
        self.plot()
        if self.wandb:
            self.wandb.log({'iter': it, 'train/loss': losses['train'], 'val/loss': losses['val'], 'lr': lr})

    def step(self, it, loss, grad_norm, lr, ms, tokens_per_s, left_s=None):
        print(f"iter {it}: loss {loss:.4f}, grad norm {grad_norm:.6f}, lr {lr:.2e}, time {ms:.0f}ms, "
              f"{tokens_per_s:,.0f} tokens/s" + (f", {it + 1}/{self.c.max_iters} {duration(left_s)} left"
                                                  if left_s is not None else ""))
        self._append(self.steps, self.steps_path, dict(iter=it, loss=loss, grad_norm=grad_norm, lr=lr,
                                                       step_ms=round(ms, 2), tokens_per_s=round(tokens_per_s)))
        if self.wandb:
            self.wandb.log({'iter': it, 'train/step_loss': loss, 'lr': lr})

    def plot(self):
        """loss_curve.png redrawn from every log step and evaluation so far."""
        save_figure(loss_figure(self.steps, self.evals, run_title(self.c)), os.path.join(self.c.out_dir, 'loss_curve.png'))

    def close(self):
        """run.json gains the run's peak memory: the GPU's allocations on CUDA, else the process's resident size."""
        import resource
        import torch
        cuda = str(self.info.get('device', '')).startswith('cuda')
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux counts kB
        write_json(dict(self.info, peak_memory_mb=round(peak, 1), peak_memory_of='cuda allocated' if cuda else
                        'process resident set'), os.path.join(self.c.out_dir, 'run.json'))
        if self.wandb:
            self.wandb.finish()
            self.wandb.teardown()  # a later run in this process (tests, notebooks) starts afresh


def setup_lines(c, defaults, base_model, data, rt):
    """What a run starts from, in a few lines: base, data, device, the settings changed, a warmup that
    takes most of the run."""
    changed = [f"{k}={c[k]}" for k in defaults if c[k] != defaults[k] and k not in ('init_from', 'out_dir', 'checkpoint')]
    lines = [f"base {base_model}; {len(data['train']):,} train and {len(data['validation']):,} validation reviews; "
             f"{rt.device}, {rt.dtype}" + (f", {rt.world} processes" if rt.world > 1 else ""),
             f"settings changed from the defaults: {', '.join(changed) or 'none'}"]
    if c.decay_lr and c.warmup_iters > c.max_iters / 2 and not c.eval_only:
        lines.append(f"note: warmup_iters={c.warmup_iters} is most of max_iters={c.max_iters}: the learning rate "
                     + ("never reaches" if c.warmup_iters >= c.max_iters else "barely reaches")
                     + f" {c.learning_rate:g}; use --warmup_iters={max(1, c.max_iters // 10)} for a short run")
    if str(rt.device) == 'cpu':
        import torch
        note = busy_cpu_note(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
        lines += [note] if note else []
    return "\n".join(lines)


def busy_cpu_note(load, cores, threads):
    """A note when other work holds the cores: each of torch's threads then waits for the slowest one at every
    operation, and one thread was 7-20x faster per step (docs/performance.md)."""
    if threads > 1 and load > cores and 'OMP_NUM_THREADS' not in os.environ:
        return (f"note: the CPU is busy (load {load:.1f} on {cores} cores): OMP_NUM_THREADS=1 before the command "
                f"can make each step several times faster")
    return None


def duration(seconds):
    """'45s', '3m20s', '2h05m': a time to plan with."""
    s = round(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def method(c):
    return f"LoRA r={c.lora_rank}, alpha={c.lora_alpha:g}" if c.lora_rank else "full fine-tuning"


def run_title(c):
    return f"{method(c)}, lr {c.learning_rate:g}"


def loss_figure(steps, evals, title):
    """
    Training loss at every log step as a line, validation loss as markers: the whole run on a log
    scale, and beside it the run after its first drop (from the second evaluation on) on a linear
    scale, where runs differ.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    start = evals[1]['iter'] if len(evals) > 1 else 0
    for ax, first in zip(axes, (0, start)):
        later = [r for r in steps if r['iter'] >= first]
        if later:
            ax.plot([r['iter'] for r in later], [r['loss'] for r in later], '-', lw=1.2, color='tab:blue',
                    label='training (mean since the previous log step)')
        later = [r for r in evals if r['iter'] >= first]
        ax.plot([r['iter'] for r in later], [r['val_loss'] for r in later], 'o-', ms=5, lw=0.8, color='tab:orange',
                mec='black', mew=0.6, label='validation', zorder=3)
        ax.set_xlabel('iteration')
        ax.grid(alpha=0.3, which='both')
    log_scale(axes[0])
    axes[0].set_ylabel('loss per target token')
    axes[0].set_title('the whole run (log scale)')
    axes[1].set_title(f'from iteration {start} (linear scale)')
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

"""
Fine-tune GPT-2 on instruction-templated Rotten Tomatoes reviews, with LoRA or in full.

    python train.py configs/finetune_params_config.py --init_from=gpt2-medium --out_dir=gpt-lora-default
    python train.py configs/finetune_params_config.py --rank=0 --lr=1e-4 --out_dir=out-full   # full fine-tuning
    python train.py --init_from=resume --out_dir=gpt-lora-default            # continue a run as it was set up
    torchrun --standalone --nproc_per_node=2 train.py configs/finetune_params_config.py   # data parallel
    torchrun --standalone --nproc_per_node=2 train.py configs/finetune_params_config.py --fsdp=True   # sharded

With lora_rank > 0 only the LoRA matrices train; with lora_rank = 0 every parameter does. Writes
ckpt.pt (LoRA: the adapter alone), metrics.jsonl, steps.jsonl, loss_curve.png and run.json to out_dir.
Top to bottom: the settings, the model, the data, the training loop, main; several processes and stop
signals are distributed.py's, the logs runlog.py's.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

from configurator import ConfigError, Settings, override, run_cli, settings_of  # first: --help skips torch
import torch

from lorakit import training
from lorakit.adapters import evaluating, parameter_summary, pissa_iterations, train_adapter_extras, variants
from lorakit.checkpoint import (Progress, base_fingerprint, ckpt_path, diverged, mean_loss, model_from_checkpoint,
                                save_checkpoint)
from lorakit.common import as_config_error, command_line, fetch_inputs, get_lr, gpt2_encoding, hold_out_dir
from lorakit.data import Batches, load_splits
from lorakit.distributed import all_reduce, finish, optimized, setup_runtime, stop_requested, stops_deferred
from lorakit.prompts import OWN, own_instruction, pick_prompt
from lorakit.runlog import RunLog, duration, method, read_logs, setup_lines
from lorakit.training import prepare_training
from model import GPT, OVERRIDABLE, GPTConfig, target_positions
# BEGIN SOLUTION train.py LoRA
# STUB: # TODO (train.py LoRA, in build_model below): import mark_only_lora_as_trainable from lora.py to use there.
from lora import mark_only_lora_as_trainable
# END SOLUTION

# The settings below are defaults only: a config file and --key=value flags override them (with
# init_from=resume, the run's own settings do), and the run reads the result as c.<name>.
# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
init_from = 'gpt2-medium'  # gpt2 .. gpt2-xl, a hub id, a local checkpoint directory, 'resume' or 'scratch'
overwrite = False  # replace another run's checkpoint in out_dir instead of refusing to
eval_interval = 100  # iterations between evaluations (and checkpoints)
eval_iters = 20  # batches per loss estimate
log_interval = 10  # iterations between printed (and steps.jsonl) training losses, each the mean since the last
eval_only = False  # evaluate once and stop
always_save_checkpoint = True  # save at every evaluation, not only when validation loss improves
checkpoint = 'auto'  # 'adapter': LoRA tensors only (MBs; the base is reloaded from init_from); 'full'; 'auto': adapter for LoRA on a pretrained model
# Weights & Biases
wandb_log = False  # log to W&B (wandb_project, wandb_run_name only take effect with it)
wandb_project = 'gpt2-lora'
wandb_run_name = ''  # '' names the run after rank, alpha and learning rate
# data
dataset = 'cornell-movie-review-data/rotten_tomatoes'  # hub id or local directory of split files
loss_on = 'label'  # 'label': learn the answer only; 'all': the whole text, as the handout does
prompt_template = 'instruct'  # instruct: dataloader.py's own; bare, question, choices, or a text with {review} (lorakit/prompts.py)
label_words = ''  # the answers for label 0 and 1, comma-separated, words or phrases (bad,good); '': dataloader.py's own
batch_size = 16
gradient_accumulation_steps = 1
bucket = 32  # batch reviews of similar length, drawn from windows of this many batches (little padding); 0: random batches
pad_multiple = 0  # pad batch lengths to a multiple of this, so torch.compile sees few shapes; 0: 32 with compile, else none
block_size = 0  # longest text in tokens (reviews beyond it are shortened); 0: the model's context
# model
lora_rank = 128  # 0: full fine-tuning
lora_alpha = 512.0
lora_dropout = 0.05
lora_targets = 'attn'  # attn: c_attn and the attention's c_proj (the handout's); qv: the query and value only (the LoRA paper's); attn_mlp: attn and the MLP
lora_scaling = 'standard'  # standard: the update is scaled by alpha / r; rslora: alpha / sqrt(r) (rank-stabilised LoRA)
lora_plus_ratio = 1.0  # LoRA+: every B learns at this multiple of the learning rate, A at the rate itself; 1: plain LoRA
lora_variant = 'lora'  # lora: W + s B A; dora: DoRA, a learned magnitude per output feature times the direction of W + s B A
lora_init = 'default'  # default: A Kaiming-uniform, B zero; pissa: PiSSA, A and B from W's top r singular vectors (W keeps the rest); pissa_niter_N: the same from a randomised SVD with N iterations
dropout = 0.0
n_layer = 12  # these three only for init_from='scratch'
n_head = 12
n_embd = 768
# optimizer
learning_rate = 5e-4
max_iters = 400
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping
decay_lr = True  # cosine decay to min_lr after warmup
warmup_iters = 20
lr_decay_iters = 0  # iteration where the decay ends; 0: max_iters
min_lr = 0.0  # where the decay ends; 0: learning_rate / 10
# system
device = 'auto'  # auto: cuda, else mps, else cpu; or cpu, cuda, cuda:1, mps
dtype = 'auto'  # auto: bfloat16 on GPUs of compute capability >= 8, float16 (+ gradient scaler) on older ones, else float32
compile = False  # torch.compile the model
grad_checkpoint = False  # recompute each block's activations in the backward pass: less memory, more compute
fsdp = False  # under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2), not copy them (DDP)
seed = 1337
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())

# --- the settings, checked (lorakit/training.py has the rules) --------------------------------------

def read_settings(argv):
    """(settings, checkpoint or None): the command line over DEFAULTS (over a resumed run's own), checked."""
    return training.read_settings(argv, DEFAULTS)


# --- the model --------------------------------------------------------------------------------------

def build_model(c, ckpt):
    """The model to train (pretrained, resumed or new), its base model's name, and which parameters train."""
    torch.manual_seed(c.seed)  # the LoRA init: the same on every rank and in every run with this seed
    lora = {k: c[k] for k in OVERRIDABLE}  # dropout and the LoRA settings
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, ckpt_path(c.out_dir))
        base_model = ckpt['base_model']
    elif c.init_from == 'scratch':
        model = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size or 1024, **lora))
        base_model = 'scratch'
    else:
        # BEGIN SOLUTION train.py LoRA
        # STUB: # TODO: load the pretrained GPT-2 named by c.init_from with LoRA layers of this run's settings (the
        # STUB: # dict lora holds the rank, alpha and dropout, and the other settings the checkpoint may be given).
        # STUB: raise NotImplementedError("train.py LoRA: load the pretrained model with LoRA layers")
        model = GPT.from_pretrained(c.init_from, lora)
        # END SOLUTION
        # a local base is reloaded from wherever the run is continued or evaluated
        base_model = os.path.abspath(c.init_from) if os.path.isdir(c.init_from) else c.init_from
    if c.block_size > model.config.block_size:
        raise ConfigError(f"block_size={c.block_size} is larger than the model's context of "
                          f"{model.config.block_size} tokens; use --block_size={model.config.block_size} or less")
    if 0 < c.block_size < model.config.block_size:
        model.crop_block_size(c.block_size)
    if c.lora_rank > 0:
        # BEGIN SOLUTION train.py LoRA
        # STUB: # TODO: with LoRA, only the LoRA matrices train (lora.py has the function).
        # STUB: raise NotImplementedError("train.py LoRA: let only the LoRA matrices train")
        mark_only_lora_as_trainable(model)
        # END SOLUTION
        train_adapter_extras(model)  # DoRA's magnitudes
    else:
        model.requires_grad_(True)
    return model, base_model


# --- the data ---------------------------------------------------------------------------------------

def run_prompt(c, enc):
    """The run's Prompt and what writes its texts: dataloader.py's _add_instruction_finetuning (the course's API)
    where the run asks the homework's own prompt, else the Prompt's."""
    own = own_instruction(enc)
    prompt = as_config_error(pick_prompt, c.prompt_template, c.label_words, own)
    return prompt, own if c.prompt_template == OWN and not c.label_words else prompt.instruction


def make_loaders(c, rt, data, enc, block_size, prompt, add_instruction):
    """Batches of the train and validation splits, this process's share of each."""
    options = dict(tokenizer=enc, batch_size=c.batch_size, add_instruction=add_instruction, prompt=prompt,
                   block_size=block_size, loss_on=c.loss_on, seed=c.seed, bucket=c.bucket,
                   pad_multiple=c.pad_multiple or (32 if c.compile else 1), rank=rt.rank, world_size=rt.world)
    return (as_config_error(Batches, data['train'], **options),
            as_config_error(Batches, data['validation'], **options))


def label_positions(y, c, device, compiled=False):
    """Where a batch's targets are, for the model's label_loss, found on the host before the batch moves; or
    None for forward's plain loss, which a compiled model uses when every token is a target (a shape per length)."""
    if compiled and c.loss_on == 'all':
        return None
    start, index = target_positions(y, trim=not compiled)  # compiled: no shape per first column
    return start, index.to(device, non_blocking=True)


# --- the training loop ------------------------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, loaders, c, rt):
    """
    Mean loss per target token over the first eval_iters batches of each split, dropout off, LoRA
    un-merged. Each process takes its share of the same global batches and the sums are added up: one
    process or N, the same examples and the same number, to float rounding.
    """
    out = {}
    with evaluating(model):
        for split, loader in loaders.items():
            sums = torch.zeros(2, device=rt.device)  # loss summed over target tokens, their count
            for x, y in loader.shared_batches(c.eval_iters):
                positions = label_positions(y, c, rt.device)
                with rt.ctx:
                    _, loss = model(x.to(rt.device), y.to(rt.device), positions=positions)
                n = len(positions[1])
                sums[0] += loss.float() * n
                sums[1] += n
            loss_sum, count = all_reduce(sums, rt).tolist()
            out[split] = loss_sum / count
    return out


@dataclass
class Trainer:
    """A run as it trains. The loop, train(), calls its methods: set_lr, evaluate, step, log_step, stop."""
    c: Settings
    rt: SimpleNamespace  # device, dtype, autocast context, ranks (distributed.setup_runtime)
    raw_model: GPT
    model: torch.nn.Module  # raw_model as it trains: compiled, under DDP (FSDP shards raw_model itself)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: Batches
    val_loader: Batches = None
    progress: Progress = None
    log: RunLog = None  # rank 0's; None elsewhere
    saved: bool = False  # a checkpoint was saved in this run

    def __post_init__(self):
        self.start = self.progress.iter_num if self.progress else 0
        self.t0 = time.time()

    def set_lr(self, it):
        lr = get_lr(self.c, it)
        for group in self.optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']  # LoRA+: B's groups learn faster
        return lr

    def step(self, it):
        """
        One optimizer step over gradient_accumulation_steps micro-batches, with no host-device sync: (the
        summed loss and target count as a device tensor, the tokens computed, the gradient norm). The loss is
        normalised by the whole step's target tokens (every rank's): the same gradient for any split of it.
        """
        c, rt, model = self.c, self.rt, self.model
        steps = range(it * c.gradient_accumulation_steps, (it + 1) * c.gradient_accumulation_steps)
        batches = [self.train_loader.get_batch(i) for i in steps]
        n_step = sum(map(self.train_loader.global_targets, steps))
        sums = torch.zeros(2, device=rt.device)
        torch.manual_seed(c.seed + 1000 * rt.rank + it)  # dropout masks depend on the iteration alone
        try:
            for m, (x, y) in enumerate(batches):
                n = int((y != -1).sum())
                positions = label_positions(y, c, rt.device, compiled=c.compile)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                if rt.distributed and not rt.fsdp:  # DDP: gradients are averaged at the last micro-batch only
                    model.require_backward_grad_sync = m == len(batches) - 1
                with rt.ctx:
                    loss = model(x, y, positions=positions)[1]  # logits not kept alive through backward
                self.scaler.scale(loss * (n * rt.world / n_step)).backward()
                sums[0] += loss.detach().float() * n
                sums[1] += n
        except torch.cuda.OutOfMemoryError:
            raise ConfigError(f"out of GPU memory at batch_size={c.batch_size}: try --batch_size="
                              f"{max(1, c.batch_size // 2)} --gradient_accumulation_steps="
                              f"{2 * c.gradient_accumulation_steps} (the same step in smaller pieces)") from None
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(optimized(self.optimizer),
                                                   c.grad_clip if c.grad_clip > 0 else float('inf'))
        self.scaler.step(self.optimizer)  # float16: a step whose gradients overflowed is skipped, by design
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int((x != self.train_loader.tokenizer.eot_token).sum()) for x, _ in batches)
        return sums, tokens, grad_norm

    def evaluate(self, it, lr, last):
        """Estimate the losses, log them, save a checkpoint if it is due; the seconds it took."""
        c, progress, t0 = self.c, self.progress, time.time()
        losses = estimate_loss(self.raw_model, {'train': self.train_loader, 'val': self.val_loader}, c, self.rt)
        if not all(map(math.isfinite, losses.values())):
            raise diverged('the loss', it, c.out_dir)
        if self.log:
            self.log.evaluation(it, losses, lr)
        improved = losses['val'] < progress.best_val_loss
        progress.best_val_loss = min(progress.best_val_loss, losses['val'])
        trained = it > self.start and not c.eval_only
        if trained and (c.always_save_checkpoint or improved or (last and not self.saved)):
            self.save()
            if self.rt.master:
                print(f"saved checkpoint to {ckpt_path(c.out_dir)}")
        return time.time() - t0

    def save(self):
        save_checkpoint(ckpt_path(self.c.out_dir), self.raw_model, self.optimizer, self.scaler, self.c, self.progress,
                        self.rt)
        self.saved = True

    def log_step(self, it, sums, grad_norm, lr, step_s, tokens_per_s):
        """Print and log the mean loss since the last log step (every process's examples); a FloatingPointError
        on every process if it is not finite."""
        loss = mean_loss(all_reduce(sums, self.rt), it, self.c, None if self.scaler.is_enabled() else grad_norm)
        if self.rt.master:
            left = step_s * (self.c.max_iters - it - 1)  # from the steps' own time: loading is no step
            self.log.step(it, loss, grad_norm.item(), lr, 1000 * step_s, tokens_per_s, left)

    def stop(self, it, signum, sums):
        """A stop signal: the weights saved as they are at this step boundary, unless they went bad."""
        c = self.c
        mean_loss(sums, it, c)
        self.save()
        if self.rt.master:
            self.log.plot()
            print(f"interrupted ({signal.Signals(signum).name}): saved checkpoint at iteration {it} to "
                  f"{ckpt_path(c.out_dir)}; continue with --init_from=resume --out_dir={c.out_dir}")


def train(t):
    """The iterations, nanoGPT's way; the number of the signal that stopped them, or 0. t: the Trainer."""
    c, start = t.c, t.start
    sums = torch.zeros(2, device=t.rt.device)  # summed loss and target tokens since the last log step
    tokens, t_log, logged = 0, time.time(), start - 1
    for it in range(start, c.max_iters + 1):
        # --- set the learning rate ---------------------------------------------------------
        t.progress.iter_num, lr = it, t.set_lr(it)
        last = it == c.max_iters or c.eval_only

        # --- evaluate, and save a checkpoint -------------------------------------------------
        logged_before_it_stopped = c.init_from == 'resume' and it == start and not c.eval_only
        if (it % c.eval_interval == 0 or last) and not logged_before_it_stopped:
            t_log += t.evaluate(it, lr, last)
        if last:
            return 0
        signum = stop_requested(t.rt, it, c.log_interval)
        if signum:
            t.stop(it, signum, sums)
            return signum

        # --- forward, backward, update -------------------------------------------------------
        step_sums, step_tokens, grad_norm = t.step(it)
        sums += step_sums
        tokens += step_tokens

        # --- timing and logging: the only place the host waits for the device between evaluations
        if it % c.log_interval == 0 or it == c.max_iters - 1:  # the last step too: the curve ends where the run does
            dt = time.time() - t_log
            tokens = all_reduce(torch.tensor(float(tokens), device=t.rt.device), t.rt).item()  # every process's
            t.log_step(it, sums, grad_norm, lr, dt / (it - logged), tokens / dt)
            sums.zero_()
            tokens, t_log, logged = 0, time.time(), it


# --- main -------------------------------------------------------------------------------------------

def main(argv):
    c, ckpt = read_settings(argv)
    rt = setup_runtime(c)
    held = [f for f in ('ckpt.pt', 'metrics.jsonl') if os.path.exists(os.path.join(c.out_dir, f))]
    if rt.master and c.init_from != 'resume' and held and not c.overwrite:
        what = "already holds a run's checkpoint" if held[0] == 'ckpt.pt' else "holds another run's logs (its checkpoint is gone)"
        resume = "continue it with --init_from=resume, " if held[0] == 'ckpt.pt' else ""
        raise ConfigError(f"{os.path.join(c.out_dir, held[0])} {what}: {resume}replace it with "
                          f"--overwrite=True, or pick another --out_dir")
    saved_name = (ckpt or {}).get('config', {}).get('wandb_run_name')  # a resumed run's own name is no request
    if rt.master and c.wandb_run_name and not c.wandb_log and c.wandb_run_name != saved_name:
        print(f"warning: wandb_run_name={c.wandb_run_name!r} without wandb_log=True: nothing is logged to "
              f"Weights & Biases; add --wandb_log=True")
    # rank 0 holds out_dir: a second command that would write there stops at once
    with hold_out_dir(c.out_dir, command_line()) if rt.master else nullcontext():
        return run(c, ckpt, rt)


def run(c, ckpt, rt):
    """Set up the run, with every check before the first write, then train."""
    # the data set first: a bad one fails fast; whatever cannot be downloaded is reported at once
    data, (raw_model, base_model), enc = fetch_inputs(
        partial(as_config_error, load_splits, c.dataset), partial(as_config_error, build_model, c, ckpt), gpt2_encoding)
    # the base's fingerprint before PiSSA moves part of W into the adapter; a resumed run's from its checkpoint
    fingerprint = (ckpt or {}).get('base_fingerprint') or (base_fingerprint(raw_model) if c.checkpoint == 'adapter'
                                                           else None)
    if ckpt is None and c.lora_init != 'default':
        as_config_error(variants().pissa_init, raw_model, pissa_iterations(c.lora_init))
    trainable, total, pct = parameter_summary(raw_model)
    progress = Progress(base_model, fingerprint, ckpt)
    if rt.master:
        print(f"{method(c)}: {trainable:,} trainable parameters of {total:,} ({pct:.2f}%)")
        print(setup_lines(c, DEFAULTS, base_model, data, rt))
        if ckpt is not None:
            print(f"resuming {ckpt_path(c.out_dir)} at iteration {progress.iter_num} "
                  f"(base model {base_model}, lora_rank={c.lora_rank})")
            if progress.iter_num >= c.max_iters:
                print(f"the run is at max_iters={c.max_iters} already: nothing to train (give a larger --max_iters "
                      f"to train on)")
    model, optimizer, scaler = prepare_training(c, rt, raw_model, ckpt)
    del ckpt
    prompt, add_instruction = run_prompt(c, enc)
    # saved with the run as the text it is: evaluation asks exactly this, whatever dataloader.py says later
    c = override(c, dict(prompt_template=prompt.template, label_words=prompt.label_words)).frozen()
    train_loader, val_loader = make_loaders(c, rt, data, enc, raw_model.config.block_size, prompt, add_instruction)
    info = dict(base_model=base_model, trainable_params=trainable, total_params=total, trainable_pct=pct,
                device=rt.device, dtype=rt.dtype, world_size=rt.world, config=dict(c))
    log = RunLog(c, progress, info, read_logs(c, progress.iter_num)) if rt.master else None
    t = Trainer(c, rt, raw_model, model, optimizer, scaler, train_loader, val_loader, progress, log)
    with stops_deferred():
        signum = train(t)
        if rt.master:
            log.close()
    finish(rt)
    if rt.master and not signum:
        files = [f for f in ('ckpt.pt', 'metrics.jsonl', 'steps.jsonl', 'run.json', 'loss_curve.png')
                 if os.path.exists(os.path.join(c.out_dir, f))]
        print(f"wrote {', '.join(files)} in {c.out_dir} ({duration(time.time() - t.t0)}); "
              f"evaluate it: python generate.py --out_dir={c.out_dir}")
    return 128 + signum if signum else 0


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__, errors=(FloatingPointError,)))

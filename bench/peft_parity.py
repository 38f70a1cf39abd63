"""
Parity with Hugging Face PEFT: LoRA trained by this repository's train.py against PEFT LoRA trained
on the same model, data, batches, prompt, rank, alpha, initial A, steps, optimizer and learning-rate
schedule (no dropout, so no masks to share). The validation loss is compared at every evaluation
and the test accuracy at the end, both scored on the same prompts with the same matching rule.
--variant=dora compares DoRA (PEFT's use_dora=True), --variant=pissa PiSSA (init_lora_weights="pissa").

    python bench/peft_parity.py --init_from=../shared/models/gpt2-imdb-12x256 \
        --dataset=../shared/data/rotten_tomatoes --lora_rank=16 --device=cpu [--variant=dora]

Where the two draw differently, the run makes them start alike: PEFT draws each A with its own
random calls (train.py draws W, b, W, b, A per layer, the starter's order), so PEFT's A are set to
train.py's; DoRA's magnitudes (the norms of W's rows, computed by both) and PiSSA's A, B and residual
W (an SVD, no random draws) are copied too, after the largest difference between the two starts is
measured and reported.

Needs `peft` (requirements-dev.txt). Adds the run to out_dir/peft_parity.json, or to --results=FILE
(docs/ quotes bench/peft_parity.json), replacing a run with the same settings, and prints it.
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import ConfigError, Settings, configure, run_cli, settings_of  # noqa: E402  (first: --help skips torch)

import tiktoken  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from lorakit.hf_checkpoint import copy_lora_into_peft, peft_target_modules  # noqa: E402
from lorakit.common import get_lr, write_json  # noqa: E402
from dataloader import CustomDataLoader  # noqa: E402
from lorakit.data import load_splits, stratified_subset  # noqa: E402
from lorakit.decoding import left_pad  # noqa: E402
from lorakit.prompts import own_instruction, prompt_of  # noqa: E402
from lorakit.variants import pissa_init  # noqa: E402
from generate import read_label  # noqa: E402
from model import GPT  # noqa: E402

# -----------------------------------------------------------------------------
init_from = 'gpt2'
dataset = 'cornell-movie-review-data/rotten_tomatoes'
out_dir = 'out-peft-parity'  # train.py's run
lora_rank = 16
lora_alpha = 0.0  # 0: 4 x lora_rank, as sweep.py
variant = 'lora'  # lora, dora (DoRA) or pissa (PiSSA's start)
learning_rate = 5e-4
max_iters = 400
batch_size = 16
eval_interval = 50
eval_iters = 20
warmup_iters = 20
loss_on = 'label'
num_samples = 0  # test reviews; 0: all
eval_batch_size = 32
seed = 1337
device = 'cpu'
results = ''  # the JSON file the run is added to; '': out_dir/peft_parity.json
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
MAX_NEW_TOKENS = 5  # generate.py's default
VARIANT = {'lora': [], 'dora': ['--lora_variant=dora'], 'pissa': ['--lora_init=pissa']}  # train.py's flags


def run_ours(c):
    """train.py and generate.py as a user runs them: (validation losses by iteration, accuracy, train seconds)."""
    common = [f'--dataset={c.dataset}', f'--out_dir={c.out_dir}', f'--device={c.device}']
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), f'--init_from={c.init_from}', *common, *VARIANT[c.variant],
                    '--overwrite=True', f'--lora_rank={c.lora_rank}', f'--lora_alpha={c.lora_alpha}', '--lora_dropout=0.0',
                    f'--learning_rate={c.learning_rate}', f'--max_iters={c.max_iters}', f'--batch_size={c.batch_size}',
                    f'--warmup_iters={c.warmup_iters}', f'--loss_on={c.loss_on}', f'--eval_interval={c.eval_interval}',
                    f'--eval_iters={c.eval_iters}', '--log_interval=50', f'--seed={c.seed}'], check=True)
    train_s = time.time() - t0
    subprocess.run([sys.executable, os.path.join(ROOT, 'generate.py'), '--init_from=resume', *common,
                    f'--num_samples={c.num_samples}', f'--batch_size={c.eval_batch_size}', f'--seed={c.seed}'], check=True)
    with open(os.path.join(c.out_dir, 'metrics.jsonl')) as f:
        val = {r['iter']: r['val_loss'] for r in map(json.loads, f)}
    with open(os.path.join(c.out_dir, 'results.json')) as f:
        return val, json.load(f)['accuracy'], train_s


def peft_model(c):
    """transformers' GPT-2 with PEFT's LoRA (DoRA, PiSSA) on the attention c_attn and c_proj, started as train.py
    starts; and the largest difference between the two starts before they were made the same (0 for LoRA's A,
    which PEFT draws otherwise)."""
    base = GPT2LMHeadModel.from_pretrained(c.init_from, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)  # as train.py
    model = get_peft_model(base, LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=0.0,
                                            fan_in_fan_out=True, target_modules=peft_target_modules('attn'), bias="none",
                                            use_dora=c.variant == 'dora',
                                            init_lora_weights='pissa' if c.variant == 'pissa' else True))
    torch.manual_seed(c.seed)  # train.py seeds, then builds the model: the same A matrices
    ours = GPT.from_pretrained(c.init_from, dict(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                                                 lora_variant='dora' if c.variant == 'dora' else 'lora'))
    if c.variant == 'pissa':
        pissa_init(ours)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    copy_lora_into_peft(ours, model)
    changed = [k for k in before if c.variant == 'pissa' or 'lora_A' not in k]  # PEFT draws its own A
    start_difference = max((before[k] - p).abs().max().item() for k, p in model.named_parameters() if k in changed)
    return model.to(c.device), start_difference


@torch.no_grad()
def val_loss(model, loader, c):
    """train.py's validation loss: the first eval_iters batches, mean over their target tokens."""
    model.eval()
    total, count = 0.0, 0
    for _, (x, y) in zip(range(c.eval_iters), loader):
        keep = y != -1
        logits = model(input_ids=x.to(c.device)).logits
        total += F.cross_entropy(logits[keep.to(c.device)], y[keep].to(c.device), reduction='sum').item()
        count += int(keep.sum())
    model.train()
    return total / count


def train_peft(c, model, loaders):
    """train.py's recipe on the PEFT model: the same batches, schedule, AdamW and clipping."""
    train_loader, val_loader = loaders
    schedule = Settings(c, decay_lr=True, lr_decay_iters=0, min_lr=0.0)  # train.py's defaults
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    val = {}
    model.train()
    for it in range(c.max_iters + 1):
        if it % c.eval_interval == 0 or it == c.max_iters:
            val[it] = val_loss(model, val_loader, c)
            print(f"peft step {it}: val loss {val[it]:.4f}", flush=True)
        if it == c.max_iters:
            return val
        for g in opt.param_groups:
            g['lr'] = get_lr(schedule, it)
        x, y = train_loader.get_batch(it)
        keep = y != -1
        logits = model(input_ids=x.to(c.device)).logits
        F.cross_entropy(logits[keep.to(c.device)], y[keep].to(c.device)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def peft_accuracy(model, c, enc):
    """Greedy transformers generate on generate.py's prompts and reviews, with its matching rule."""
    test = load_splits(c.dataset, ('test',))['test']
    recs = test.select(stratified_subset(test['label'], c.num_samples, c.seed))
    block = model.config.n_positions
    correct = 0
    model.eval()
    prompt = prompt_of(own_instruction(enc))
    for s in range(0, len(recs), c.eval_batch_size):
        part = recs[s:s + c.eval_batch_size]
        idx, mask = left_pad([prompt.encode(enc, t, block - MAX_NEW_TOKENS) for t in part['text']], enc.eot_token)
        out = model.generate(input_ids=idx.to(c.device), attention_mask=mask.to(c.device), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, pad_token_id=enc.eot_token)
        for label, row in zip(part['label'], out[:, idx.size(1):].tolist()):
            row = row[:row.index(enc.eot_token)] if enc.eot_token in row else row
            correct += read_label(enc.decode(row), prompt.words) == label
    return correct / len(recs)


@torch.no_grad()
def export_check(out_dir, seed=0):
    """train.py's run exported with export.py to PEFT and to transformers, each loaded there: the largest logit
    difference from this repository's model on 4 x 64 random tokens, for each."""
    from peft import PeftModel
    from lorakit.checkpoint import load_checkpoint
    for fmt in ('peft', 'hf'):
        subprocess.run([sys.executable, os.path.join(ROOT, 'export.py'), f'--out_dir={out_dir}', f'--format={fmt}',
                        '--overwrite=True'], check=True, stdout=subprocess.DEVNULL)
    ours, ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    idx = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(seed))
    expected = ours.eval()(idx, idx)[0]
    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(ckpt['base_model']), os.path.join(out_dir, 'peft'))
    merged = GPT2LMHeadModel.from_pretrained(os.path.join(out_dir, 'hf'))
    return {f'export_{name}_max_logit_difference': (m.eval()(input_ids=idx).logits - expected).abs().max().item()
            for name, m in (('peft', peft), ('hf', merged))}


def save(result, path):
    """Add result to the runs in path, replacing one with the same settings."""
    try:
        with open(path) as f:
            runs = json.load(f)['runs']
    except (OSError, ValueError, KeyError, TypeError):
        runs = []
    same = {k: result['settings'].get(k, 'lora') for k in ('init_from', 'dataset', 'lora_rank', 'lora_alpha', 'learning_rate',
                                                           'max_iters', 'batch_size', 'num_samples', 'seed', 'variant')}
    runs = [r for r in runs if {k: r['settings'].get(k) for k in same} != same] + [result]
    write_json({'runs': runs}, path)


def main(argv):
    c = configure(DEFAULTS, argv)
    if c.variant not in VARIANT:
        raise ConfigError(f"variant must be one of {', '.join(VARIANT)}, not {c.variant!r}")
    c.lora_alpha = c.lora_alpha or 4.0 * c.lora_rank
    ours_val, ours_acc, ours_s = run_ours(c)
    enc = tiktoken.get_encoding('gpt2')
    data = load_splits(c.dataset)
    model, start_difference = peft_model(c)
    loader = dict(tokenizer=enc, batch_size=c.batch_size, block_size=model.config.n_positions, loss_on=c.loss_on,
                  seed=c.seed)  # train.py's: the same batches in the same order
    loaders = CustomDataLoader(data['train'], **loader).batches, CustomDataLoader(data['validation'], **loader).batches
    t0 = time.time()
    peft_val = train_peft(c, model, loaders)
    peft_s = time.time() - t0
    peft_acc = peft_accuracy(model, c, enc)
    rel = {it: abs(ours_val[it] - peft_val[it]) / peft_val[it] for it in peft_val}
    result = dict(ours_accuracy=ours_acc, peft_accuracy=peft_acc, difference_points=round(100 * (ours_acc - peft_acc), 2),
                  val_loss=[dict(iter=it, ours=ours_val[it], peft=peft_val[it]) for it in sorted(peft_val)],
                  max_relative_val_loss_difference=max(rel.values()), start_difference=start_difference,
                  ours_train_s=round(ours_s, 1), peft_train_s=round(peft_s, 1), **export_check(c.out_dir),
                  settings=dict(c))
    print(json.dumps(result, indent=2))
    save(result, c.results or os.path.join(c.out_dir, 'peft_parity.json'))
    return result


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

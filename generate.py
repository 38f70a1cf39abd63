"""
Test accuracy of a fine-tuned or pretrained GPT-2 on Rotten Tomatoes: the label word must be what
the model generates after the prompt it was trained on.

    python generate.py --init_from=resume --out_dir=gpt-lora-default        # a train.py run
    python generate.py --init_from=gpt2-medium --out_dir=gpt2-medium-zero-shot   # prompting alone
    python generate.py --init_from=gpt2-medium --prompt_style=few_shot --num_shots=4 --out_dir=gpt2-medium-4-shot
    python generate.py --init_from=resume --out_dir=gpt-lora-default --mode=score --num_samples=200
    python generate.py --init_from=resume --out_dir=gpt-lora-default --review="an utterly charmless film"
    python generate.py --init_from=gpt2-medium --prompt_template=bare --label_words=bad,good --out_dir=gpt2-medium-zero-shot-bare
    python generate.py --init_from=gpt2-medium --prompt="Q: Is the sky blue? A:" --max_new_tokens=40

The prompt is the run's own (resume: the prompt it was trained with) or dataloader.py's instruction,
read off its _add_instruction_finetuning. A review counts as right when the continuation starts with
its label word (get_accuracy); mode=score instead compares the probabilities of the two label words
(all of their tokens) after the prompt. num_samples=N evaluates N reviews drawn at random (seeded)
with each label in its share of the split. Writes out_dir/results.json (with the positions of the
reviews evaluated) and out_dir/predictions.jsonl. review (or reviews_file, one review a line) prints
what the model generates for those texts and the probabilities of the two label words, and writes
nothing; prompt prints the model's continuation of a text of your own and writes nothing.
"""

import json
import os
# BEGIN SOLUTION ModelSampler.get_accuracy
import re
# END SOLUTION
import sys
import time
from functools import partial

from configurator import ConfigError, check, configure, one_of, override, run_cli, settings_of  # first: --help skips torch
import torch

from lorakit.adapters import merge_lora
from lorakit.checkpoint import ckpt_path, model_from_checkpoint, read_checkpoint
from lorakit.common import (append_line, as_config_error, autocast, command_line, fetch_inputs, gpt2_encoding,
                            hold_out_dir, pick_device, pick_dtype, read_json, read_text, save_atomic, write_json)
from lorakit.data import EVAL_MODES, ROTTEN_TOMATOES, load_splits, stratified_subset
from lorakit.decoding import BatchedDecoder
from lorakit.prompts import OWN, few_shot_demonstrations, own_instruction, pick_prompt, prompt_errors
from model import GPT

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (out_dir/ckpt.pt), gpt2 .. gpt2-xl, a hub id or a local checkpoint directory
out_dir = 'out'  # the run to evaluate, and where results.json and predictions.jsonl go
dataset = ''  # hub id or local directory of split files; '': the run's own (resume), else Rotten Tomatoes
split = 'test'
num_samples = 0  # reviews to evaluate, drawn at random (seeded), each label in its share; 0: the whole split
batch_size = 32
mode = 'generate'  # 'generate': generate and match the label word; 'score': compare the two label words' probabilities
prompt_style = 'zero_shot'  # 'zero_shot': the instruction alone; 'few_shot': num_shots solved examples first
num_shots = 4  # few-shot demonstrations, balanced between the labels, drawn from the train split
prompt_template = ''  # '': the run's own (resume), else 'instruct', dataloader.py's; see train.py
label_words = ''  # '': the run's own (resume), else dataloader.py's; see train.py
max_new_tokens = 5
temperature = 0.0  # 0: greedy decoding; > 0: sampling
top_k = 0  # with sampling: keep the top_k most likely tokens; 0: all
review = ''  # classify this text instead of a split: its label and both label words' probabilities
reviews_file = ''  # ... or each line of this file
prompt = ''  # print the model's continuation of this text (FILE:path: of a file's text) and write nothing
num_continuations = 1  # with prompt: how many continuations to print (they differ only when temperature > 0)
seed = 1337  # the reviews of num_samples, the few-shot examples and sampling
device = 'auto'  # auto: cuda, else mps, else cpu
dtype = 'auto'  # auto: bfloat16 on GPUs of compute capability >= 8, float16 on older ones, else float32
# -----------------------------------------------------------------------------
DEFAULTS = settings_of(globals())
HISTORY = 'results_history.jsonl'  # every evaluation of out_dir, one line each, with its settings


def check_settings(c):
    check([
        (c.max_new_tokens < 1, f"max_new_tokens must be >= 1, not {c.max_new_tokens}"),
        (c.num_samples < 0, f"num_samples must be >= 1 (or 0 for the whole split), not {c.num_samples}"),
        (c.batch_size < 1, f"batch_size must be >= 1, not {c.batch_size}"),
        (c.temperature < 0 or 0 < c.temperature < 1e-6,
         f"temperature must be 0 (greedy) or at least 1e-6 (smaller ones overflow the logits), not {c.temperature}"),
        (bool(c.prompt) and bool(c.review or c.reviews_file),
         "prompt continues a text, review and reviews_file classify reviews: give one of them"),
        (c.top_k < 0, f"top_k must be >= 0 (0 keeps every token), not {c.top_k}"),
        (c.num_continuations < 1, f"num_continuations must be >= 1, not {c.num_continuations}"),
        one_of('mode', c.mode, EVAL_MODES),
        one_of('prompt_style', c.prompt_style, ('zero_shot', 'few_shot')),
        (c.prompt_style == 'few_shot' and c.num_shots < 1, f"num_shots must be >= 1 for few_shot, not {c.num_shots}"),
        *prompt_errors(c.prompt_template or OWN, c.label_words),
    ])


def read_run(c):
    """For resume, the run's checkpoint (read, not yet built into a model) and its settings; else (None, {})."""
    if c.init_from != 'resume':
        return None, {}
    path = ckpt_path(c.out_dir)
    ckpt = as_config_error(read_checkpoint, path)
    config = ckpt.get('config', {})
    if config.get('max_iters') and ckpt.get('iter_num', 0) < config['max_iters']:
        print(f"warning: {path} is at iteration {ckpt.get('iter_num', 0)} of the {config['max_iters']} its run was set "
              f"up for: an unfinished run (finish it with python train.py --init_from=resume --out_dir={c.out_dir})")
    return ckpt, config


def load_model(c, ckpt):
    """The model to evaluate: the run's (resume) or a pretrained one."""
    if ckpt is None:
        return as_config_error(GPT.from_pretrained, c.init_from)
    return as_config_error(model_from_checkpoint, ckpt, ckpt_path(c.out_dir))


def load_data(dataset, splits):
    """The splits a command needs of a data set, or None when it needs none."""
    return as_config_error(load_splits, dataset, splits) if splits else None


def run_prompt(c, trained, enc):
    """The Prompt: this command's prompt_template and label_words, else the run's, else dataloader.py's own (read
    off its _add_instruction_finetuning, the course's API)."""
    run = (trained.get('prompt_template', OWN), trained.get('label_words', ''))
    template, words = c.prompt_template or run[0], c.label_words or run[1]
    prompt = as_config_error(pick_prompt, template, words, own_instruction(enc))
    if trained and (template, words) != run:
        print(f"note: asking with prompt_template={prompt.template!r} label_words={prompt.label_words!r}; the run was "
              f"trained with {run[0]!r} and {run[1]!r}")
    return prompt


# BEGIN SOLUTION ModelSampler.get_accuracy
def read_label(generation, words):
    """The label (0 or 1) whose word a generation starts with, ignoring leading whitespace and case; None when it
    starts with neither, or names the other label after it (" positive, not negative")."""
    for label, word in enumerate(words):
        m = re.match(rf"\s*{re.escape(word)}(?!\w)", generation, re.IGNORECASE)
        if m:
            other = re.escape(words[1 - label])
            return None if re.search(rf"(?<!\w){other}(?!\w)", generation[m.end():], re.IGNORECASE) else label
    return None


# END SOLUTION
class ModelSampler:
    """
    The starter's ModelSampler(out_dir, init_from, device, max_new_tokens, temperature, top_k), in that
    order; any other setting above by keyword. Settings left out keep their defaults.
    """

    def __init__(self, out_dir=DEFAULTS.out_dir, init_from=DEFAULTS.init_from, device=DEFAULTS.device,
                 max_new_tokens=DEFAULTS.max_new_tokens, temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k,
                 **settings):
        c = override(DEFAULTS, dict(out_dir=out_dir, init_from=init_from, device=device, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, **settings))
        check_settings(c)
        c = self.settings = c.frozen()
        self.device = pick_device(c.device)
        self.ctx = autocast(self.device, pick_dtype(c.dtype, self.device))
        self.generator = torch.Generator(self.device).manual_seed(c.seed)
        ckpt, trained = read_run(c)
        self.progress = (ckpt.get('iter_num', 0), trained.get('max_iters')) if ckpt is not None else None
        # a resumed run is evaluated on the data set it trained on, unless --dataset says otherwise
        self.dataset = c.dataset or trained.get('dataset') or ROTTEN_TOMATOES
        own = bool(c.review or c.reviews_file or c.prompt)  # the user's texts need no split
        splits = ((c.split,) if not own else ()) + (('train',) if c.prompt_style == 'few_shot' else ())
        # whatever cannot be downloaded is reported at once
        self.enc, model, data = fetch_inputs(gpt2_encoding, partial(load_model, c, ckpt),
                                             partial(load_data, self.dataset, splits))
        del ckpt
        self.prompt = None if c.prompt else run_prompt(c, trained, self.enc)  # a free text needs no template
        self.label_ids = [self.enc.encode_ordinary(self.prompt.answer(y)) for y in (0, 1)] if self.prompt else []
        self._check_lengths(model.config.block_size)
        # each LoRA layer's eval() merges its update into W: inference costs what the model without LoRA costs
        self.model = merge_lora(model.to(self.device).eval()).use_fast_gelu(self.device == 'cpu')
        answers = [(ids, self.prompt.answer(y)) for y, ids in enumerate(self.label_ids)] if c.mode == 'score' else None
        self.decoder = BatchedDecoder(self.model, self.enc, self.ctx, self.device, c.max_new_tokens, c.temperature,
                                      c.top_k, c.batch_size, self.generator, answers)
        if not own:
            self.split_size = len(data[c.split])
            self.indices = stratified_subset(data[c.split]['label'], c.num_samples, c.seed)
            self.records = data[c.split].select(self.indices)
        self.demonstrations = self._demonstrations(data) if c.prompt_style == 'few_shot' and self.prompt else ()

    def _check_lengths(self, block):
        c, longest = self.settings, max(map(len, self.label_ids), default=0)
        if c.mode == 'generate' and c.max_new_tokens < longest:
            raise ConfigError(f"label_words={self.prompt.label_words!r} has a word of {longest} tokens, more than "
                              f"max_new_tokens={c.max_new_tokens} can generate; use --max_new_tokens={longest + 2}")
        if c.max_new_tokens >= block:
            raise ConfigError(f"max_new_tokens={c.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {block} tokens; use --max_new_tokens=5")

    def _demonstrations(self, data):
        """few_shot's solved examples from the train split, checked to fit the model's context."""
        c, block = self.settings, self.model.config.block_size
        fewest = min(data['train']['label'].count(y) for y in (0, 1))
        if (c.num_shots + 1) // 2 > fewest:
            raise ConfigError(f"num_shots={c.num_shots} needs {(c.num_shots + 1) // 2} reviews of each label, but "
                              f"the train split of {self.dataset} has {fewest} of one; use --num_shots={2 * fewest}")
        demonstrations = few_shot_demonstrations(data['train'], c.num_shots, c.seed)
        fixed = len(self.enc.encode_ordinary(self.prompt.text('', demonstrations)))
        if fixed + c.max_new_tokens >= block:
            raise ConfigError(f"num_shots={c.num_shots} examples take {fixed} tokens: with max_new_tokens="
                              f"{c.max_new_tokens} no review fits the model's context of {block} tokens; "
                              f"use fewer --num_shots")
        return demonstrations

    def prompt_ids(self, text):
        return self.prompt.encode(self.enc, text, self.model.config.block_size - self.settings.max_new_tokens,
                                  self.demonstrations)

    def get_generation(self, prompt):
        """The prompt followed by the model's continuation of max_new_tokens tokens (decoded, cut at
        end-of-text): greedy at temperature 0, else sampled from the top_k likeliest tokens."""
        c = self.settings
        idx = torch.tensor([self.enc.encode_ordinary(prompt)], dtype=torch.long, device=self.device)
        with self.ctx:
            out = self.model.generate(idx, c.max_new_tokens, c.temperature, c.top_k, generator=self.generator)
        return prompt + self.decoder.decode(out[0, -c.max_new_tokens:].tolist())

    def get_accuracy(self, progress=True):
        """
        (accuracy, positive_count, negative_count) on self.records: a review counts as right when the model's
        generation after its prompt starts with its label word; one that starts with neither is wrong.
        """
        # BEGIN SOLUTION ModelSampler.get_accuracy
        # STUB: # TODO: for each review of self.records (dicts with 'text' and 'label'), generate the model's
        # STUB: # continuation of its prompt (the dataloader's template, without the label: self.prompt_ids(text)
        # STUB: # gives its token ids, self.generations(list of them) the continuations as text, in batches).
        # STUB: # Read the label each continuation starts with: its first characters, ignoring leading spaces and
        # STUB: # case, must be a label word (label 0's or label 1's, self.prompt.words); one that starts with
        # STUB: # neither is unparseable and counts as wrong. Return (share correct, how many read as positive,
        # STUB: # how many read as negative).
        # STUB: raise NotImplementedError("ModelSampler.get_accuracy")
        prompts = [self.prompt_ids(r['text']) for r in self.records]
        generations = self.generations(prompts, progress)  # in batches; the shared prompt start computed once
        predicted = [read_label(g, self.prompt.words) for g in generations]  # 0, 1, or None when unparseable
        correct = sum(p == r['label'] for p, r in zip(predicted, self.records))
        # what predictions.jsonl holds, one review a line (write_results)
        self.results = [dict(text=r['text'], label=r['label'], prompt=self.enc.decode(ids), generation=g,
                             prediction=None if p is None else self.prompt.words[p])
                        for r, ids, g, p in zip(self.records, prompts, generations, predicted)]
        return correct / len(predicted), predicted.count(1), predicted.count(0)
        # END SOLUTION

    def generations(self, prompts, progress=False):
        """The continuation of each prompt (token id lists), as text, in their order: in batches that share
        the prompts' common start (lorakit/decoding.py); the results do not depend on the batching."""
        return self.decoder.generations(prompts, progress)

    def classify(self, texts):
        """(continuation, P(label 0's word), P(label 1's word)) of each text: what the model generates after its
        prompt, and the probabilities of the label words (all their tokens) as what follows it."""
        prompts = [self.prompt_ids(t) for t in texts]
        generations = self.decoder.continuations(prompts)
        idx, mask = self.decoder.left_pad(prompts)
        with self.ctx:
            probs = self.model.continuation_logprobs(idx, self.label_ids, mask).exp().tolist()
        return [(g, *p) for g, p in zip(generations, probs)]

    def write_results(self, out_dir, accuracy, seconds):
        """results.json of get_accuracy()'s answer and the seconds it took, and the predictions.jsonl it kept,
        if it kept one; written atomically."""
        c = self.settings
        accuracy, pos, neg = accuracy
        os.makedirs(out_dir, exist_ok=True)
        n = len(self.records)
        summary = dict(accuracy=accuracy, positive=pos, negative=neg, unparseable=n - pos - neg, n=n,
                       seconds=round(seconds, 3), examples_per_second=round(n / seconds, 2),
                       **{k: c[k] for k in ('init_from', 'out_dir', 'split', 'mode', 'prompt_style', 'max_new_tokens',
                                            'temperature', 'top_k', 'seed', 'batch_size')},
                       dataset=self.dataset, prompt_template=self.prompt.template, label_words=self.prompt.label_words,
                       num_shots=c.num_shots if c.prompt_style == 'few_shot' else 0,
                       **(dict(iter_num=self.progress[0], max_iters=self.progress[1]) if self.progress else {}),
                       reviews=self.indices if n < self.split_size else 'all')  # positions in the split
        path, history = os.path.join(out_dir, 'results.json'), os.path.join(out_dir, HISTORY)
        previous = read_json(path)
        if previous is not None and not os.path.exists(history):  # written before there was a history
            append_line(history, previous, then='run the command again')
        append_line(history, dict(summary, when=time.strftime('%Y-%m-%d %H:%M:%S')), then='run the command again')
        write_json(summary, path)
        if getattr(self, 'results', None) is not None:  # a get_accuracy of the course's form keeps none
            lines = ''.join(json.dumps(r) + '\n' for r in self.results).encode()
            save_atomic(lines, os.path.join(out_dir, 'predictions.jsonl'))
        elif os.path.exists(os.path.join(out_dir, 'predictions.jsonl')):  # an earlier evaluation's: not these results
            os.remove(os.path.join(out_dir, 'predictions.jsonl'))
        if previous is not None:
            summary['replaced'] = previous
        return summary


def own_reviews(c):
    """The texts of review and reviews_file, checked before any work."""
    texts = [c.review] if c.review.strip() else []
    if c.reviews_file:
        texts += [line.strip() for line in read_text(c.reviews_file, 'reviews_file').splitlines() if line.strip()]
    if not texts:
        raise ConfigError(f"reviews_file {c.reviews_file} holds no review: write one a line" if c.reviews_file
                          else "review is blank: give the text to classify, e.g. --review=\"a charmless film\"")
    return texts


def prompt_text(c):
    """The text of prompt (FILE:path: that file's), checked before any work."""
    text = read_text(c.prompt[5:], 'prompt file') if c.prompt.startswith('FILE:') else c.prompt
    if not text.strip():
        raise ConfigError("prompt is blank: give the text to continue, e.g. --prompt=\"The movie was\"")
    return text


def main(argv):
    c = configure(DEFAULTS, argv)
    check_settings(c)
    if c.prompt:  # a free text continued: printed, nothing written
        text = prompt_text(c)
        sampler = ModelSampler(**c)
        for i in range(c.num_continuations):
            print(('' if c.num_continuations == 1 else f"--- continuation {i + 1}\n") + sampler.get_generation(text))
        return None
    if c.review or c.reviews_file:  # the user's own reviews: printed, nothing written
        texts = own_reviews(c)
        sampler = ModelSampler(**c)
        negative, positive = sampler.prompt.words
        for text, (generation, p_neg, p_pos) in zip(texts, sampler.classify(texts)):
            print(f"P({negative}) {p_neg:.3g}  P({positive}) {p_pos:.3g}  generates {generation!r}  {text}")
        return None
    with hold_out_dir(c.out_dir, command_line()):  # before the work: results that cannot be written stop it now
        sampler = ModelSampler(**c)
        t0 = time.time()
        accuracy, pos, neg = sampler.get_accuracy()
        summary = sampler.write_results(c.out_dir, (accuracy, pos, neg), time.time() - t0)
    print(f"Accuracy: {accuracy:.4f}, Positive Predictions: {pos}, Negative Predictions: {neg}, "
          f"Unparseable: {summary['unparseable']} ({summary['n']} reviews, {summary['seconds']:.1f} s, "
          f"{summary['examples_per_second']:.1f} reviews/s)")
    kept = ' and predictions.jsonl' if os.path.exists(os.path.join(c.out_dir, 'predictions.jsonl')) else ''
    print(f"wrote {os.path.join(c.out_dir, 'results.json')}{kept}")
    if 'replaced' in summary:
        print(f"replaced the results of an earlier evaluation ({describe(summary.pop('replaced'))}); every "
              f"evaluation's results stay in {os.path.join(c.out_dir, HISTORY)}")
    return summary


def describe(results):
    """An evaluation in a few words: accuracy, how many reviews, of what model, how."""
    try:
        how = ('scored' if results.get('mode') == 'score' else 'greedy' if not results['temperature']
               else f"temperature {results['temperature']}")
        return (f"accuracy {results['accuracy']:.4f} on {results['n']} reviews of {results['init_from']}, "
                f"{results['prompt_style']}, {how}")
    except (KeyError, TypeError, ValueError):
        return "results.json of another form"


if __name__ == '__main__':
    sys.exit(run_cli(main, sys.argv[1:], __file__))

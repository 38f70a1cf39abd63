"""
Rotten Tomatoes reviews: the splits loaded and checked, and batches of their instruction-tuned texts.

    data = load_splits("cornell-movie-review-data/rotten_tomatoes")   # or a local directory
    batches = Batches(data["train"], tiktoken.get_encoding("gpt2"), 8, loader._add_instruction_finetuning)
    x, y = batches.get_batch(0)   # (B, T) inputs, (B, T) targets with -1 where nothing is learned

A text's last tokens must be its label word and end-of-text: the loss falls on them (loss_on=label).
Also the evaluation's side: stratified_subset() draws test reviews with each label in its share.
"""

import math
import os
import random

import datasets
import torch

from lorakit.common import Unreachable, hub_offline, not_a_hub_id
from lorakit.prompts import EOT, clean, prompt_of

datasets.logging.set_verbosity_error()
datasets.disable_progress_bars()

LOSS_ON = ("label", "all")
EVAL_MODES = ("generate", "score")  # how generate.py reads an answer: the words generated, or the likelier label word
ROTTEN_TOMATOES = "cornell-movie-review-data/rotten_tomatoes"


class Batches:
    """
    Batches of instruction-tuned reviews, each record's text made by add_instruction (a
    CustomDataLoader._add_instruction_finetuning, or Prompt.instruction), whose Prompt is prompt. get_batch(i)
    is a pure function of (seed, i, rank): a run that resumes at iteration i sees the batches it would have
    seen. Each epoch is a fresh seeded shuffle, grouped so that a batch holds reviews of similar length
    (bucket); with world_size > 1 the ranks split one global batch of world_size * batch_size.
    """

    def __init__(self, dataset, tokenizer, batch_size=8, add_instruction=None, prompt=None, block_size=1024,
                 loss_on="label", shuffle=True, seed=1337, rank=0, world_size=1, bucket=32, pad_multiple=1):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, not '{loss_on}'")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.block_size = block_size
        self.loss_on = loss_on
        self.shuffle = shuffle
        self.seed = seed
        self.bucket = bucket  # batches of similar length come from windows of this many batches; 0: off
        self.pad_multiple = pad_multiple  # batch lengths are multiples of this: few shapes, for torch.compile
        self.rank = rank
        self.world_size = world_size
        self.prompt = prompt or prompt_of(add_instruction)  # the template and the label words
        add_instruction = add_instruction or self.prompt.instruction
        # each label's answer as tokens: its word, then end-of-text
        self.answers = [tokenizer.encode_ordinary(self.prompt.answer(y)) + [tokenizer.eot_token]
                        for y in (0, 1)]
        records = [dict(rec) for rec in dataset]
        check_labels([r["label"] for r in records], [r["text"] for r in records])
        self.records = [self._tokenize(add_instruction(rec)) for rec in records]
        self._orders = {}

    def _tokenize(self, rec):
        """A record's instr_tuned_text as token ids (its review shortened to fit block_size + 1 tokens) and
        how many of them are the answer; the review is ordinary text, whatever it holds."""
        text, answer = rec["instr_tuned_text"], self.answers[rec["label"]]
        ids = self.tokenizer.encode_ordinary(text.removesuffix(EOT)) + [self.tokenizer.eot_token]
        if not text.endswith(EOT) or ids[-len(answer):] != answer:  # the loss falls on these last tokens
            raise ValueError(f"instr_tuned_text must end in its label word {self.prompt.answer(rec['label'])!r}, then "
                             f"{EOT}; it ends {text[-40:]!r}")
        if len(ids) > self.block_size + 1:  # inputs are the text minus its last token
            ids = self.prompt.encode(self.tokenizer, rec["text"], self.block_size + 1 - len(answer)) + answer
        rec["ids"], rec["n_answer"] = ids, len(answer)
        rec["n_targets"] = len(answer) if self.loss_on == "label" else len(ids) - 1
        return rec

    def __len__(self):
        """Global batches per epoch."""
        return math.ceil(len(self.records) / (self.batch_size * self.world_size))

    def _order(self, epoch):
        if epoch not in self._orders:
            n = len(self.records)
            order = list(range(n))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(n, generator=g).tolist()
                if self.bucket:
                    order = self._bucketed(order, g)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _bucketed(self, order, g):
        """Sort each window of `bucket` global batches by length, then shuffle the batches within it:
        a batch then holds reviews of similar length and little of it is padding."""
        G = self.batch_size * self.world_size
        out = []
        for s in range(0, len(order), G * self.bucket):
            part = sorted(order[s:s + G * self.bucket], key=lambda j: len(self.records[j]["ids"]))
            batches = [part[j:j + G] for j in range(0, len(part), G)]
            full = [b for b in batches if len(b) == G]
            for k in torch.randperm(len(full), generator=g).tolist():
                out += full[k]
            out += [j for b in batches if len(b) < G for j in b]  # a short last batch stays last
        return out

    def padding_share(self, n_batches=100):
        """Share of the input tokens of the first n_batches batches that are padding."""
        real = total = 0
        for i in range(n_batches):
            x, _ = self.get_batch(i)
            real += sum(min(len(self.records[j]["ids"]) - 1, x.size(1)) for j in self._picks(i))
            total += x.numel()
        return 1 - real / total

    def get_batch(self, i):
        """This rank's share of global batch i (an endless stream over the epochs)."""
        return self.collate([self.records[j] for j in self._picks(i)])

    def global_targets(self, i):
        """Target tokens in global batch i, every rank's share: known without asking the other ranks."""
        return sum(self.records[j]["n_targets"] for r in range(self.world_size) for j in self._picks(i, r))

    def _picks(self, i, rank=None):
        n, B = len(self.records), self.batch_size
        start = (i * self.world_size + (self.rank if rank is None else rank)) * B
        return [self._order(k // n)[k % n] for k in range(start, start + B)]

    def __iter__(self):
        """One pass over the data in the first epoch's order, this rank's share, the last batch possibly smaller."""
        order = self._order(0)
        for i in range(len(self)):
            batch = self._pass_batch(i, order)
            if batch is not None:
                yield batch

    def shared_batches(self, n):
        """This process's share of the first n batches of one pass (as __iter__), of those in which every
        process has a share: under FSDP each forward needs all of them."""
        order, N, W, B = self._order(0), len(self.records), self.world_size, self.batch_size
        for i in range(min(n, max(0, (N - (W - 1) * B + W * B - 1) // (W * B)))):
            yield self._pass_batch(i, order)

    def _pass_batch(self, i, order):
        """This rank's share of batch i of one pass over the records in order, or None past them."""
        s = (i * self.world_size + self.rank) * self.batch_size
        part = order[s:s + self.batch_size]
        return self.collate([self.records[j] for j in part]) if part else None

    def loader(self, shuffle=True):
        """
        A torch DataLoader of (x, y) batches, one epoch: with shuffle the batches training takes (get_batch:
        seeded, reviews of similar length together), else the records in order.
        """
        in_order = list(range(len(self.records)))
        get = self.get_batch if shuffle else lambda i: self._pass_batch(i, in_order)
        return torch.utils.data.DataLoader(_Batches(get, len(self)), batch_size=None)

    def collate(self, recs):
        """Right-padded (x, y): y is x shifted by one, -1 on padding and, with loss_on=label, the prompt."""
        T = max(len(r["ids"]) for r in recs) - 1
        T = min(-(-T // self.pad_multiple) * self.pad_multiple, self.block_size)
        x = torch.full((len(recs), T), self.tokenizer.eot_token, dtype=torch.long)
        y = torch.full((len(recs), T), -1, dtype=torch.long)
        for b, r in enumerate(recs):
            ids = torch.tensor(r["ids"], dtype=torch.long)
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            first = n - r["n_answer"] if self.loss_on == "label" else 0
            y[b, first:n] = ids[first + 1:]
        return x, y


class _Batches(torch.utils.data.Dataset):
    """Batch i is get(i): a DataLoader over whole batches that CustomDataLoader makes."""

    def __init__(self, get, n):
        self.get, self.n = get, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.get(i)


def check_labels(labels, texts, where="the data"):
    """A ValueError naming the first label that is not 0 or 1 (its review, row and where)."""
    bad = next((i for i, y in enumerate(labels) if type(y) is not int or y not in (0, 1)), None)  # not 1.0, not True
    if bad is not None:
        raise ValueError(f"label {labels[bad]!r} of review {clean(texts[bad])[:40]!r} (row {bad} of {where}) "
                         f"is not 0 (negative) or 1 (positive)")


def load_splits(dataset, splits=("train", "validation")):
    """A DatasetDict from a hub id or a local directory of split files, checked for what we need."""
    local = os.path.isdir(dataset)
    if not local and not_a_hub_id(dataset):
        raise ValueError(f"cannot load data set '{dataset}': no such directory")
    if not local and hub_offline():
        datasets.config.HF_HUB_OFFLINE = True  # the hub cache only: no half a minute of retries
    try:
        data = datasets.load_dataset(dataset)
    except Exception as e:  # datasets raises many types for "not there" and "not readable"
        if not local and datasets.config.HF_HUB_OFFLINE:
            raise Unreachable(f"the data set '{dataset}'", "pass its local directory with --dataset=DIR") from None
        where = "local directory" if local else "hub id or local directory"
        cause = f" ({type(e.__cause__).__name__}: {str(e.__cause__).splitlines()[0]})" if e.__cause__ else ""
        raise ValueError(f"cannot load data set '{dataset}' ({where}): {str(e).splitlines()[0]}{cause}") from None
    for split in splits:
        if split not in data:
            raise ValueError(f"data set '{dataset}' has no '{split}' split (it has: {', '.join(data)})")
        missing = {"text", "label"} - set(data[split].column_names)
        if missing:
            raise ValueError(f"the '{split}' split of '{dataset}' lacks column(s) {', '.join(sorted(missing))}; "
                             f"it needs 'text' (the review) and 'label' (0 negative, 1 positive)")
        if len(data[split]) == 0:
            raise ValueError(f"the '{split}' split of '{dataset}' is empty")
    for split in splits:  # every split's labels, before any work
        check_labels(data[split]["label"], data[split]["text"], f"the '{split}' split of '{dataset}'")
    return data


def stratified_subset(labels, n, seed):
    """
    Positions of n reviews drawn at random with each label in its share of the split, in split order:
    the same n for every model evaluated with the same seed. Rotten Tomatoes lists all positive test
    reviews first, so the first n would be one label only.
    """
    if not 0 < n < len(labels):
        return list(range(len(labels)))
    rng = random.Random(seed)
    by_label = {y: [i for i, lab in enumerate(labels) if lab == y] for y in sorted(set(labels))}
    quota = {y: len(ix) * n // len(labels) for y, ix in by_label.items()}
    # the reviews the rounding left over go to the labels with the largest remainders
    for y in sorted(by_label, key=lambda y: -(len(by_label[y]) * n % len(labels)))[:n - sum(quota.values())]:
        quota[y] += 1
    return sorted(i for y, ix in by_label.items() for i in rng.sample(ix, quota[y]))

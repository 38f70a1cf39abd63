"""
Rotten Tomatoes reviews as instruction-tuning batches.

Each review becomes one text: a prompt (by default the homework's instruction, the review and
"Sentiment:"), then the label word (" positive" / " negative", one GPT-2 token each, the space
belongs to the word), then end-of-text. Prompt is the one place the prompt is written, from a
template and two label words that train.py saves with its run: generate.py asks the model exactly
the text it was trained on, up to the label. A prompt never ends in a space, because " positive" is
one token while "positive" after a space is another.

    data = load_splits("cornell-movie-review-data/rotten_tomatoes")   # or a local directory
    loader = CustomDataLoader(data["train"], tiktoken.get_encoding("gpt2"), batch_size=8)
    x, y = loader.get_batch(0)   # (B, T) inputs, (B, T) targets with -1 where nothing is learned
    Prompt("bare", "bad,good").text("a gorgeous film")   # 'Review: a gorgeous film\nSentiment:'

The answer side lives here too: Prompt.parse() reads the label word a model generated, and
stratified_subset() draws test reviews with each label in its share.
"""

import math
import os
import random
import re

import datasets
import torch

from lorakit.common import Unreachable, hub_offline, not_a_hub_id

datasets.logging.set_verbosity_error()
datasets.disable_progress_bars()

LOSS_ON = ("label", "all")
EVAL_MODES = ("generate", "score")  # how generate.py reads an answer: the words generated, or the likelier label word
# the prompts to choose from: {review} is where the review goes, {negative} and {positive} stand for
# the label words; instruct is the homework's
TEMPLATES = {
    "instruct": "Classify the sentiment of the movie review as {positive} or {negative}.\n\nReview: {review}\nSentiment:",
    "bare": "Review: {review}\nSentiment:",
    "question": "Review: {review}\nQuestion: Did the critic like the movie?\nAnswer:",
    "choices": "Review: {review}\nIs this review {negative} or {positive}?\nAnswer:",
}
DEFAULT_LABEL_WORDS = "negative,positive"  # label 0, label 1
ROTTEN_TOMATOES = "cornell-movie-review-data/rotten_tomatoes"
EOT = "<|endoftext|>"  # GPT-2's end-of-text, which ends every answer


def clean(text):
    """A review as prompt text: a missing review (None in a CSV) is the empty string."""
    return "" if text is None else str(text).strip()


def split_label_words(label_words):
    """'negative, positive' -> ['negative', 'positive'] (label 0's word first)."""
    return [w.strip() for w in label_words.split(",")]


def prompt_errors(template, label_words):
    """configurator.check rules for a prompt_template and label_words pair."""
    text = TEMPLATES.get(template, template)
    words = split_label_words(label_words)
    w = [x.lower() for x in words]
    two = len(words) == 2 and all(words)
    return [
        ("{review}" not in text, f"prompt_template must be one of {', '.join(TEMPLATES)} or a text with {{review}} "
                                 f"where the review goes, not {template!r}"),
        (text != text.rstrip(), "prompt_template must not end in a space or a newline: the label word brings its "
                                "own leading space"),
        (not two, f"label_words must be two words or phrases, comma-separated, for label 0 and label 1 (like "
                  f"'{DEFAULT_LABEL_WORDS}'), not {label_words!r}"),
        (two and w[0] == w[1], f"label_words {label_words!r} name one word twice: the two labels need different words"),
        (two and w[0] != w[1] and (w[0].startswith(w[1]) or w[1].startswith(w[0])),
         f"label_words {label_words!r}: one begins with the other, so an answer could be read as either label; "
         f"pick words that differ before either ends"),
    ]


class Prompt:
    """
    How a review is put to the model and how its answer reads: a template (a name of TEMPLATES or a
    text with {review}) and the two label words (label 0, label 1), which may be phrases of several
    tokens. text() is the one place a prompt is written, so generate.py asks a model exactly what it
    was trained on. Few-shot examples repeat the template from the paragraph that holds {review} on;
    the paragraphs before it (an instruction) come once, first.
    """

    def __init__(self, template="instruct", label_words=DEFAULT_LABEL_WORDS):
        problem = next((message for bad, message in prompt_errors(template, label_words) if bad), None)
        if problem:
            raise ValueError(problem)
        self.template, self.label_words = template, label_words
        self.words = tuple(split_label_words(label_words))
        text = TEMPLATES.get(template, template)
        for name, word in zip(("{negative}", "{positive}"), self.words):
            text = text.replace(name, word)
        cut = text.rfind("\n\n", 0, text.index("{review}"))
        self.head, self.body = (text[:cut + 2], text[cut + 2:]) if cut >= 0 else ("", text)
        self._answer_re = re.compile(r"\s*(" + "|".join(map(re.escape, self.words)) + r")(?!\w)", re.IGNORECASE)

    def answer(self, label):
        """The label's word as the model writes it: after a space, which belongs to the word's token."""
        return " " + self.words[label]

    def text(self, review, demonstrations=()):
        """The prompt: the instruction, optional solved (text, label) examples (few-shot), then the review."""
        shots = "".join(self.body.replace("{review}", clean(t)) + self.answer(y) + "\n\n" for t, y in demonstrations)
        return self.head + shots + self.body.replace("{review}", clean(review))

    def encode(self, enc, review, max_tokens, demonstrations=()):
        """Token ids of text(review), the review shortened (never the rest) to fit max_tokens."""
        ids = enc.encode_ordinary(self.text(review, demonstrations))
        if len(ids) <= max_tokens:
            return ids
        tokens = enc.encode_ordinary(clean(review))
        overflow = len(ids) - max_tokens
        if overflow >= len(tokens):
            raise ValueError(f"the prompt without its review is longer than {max_tokens} tokens; raise block_size")
        while len(ids) > max_tokens:  # a cut can re-tokenise differently at its edge: cut until it fits
            tokens = tokens[:len(tokens) - overflow]
            ids = enc.encode_ordinary(self.text(enc.decode(tokens), demonstrations))
            overflow = max(1, len(ids) - max_tokens)
        return ids

    def parse(self, generation):
        """The label a continuation starts with (0 or 1, ignoring leading whitespace and case), or None when
        it starts with neither or names the other label after it."""
        m = self._answer_re.match(generation)
        if m is None:
            return None
        label = [w.lower() for w in self.words].index(m.group(1).lower())
        other = re.escape(self.words[1 - label])
        return None if re.search(rf"(?<!\w){other}(?!\w)", generation[m.end():], re.IGNORECASE) else label


class CustomDataLoader:
    """
    Batches of instruction-tuned reviews. get_batch(i) is a pure function of (seed, i, rank): a run
    that resumes at iteration i sees the batches it would have seen. Each epoch is a fresh seeded
    shuffle, grouped so that a batch holds reviews of similar length (bucket); with world_size > 1
    the ranks split one global batch of world_size * batch_size.
    """

    def __init__(self, dataset, tokenizer, batch_size=8, block_size=1024, loss_on="label", shuffle=True,
                 seed=1337, rank=0, world_size=1, bucket=32, pad_multiple=1, prompt=None):
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
        self.prompt = prompt or Prompt()  # the template and the label words
        # each label's answer as tokens: its word, then end-of-text
        self.answers = [tokenizer.encode_ordinary(self.prompt.answer(y)) + [tokenizer.eot_token]
                        for y in (0, 1)]
        records = [dict(rec) for rec in dataset]
        check_labels([r["label"] for r in records], [r["text"] for r in records])
        self.records = [self._tokenize(self._add_instruction_finetuning(rec)) for rec in records]
        self._orders = {}

    def _add_instruction_finetuning(self, rec):
        """Adds instr_tuned_text to a record: its prompt, then its label word and end-of-text (the answer)."""
        # BEGIN SOLUTION CustomDataLoader._add_instruction_finetuning
        # STUB: # TODO: set rec["instr_tuned_text"] to the prompt of rec["text"], then the word of rec["label"],
        # STUB: # then end-of-text. Hint: self.prompt.text(review), self.prompt.answer(label) and EOT.
        # STUB: raise NotImplementedError("CustomDataLoader._add_instruction_finetuning")
        rec["instr_tuned_text"] = self.prompt.text(rec["text"]) + self.prompt.answer(rec["label"]) + EOT
        # END SOLUTION
        return rec

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

    def get_loader(self, shuffle=True):
        """
        The starter's torch DataLoader of (x, y) batches, one epoch: with shuffle the batches training
        takes (get_batch: seeded, reviews of similar length together), else the records in order.
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


# --- evaluation's side: generate.py's review sample, few-shot examples and batches ----------------------

def few_shot_demonstrations(train_split, k, seed):
    """k solved (text, label) examples, as balanced as k allows, in a seeded random order."""
    rng = random.Random(seed)
    by_label = {y: [i for i, lab in enumerate(train_split["label"]) if lab == y] for y in (0, 1)}
    first = rng.randrange(2)
    labels = [(first + j) % 2 for j in range(k)]
    picks = [(i, y) for y in (0, 1) for i in rng.sample(by_label[y], labels.count(y))]
    rng.shuffle(picks)
    return [(train_split[i]["text"], y) for i, y in picks]


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


def left_pad(prompts, pad_id):
    """(B, T) token ids of prompts (lists of ids) padded on the left, and the (B, T) mask of real tokens."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return idx, mask

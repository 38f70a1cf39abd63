"""
How a review is put to the model: a template with {review} where the review goes and two label words
(label 0's, label 1's). The homework's own prompt is whatever dataloader.py's
CustomDataLoader._add_instruction_finetuning writes, read off it by prompt_of(); the templates here
are alternatives for comparing prompts (docs/prompts.md):

    prompt = prompt_of(CustomDataLoader(split, enc, 8)._add_instruction_finetuning)   # the student's
    prompt = Prompt("bare", "bad,good")     # 'Review: {review}\nSentiment:', answered " bad" / " good"
    prompt.text("a gorgeous film") + prompt.answer(1)

Deciding which label a generation names is ModelSampler.get_accuracy's work (generate.py), not this file's.
"""

import random

import datasets

EOT = "<|endoftext|>"  # GPT-2's end-of-text, which ends every answer
OWN = "instruct"  # prompt_template's name for dataloader.py's own prompt
# other prompts to compare with it: {negative} and {positive} stand for the label words
TEMPLATES = {
    "bare": "Review: {review}\nSentiment:",
    "question": "Review: {review}\nQuestion: Did the critic like the movie?\nAnswer:",
    "choices": "Review: {review}\nIs this review {negative} or {positive}?\nAnswer:",
}


def clean(text):
    """A review as prompt text: a missing review (None in a CSV) is the empty string."""
    return "" if text is None else str(text).strip()


def split_label_words(label_words):
    """'negative, positive' -> ['negative', 'positive'] (label 0's word first)."""
    return [w.strip() for w in label_words.split(",")]


def prompt_errors(template, label_words):
    """configurator.check rules for a prompt_template and label_words pair; OWN and '' (dataloader.py's own
    template and words) are checked when dataloader.py is read."""
    text = TEMPLATES.get(template, template)
    words = split_label_words(label_words)
    w = [x.lower() for x in words]
    two = len(words) == 2 and all(words)
    return [
        (template != OWN and "{review}" not in text,
         f"prompt_template must be one of {', '.join([OWN, *TEMPLATES])} or a text with {{review}} where the review "
         f"goes, not {template!r}"),
        (text != text.rstrip(), "prompt_template must not end in a space or a newline: the label word brings its "
                                "own leading space"),
        (label_words != "" and not two, f"label_words must be two words or phrases, comma-separated, for label 0 and "
                                        f"label 1 (like 'negative,positive'), not {label_words!r}"),
        (two and w[0] == w[1], f"label_words {label_words!r} name one word twice: the two labels need different words"),
        (two and w[0] != w[1] and (w[0].startswith(w[1]) or w[1].startswith(w[0])),
         f"label_words {label_words!r}: one begins with the other, so an answer could be read as either label; "
         f"pick words that differ before either ends"),
    ]


class Prompt:
    """
    A template (a name of TEMPLATES or a text with {review}) and the two label words (label 0, label 1),
    which may be phrases of several tokens. text() is the one place a prompt is written, so generate.py
    asks a model exactly what it was trained on. Few-shot examples repeat the template from the paragraph
    that holds {review} on; the paragraphs before it (an instruction) come once, first.
    """

    def __init__(self, template, label_words):
        problem = next((message for bad, message in prompt_errors(template, label_words) if bad), None)
        if problem or template == OWN or not label_words:
            raise ValueError(problem or "Prompt needs a template text and label words: prompt_of() reads "
                                        "dataloader.py's own")
        self.template, self.label_words = template, label_words
        self.words = tuple(split_label_words(label_words))
        text = TEMPLATES.get(template, template)
        for name, word in zip(("{negative}", "{positive}"), self.words):
            text = text.replace(name, word)
        cut = text.rfind("\n\n", 0, text.index("{review}"))
        self.head, self.body = (text[:cut + 2], text[cut + 2:]) if cut >= 0 else ("", text)

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

    def instruction(self, rec):
        """rec with instr_tuned_text, as CustomDataLoader._add_instruction_finetuning adds it: this prompt's text,
        the label word, end-of-text."""
        rec["instr_tuned_text"] = self.text(rec["text"]) + self.answer(rec["label"]) + EOT
        return rec


def prompt_of(add_instruction):
    """
    The Prompt that a CustomDataLoader._add_instruction_finetuning writes (a student's or the solution's),
    read off two calls with "{review}" for the review: the text both labels share, up to the word where
    they part, is the template; what follows, up to end-of-text, is each label's word. A ValueError
    saying what is wrong with the texts it writes.
    """
    def text(label):
        try:
            out = add_instruction({"text": "{review}", "label": label})["instr_tuned_text"]
        except NotImplementedError:
            raise
        except Exception as e:
            raise ValueError(f"CustomDataLoader._add_instruction_finetuning fails on a record: "
                             f"{type(e).__name__}: {e}") from None
        if not isinstance(out, str) or not out.endswith(EOT):
            raise ValueError(f"CustomDataLoader._add_instruction_finetuning must set rec['instr_tuned_text'] to a "
                             f"text that ends in the label word, then {EOT}; it gives {str(out)[-60:]!r}")
        return out[:-len(EOT)]
    template, words = prompt_from_texts(text(0), text(1))
    if "{review}" not in template:
        raise ValueError(f"the instruction CustomDataLoader._add_instruction_finetuning writes must hold the review; "
                         f"it writes {text(0)[:80]!r}")
    return Prompt(template, words)


def prompt_from_texts(negative, positive):
    """(template, 'word0,word1') of the instr_tuned_texts of one review with label 0 and with label 1 (as prompt_of
    reads them): their shared text, up to the word where they part, and each one's word before end-of-text."""
    texts = [t.removesuffix(EOT) for t in (negative, positive)]
    n = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
    while n and (texts[0][n - 1].isalnum() or texts[0][n - 1] in "'-"):  # back to the start of a word
        n -= 1
    template = texts[0][:n].rstrip()
    words = [t[len(template):].strip() for t in texts]
    if not all(words) or "," in "".join(words):
        raise ValueError(f"CustomDataLoader._add_instruction_finetuning must end each text in its label word (two "
                         f"different words, without commas); it ends them in {words[0]!r} and {words[1]!r}")
    return template, ",".join(words)


def pick_prompt(template, label_words, add_instruction):
    """The Prompt of prompt_template and label_words: OWN and '' mean dataloader.py's own (add_instruction's)."""
    own = prompt_of(add_instruction) if template == OWN or not label_words else None
    return Prompt(own.template if template == OWN else template, label_words or own.label_words)


def few_shot_demonstrations(train_split, k, seed):
    """k solved (text, label) examples, as balanced as k allows, in a seeded random order."""
    rng = random.Random(seed)
    by_label = {y: [i for i, lab in enumerate(train_split["label"]) if lab == y] for y in (0, 1)}
    first = rng.randrange(2)
    labels = [(first + j) % 2 for j in range(k)]
    picks = [(i, y) for y in (0, 1) for i in rng.sample(by_label[y], labels.count(y))]
    rng.shuffle(picks)
    return [(train_split[i]["text"], y) for i, y in picks]


def own_instruction(enc):
    """dataloader.py's CustomDataLoader._add_instruction_finetuning (the course's API), of a loader over one
    review: what writes the homework's own prompt."""
    from dataloader import CustomDataLoader
    return CustomDataLoader(datasets.Dataset.from_dict({"text": ["a film"], "label": [0]}), enc, 1)._add_instruction_finetuning


"""
Rotten Tomatoes reviews as instruction-tuning text and batches.

Each review becomes one text: the instruction with the review in it, then the label word, then
end-of-text (question 2.4). The model learns to answer with the label word, and generate.py asks it
the same instruction, read off _add_instruction_finetuning, so evaluation asks exactly what training
taught.

    split = lorakit.data.load_splits("cornell-movie-review-data/rotten_tomatoes")["train"]   # or a local directory
    loader = CustomDataLoader(split, tiktoken.get_encoding("gpt2"), batch_size=8)
    loader._add_instruction_finetuning({"text": "a gorgeous film", "label": 1})["instr_tuned_text"]
    x, y = next(iter(loader.get_loader()))   # (B, T) inputs, (B, T) targets, -1 where nothing is learned

The batches (lengths bucketed, seeded, shared across processes) are lorakit/data.py's.
"""

from lorakit.data import Batches

EOT = "<|endoftext|>"  # GPT-2's end-of-text, which ends every answer

# BEGIN SOLUTION CustomDataLoader._add_instruction_finetuning
# STUB: # TODO (question 2.4): the instruction the model is asked, with {review} where the review goes, and the
# STUB: # words it answers with for label 0 and label 1 (generate.py reads both off _add_instruction_finetuning).
# STUB: INSTRUCTION_TEMPLATE = None
# STUB: LABEL_WORDS = None
INSTRUCTION_TEMPLATE = ("Classify the sentiment of the movie review as positive or negative.\n\n"
                        "Review: {review}\nSentiment:")
LABEL_WORDS = ("negative", "positive")  # label 0, label 1
# END SOLUTION


class CustomDataLoader:
    """
    The reviews of a split as instruction-tuned texts and (x, y) batches of their tokens: y is x shifted
    by one, with -1 where nothing is learned (padding and, by default, the prompt: the loss falls on the
    answer). More keyword arguments set lorakit.data.Batches' options (block_size, loss_on, seed, ...).
    """

    def __init__(self, dataset, tokenizer, batch_size=8, **options):
        self.dataset, self.tokenizer, self.batch_size, self.options = dataset, tokenizer, batch_size, options
        self._batches = None

    def _add_instruction_finetuning(self, rec):
        """Adds instr_tuned_text to a record (a dict with 'text' and 'label'): its prompt, its label word, end-of-text."""
        # BEGIN SOLUTION CustomDataLoader._add_instruction_finetuning
        # STUB: # TODO: set rec["instr_tuned_text"] to INSTRUCTION_TEMPLATE with rec["text"] in it, then a space and
        # STUB: # the word of rec["label"] (0 or 1), then EOT, so that the model learns to answer with the word.
        # STUB: raise NotImplementedError("CustomDataLoader._add_instruction_finetuning")
        review = "" if rec["text"] is None else str(rec["text"]).strip()
        prompt = INSTRUCTION_TEMPLATE.replace("{review}", review)  # not format(): a review may hold braces
        rec["instr_tuned_text"] = prompt + " " + LABEL_WORDS[rec["label"]] + EOT
        # END SOLUTION
        return rec

    @property
    def batches(self):
        """lorakit.data.Batches of this split's texts, made on first use."""
        if self._batches is None:
            self._batches = Batches(self.dataset, self.tokenizer, self.batch_size, self._add_instruction_finetuning,
                                    **self.options)
        return self._batches

    def get_loader(self, shuffle=True):
        """A torch DataLoader of (x, y) batches, one epoch: shuffled (seeded, reviews of similar length together),
        or the records in order."""
        return self.batches.loader(shuffle)

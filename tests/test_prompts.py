"""Prompt templates and label words: the prompt's text, the answer rule, training, resume, scoring, the sweep grid."""
import json
import re
import subprocess
import sys

import pytest
import tiktoken
import torch

import generate
import sweep
import train
from configurator import ConfigError, configure
from conftest import ROOT
from generate import read_label
from lorakit.data import Batches, load_splits
from lorakit.prompts import Prompt, own_instruction, pick_prompt

ENC = tiktoken.get_encoding("gpt2")


def test_templates_put_the_label_words_in_and_few_shot_examples_repeat_the_review_paragraph():
    p = pick_prompt("instruct", "bad,good", own_instruction(ENC))  # dataloader.py's instruction, other words
    assert p.text("a gem") == "Classify the sentiment of the movie review as positive or negative.\n\nReview: a gem\nSentiment:"
    shots = p.text("a gem", [("dull", 0), ("fun", 1)])
    assert shots.count("Classify") == 1 and shots.count("Review:") == 3 and "Sentiment: bad\n\nReview: fun" in shots
    custom = Prompt("Is '{review}' liked?", "no,yes")
    assert custom.text("it", [("ok", 1)]) == "Is 'ok' liked? yes\n\nIs 'it' liked?"
    assert Prompt("bare", "negative,positive").text("a {negative} {review} film") == "Review: a {negative} {review} film\nSentiment:"


@pytest.mark.parametrize("generation, label", [
    (" very good", 1), ("  Very Bad.", 0), (" very", None), (" very goodness", None), (" very bad, not very good", None),
    (" good", None),
])
def test_a_phrase_is_read_as_a_whole(generation, label):
    assert read_label(generation, ("very bad", "very good")) == label


def test_one_word_inside_the_other_is_fine_when_neither_begins_the_other():
    words = ("not bad", "bad")
    assert [read_label(g, words) for g in (" not bad at all", " bad", " bad, not bad")] == [0, 1, None]


@pytest.mark.parametrize("flags, message", [
    (["--prompt_template=Sentiment of this review:"], "prompt_template must be one of instruct, bare, question, "
                                                      "choices or a text with {review}"),
    (["--prompt_template=Review: {review}\nSentiment: "], "must not end in a space"),
    (["--label_words=good,Good"], "name one word twice"),
    (["--label_words=no,not"], "one begins with the other"),
    (["--label_words=positive"], "label_words must be two words or phrases"),
])
def test_bad_templates_and_label_words_are_one_line_before_any_work(flags, message, tmp_path):
    for script in ("train.py", "generate.py"):
        p = subprocess.run([sys.executable, script, *flags, f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    with pytest.raises(ConfigError, match=re.escape(message)):
        sweep.main([f"--out_dir={tmp_path / 'out'}", *[f.replace("--prompt_template", "--templates") for f in flags]])
    assert not (tmp_path / "out").exists()


def test_a_multi_token_label_is_the_whole_answer_the_loss_falls_on(reviews):
    prompt = Prompt("bare", "very bad,very good")
    loader = Batches(load_splits(reviews)["train"], ENC, batch_size=4, prompt=prompt)
    answer = ENC.encode(" very good")
    assert len(answer) == 2 and ENC.encode(" very bad")[0] == answer[0]  # the labels share their first token
    rec = loader._tokenize(prompt.instruction({"text": "a gem", "label": 1}))
    assert rec["ids"] == ENC.encode("Review: a gem\nSentiment:") + answer + [ENC.eot_token] and rec["n_answer"] == 3
    _, y = loader.collate([rec])
    assert y[0][y[0] != -1].tolist() == answer + [ENC.eot_token]


def test_a_run_is_evaluated_with_its_template_and_label_words_and_scored_on_whole_phrases(tiny_ckpt, reviews, tmp_path):
    kw = [f"--init_from={tiny_ckpt}", f"--dataset={reviews}", f"--out_dir={tmp_path}", "--device=cpu",
          "--batch_size=4", "--eval_iters=1", "--rank=4", "--alpha=8", "--lr=3e-2", "--max_iters=3"]
    train.main([*kw, "--prompt_template=question", "--label_words=very bad,very good"])
    c, _ = train.read_settings([*kw[1:], "--init_from=resume"])
    assert (c.prompt_template, c.label_words) == ("question", "very bad,very good")
    results = generate.main([f"--out_dir={tmp_path}", "--device=cpu", "--mode=score", "--num_samples=8"])
    assert (results["prompt_template"], results["label_words"]) == ("question", "very bad,very good")
    preds = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert all(r["prompt"].endswith("\nQuestion: Did the critic like the movie?\nAnswer:") for r in preds)
    assert {r["prediction"] for r in preds} <= {"very bad", "very good"}
    # score mode weighs both tokens of each label: the first, " very", cannot tell them apart
    sampler = generate.ModelSampler(init_from="resume", out_dir=str(tmp_path), device="cpu", mode="score")
    for r in preds:
        whole = [ENC.encode(r["prompt"]) + ENC.encode(f" very {w}") for w in ("bad", "good")]
        with torch.no_grad():
            logprobs = [sampler.model(torch.tensor([ids]), torch.tensor([ids]))[0][0].log_softmax(-1) for ids in whole]
        score = [float(lp[-3, ids[-2]] + lp[-2, ids[-1]]) for lp, ids in zip(logprobs, whole)]
        assert score[0] != score[1] and r["prediction"] == ("very good" if score[1] > score[0] else "very bad")
    assert results["accuracy"] == sum(r["prediction"] == ("very good" if r["label"] else "very bad")
                                      for r in preds) / 8


def test_own_reviews_with_phrases_get_probabilities_of_the_whole_phrases(tiny_ckpt, capsys):
    generate.main([f"--init_from={tiny_ckpt}", "--review=an utterly charmless film", "--device=cpu",
                   "--label_words=very bad,very good"])
    line = capsys.readouterr().out.strip()
    bad, good = re.match(r"P\(very bad\) (\S+) +P\(very good\) (\S+) +generates ", line).groups()
    assert 0 < float(bad) + float(good) <= 1


def test_the_sweep_grids_over_templates_and_label_words():
    c = configure(sweep.DEFAULTS, ["--templates=instruct,bare", "--label_words=;bad,good",
                                   "--ranks=16", "--full_finetune=False", "--seeds=1,2"])
    runs = {r["name"]: r for r in sweep.plan(c)}
    assert len(runs) == 4 * 4 and {"zero-shot", "zero-shot-bare-bad-good", "lora-r16-bad-good-seed2"} <= set(runs)
    assert "--prompt_template=bare" in runs["few-shot-4-bare"]["eval"]
    trained = runs["lora-r16-bare-bad-good-seed1"]
    assert {"--prompt_template=bare", "--label_words=bad,good"} <= set(trained["train"])
    assert not any(f.startswith(("--prompt_template", "--label_words")) for f in trained["eval"])  # the run's own
    assert trained["group"] == "lora-r16-bare-bad-good" and trained["method"] == "LoRA, template bare, bad/good"

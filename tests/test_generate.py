"""generate.py: the matching rule, batching, checkpoints, few-shot prompts, results files."""
import json
import os
import re

import pytest
import torch

import generate
from configurator import ConfigError
from conftest import DATA, STANDIN, needs_data, needs_standin, results_of
from generate import ModelSampler, main, read_label
from lorakit.prompts import few_shot_demonstrations
from lora import mark_only_lora_as_trainable
from model import GPT


@pytest.mark.parametrize("generation, label", [
    (" positive", 1), (" negative<|x|>", 0), ("Positive!", 1), ("\n\n  NEGATIVE.", 0), (" positive\nReview", 1),
    (" neutral", None), ("", None), (" pos", None), (" positively great", None), (" the film is positive", None),
    (" positive or negative", None), (" negative, not positive", None), ("!!!", None),
])
def test_matching_rule(generation, label):
    assert read_label(generation, ("negative", "positive")) == label


def test_few_shot_demonstrations_are_balanced_and_reproducible(reviews):
    from lorakit.data import load_splits
    train_split = load_splits(reviews)["train"]
    a = few_shot_demonstrations(train_split, 6, seed=1)
    assert a == few_shot_demonstrations(train_split, 6, seed=1)
    assert sorted(y for _, y in a) == [0, 0, 0, 1, 1, 1]
    assert len({t for t, _ in a}) == 6
    assert a != few_shot_demonstrations(train_split, 6, seed=2)
    assert sorted(y for _, y in few_shot_demonstrations(train_split, 3, seed=1)) in ([0, 0, 1], [0, 1, 1])


def save_lora_run(ckpt_dir, tiny_ckpt, prefix=""):
    """A train.py-style checkpoint of a LoRA model with a non-zero update; returns that model."""
    torch.manual_seed(0)
    model = mark_only_lora_as_trainable(GPT.from_pretrained(tiny_ckpt, dict(lora_rank=4, lora_alpha=8)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.3)
    os.makedirs(ckpt_dir, exist_ok=True)
    from dataclasses import asdict
    torch.save({"model": {prefix + k: v for k, v in model.state_dict().items()},
                "model_args": asdict(model.config), "iter_num": 1, "base_model": tiny_ckpt},
               os.path.join(ckpt_dir, "ckpt.pt"))
    return model


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_resume_gives_the_saved_models_logits(tiny_ckpt, reviews, tmp_path, prefix):
    saved = save_lora_run(tmp_path, tiny_ckpt, prefix).eval()
    sampler = ModelSampler(init_from="resume", out_dir=str(tmp_path), dataset=reviews, device="cpu")
    assert sampler.model.transformer.h[0].attn.c_attn.has_weights_merged
    idx = torch.randint(0, 50257, (2, 20))
    torch.testing.assert_close(sampler.model(idx, idx)[0], saved(idx, idx)[0], rtol=1e-5, atol=1e-5)


def test_batched_predictions_equal_one_at_a_time(tiny_ckpt, reviews, tmp_path):
    save_lora_run(tmp_path, tiny_ckpt)
    kw = dict(init_from="resume", out_dir=str(tmp_path), dataset=reviews, device="cpu", max_new_tokens=4)
    batched = results_of(ModelSampler(batch_size=7, **kw))
    single = results_of(ModelSampler(batch_size=1, **kw))
    assert [r["generation"] for r in batched] == [r["generation"] for r in single]
    assert len({r["generation"] for r in batched}) > 1  # the check means something: generations differ


def test_results_files_and_the_printed_line(tiny_ckpt, reviews, tmp_path, capsys):
    save_lora_run(tmp_path, tiny_ckpt)
    summary = main([f"--out_dir={tmp_path}", f"--dataset={reviews}", "--device=cpu", "--num_samples=10",
                    "--prompt_style=few_shot", "--num_shots=2"])
    out = capsys.readouterr().out
    assert f"Accuracy: {summary['accuracy']:.4f}, Positive Predictions: {summary['positive']}, " \
           f"Negative Predictions: {summary['negative']}" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n"] == 10 and results["num_shots"] == 2 and results["seconds"] > 0
    preds = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(preds) == 10 and set(preds[0]) == {"text", "label", "prompt", "generation", "prediction"}
    assert preds[0]["prompt"].count("Review:") == 3  # two demonstrations, then the review itself
    correct = sum(p["prediction"] == ("positive" if p["label"] else "negative") for p in preds)
    assert results["accuracy"] == correct / 10
    assert results["unparseable"] == sum(p["prediction"] is None for p in preds)


def test_score_mode_picks_the_likelier_label_word(tiny_ckpt, reviews, tmp_path):
    saved = save_lora_run(tmp_path, tiny_ckpt).eval()
    sampler = ModelSampler(init_from="resume", out_dir=str(tmp_path), dataset=reviews, device="cpu", mode="score",
                           num_samples=6)
    preds = results_of(sampler)
    for r in preds:
        ids = torch.tensor([sampler.prompt_ids(r["text"])])
        logits, _ = saved(ids)
        assert r["prediction"] == ("positive" if logits[0, -1, 3967] > logits[0, -1, 4633] else "negative")


@pytest.mark.parametrize("flag, message", [
    ("--max_new_tokens=0", "max_new_tokens must be >= 1"), ("--temperature=-1.0", "temperature must be 0 .greedy. or at least 1e-6"),
    ("--num_samples=-1", "num_samples must be >= 1"), ("--mode=vote", "mode must be one of generate, score, not 'vote'"),
])
def test_bad_settings(tmp_path, flag, message):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match=message):
        main([f"--out_dir={tmp_path}", flag])


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="no checkpoint at .*ckpt.pt"):
        main([f"--out_dir={tmp_path}", "--device=cpu"])


@needs_standin
@needs_data
def test_greedy_generations_match_transformers_on_the_standin():
    from transformers import GPT2LMHeadModel
    sampler = ModelSampler(init_from=str(STANDIN), dataset=str(DATA), device="cpu", num_samples=12, batch_size=5,
                           max_new_tokens=6)
    hf = GPT2LMHeadModel.from_pretrained(str(STANDIN)).eval()
    for r in results_of(sampler):
        ids = torch.tensor([sampler.prompt_ids(r["text"])])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                          pad_token_id=50256)
        row = out[0, ids.shape[1]:].tolist()
        row = row[:row.index(50256)] if 50256 in row else row
        assert r["generation"] == sampler.enc.decode(row)


@pytest.mark.parametrize("mode", ["generate", "score"])
def test_the_shared_prompt_start_is_computed_once_and_changes_nothing(tiny_ckpt, reviews, tmp_path, mode):
    save_lora_run(tmp_path, tiny_ckpt)
    sampler = ModelSampler(init_from="resume", out_dir=str(tmp_path), dataset=reviews, device="cpu", mode=mode,
                           prompt_style="few_shot", num_shots=2, batch_size=5, max_new_tokens=4)
    prompts = [sampler.prompt_ids(r["text"]) for r in sampler.records]
    ids, _ = sampler.decoder.shared_prefix(prompts)
    # the instruction and both examples, up to the "Review:" that every prompt has next
    assert sampler.enc.decode(ids).count("Review:") == 3 and sampler.enc.decode(ids).endswith("Review:")
    preds = results_of(sampler)
    assert [r["generation"] for r in preds] == [sampler.decoder.continuations([p])[0] for p in prompts]


def test_own_reviews_get_a_generation_and_two_probabilities_and_nothing_is_written(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("a dull , lifeless mess\n\nan absolute joy to watch\n")
    generate.main([f"--init_from={tiny_ckpt}", "--review=an utterly charmless film", "--device=cpu",
                   f"--reviews_file={tmp_path / 'mine.txt'}", f"--out_dir={tmp_path / 'out'}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("  ")[-1] for line in lines] == ["an utterly charmless film", "a dull , lifeless mess",
                                                        "an absolute joy to watch"]
    for line in lines:
        neg, pos, generation = re.match(r"P\(negative\) (\S+) +P\(positive\) (\S+) +generates ('.*'|\".*\")", line).groups()
        assert 0 < float(neg) + float(pos) <= 1 and generation
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="cannot read reviews_file .*: No such file or directory"):
        generate.main([f"--init_from={tiny_ckpt}", f"--reviews_file={tmp_path / 'none.txt'}", "--device=cpu"])
    with pytest.raises(ConfigError, match="review is blank"):
        generate.main([f"--init_from={tiny_ckpt}", "--review=  ", "--device=cpu"])

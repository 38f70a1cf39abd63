"""configurator.py's flags and dataloader.py's instruction batches."""
import pytest
import tiktoken
import torch

from configurator import ConfigError, configure
from conftest import batches_of, homework_prompt
from dataloader import CustomDataLoader
from lorakit.data import load_splits

DEFAULTS = dict(init_from="gpt2", learning_rate=6e-4, lora_rank=0, lora_alpha=0.0, dropout=0.1,
                compile=False, top_k=None, out_dir="out")
ENC = tiktoken.get_encoding("gpt2")


def test_flags_aliases_dashes_and_types():
    c = configure(DEFAULTS, ["--init-from=gpt2-medium", "lr=1e-4", "--rank=16", "alpha=64", "--dropout=0",
                             "--compile=True", "--top_k=200", "--out_dir=123"])
    assert c == dict(init_from="gpt2-medium", learning_rate=1e-4, lora_rank=16, lora_alpha=64.0, dropout=0.0,
                     compile=True, top_k=200, out_dir="123")
    assert type(c["lora_alpha"]) is float and type(c["out_dir"]) is str


@pytest.mark.parametrize("argv, message", [
    (["--learnig_rate=1e-3"], "unknown setting 'learnig_rate'; did you mean learning_rate"),
    (["--lora_rank=big"], "setting 'lora_rank' expects int (like 0), got 'big'"),
    (["--lora_rank=1.5"], "setting 'lora_rank' expects int (like 0), got 1.5"),
    (["--compile"], "'--compile' is not a setting: write --key=value"),
    (["=3"], "has no setting name"),
    (["no_such_config.py"], "config file 'no_such_config.py' not found"),
])
def test_bad_flags_are_one_clear_error(argv, message):
    with pytest.raises(ConfigError) as e:
        configure(DEFAULTS, argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "exp.py"
    cfg.write_text("import math\ninit_from = 'gpt2-large'\nlora_rank = 8\nlora_alpha = 4 * lora_rank\n")
    c = configure(DEFAULTS, [str(cfg), "--lora_rank=4"])
    assert (c["init_from"], c["lora_rank"], c["lora_alpha"]) == ("gpt2-large", 4, 32.0)
    cfg.write_text("lora_rnk = 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'lora_rnk' in .*did you mean lora_rank"):
        configure(DEFAULTS, [str(cfg)])


def test_default_config_is_the_handouts():
    import train
    c = configure(train.DEFAULTS, ["configs/finetune_params_config.py"])
    assert (c["init_from"], c["lora_rank"], c["lora_alpha"], c["learning_rate"]) == ("gpt2-medium", 128, 512.0, 5e-4)


def test_instruction_text_prompt_and_label_tokens(reviews):
    data = load_splits(reviews)
    loader = CustomDataLoader(data["train"], ENC, batch_size=4)
    rec = loader.batches._tokenize(loader._add_instruction_finetuning({"text": "a gorgeous film .", "label": 1}))
    prompt = homework_prompt().text("a gorgeous film .")
    assert rec["instr_tuned_text"] == prompt + " positive<|endoftext|>"
    assert not prompt.endswith(" ")
    ids = ENC.encode(rec["instr_tuned_text"], allowed_special={"<|endoftext|>"})
    assert ids == rec["ids"] == ENC.encode(prompt) + [3967, ENC.eot_token]  # " positive" is one token
    neg = loader.batches._tokenize(loader._add_instruction_finetuning({"text": "a dull film .", "label": 0}))
    assert neg["ids"][-2:] == [4633, ENC.eot_token]  # " negative"


@pytest.mark.parametrize("loss_on", ["label", "all"])
def test_batches_pad_and_mask(reviews, loss_on):
    data = load_splits(reviews)
    loader = batches_of(data["train"], ENC, batch_size=5, loss_on=loss_on, shuffle=False)
    x, y = loader.get_batch(0)
    for b in range(5):
        ids = loader.records[b]["ids"]
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1]
        assert (y[b, n:] == -1).all()  # padding is never learned
        learned = y[b, :n][y[b, :n] != -1].tolist()
        assert learned == (ids[-2:] if loss_on == "label" else ids[1:])


def test_long_review_is_cut_in_the_review_only():
    long_text = " ".join(["remarkably"] * 400)
    loader = batches_of([{"text": long_text, "label": 0}], ENC, batch_size=1, block_size=64)
    rec = loader.records[0]
    assert len(rec["ids"]) == 65  # block_size inputs + the last target
    text = rec["instr_tuned_text"]
    assert text.startswith(homework_prompt().text("")[:40]) and text.endswith("\nSentiment: negative<|endoftext|>")
    assert len(homework_prompt().encode(ENC, long_text, 50)) <= 50


def test_batches_are_reproducible_and_ranks_split_the_global_batch(reviews):
    data = load_splits(reviews)
    one = batches_of(data["train"], ENC, batch_size=8, seed=3)
    again = batches_of(data["train"], ENC, batch_size=8, seed=3)
    halves = [batches_of(data["train"], ENC, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for i in (0, 5, 13):  # 48 examples: batch 13 is in the third epoch
        x, y = one.get_batch(i)
        assert torch.equal(x, again.get_batch(i)[0])
        unpadded = lambda rows: sorted(tuple(t for t in r.tolist() if t != -1) for r in rows)  # noqa: E731
        assert unpadded([r for h in halves for r in h.get_batch(i)[1]]) == unpadded(y)
    epoch0 = [tuple(r) for i in range(6) for r in one.get_batch(i)[0].tolist()]
    assert len(set(epoch0)) == 48  # an epoch visits every review once


def test_missing_split_column_or_label(tmp_path, reviews):
    with pytest.raises(ValueError, match="has no 'unlabeled' split .it has: train, validation, test"):
        load_splits(reviews, splits=("train", "unlabeled"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("review,label\ngood,1\n")
    (bad / "validation.csv").write_text("review,label\nbad,0\n")
    with pytest.raises(ValueError, match="lacks column.s. text"):
        load_splits(str(bad))
    with pytest.raises(ValueError, match="label 2 .* is not 0 .negative. or 1"):
        batches_of([{"text": "fine", "label": 2}], ENC)
    with pytest.raises(ValueError, match="cannot load data set"):
        load_splits(str(tmp_path / "nowhere"))


def test_length_bucketing_keeps_padding_low():
    import random
    rng = random.Random(0)
    words = ["good", "bad", "remarkably", "tedious", "film", "a", "the", "performance", "story"]
    recs = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 60))), "label": i % 2}
            for i in range(2000)]
    plain = batches_of(recs, ENC, batch_size=16, bucket=0)
    bucketed = batches_of(recs, ENC, batch_size=16)
    assert plain.padding_share(60) > 0.25
    assert bucketed.padding_share(60) < 0.05
    epoch = [j for i in range(125) for j in bucketed._picks(i)]
    assert sorted(epoch) == list(range(2000))  # still every review once an epoch

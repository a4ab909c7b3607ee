"""Tests for thanora.data.formats (fast: a tiny offline WordLevel tokenizer; slow: the real SmolLM2)."""

from __future__ import annotations

import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from thanora.assets import SMOLLM2_VOCAB_SIZE, AssetMissingError, smollm2_dir
from thanora.data.example import Example
from thanora.data.formats import (
    IGNORE_INDEX,
    collate,
    encode_example,
    format_prompt,
    format_target,
    option_targets,
    uses_chat_template,
)

_TEXT = (
    "Question: Answer: what is the sky colour ? red blue green A. B. C. A B C one two three four five six "
    "seven eight nine ten <user> <assistant> 42"
)
WORDS = _TEXT.split()
MC = Example("Question: what is the sky colour ?", ("red", "blue", "green"), 1, uid="mc")
GEN = Example("Question: what is the sky colour ?", (), "blue", uid="gen")


def _tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


# ----------------------------------------------------------------------------------------------- formatting
def test_prompt_and_targets_per_format() -> None:
    assert format_prompt(MC, "ranked") == "Question: what is the sky colour ?\nAnswer:"
    assert format_prompt(MC, "letter") == "Question: what is the sky colour ?\n A. red\n B. blue\n C. green\nAnswer:"
    assert format_prompt(GEN, "generative") == format_prompt(MC, "ranked")
    assert format_target(MC, "ranked") == " blue"
    assert format_target(MC, "letter") == " B"
    assert format_target(MC, "generative") == " blue"
    assert format_target(GEN, "generative") == " blue"
    assert option_targets(MC, "ranked") == [" red", " blue", " green"]
    assert option_targets(MC, "letter") == [" A", " B", " C"]
    assert option_targets(GEN, "generative") == [" blue"]


def test_format_errors() -> None:
    with pytest.raises(ValueError, match="unknown answer format"):
        format_prompt(MC, "cloze")
    with pytest.raises(ValueError, match="needs choices"):
        format_target(GEN, "letter")
    with pytest.raises(ValueError, match="not an index"):
        format_target(Example("q", ("a", "b"), 7), "ranked")


def test_image_token() -> None:
    ex = Example("Question: what colour ?", ("red", "blue"), 0, image="/tmp/x.png")
    assert format_prompt(ex, "ranked", image_token="<image>").startswith("<image>\nQuestion:")
    assert format_prompt(MC, "ranked", image_token="<image>").startswith("Question:")


def test_chat_template(tok: PreTrainedTokenizerFast) -> None:
    assert not uses_chat_template(tok, True)  # no template: plain text even when asked
    assert format_prompt(MC, "letter", tok, apply_chat_template=True) == format_prompt(MC, "letter")
    tok.chat_template = (
        "{% for m in messages %}<user> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <assistant>"
        "{% endif %}"
    )
    assert uses_chat_template(tok, True) and not uses_chat_template(tok, False)
    prompt = format_prompt(MC, "letter", tok, apply_chat_template=True)
    assert prompt == "<user> " + format_prompt(MC, "letter") + " <assistant>"
    assert format_target(MC, "letter", tok, apply_chat_template=True) == "B"
    assert option_targets(MC, "ranked", tok, apply_chat_template=True) == ["red", "blue", "green"]


# ----------------------------------------------------------------------------------------------- encoding
def test_labels_mask_exactly_the_answer(tok: PreTrainedTokenizerFast) -> None:
    prompt, target = format_prompt(MC, "letter"), format_target(MC, "letter")
    enc = encode_example(tok, prompt, target, max_length=64)
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == prompt_ids + target_ids
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert enc["input_ids"][0] == tok.bos_token_id
    assert tok.decode([t for t in enc["labels"] if t != IGNORE_INDEX]) == "B"

    with_eos = encode_example(tok, prompt, " one two", max_length=64, add_eos=True)
    answer = [t for t in with_eos["labels"] if t != IGNORE_INDEX]
    assert answer == [*tok(" one two", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert with_eos["input_ids"][-len(answer) :] == answer


def test_left_truncation_keeps_answer_and_bos(tok: PreTrainedTokenizerFast) -> None:
    prompt = "Question: " + " ".join(["one two three four five"] * 10) + " Answer:"
    target = " six seven eight"
    enc = encode_example(tok, prompt, target, max_length=12, add_eos=True)
    target_ids = [*tok(target, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert len(enc["input_ids"]) == 12
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["input_ids"][-4:] == target_ids and enc["labels"][-4:] == target_ids
    assert enc["labels"][:-4] == [IGNORE_INDEX] * 8
    # the kept prompt tokens are the END of the prompt ("... four five Answer:")
    assert tok.decode(enc["input_ids"][5:8]) == "four five Answer:"
    with pytest.raises(ValueError, match="does not fit"):
        encode_example(tok, prompt, target, max_length=4, add_eos=True)


def test_truncation_without_bos_and_duplicate_bos() -> None:
    plain = _tokenizer(bos=False)
    enc = encode_example(plain, "one two three four five Answer:", " six", max_length=3)
    assert plain.decode(enc["input_ids"]) == "five Answer: six"
    bos_tok = _tokenizer()
    enc = encode_example(bos_tok, "[BOS] one Answer:", " two", max_length=16)
    assert enc["input_ids"].count(bos_tok.bos_token_id) == 1


# ----------------------------------------------------------------------------------------------- collation
def test_collate_pads_right(tok: PreTrainedTokenizerFast) -> None:
    a = encode_example(tok, "one two three Answer:", " four", 32)
    b = encode_example(tok, "one Answer:", " four five", 32)
    batch = collate([{**a, "task_id": 0, "weight": 0.5}, {**b, "task_id": 3, "weight": 1.0}], tok.pad_token_id)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"].dtype == torch.long
    short = len(b["input_ids"])
    assert batch["input_ids"][1, short:].tolist() == [tok.pad_token_id] * (width - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (width - short)
    assert batch["labels"][1, short:].tolist() == [IGNORE_INDEX] * (width - short)
    assert batch["labels"][0].tolist() == a["labels"]
    assert batch["task_id"].dtype == torch.long and batch["task_id"].tolist() == [0, 3]
    assert batch["weight"].dtype == torch.float32
    with pytest.raises(TypeError, match="uid"):
        collate([{**a, "uid": "x"}, {**b, "uid": "y"}], 0)
    with pytest.raises(ValueError, match="same keys"):
        collate([a, {**b, "task_id": 1}], 0)


def test_collate_equals_transformers_seq2seq_collator_on_text(tok: PreTrainedTokenizerFast) -> None:
    """The docstring's claim for keeping `collate`: the same tensors as DataCollatorForSeq2Seq on text features."""
    from transformers import DataCollatorForSeq2Seq

    feats = [encode_example(tok, p, t, 32) for p, t in (("one two three Answer:", " four"),
                                                        ("one Answer:", " four five"), ("two Answer:", " one"))]
    ours = collate(feats, tok.pad_token_id)
    theirs = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")(
        [dict(f) for f in feats])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key


def test_collate_concatenates_per_image_tensors(tok: PreTrainedTokenizerFast) -> None:
    a = encode_example(tok, "one two three Answer:", " four", 32)
    b = encode_example(tok, "one Answer:", " four five", 32)
    pa, pb = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4)  # leading dim: images of the example
    features = [{**a, "pixel_values": pa, "w": torch.tensor(1.0)}, {**b, "pixel_values": pb, "w": torch.tensor(2.0)}]
    batch = collate(features, tok.pad_token_id)
    torch.testing.assert_close(batch["pixel_values"], torch.cat([pa, pb]))
    assert batch["w"].tolist() == [1.0, 2.0]  # 0-d tensors are stacked
    mixed = collate([a, {**b, "pixel_values": pb}, {**a, "pixel_values": pa}], tok.pad_token_id)  # text-only allowed
    torch.testing.assert_close(mixed["pixel_values"], torch.cat([pb, pa]))
    assert mixed["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match="beyond dim 0"):
        collate([{**a, "pixel_values": pa}, {**b, "pixel_values": torch.randn(1, 3, 8, 8)}], 0)
    with pytest.raises(ValueError, match="same keys"):
        collate([{**a, "task_id": 0}, {**b, "pixel_values": pb}], 0)

# ----------------------------------------------------------------------------------------------- real model (slow)
@pytest.mark.slow
def test_smollm2_conversion_and_logits() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        t0 = time.perf_counter()
        folder = smollm2_dir()
        first = time.perf_counter() - t0
    except AssetMissingError as err:
        pytest.skip(f"asset package not installed: {err.what}")
    t0 = time.perf_counter()
    assert smollm2_dir() == folder
    assert time.perf_counter() - t0 < 1.0, "second call must not convert again"
    print(f"SmolLM2 folder {folder} (first call {first:.1f} s)")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert tok.pad_token is not None and tok.chat_template
    assert getattr(model.config, "quantization_config", None) is None
    prompt = format_prompt(MC, "ranked", tok, apply_chat_template=True)
    enc = encode_example(tok, prompt, format_target(MC, "ranked", tok, apply_chat_template=True), 128, add_eos=True)
    assert "<|im_start|>assistant" in prompt
    assert enc["labels"][-1] == tok.eos_token_id
    plain = encode_example(tok, format_prompt(MC, "ranked"), format_target(MC, "ranked"), 128)
    assert plain["input_ids"] == tok(format_prompt(MC, "ranked") + format_target(MC, "ranked"))["input_ids"]
    batch = collate([enc, plain], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], SMOLLM2_VOCAB_SIZE)
    assert torch.isfinite(logits).all()

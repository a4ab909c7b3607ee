"""Tests for thanora.evaluation.evaluate (fast: tiny Llama / LLaVA and an offline WordLevel tokenizer; slow: real
SmolLM2)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import LLAVA_IMAGE_TOKEN, LLAVA_IMAGE_TOKENS, VOCAB, tiny_llama, tiny_llava
from thanora.data.example import Example
from thanora.data.formats import IGNORE_INDEX, encode_example, format_prompt, option_targets
from thanora.evaluation.evaluate import (
    EvalConfig,
    EvalTask,
    average,
    evaluate,
    evaluate_task,
    generate_answers,
    score_options,
)

_TEXT = (
    "Question: Answer: what is the sky grass sea colour ? red blue green dark light very A. B. C. D. A B C D "
    "how many apples are there 42 7 one two three"
)
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]  # ids 0, 1, 2 match the tiny models' pad/bos/eos ids


def make_tokenizer(vocab_size: int = VOCAB, image_token: str | None = None) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer with exactly ``vocab_size`` ids (fillers ``w<i>``), BOS added to every text."""
    words = SPECIALS + sorted(set(_TEXT.split()))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    if image_token is not None:
        words[LLAVA_IMAGE_TOKEN] = image_token  # replaces a filler
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if image_token is not None:
        tok.add_special_tokens([image_token])  # so "<image><image>..." splits into image tokens
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


MC = [
    Example("Question: what colour is the sky ?", ("red", "blue", "dark green"), 1, uid="a"),
    Example("Question: what colour is the grass ?", ("very dark red", "light green", "blue", "red"), 2, uid="b"),
    Example("Question: what is the sea colour ? very very dark", ("blue", "green", "red"), 0, uid="c"),
    Example("Question: sky ?", ("light red", "red", "green", "blue"), 3, uid="d"),
    Example("Question: how many apples are there ?", ("one", "two", "blue three"), 2, uid="e"),
]
GEN = [Example("Question: how many apples are there ?", (), "42", uid=f"g{i}") for i in range(3)]


def naive_scores(model: torch.nn.Module, tok: PreTrainedTokenizerFast, prompt: str, targets: list[str],
                 normalize: bool, prompt_ids: list[int] | None = None, extras: dict[str, torch.Tensor] | None = None
                 ) -> list[float]:
    """One (prompt, option) pair at a time, no padding, full-sequence log-softmax in float64."""
    out = []
    for target in targets:
        if prompt_ids is None:
            enc = encode_example(tok, prompt, target, 10_000)
            ids, positions = enc["input_ids"], [p for p, label in enumerate(enc["labels"]) if label != IGNORE_INDEX]
        else:
            target_ids = tok(target, add_special_tokens=False)["input_ids"]
            ids, positions = prompt_ids + target_ids, list(range(len(prompt_ids), len(prompt_ids) + len(target_ids)))
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids]), **(extras or {})).logits[0].double().log_softmax(-1)
        total = sum(float(logp[p - 1, ids[p]]) for p in positions)
        out.append(total / len(positions) if normalize else total)
    return out


def _pairs(fmt: str) -> tuple[list[str], list[list[str]]]:
    return [format_prompt(ex, fmt) for ex in MC], [option_targets(ex, fmt) for ex in MC]


def rigged_llama(tok: PreTrainedTokenizerFast, word: str) -> torch.nn.Module:
    """Tiny Llama whose logits are a constant bias favouring ``word`` at every position."""
    model = tiny_llama()
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    head.bias.data[tok.convert_tokens_to_ids(word)] = 10.0
    model.lm_head = head
    return model


# ----------------------------------------------------------------------------------------------- config
def test_config_and_task_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalConfig(max_new_tokens=True)
    with pytest.raises(ValueError, match="length_normalize"):
        EvalConfig(length_normalize=1)  # type: ignore[arg-type]
    ranked, gen = EvalTask("t", MC, "ranked"), EvalTask("g", GEN, "generative")
    assert (ranked.metric, ranked.mode) == ("accuracy", "loglik")
    assert (gen.metric, gen.mode) == ("exact_match", "generate")
    assert EvalTask("l", MC, "letter", mode="generate").mode == "generate"
    for bad in (dict(answer_format="cloze"), dict(answer_format="ranked", mode="generate"),
                dict(answer_format="letter", metric="anls"), dict(answer_format="generative", mode="loglik")):
        with pytest.raises(ValueError, match="task 'x'"):
            EvalTask("x", MC, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no examples"):
        EvalTask("x", [], "ranked")


# ----------------------------------------------------------------------------------------------- log-likelihood
@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pack", [True, False])
def test_score_options_equals_naive_per_pair(tok: PreTrainedTokenizerFast, batch_size: int, normalize: bool,
                                             pack: bool) -> None:
    model = tiny_llama()
    cfg = EvalConfig(batch_size=batch_size, length_normalize=normalize, pack_options=pack)
    ranked, letter = _pairs("ranked"), _pairs("letter")  # multi-token options, and shared single-token letters
    prompts, options = ranked[0] + letter[0], ranked[1] + letter[1]
    got = score_options(model, tok, prompts, options, cfg, "cpu")
    assert [len(s) for s in got] == [len(o) for o in options]
    for prompt, targets, scores in zip(prompts, options, got, strict=True):
        np.testing.assert_allclose(scores, naive_scores(model, tok, prompt, targets, normalize), atol=1e-4)


def test_packed_options_match_separate_pairs_on_gpt2(tok: PreTrainedTokenizerFast, gpt2: torch.nn.Module) -> None:
    prompts, options = _pairs("ranked")
    packed = score_options(gpt2, tok, prompts, options, EvalConfig(batch_size=4, pack_options=True), "cpu")
    separate = score_options(gpt2, tok, prompts, options, EvalConfig(batch_size=4, pack_options=False), "cpu")
    np.testing.assert_allclose(np.concatenate(packed), np.concatenate(separate), atol=1e-4)


def test_order_and_batching_do_not_change_scores(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_llama()
    prompts, options = _pairs("ranked")
    ref = score_options(model, tok, prompts, options, EvalConfig(batch_size=2), "cpu")
    perm = list(range(len(prompts)))
    random.Random(0).shuffle(perm)
    shuffled = score_options(model, tok, [prompts[i] for i in perm], [options[i] for i in perm],
                             EvalConfig(batch_size=5), "cpu")
    for k, i in enumerate(perm):
        np.testing.assert_allclose(shuffled[k], ref[i], atol=1e-5)


def test_gpt2_and_peft_wrapper(tok: PreTrainedTokenizerFast, gpt2: torch.nn.Module) -> None:
    from peft import LoraConfig, get_peft_model

    prompts, options = _pairs("ranked")
    cfg = EvalConfig(batch_size=4)
    got = score_options(gpt2, tok, prompts, options, cfg, "cpu")
    for prompt, targets, scores in zip(prompts, options, got, strict=True):
        np.testing.assert_allclose(scores, naive_scores(gpt2, tok, prompt, targets, True), atol=1e-4)
    base = score_options(tiny_llama(), tok, prompts, options, cfg, "cpu")
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped = score_options(peft_model, tok, prompts, options, cfg, "cpu")  # B = 0: same scores
    np.testing.assert_allclose(np.concatenate(wrapped), np.concatenate(base), atol=1e-5)


class _PlainForward(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep``: the full-logits path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_model_without_logits_to_keep(tok: PreTrainedTokenizerFast) -> None:
    prompts, options = _pairs("ranked")
    model = tiny_llama()
    plain = score_options(_PlainForward(model), tok, prompts, options, EvalConfig(batch_size=3), "cpu")
    kept = score_options(model, tok, prompts, options, EvalConfig(batch_size=3), "cpu")
    np.testing.assert_allclose(np.concatenate(plain), np.concatenate(kept), atol=1e-5)


def test_mode_restored(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_llama().train()
    prompts, options = _pairs("letter")
    score_options(model, tok, prompts, options, EvalConfig(), "cpu")
    assert model.training and all(m.training for m in model.modules())
    generate_answers(model, tok, prompts[:2], EvalConfig(max_new_tokens=2), "cpu")
    assert model.training
    model.eval()
    score_options(model, tok, prompts, options, EvalConfig(), "cpu")
    assert not model.training


# ----------------------------------------------------------------------------------------------- tasks
def test_rigged_model_gets_everything_right(tok: PreTrainedTokenizerFast) -> None:
    cfg = EvalConfig(batch_size=3, max_new_tokens=4)
    blue = rigged_llama(tok, "blue")  # the correct ranked option always contains "blue"
    ranked = evaluate_task(blue, tok, EvalTask("ranked", MC[:4], "ranked"), cfg, "cpu")
    assert ranked == {"metric": "accuracy", "mode": "loglik", "score": 1.0, "n": 4, "correct": [1.0] * 4}
    letter_c = [Example(ex.prompt, ex.choices, 2, uid=ex.uid) for ex in MC]
    c_model = rigged_llama(tok, "C")
    for mode in ("loglik", "generate"):
        result = evaluate_task(c_model, tok, EvalTask("letter", letter_c, "letter", mode=mode), cfg, "cpu")
        assert (result["mode"], result["score"], result["n"]) == (mode, 1.0, 5)
    wrong = [Example(ex.prompt, ex.choices, 0, uid=ex.uid) for ex in MC]
    assert evaluate_task(c_model, tok, EvalTask("w", wrong, "letter"), cfg, "cpu")["score"] == 0.0
    m42 = rigged_llama(tok, "42")
    gen = evaluate_task(m42, tok, EvalTask("gsm", GEN, "generative"), cfg, "cpu")
    assert (gen["metric"], gen["mode"], gen["score"]) == ("exact_match", "generate", 1.0)
    one = EvalConfig(max_new_tokens=1)
    for metric in ("relaxed_accuracy", "anls"):
        assert evaluate_task(m42, tok, EvalTask(metric, GEN, "generative", metric=metric), one, "cpu")["score"] == 1


def test_generation_strings_batching_and_padding_side(tok: PreTrainedTokenizerFast) -> None:
    model = tiny_llama()
    prompts = [format_prompt(ex, "letter") for ex in MC]
    assert tok.padding_side == "right"
    one = generate_answers(model, tok, prompts, EvalConfig(batch_size=1, max_new_tokens=5), "cpu")
    many = generate_answers(model, tok, prompts, EvalConfig(batch_size=4, max_new_tokens=5), "cpu")
    assert tok.padding_side == "right"
    assert all(isinstance(t, str) for t in one) and len(one) == len(prompts)
    assert one == many  # left padding with the attention mask does not change greedy answers
    assert all(not t.startswith(p) for t, p in zip(one, prompts, strict=True))


def test_evaluate_and_average(tok: PreTrainedTokenizerFast) -> None:
    tasks = [EvalTask("mc", MC, "ranked"), EvalTask("gen", GEN, "generative")]
    results = evaluate(tiny_llama(), tok, tasks, EvalConfig(max_new_tokens=3), "cpu", progress=False)
    assert list(results) == ["mc", "gen"]
    assert all(r["n"] == len(t.examples) == len(r["correct"]) for r, t in zip(results.values(), tasks, strict=True))
    assert average(results) == pytest.approx((results["mc"]["score"] + results["gen"]["score"]) / 2)
    with pytest.raises(ValueError, match="distinct"):
        evaluate(tiny_llama(), tok, [tasks[0], tasks[0]], EvalConfig(), "cpu", progress=False)
    with pytest.raises(ValueError, match="no task"):
        average({})


# ----------------------------------------------------------------------------------------------- vision-language
def _llava_processor() -> object:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=make_tokenizer(160, "<image>"), patch_size=8,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def _images(tmp_path: Path, n: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_llava_scoring_matches_naive_and_tasks_run(tmp_path: Path) -> None:
    from PIL import Image

    model, processor = tiny_llava(), _llava_processor()
    tok = processor.tokenizer  # type: ignore[attr-defined]
    paths = _images(tmp_path, 3)
    examples = [Example(ex.prompt, ex.choices, ex.answer, p, ex.uid) for ex, p in zip(MC, paths, strict=False)]
    examples.append(MC[3])  # a text-only example in the same batches
    prompts = [format_prompt(ex, "ranked", image_token="<image>") for ex in examples]
    options = [option_targets(ex, "ranked") for ex in examples]
    images = [ex.image for ex in examples]
    got = score_options(model, tok, prompts, options, EvalConfig(batch_size=4), "cpu", images, processor)
    for prompt, targets, image, scores in zip(prompts, options, images, got, strict=True):
        if image is None:
            expected = naive_scores(model, tok, prompt, targets, True)
        else:
            out = processor(text=[prompt], images=[Image.open(image).convert("RGB")], return_tensors="pt")  # type: ignore[operator]
            ids = out["input_ids"][0].tolist()
            assert ids.count(LLAVA_IMAGE_TOKEN) == LLAVA_IMAGE_TOKENS and out["pixel_values"].shape == (1, 3, 32, 32)
            expected = naive_scores(model, tok, prompt, targets, True, ids, {"pixel_values": out["pixel_values"]})
        np.testing.assert_allclose(scores, expected, atol=1e-4)
    with pytest.raises(ValueError, match="processor"):
        score_options(model, tok, prompts, options, EvalConfig(), "cpu", images)
    for mode in ("loglik", "generate"):
        task = EvalTask("vqa", examples, "letter", mode=mode)
        result = evaluate_task(model, tok, task, EvalConfig(batch_size=2, max_new_tokens=2), "cpu", processor)
        assert result["n"] == 4 and 0.0 <= result["score"] <= 1.0


# ----------------------------------------------------------------------------------------------- real model (slow)
EASY = [
    Example("Question: What colour is the sky on a clear day?", ("blue", "green", "purple"), 0, uid="sky"),
    Example("Question: How many legs does a dog have?", ("two", "four", "ten"), 1, uid="dog"),
    Example("Question: What is the capital of France?", ("London", "Berlin", "Paris"), 2, uid="paris"),
    Example("Question: What do bees make?", ("honey", "steel", "glass"), 0, uid="bees"),
]


@pytest.mark.slow
def test_smollm2_real_tokenizer_and_easy_questions() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thanora.assets import AssetMissingError, smollm2_dir
    from thanora.data.sources import load_source

    try:
        folder = smollm2_dir()
        csqa = load_source("csqa")[:6]
    except AssetMissingError as err:
        pytest.skip(f"asset package not installed: {err.what}")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    for fmt in ("ranked", "letter"):  # BPE boundaries: batched scores equal the naive per-pair ones
        prompts, options = [format_prompt(ex, fmt) for ex in csqa], [option_targets(ex, fmt) for ex in csqa]
        got = score_options(model, tok, prompts, options, EvalConfig(batch_size=8), "cpu")
        for prompt, targets, scores in zip(prompts, options, got, strict=True):
            np.testing.assert_allclose(scores, naive_scores(model, tok, prompt, targets, True), atol=1e-3)
    t0 = time.perf_counter()
    result = evaluate_task(model, tok, EvalTask("easy", EASY, "ranked"), EvalConfig(), "cpu")
    print(f"SmolLM2-135M easy questions: {result['correct']} in {time.perf_counter() - t0:.1f} s")
    assert result["score"] >= 0.75
    prompts = [format_prompt(ex, "generative", tok, apply_chat_template=True) for ex in EASY[1:3]]
    answers = generate_answers(model, tok, prompts, EvalConfig(max_new_tokens=12), "cpu")
    print(f"generated: {answers}")
    assert "four" in answers[0] and "Paris" in answers[1]

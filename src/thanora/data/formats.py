"""Prompt/answer formatting, tokenisation with answer-only labels, and batch collation.

Answer formats:

* ``"ranked"``: the option TEXT is the answer (``...\\nAnswer:`` then `` bank``). Used for length-normalised
  log-likelihood scoring of every option (OLMES "RC" style) and as the training target.
* ``"letter"``: options are listed (``\\n A. bank\\n B. library ...\\nAnswer:``) and the answer is `` B``.
* ``"generative"``: a free answer string (``...\\nAnswer:`` then `` 18``); for multiple-choice examples the
  correct option text is the reference.

Chat template decision: with ``apply_chat_template=True`` and a tokenizer that has a chat template, the whole
formatted prompt (cue ``Answer:`` included) becomes one user turn rendered with
``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``; the targets then drop their
leading space because the assistant turn starts on a fresh line. Otherwise (the default, and for tokenizers
without a template) the plain text is used and targets start with a space, so the prompt/answer token boundary is
the natural one for byte-level BPE tokenizers.

Images: an example with an ``image`` is encoded through the model's processor (``AutoProcessor``-like: ``text=``,
``images=``) for the prompt, which expands the image placeholder and returns pixel values, and through the plain
tokenizer for the answer (:class:`ImagePromptTokenizer`, :func:`encode_image_example`); training, calibration and
evaluation all go through it, so they tokenise identically. The processor's other outputs (``pixel_values``,
``image_sizes``...) stay in the feature with their leading per-image dimension and :func:`collate` concatenates them
along dim 0 over the examples that have them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from thanora.data.example import Example

AnswerFormat = Literal["ranked", "letter", "generative"]
FORMATS: tuple[str, ...] = ("ranked", "letter", "generative")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IGNORE_INDEX = -100
_BASE_KEYS = ("input_ids", "attention_mask", "labels")
_TEXT_KEYS = ("input_ids", "attention_mask")


def _check(example: Example, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown answer format {fmt!r}; expected one of {FORMATS}")
    if fmt in ("ranked", "letter") and not example.choices:
        raise ValueError(f"format {fmt!r} needs choices but example {example.uid!r} is generative")
    if fmt == "letter" and len(example.choices) > len(LETTERS):
        raise ValueError(f"format 'letter' supports at most {len(LETTERS)} choices, got {len(example.choices)}")
    if example.choices and not (isinstance(example.answer, int) and 0 <= example.answer < len(example.choices)):
        raise ValueError(f"example {example.uid!r}: answer {example.answer!r} is not an index into its choices")


def uses_chat_template(tokenizer: Any, apply_chat_template: bool) -> bool:
    """Whether prompts will be wrapped in the tokenizer's chat template.

    Args:
        tokenizer: A Hugging Face tokenizer, or ``None``.
        apply_chat_template: The caller's request.

    Returns:
        True only if requested and the tokenizer has a chat template.
    """
    return bool(apply_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))


def format_prompt(
    example: Example,
    fmt: str,
    tokenizer: Any = None,
    apply_chat_template: bool = False,
    image_token: str | None = None,
) -> str:
    """Render the prompt (everything before the answer) of an example.

    Args:
        example: The example.
        fmt: ``"ranked"``, ``"letter"`` or ``"generative"``.
        tokenizer: Tokenizer whose chat template is used when ``apply_chat_template`` is set.
        apply_chat_template: Wrap the prompt as a user turn (see the module docstring).
        image_token: Placeholder prepended (on its own line) when the example has an image, e.g. ``"<image>"``.

    Returns:
        The prompt text.

    Raises:
        ValueError: For an unknown format or a format that needs choices on a generative example.
    """
    _check(example, fmt)
    body = example.prompt.rstrip()
    if fmt == "letter":
        body += "".join(f"\n {LETTERS[k]}. {choice}" for k, choice in enumerate(example.choices))
    text = f"{body}\nAnswer:"
    if image_token and example.image:
        text = f"{image_token}\n{text}"
    if uses_chat_template(tokenizer, apply_chat_template):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    return text


def _answer_text(example: Example, fmt: str) -> str:
    if fmt == "letter":
        return LETTERS[int(example.answer)]
    if example.choices:
        return example.choices[int(example.answer)]
    return str(example.answer)


def format_target(example: Example, fmt: str, tokenizer: Any = None, apply_chat_template: bool = False) -> str:
    """Render the training answer of an example (the continuation of :func:`format_prompt`).

    Args:
        example: The example.
        fmt: ``"ranked"``, ``"letter"`` or ``"generative"``.
        tokenizer: Same as for :func:`format_prompt`.
        apply_chat_template: Same as for :func:`format_prompt`; decides the leading space.

    Returns:
        The answer text: `` <option text>``, `` <letter>`` or `` <reference>`` (no leading space in chat mode).
    """
    _check(example, fmt)
    text = _answer_text(example, fmt)
    return text if uses_chat_template(tokenizer, apply_chat_template) else f" {text}"


def option_targets(example: Example, fmt: str, tokenizer: Any = None, apply_chat_template: bool = False) -> list[str]:
    """Render the continuation of every option, for log-likelihood scoring.

    Args:
        example: The example.
        fmt: ``"ranked"`` (option texts), ``"letter"`` (letters) or ``"generative"`` (option texts for MC
            examples; the single reference for generative ones).
        tokenizer: Same as for :func:`format_prompt`.
        apply_chat_template: Same as for :func:`format_prompt`.

    Returns:
        One continuation per option, in option order; the correct one is at index ``example.answer`` for MC.
    """
    _check(example, fmt)
    sep = "" if uses_chat_template(tokenizer, apply_chat_template) else " "
    if fmt == "letter":
        return [f"{sep}{LETTERS[k]}" for k in range(len(example.choices))]
    if example.choices:
        return [f"{sep}{choice}" for choice in example.choices]
    return [f"{sep}{example.answer}"]


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_example(
    tokenizer: Any,
    prompt: str,
    target: str,
    max_length: int,
    add_eos: bool = False,
    add_special_tokens: bool = True,
) -> dict[str, list[int]]:
    """Tokenise prompt and target separately and concatenate, masking the prompt out of the labels.

    Tokenising the two parts separately makes the prompt/answer boundary exact: the labels are exactly the target
    tokens (plus EOS when ``add_eos``). The tokenizer's special tokens (e.g. BOS) are added to the prompt only; a
    BOS duplicated by a chat template is removed and a trailing EOS that some tokenizers append to every text is
    dropped from the prompt. If the sequence is too long, the prompt is cut from the LEFT (keeping a leading BOS);
    the answer is never cut.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: Prompt text (from :func:`format_prompt`).
        target: Answer text (from :func:`format_target` or :func:`option_targets`).
        max_length: Maximum total number of tokens.
        add_eos: Append the EOS token after the target (for training generation to stop).
        add_special_tokens: Let the tokenizer add its special tokens to the prompt.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt tokens).

    Raises:
        ValueError: If the answer alone does not fit in ``max_length`` or the target is empty.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    prompt_ids = _ids(tokenizer, prompt, add_special_tokens)
    if add_special_tokens and eos is not None and prompt_ids and prompt_ids[-1] == eos:
        plain = _ids(tokenizer, prompt, False)
        if not plain or plain[-1] != eos:
            prompt_ids = prompt_ids[:-1]
    if bos is not None and len(prompt_ids) >= 2 and prompt_ids[0] == prompt_ids[1] == bos:
        prompt_ids = prompt_ids[1:]
    target_ids = _ids(tokenizer, target, False)
    if add_eos:
        if eos is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        target_ids.append(eos)
    if not target_ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    head = prompt_ids[:1] if add_special_tokens and bos is not None and prompt_ids[:1] == [bos] else []
    room = max_length - len(target_ids) - len(head)
    if room < 0:
        raise ValueError(f"the answer has {len(target_ids)} tokens and does not fit max_length={max_length}")
    body = prompt_ids[len(head) :]
    if len(body) > room:
        body = body[len(body) - room :] if room > 0 else []
        prompt_ids = head + body
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


class ImagePromptTokenizer:
    """Tokenizer view of one image example for :func:`encode_example`.

    The prompt text (with its image) goes through the processor, which expands the image placeholder and returns
    pixel values (cached per ``add_special_tokens``, kept in :attr:`extras`); any other text (the answer) goes
    through the plain tokenizer. Training, calibration and evaluation all encode image examples through this class.

    Args:
        processor: ``AutoProcessor``-like callable (``text=``, ``images=``, ``return_tensors=``).
        tokenizer: The plain tokenizer (BOS/EOS ids, answers).
        prompt: The prompt text, with the processor's image placeholder (``format_prompt(..., image_token=)``).
        image: Image path or PIL image.

    Raises:
        ValueError: If ``processor`` is None.
    """

    def __init__(self, processor: Any, tokenizer: Any, prompt: str, image: Any) -> None:
        if processor is None:
            raise ValueError("an example has an image: pass a processor (AutoProcessor-like) to encode it (a "
                             "vision-language model folder loads one)")
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self._processor, self._tokenizer, self._prompt, self._image = processor, tokenizer, prompt, image
        self._cache: dict[bool, Mapping[str, Any]] = {}
        self.extras: dict[str, torch.Tensor] = {}
        self.image_token_id = _image_token_id(processor, tokenizer)
        self.prompt_ids: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> Mapping[str, Any]:
        """Token ids of ``text`` (``{"input_ids": [...]}``), through the processor for the prompt."""
        if text != self._prompt:
            return self._tokenizer(text, add_special_tokens=add_special_tokens)
        if add_special_tokens not in self._cache:
            image = self._image
            if isinstance(image, (str, Path)):
                from PIL import Image

                with Image.open(image) as img:
                    image = img.convert("RGB")
            kwargs = {"add_special_tokens": add_special_tokens, "return_tensors": "pt"}
            self._cache[add_special_tokens] = self._processor(text=[text], images=[image], **kwargs)
        out = self._cache[add_special_tokens]
        self.extras = {k: v for k, v in out.items() if k not in _TEXT_KEYS}
        self.prompt_ids = out["input_ids"][0].tolist()
        return {"input_ids": list(self.prompt_ids)}

    def check_image_tokens(self, input_ids: Sequence[int], max_length: int) -> None:
        """Raise if truncation to ``max_length`` cut image placeholder tokens off the encoded prompt.

        Raises:
            ValueError: Fewer image tokens in ``input_ids`` than the processor produced.
        """
        if self.image_token_id is None:
            return
        wanted = self.prompt_ids.count(self.image_token_id)
        if list(input_ids).count(self.image_token_id) != wanted:
            raise ValueError(f"a prompt with its image needs {len(self.prompt_ids)} tokens ({wanted} for the image) "
                             f"but max_length={max_length} cuts image tokens off; raise the maximum length "
                             "(data.max_length)")


def _image_token_id(processor: Any, tokenizer: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    token = getattr(processor, "image_token", None)
    if token_id is None and isinstance(token, str):
        token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None) else None


def encode_image_example(
    processor: Any,
    tokenizer: Any,
    prompt: str,
    target: str,
    image: Any,
    max_length: int,
    add_eos: bool = False,
) -> dict[str, Any]:
    """:func:`encode_example` for an example with an image: the prompt through the processor, the answer through the
    tokenizer (:class:`ImagePromptTokenizer`).

    Args:
        processor: ``AutoProcessor``-like callable.
        tokenizer: The plain tokenizer.
        prompt: Prompt text with the image placeholder (``format_prompt(..., image_token=processor.image_token)``).
        target: Answer text.
        image: Image path or PIL image.
        max_length: Maximum total number of tokens (image tokens included).
        add_eos: Append EOS after the target.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` and the processor's other outputs (``pixel_values`` with its
        leading per-image dimension, ``image_sizes``...).

    Raises:
        ValueError: As :func:`encode_example`, or if ``max_length`` would cut image tokens off the prompt.
    """
    encoder = ImagePromptTokenizer(processor, tokenizer, prompt, image)
    feature: dict[str, Any] = dict(encode_example(encoder, prompt, target, max_length, add_eos=add_eos))
    encoder.check_image_tokens(feature["input_ids"], max_length)
    return {**feature, **encoder.extras}


def collate(features: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch.

    Not transformers' ``DataCollatorForSeq2Seq`` (checked): on text features both give the same tensors (tested),
    but it needs a tokenizer, goes through ``tokenizer.pad`` (241 vs 430 µs per batch of 8 SmolLM2 features here)
    and neither concatenates per-image processor outputs along dim 0 nor collates scalar keys such as ``task_id``.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` (if present) with
    -100. Every other key holds, per feature, a scalar (integers/bools, e.g. ``task_id``, become a LongTensor,
    floats a FloatTensor; 0-d tensors are stacked) or a tensor with a leading per-image dimension (processor outputs
    such as ``pixel_values`` (1, 3, H, W)), concatenated along dim 0.

    Mixed batches (decision): examples without an image may sit in a batch with image examples. Such per-image keys
    are then concatenated over the features that have them only, in batch order, which is the convention of
    placeholder-based vision-language models (LLaVA & co. pair the i-th image with the i-th run of image tokens);
    evaluation batches images the same way. Every other key must be present in every feature.

    Args:
        features: Outputs of :func:`encode_example` / :func:`encode_image_example`, possibly with extra keys.
        pad_token_id: Padding id for ``input_ids``.

    Returns:
        The batch as tensors.

    Raises:
        ValueError: For an empty batch, features with differing non-image keys, or per-image tensors whose shapes
            beyond dim 0 differ.
        TypeError: For an extra key whose values cannot be stacked.
    """
    if not features:
        raise ValueError("cannot collate an empty batch")
    keys = list(dict.fromkeys(k for f in features for k in f))
    for key in keys:
        present = [f[key] for f in features if key in f]
        if len(present) < len(features) and not all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in present):
            raise ValueError(f"all features must have the same keys ({key!r} is missing from some); only per-image "
                             "tensors (processor outputs) may be absent from text-only examples")
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    for key, pad in pads.items():
        if key == "attention_mask" and key not in features[0]:
            rows = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        elif key not in features[0]:
            continue
        else:
            rows = [list(f[key]) + [pad] * (width - len(f[key])) for f in features]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    for key in keys:
        if key in _BASE_KEYS:
            continue
        values = [f[key] for f in features if key in f]
        if all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values):
            if len({tuple(v.shape[1:]) for v in values}) > 1:
                raise ValueError(f"cannot collate key {key!r}: shapes {[tuple(v.shape) for v in values]} differ "
                                 "beyond dim 0")
            batch[key] = torch.cat(values)
        elif all(isinstance(v, torch.Tensor) for v in values):
            batch[key] = torch.stack(values)
        elif all(isinstance(v, (bool, int)) for v in values):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        elif all(isinstance(v, (bool, int, float)) for v in values):
            batch[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        else:
            raise TypeError(f"cannot collate key {key!r}: values must be scalar numbers or tensors")
    return batch

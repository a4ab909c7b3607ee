"""The base model of a run: where it is, on which device it runs, and how it, its tokenizer and processor load.

Text models load with ``AutoModelForCausalLM`` / ``AutoTokenizer``; vision-language models (a saved config with a
``vision_config``, e.g. LLaVA) with ``AutoModelForImageTextToText`` and ``AutoProcessor``. A model name is resolved
before anything else runs (`resolve_model_path`): the offline alias ``smollm2``, a local folder, a model in the local
Hugging Face cache, or a Hub id the Hub confirms; anything else fails at once with the list of what is available,
instead of transformers' retries against an unreachable Hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thanora.experiment.config import RunConfig

OFFLINE_ALIASES = ("smollm2",)
_HUB_TIMEOUT_S = 5.0


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU; any other name is checked for availability.

    Raises:
        ValueError: the device does not exist on this machine (naming ``model.device`` and what to use).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"model.device={name}: no CUDA device is available here (torch {torch.__version__}); "
                             "use model.device=auto or cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"model.device={name}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"model.device={name}: MPS is not available here; use model.device=auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on a CUDA device that supports it, else float32 (CPU: bf16 kernels are no faster for
    models of this size, measured; and float32 keeps the residual init exact); other names as they are."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def model_path(cfg: RunConfig) -> str | Path:
    """The config's base model as `resolve_model_path` finds it."""
    return resolve_model_path(cfg.model.name_or_path)


def resolve_model_path(name: str) -> str | Path:
    """``smollm2`` → the converted offline asset folder; a local folder as given; else a Hub id, checked.

    Raises:
        FileNotFoundError: a local path that does not exist, a folder without ``config.json``, or a Hub id that is
            neither in the local cache nor (when the Hub can be reached) on the Hub; the message lists what is
            available offline.
        AssetMissingError: ``smollm2`` without its package installed.
    """
    if name == "smollm2":
        from thanora.assets import smollm2_dir

        return smollm2_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.name_or_path {name!r} is a folder without config.json; give a "
                                    "transformers model folder (save_pretrained), 'smollm2' or a Hub id")
        return path
    if name.startswith(("/", ".", "~")) or os.sep in name.strip("/").replace("/", "", 1) or path.exists():
        raise FileNotFoundError(f"model.name_or_path {name!r} does not exist; give a model folder, "
                                f"{_available()} or a Hugging Face Hub id")
    if _in_hub_cache(name):
        return name
    if _hub_offline():
        raise FileNotFoundError(f"model.name_or_path {name!r} is not a local folder and not in the local Hugging Face "
                                f"cache, and the Hub is off (HF_HUB_OFFLINE); available: {_available()}")
    _check_on_hub(name)
    return name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the cache cannot even parse is simply not cached
        return False


def _check_on_hub(name: str) -> None:
    """One quick Hub request: a missing repo or an unreachable Hub is an error now, not after transformers' retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=_HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(f"model.name_or_path {name!r} is not a local folder and not a model on the Hugging "
                                f"Face Hub; available offline: {_available()}") from None
    except Exception as err:  # connection errors of every kind: DNS, refused, timeout, proxy
        raise FileNotFoundError(f"model.name_or_path {name!r} is not a local folder or in the local Hugging Face "
                                f"cache, and the Hub cannot be reached ({type(err).__name__}); available offline: "
                                f"{_available()}") from None


def _available() -> str:
    """What loads without the Hub: the offline aliases and the models in the local Hugging Face cache."""
    names = [f"'{a}'" for a in OFFLINE_ALIASES]
    try:
        from huggingface_hub import scan_cache_dir

        names += sorted(f"'{r.repo_id}'" for r in scan_cache_dir().repos if r.repo_type == "model")[:10]
    except Exception:  # no cache folder yet
        pass
    return ", ".join(names)


def meta_model(name: str) -> nn.Module:
    """The base model ``name`` (``smollm2``, a folder or a Hub id) built from its config on the meta device: its
    structure without its weights, for parameter counts and the checks a run does before any work."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(resolve_model_path(name)))
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def is_vision_language(cfg: RunConfig) -> bool:
    """Whether the base model is a vision-language model: its saved config has a ``vision_config`` (LLaVA & co.)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path(cfg)))
    return getattr(config, "vision_config", None) is not None


def load_processor(cfg: RunConfig) -> Any:
    """The ``AutoProcessor`` of a vision-language base model (with a pad token), or None for a text model."""
    if not is_vision_language(cfg):
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_path(cfg)))
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_token", None) is None:
        raise ValueError(f"model {cfg.model.name_or_path!r} is a vision-language model but its processor "
                         f"({type(processor).__name__}) has no tokenizer or image_token")
    _ensure_pad_token(processor.tokenizer)
    return processor


def load_tokenizer(cfg: RunConfig, processor: Any = None) -> Any:
    """The base model's tokenizer, with a pad token: the processor's own for a vision-language model (so prompts
    and answers share one tokenizer object), else ``AutoTokenizer``."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path(cfg)))
    _ensure_pad_token(tokenizer)
    return tokenizer


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """A fresh copy of the base model on ``device`` in eval mode: ``AutoModelForImageTextToText`` for a
    vision-language model, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_language(cfg) else AutoModelForCausalLM
    model = auto.from_pretrained(str(model_path(cfg)), dtype=resolve_dtype(cfg.model.dtype, device))
    return model.to(device).eval()

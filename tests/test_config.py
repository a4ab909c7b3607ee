"""Tests for thanora.experiment.config: YAML loading, overrides, unknown keys and value errors with their key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from thanora.core.hasi_config import ThanoraConfig
from thanora.experiment.config import ConfigError, config_from_dict, load_config

BASE = {
    "model": {"name_or_path": "some/model"},
    "tasks": [{"name": "a", "source": "csqa", "n_train": 10, "n_eval": 5, "n_calibration": 4},
              {"name": "b", "source": "obqa"}],
    "methods": [{"name": "lora", "rank": 8}, {"name": "thanora", "rank": 8, "spr_lambda": 0.0}],
    "train": {"lr": "1e-4", "epochs": 1},
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_load_roundtrip_and_resolved_yaml(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.tasks[0].n_train == 10 and cfg.tasks[1].n_train == 500
    assert cfg.train.lr == pytest.approx(1e-4)
    settings = cfg.methods[1].build()
    assert isinstance(settings, ThanoraConfig) and settings.rank == 8 and settings.spr_lambda == 0.0
    cfg.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_overrides_by_index_and_by_name(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE),
                      ["tasks.0.n_train=20", "methods.thanora.tau=0.5", "train.batch_size=4", "tasks.b.n_eval=7"])
    assert cfg.tasks[0].n_train == 20 and cfg.tasks[1].n_eval == 7
    assert cfg.methods[1].build().tau == 0.5 and cfg.train.batch_size == 4


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"trian": {}}, r"trian"),
        ({"train": {"lr": 1e-4, "epochz": 1}}, r"train\.epochz"),
        ({"tasks": [{"name": "a", "source": "csqa", "n_trian": 3}]}, r"tasks\[0\]\.n_trian"),
        ({"methods": [{"name": "lorra"}]}, r"methods\[0\]\.name.*lora"),
        ({"methods": [{"name": "thanora", "rnk": 4}]}, r"rnk"),
        ({"methods": [{"name": "thanora", "tau": -1}]}, r"ThanoraConfig\.tau"),
        ({"tasks": []}, r"at least one task"),
        ({"train": {"gradient_checkpointing": True}, "methods": [{"name": "lora"}, {"name": "dare"}]},
         r"train\.gradient_checkpointing: dare .*set it to false"),
        ({"tasks": [{"name": "a", "source": "csqa"}, {"name": "a", "source": "obqa"}]}, r"unique"),
    ],
)
def test_bad_config_names_the_key(patch: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, **patch})


def test_missing_file_and_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"a\.b=value"):
        load_config(_write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(ConfigError, match="no list item"):
        load_config(_write(tmp_path, BASE), ["methods.dora.rank=4"])


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.tasks and cfg.methods
    assert len({m.label for m in cfg.methods}) == len(cfg.methods)


def test_repeated_method_needs_a_label() -> None:
    methods = [{"name": "thanora", "rank": 8}, {"name": "thanora", "rank": 8, "spr_lambda": 0.0}]
    with pytest.raises(ConfigError, match="label"):
        config_from_dict({**BASE, "methods": methods})
    methods[1]["label"] = "hasi_only"
    cfg = config_from_dict({**BASE, "methods": methods})
    assert [m.label for m in cfg.methods] == ["thanora", "hasi_only"]
    assert load_config_roundtrip(cfg) == cfg.to_dict()


def load_config_roundtrip(cfg) -> dict:
    return config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))).to_dict()


def test_a_method_entry_sets_its_own_training_settings_and_tasks() -> None:
    cfg = config_from_dict({**BASE, "methods": [
        {"name": "lora", "rank": 8, "train": {"lr": "3e-4", "max_steps": 50}},
        {"name": "lora", "label": "lora_a", "rank": 8, "tasks": ["a"], "train": {"warmup_ratio": 0.1}},
        {"name": "thanora", "rank": 8}]})
    lora, single, thanora_spec = cfg.methods
    assert lora.train_config(cfg.train).lr == pytest.approx(3e-4) and lora.train_config(cfg.train).max_steps == 50
    assert single.tasks == ("a",) and single.train_config(cfg.train).lr == cfg.train.lr
    assert thanora_spec.train_config(cfg.train) is cfg.train
    again = config_from_dict(cfg.to_dict())  # the resolved config keeps them
    assert again.methods[0].train == {"lr": pytest.approx(3e-4), "max_steps": 50}
    assert again.methods[1].tasks == ("a",)


def test_a_run_wide_setting_every_method_overrides_is_said_to_have_no_effect() -> None:
    from thanora.experiment.no_effect import ineffective_settings

    own = [{"name": "lora", "rank": 8, "train": {"lr": 3e-3}}, {"name": "thanora", "rank": 8, "train": {"lr": 1e-4}}]
    notes = ineffective_settings(config_from_dict({**BASE, "methods": own}))
    assert notes == ["train.lr=0.0001 has no effect: every method sets its own train.lr"]
    assert ineffective_settings(config_from_dict({**BASE, "methods": own, "train": {"epochs": 1}})) == []  # default
    one = [own[0], {"name": "thanora", "rank": 8}]  # thanora trains at the run's rate: it has an effect
    assert ineffective_settings(config_from_dict({**BASE, "methods": one})) == []


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "lora", "train": {"batch_size": 4}}, r"methods\[lora\]\.train: \['batch_size'\] cannot be set per"),
    ({"name": "lora", "train": {"lr": "fast"}}, r"methods\[lora\]\.train\.lr: expected a number"),
    ({"name": "lora", "train": {"lr": -1.0}}, r"methods\[lora\]\.train: TrainConfig\.lr must be > 0"),
    ({"name": "lora", "tasks": ["c"]}, r"methods\[lora\]\.tasks: \['c'\] are not tasks of this run"),
    ({"name": "lora", "tasks": []}, r"methods\[lora\]\.tasks: give at least one task"),
    ({"name": "thanora", "rank": 2, "r_min": 2, "tasks": ["a", "b"]}, r"methods\[thanora\]: rank=2 cannot give"),
])
def test_bad_per_method_settings_name_the_field(entry: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, "methods": [entry]})

"""The embeddings' identity comes from the config dataclasses themselves: every field of the run's data config that
is not explicitly excluded (``analysis.embed.NOT_IN_IDENTITY``), and a field added later, changes it, so a store
embedded with other preprocessing is never reused as current."""

from __future__ import annotations

import dataclasses

import pytest

from analysis.embed import IDENTITY_VERSION, NOT_IN_IDENTITY, embedding_identity
from analysis.runs import Checkpoint
from training.config import DataConfig, ModelConfig, TrainingConfig

CHECKPOINT = Checkpoint("last", None, "0" * 64, 1.0, 10)


def identity(config: TrainingConfig, **changes) -> str:
    args = {"checkpoint": CHECKPOINT, "where": "TRUE", "selection_sha": "1" * 64, "config": config,
            "projections": True, **changes}
    return embedding_identity(**args)


def _candidates(value):
    """Other values of ``value``'s type, plainest first (the first one the dataclass accepts is used)."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, value - 1]
    if isinstance(value, float):
        return [value * 0.5, value + 0.1, value - 0.1, value * 2]
    if value is None:  # an optional number (ir_mean, ir_std)
        return [1.5, 2.5]
    if isinstance(value, str):
        return [value + "x", "crop", "pad", "error", "cpu", "gpu", "rgb-grey", "ir3", "frame", "dino"]
    if isinstance(value, tuple):
        options = []
        per_item = [_candidates(v) for v in value]
        for i in range(min(len(c) for c in per_item)):
            options.append(tuple(type(v)(c[i]) for v, c in zip(value, per_item)))
        return options
    raise TypeError(f"no other value known for a {type(value).__name__}: teach _candidates this type")


def changed(instance, name: str):
    """``instance`` with field ``name`` set to another value its __post_init__ accepts."""
    for candidate in _candidates(getattr(instance, name)):
        if candidate == getattr(instance, name):  # 0.0 * 0.5, say
            continue
        try:
            return dataclasses.replace(instance, **{name: candidate})
        except (ValueError, TypeError):
            continue
    raise AssertionError(f"{type(instance).__name__}.{name}: no other valid value found for "
                         f"{getattr(instance, name)!r}; teach _candidates one")


def test_the_excluded_fields_exist():
    # A renamed or removed field left in the set would exclude nothing while reading as if it did.
    assert NOT_IN_IDENTITY <= {f.name for f in dataclasses.fields(DataConfig)}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DataConfig) if f.name not in NOT_IN_IDENTITY])
def test_every_data_field_not_excluded_changes_the_identity(name):
    base = TrainingConfig()
    other = dataclasses.replace(base, data=changed(base.data, name))
    assert getattr(other.data, name) != getattr(base.data, name)
    assert identity(other) != identity(base), f"data.{name} does not change the embeddings' identity"


@pytest.mark.parametrize("name", sorted(NOT_IN_IDENTITY))
def test_the_excluded_fields_do_not_change_it(name):
    base = TrainingConfig()
    assert identity(dataclasses.replace(base, data=changed(base.data, name))) == identity(base)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ModelConfig)])
def test_every_model_field_changes_the_identity(name):
    base = TrainingConfig()
    other = dataclasses.replace(base, model=changed(base.model, name))
    assert identity(other) != identity(base), f"model.{name} does not change the embeddings' identity"


def test_a_field_added_to_the_data_config_changes_it_by_default():
    # A new data option nobody listed in analysis: it must count, not be ignored.
    Extended = dataclasses.make_dataclass("Extended", [("new_option", float, dataclasses.field(default=1.0))],
                                          bases=(DataConfig,), frozen=True)
    base = dataclasses.replace(TrainingConfig(), data=Extended())
    other = dataclasses.replace(base, data=Extended(new_option=2.0))
    assert identity(other) != identity(base)
    assert identity(base) != identity(TrainingConfig())  # the field's presence alone already counts


def test_the_other_inputs_change_it_and_it_is_stable():
    base = TrainingConfig()
    assert identity(base) == identity(TrainingConfig())
    assert len({identity(base), identity(base, where="split = 'test'"), identity(base, selection_sha="2" * 64),
                identity(base, projections=False),
                identity(base, checkpoint=dataclasses.replace(CHECKPOINT, sha256="f" * 64))}) == 5
    assert IDENTITY_VERSION >= 2  # version 1 stores (a hand-written field list) are embedded anew


def test_the_runs_config_is_parsed_once_per_version_of_the_file(tmp_path, monkeypatch):
    import analysis.runs as runs_module
    from training.config import config_toml

    calls = []
    real = runs_module.load_training_config
    monkeypatch.setattr(runs_module, "load_training_config", lambda path: calls.append(path) or real(path))
    (tmp_path / "config.toml").write_text(config_toml(TrainingConfig()))
    run = runs_module.RunDir.open(tmp_path)
    first = run.training_config()
    assert runs_module.RunDir(tmp_path).training_config() is first and len(calls) == 1
    # Rewritten as training does (a new file renamed over it): parsed anew.
    changed_config = dataclasses.replace(TrainingConfig(), data=DataConfig(rgb_scale=3))
    (tmp_path / "config.toml.tmp").write_text(config_toml(changed_config))
    (tmp_path / "config.toml.tmp").replace(tmp_path / "config.toml")
    assert run.training_config().data.rgb_scale == 3 and len(calls) == 2

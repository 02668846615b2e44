"""Typed config: TOML loading, overrides, exact error messages, round trip."""

from __future__ import annotations

import pytest

from retdmctl.config import Config, apply, config_hash, dump_toml, load_toml, parse_set
from retdmctl.errors import ConfigError


def test_toml_overrides_defaults_and_round_trips(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[knn]\nk = 5\n[model]\nbackbone = "tiny_cnn"\nfrozen_backbone = true\n[loss]\nalpha = 0.5\n')
    cfg = Config()
    apply(cfg, load_toml(path), str(path))
    assert (cfg.knn.k, cfg.model.backbone, cfg.model.frozen_backbone, cfg.loss.alpha) == (5, "tiny_cnn", True, 0.5)
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(cfg))
    cfg2 = Config()
    apply(cfg2, load_toml(again), str(again))
    assert cfg2 == cfg


def test_unknown_section_and_key_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^x.toml: unknown section \[nope\]; known: "):
        apply(Config(), {"nope": {}}, "x.toml")
    with pytest.raises(ConfigError, match=r"^x.toml: unknown option knn.kk; known: index, k$"):
        apply(Config(), {"knn": {"kk": 1}}, "x.toml")


def test_values_are_coerced_or_rejected():
    cfg = Config()
    apply(cfg, parse_set(["knn.k=7", "model.frozen_backbone=true", "loss.lam=0"]), "command line")
    assert cfg.knn.k == 7 and cfg.model.frozen_backbone is True and cfg.loss.lam == 0.0
    with pytest.raises(ConfigError, match=r"^knn.k must be an integer, got 'seven'$"):
        apply(cfg, {"knn": {"k": "seven"}}, "command line")
    with pytest.raises(ConfigError, match=r"^model.pretrained must be true or false, got 'maybe'$"):
        apply(cfg, {"model": {"pretrained": "maybe"}}, "command line")
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        parse_set(["k=5"])


def test_bad_toml_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[knn\nk=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_config_hash_changes_with_any_value():
    a, b = Config(), Config()
    assert config_hash(a.sections(("knn",))) == config_hash(b.sections(("knn",)))
    b.knn.k = 3
    assert config_hash(a.sections(("knn",))) != config_hash(b.sections(("knn",)))
    assert config_hash(a.sections(("model",))) == config_hash(b.sections(("model",)))


def test_config_hash_covers_defaults_too():
    # a default that changes between versions must not let a stage pass as up to date
    full = Config().sections(("ingest",))
    changed_default = {"ingest": {**full["ingest"], "short_side": 320}}
    assert config_hash(changed_default) != config_hash(full)
    older = {"ingest": {k: v for k, v in full["ingest"].items() if k != "classes"}}
    assert config_hash(older) != config_hash(full)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.image_size=0", "model.image_size must be >= 1, got 0"),
        ("model.batch_size=-3", "model.batch_size must be >= 1, got -3"),
        ("classifier.epochs=0", "classifier.epochs must be >= 1, got 0"),
        ("joint.epochs=0", "joint.epochs must be >= 1, got 0"),
        ("knn.k=0", "knn.k must be >= 1, got 0"),
        ("eval.threshold=1", "eval.threshold must be in (0, 1), got 1.0"),
        ("eval.threshold=0", "eval.threshold must be in (0, 1), got 0.0"),
        ("loss.alpha=-5", "loss.alpha must be >= 0, got -5.0"),
        ("loss.beta=-0.1", "loss.beta must be >= 0, got -0.1"),
        ("loss.lam=-1", "loss.lam must be >= 0, got -1.0"),
        ("classifier.lr=0", "classifier.lr must be > 0, got 0.0"),
        ("ingest.val_fraction=1.5", "ingest.val_fraction must be in [0, 1), got 1.5"),
        ("eval.checkpoint=metric", "eval.checkpoint must be one of classifier, joint, got 'metric'"),
        ("runtime.device=tpu", "runtime.device must be one of auto, cpu, cuda, got 'tpu'"),
        ("joint.way2=cache", "joint.way2 must be one of bank, forward, got 'cache'"),
        ("model.backbone=alexnet", "unknown backbone 'alexnet'; known: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet50, tiny_cnn, vgg16, or timm:<name>"),
    ],
)
def test_every_value_is_validated_with_its_allowed_range(setting, message):
    from retdmctl.config import validate
    from retdmctl.errors import RetdmError

    cfg = Config()
    apply(cfg, parse_set([setting]), "command line")
    with pytest.raises(RetdmError) as info:
        validate(cfg)
    assert str(info.value) == message
    validate(Config())  # the defaults are valid


def test_toml_round_trips_non_ascii_and_astral_names(tmp_path):
    cfg = Config()
    cfg.ingest.classes = 'chat,café,日本,"quoted",back\\slash,🐈,𝔘𝔫𝔦'
    cfg.ingest.path = "/données/ダタ/🐈.csv"
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    again = Config()
    apply(again, load_toml(path), str(path))
    assert again == cfg


def test_a_stage_run_from_the_library_refuses_a_bad_choice_with_the_configs_message():
    from stages import BY_NAME

    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained = "tiny_cnn", False
    cfg.eval.checkpoint = "metric"
    assert BY_NAME["eval"].blocked(cfg) == "eval.checkpoint must be one of classifier, joint, got 'metric'"
    cfg.knn.index = "flat"
    assert BY_NAME["knn"].blocked(cfg) == "knn.index must be one of auto, exact, ivf, hnsw, got 'flat'"
    cfg.joint.way2 = "cache"
    assert BY_NAME["joint"].blocked(cfg) == "joint.way2 must be one of bank, forward, got 'cache'"

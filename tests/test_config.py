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
    with pytest.raises(ConfigError, match=r"^x.toml: unknown option knn.kk; known: k$"):
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


def test_config_hash_ignores_options_at_their_default():
    # a stage finished before an option existed stays up to date once it is added
    full = Config().sections(("ingest",))
    older = {"ingest": {k: v for k, v in full["ingest"].items() if k != "classes"}}
    assert config_hash(older) == config_hash(full)
    full["ingest"]["classes"] = "cat,dog"
    assert config_hash(older) != config_hash(full)

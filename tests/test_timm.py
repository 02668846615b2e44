"""timm:<name> backbones: registry, offline weights (file or local Hugging Face cache), the CLI."""

from __future__ import annotations

import socket

import pytest
import torch

from retdmctl.errors import BackboneError
from retdmctl.models.backbones import build_backbone, get_backbone_spec
from tests.conftest import TINY_TOML, invoke

timm = pytest.importorskip("timm", reason="timm is not installed: no timm:<name> backbones")

SMALL = "mobilenetv3_small_050"  # ~0.5M parameters: quick on CPU


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and any network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _saved(name: str, path, **kwargs):
    """A random-init timm model (classifier included) saved as a state dict at ``path``."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    torch.save(model.state_dict(), path)
    return model


def test_spec_comes_from_timm():
    spec = get_backbone_spec("timm:resnet18")
    assert (spec.name, spec.out_dim, spec.default_size) == ("timm:resnet18", 512, 224)
    assert (spec.mean, spec.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert spec.tunable_blocks == 0  # no generic blocks: model.tune_blocks is refused
    small = get_backbone_spec(f"timm:{SMALL}")
    assert (small.out_dim, small.tunable_blocks) == (1024, 12)  # the pre-logits head, 12 blocks


def test_weights_file_loads_strictly_and_forward_is_pooled(tmp_path):
    source = _saved("resnet18", tmp_path / "r18.pth").eval()  # fc.* keys: dropped
    model, spec = build_backbone("timm:resnet18", weights_file=tmp_path / "r18.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.eval()(x)
        torch.testing.assert_close(features, source.forward_head(source.forward_features(x), pre_logits=True))
    assert features.shape == (2, spec.out_dim)


def test_safetensors_weights_file(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model(SMALL, pretrained=False, num_classes=0)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model, _ = build_backbone(f"timm:{SMALL}", weights_file=tmp_path / "w.safetensors")
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_weights_file_of_another_model_does_not_fit(tmp_path):
    _saved("resnet34", tmp_path / "r34.pth")
    with pytest.raises(BackboneError) as info:
        build_backbone("timm:resnet18", weights_file=tmp_path / "r34.pth")
    assert str(info.value).startswith(f"weights file {tmp_path / 'r34.pth'} does not fit timm:resnet18: ")
    assert "unexpected keys" in str(info.value) and "\n" not in str(info.value)


def test_trunk_and_tail_compose_to_forward():
    model, spec = build_backbone(f"timm:{SMALL}", pretrained=False)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        for tail in (1, spec.tunable_blocks):
            assert torch.equal(model.forward_tail(model.forward_trunk(x, tail), tail), whole)
    tail_params = {id(p) for m in model.tail_modules(2) for p in m.parameters()}
    assert {id(p) for p in model.net.conv_head.parameters()} <= tail_params
    assert not {id(p) for p in model.net.conv_stem.parameters()} & tail_params


def test_hf_cache_is_read_without_network(tmp_path):
    """Weights a user downloaded earlier (here: a fake snapshot) load from the cache."""
    from safetensors.torch import save_file

    repo = tmp_path / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    source = timm.create_model("resnet18", pretrained=False)
    save_file(source.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    model, _ = build_backbone("timm:resnet18", pretrained=True)
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_cache_and_unknown_name_are_one_line_cli_errors(tmp_path):
    work = tmp_path / "w"
    result = invoke("--workdir", work, "train", "--stage", "classifier", "--frozen-backbone",
                    "--backbone", "timm:not_a_model_xyz")
    assert result.exit_code == 2  # a bad value on the command line: a usage error
    assert result.output.strip().splitlines()[-1] == (
        "error: unknown timm backbone 'timm:not_a_model_xyz'; list the names with: "
        "python -c \"import timm; print(timm.list_models('*not_a_model_xyz*'))\"")

    work.mkdir()
    (work / "retdm.toml").write_text(TINY_TOML)
    assert invoke("--workdir", work, "ingest", "demo").exit_code == 0
    result = invoke("--workdir", work, "train", "--stage", "classifier", "--frozen-backbone",
                    "--backbone", "timm:resnet18", "--pretrained")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: no pretrained weights for timm:resnet18 in the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}, "
        "repository timm/resnet18.a1_in1k); retdmctl never downloads: pass --weights-file FILE, or use --no-pretrained")
    assert not (tmp_path / "hf").exists()  # nothing was fetched into the cache


def test_tune_blocks_refused_where_timm_has_no_generic_blocks(tmp_path):
    result = invoke("--workdir", tmp_path, "train", "--stage", "classifier", "--frozen-backbone",
                    "--backbone", "timm:resnet18", "--tune-blocks", "1")
    assert result.exit_code == 2  # a bad value on the command line: a usage error
    assert result.output.strip().splitlines()[-1] == (
        "error: model.tune_blocks: timm:resnet18 has no blocks to tune, got 1")


def test_timm_backbone_trains_frozen_from_a_local_weights_file(tmp_path):
    weights = tmp_path / "small.pth"
    _saved(SMALL, weights)
    work = tmp_path / "w"
    work.mkdir()
    (work / "retdm.toml").write_text(TINY_TOML)
    assert invoke("--workdir", work, "ingest", "demo").exit_code == 0
    result = invoke("--workdir", work, "train", "--stage", "classifier", "--frozen-backbone",
                    "--backbone", f"timm:{SMALL}", "--weights-file", weights,
                    "--tune-blocks", "0", "--views", "1", "--epochs", "2")
    assert result.exit_code == 0, result.output
    [ckpt_path] = (work).rglob("classifier/checkpoint.pt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert (ckpt["backbone"], ckpt["feature_dim"]) == (f"timm:{SMALL}", 1024)

    # predict rebuilds the frozen backbone from the same weights file, offline
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    result = invoke("--workdir", work, "predict", tmp_path / "red.png", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    assert '"red.png"' in result.output or "red.png" in result.output

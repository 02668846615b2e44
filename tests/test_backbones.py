"""Backbone registry, offline weight loading and the EfficientNet-Lite0 port."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl.errors import BackboneError
from retdmctl.models.backbones import BACKBONES, build_backbone, get_backbone_spec
from retdmctl.models.efficientnet_lite import EfficientNetLite0, package_checkpoint_path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Clear MIML scene photos and ImageNet classes that a working model ranks in its top 5.
PHOTOS: dict[str, set[str]] = {
    "415.jpg": {"alp", "volcano", "valley"},  # snowy peak
    "821.jpg": {"seashore", "sandbar", "lakeside"},  # beach and surf
    "812.jpg": {"promontory", "seashore", "cliff"},  # rocky coast
    "1203.jpg": {"beacon", "breakwater", "seashore"},  # lighthouse at sunset
}


def _load_photo(path: Path, size: int = 224) -> torch.Tensor:
    """Resize the short side to ``size``, centre crop, normalise with mean/std 0.5."""
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return (x - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(package_checkpoint_path(), map_location="cpu", weights_only=True),
                          strict=True)
    return model.eval()


def test_lite0_matches_package_checkpoint_keys_and_shapes():
    state = torch.load(package_checkpoint_path(), map_location="cpu", weights_only=True)
    ours = EfficientNetLite0().state_dict()
    assert list(ours) == list(state)
    assert all(ours[k].shape == v.shape for k, v in state.items())
    assert sum(k.endswith("_depthwise_conv.weight") for k in ours) == 16


@pytest.mark.data
def test_lite0_classifies_scene_photos_sensibly(lite0):
    from torchvision.models import ResNet50_Weights

    images = SHARED_DATA / "scene" / "images"
    if not images.is_dir():
        pytest.skip(f"real data not available: {images} is absent (see ../shared/data/README.md)")
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    batch = torch.stack([_load_photo(images / name) for name in PHOTOS])
    with torch.no_grad():
        top5 = lite0(batch).topk(5).indices
    for (name, plausible), row in zip(PHOTOS.items(), top5.tolist()):
        predicted = [categories[i] for i in row]
        assert plausible & set(predicted), f"{name}: top-5 {predicted}, expected one of {sorted(plausible)}"


def test_lite0_features_are_pooled_head_output(lite0):
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        features = lite0.forward_features(x)
        logits = lite0(x)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    assert (features >= 0).all() and (features <= 6).all()  # ReLU6 before the pool
    torch.testing.assert_close(logits, lite0._fc(features))


def test_unknown_backbone_is_rejected_with_the_known_names():
    expected = "unknown backbone 'resnet18'; known: efficientnet_lite0, resnet50, tiny_cnn, vgg16"
    with pytest.raises(BackboneError) as info:
        get_backbone_spec("resnet18")
    assert str(info.value) == expected
    with pytest.raises(BackboneError, match="unknown backbone 'resnet18'"):
        build_backbone("resnet18")


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_torchvision_pretrained_without_local_weights_fails_offline(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.set_dir, undone after
    with pytest.raises(BackboneError) as info:
        build_backbone(name, pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"no pretrained weights for {name}: expected {tmp_path / 'hub' / 'checkpoints'}")
    assert "--weights-file" in message and "--no-pretrained" in message


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_forward_gives_pooled_features_of_out_dim(name):
    model, spec = build_backbone(name, pretrained=name == "efficientnet_lite0")
    assert spec is BACKBONES[name]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, spec.out_dim)


def test_weights_file_round_trip(tmp_path):
    source, _ = build_backbone("resnet50", pretrained=False)
    full = source.state_dict() | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet50.pth"
    torch.save(full, path)  # a full torchvision checkpoint: the fc keys are ignored
    loaded, _ = build_backbone("resnet50", weights_file=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x))

    tiny, _ = build_backbone("tiny_cnn")
    torch.save(tiny.state_dict(), tmp_path / "tiny.pth")
    again, _ = build_backbone("tiny_cnn", weights_file=tmp_path / "tiny.pth")
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))


def test_bad_weights_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone("tiny_cnn", weights_file=missing)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot be read") as info:
        build_backbone("tiny_cnn", weights_file=garbage)
    assert "\n" not in str(info.value)

    tiny, _ = build_backbone("tiny_cnn")
    wrong = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), wrong)
    with pytest.raises(BackboneError, match="does not fit efficientnet_lite0") as info:
        build_backbone("efficientnet_lite0", weights_file=wrong)
    assert str(wrong) in str(info.value) and "\n" not in str(info.value)

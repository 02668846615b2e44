"""Backbone registry, offline weight loading and the EfficientNet-Lite0/1/2 port."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl.errors import BackboneError
from retdmctl.models.backbones import BACKBONES, build_backbone, get_backbone_spec
from retdmctl.models.efficientnet_lite import (
    LITE_VARIANTS,
    Conv2dSame,
    EfficientNetLite,
    EfficientNetLite0,
    EfficientNetLite1,
    EfficientNetLite2,
    lite_stages,
    load_package_weights,
    package_checkpoint_path,
    round_filters,
)
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


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(package_checkpoint_path(), map_location="cpu", weights_only=True),
                          strict=True)
    return model.eval()


# variant, class, native size, blocks, channels into the 1280-wide head
LITES = [("lite0", EfficientNetLite0, 224, 16, 320),
         ("lite1", EfficientNetLite1, 240, 21, 320),
         ("lite2", EfficientNetLite2, 260, 21, 352)]


@pytest.fixture(scope="module", params=LITES[1:], ids=lambda lite: lite[0])
def lite12(request) -> tuple[str, EfficientNetLite, int]:
    variant, cls, size, _, _ = request.param
    return variant, load_package_weights(cls(), variant).eval(), size


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing may download."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("variant,cls,size,n_blocks,last_ch", LITES, ids=[lite[0] for lite in LITES])
def test_lite_matches_package_checkpoint_keys_and_shapes(variant, cls, size, n_blocks, last_ch):
    state = torch.load(package_checkpoint_path(variant), map_location="cpu", weights_only=True)
    ours = cls().state_dict()
    assert list(ours) == list(state)  # every key, in the same order
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in state.items()}
    assert sum(k.endswith("_depthwise_conv.weight") for k in ours) == n_blocks
    assert ours["_conv_stem.weight"].shape == (32, 3, 3, 3)  # stem never scaled
    assert ours["_conv_head.weight"].shape == (1280, last_ch, 1, 1)  # head never scaled
    assert LITE_VARIANTS[variant].resolution == size
    cls().load_state_dict(state, strict=True)
    assert list(EfficientNetLite.from_variant(variant).state_dict()) == list(state)


def test_package_checkpoint_path_per_variant():
    paths = {v: package_checkpoint_path(v) for v in LITE_VARIANTS}
    assert [p.name.split("-")[1] for p in paths.values()] == ["lite0", "lite1", "lite2"]
    assert all(p.is_file() for p in paths.values())
    assert package_checkpoint_path() == paths["lite0"]  # the old no-argument call
    assert package_checkpoint_path("efficientnet_lite2") == paths["lite2"]
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite9'"):
        package_checkpoint_path("lite9")


def test_lite_scaling_rules():
    # The TF reference round_filters: nearest multiple of 8, never more than 10% down.
    assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [round_filters(c, 1.0) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 40, 80, 112, 192, 320]
    assert round_filters(32, 1.4) == 48 and round_filters(24, 1.4) == 32
    # Depth: ceil(r * depth), but the first and last stages keep one block (fix_head_stem).
    assert [s.repeats for s in lite_stages(1.0, 1.0)] == [1, 2, 2, 3, 3, 4, 1]
    assert [s.repeats for s in lite_stages(1.0, 1.1)] == [1, 3, 3, 4, 4, 5, 1]
    assert [s.repeats for s in lite_stages(1.1, 1.2)] == [1, 3, 3, 4, 4, 5, 1]
    assert [s.repeats for s in lite_stages(1.4, 1.8)] == [1, 4, 4, 6, 6, 8, 1]  # Lite4
    assert lite_stages(1.1, 1.2)[0].in_ch == 32  # reads the unscaled stem


# --- independent reference: timm's tf_efficientnet_lite* architecture -----------------

# lukemelas module names -> timm's: top level, first block (depthwise-separable), the rest
_TIMM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
             "_fc": "classifier"}
_TIMM_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TIMM_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _to_timm(state: dict[str, torch.Tensor], timm_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename our state dict to timm's; our n-th block is timm's n-th block in stage order."""
    positions = [f"blocks.{s}.{j}" for s, stage in enumerate(timm_model.blocks) for j in range(len(stage))]
    out = {}
    for key, value in state.items():
        module, *rest = key.split(".")
        if module == "_blocks":
            n, module, *rest = rest
            table = _TIMM_DS if n == "0" else _TIMM_IR
            out[".".join([positions[int(n)], table[module], *rest])] = value
        else:
            out[".".join([_TIMM_TOP[module], *rest])] = value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant,cls,size,n_blocks,last_ch", LITES, ids=[lite[0] for lite in LITES])
def test_lite_logits_match_timm_reference(variant, cls, size, n_blocks, last_ch, no_network):
    timm = pytest.importorskip("timm", reason="timm is not installed (it is in the dev extra): "
                                              "no independent reference architecture")
    reference = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval()
    ours = load_package_weights(cls(), variant).eval()
    # timm builds its own blocks, channels, "same" padding and ReLU6: a strict load checks
    # the architecture, the logits check the forward pass.
    reference.load_state_dict(_to_timm(ours.state_dict(), reference), strict=True)
    assert sum(len(stage) for stage in reference.blocks) == n_blocks
    generator = torch.Generator().manual_seed(0)
    for shape in ((2, 3, size, size), (1, 3, size + 1, size - 15)):  # native, then odd and non-square
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = reference(x)
            torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
        assert expected.std() > 0.5  # real logits, not a degenerate output


# --- TF "SAME" padding at the sizes Lite1 (240) and Lite2 (260) meet -----------------

# (input side, kernel) -> sums of an all-ones 3x3/5x5 stride-2 kernel over an all-ones input
# at the top-left and bottom-right outputs. TF "SAME" pads floor(total/2) before and the
# rest after, so an even side pads only after (top-left window fully inside: k*k); a
# symmetric padding=k//2 would give (k-1)^2 or (k-2)^2 there instead.
SAME_CORNERS = {
    (240, 3): (9, 4), (120, 3): (9, 4), (60, 5): (16, 9), (30, 3): (9, 4), (15, 5): (9, 9),
    (260, 3): (9, 4), (130, 3): (9, 4), (65, 5): (9, 9), (33, 3): (4, 4), (17, 5): (9, 9),
}


@pytest.mark.parametrize("side,kernel", sorted(SAME_CORNERS))
def test_conv2d_same_matches_tf_padding(side, kernel):
    conv = Conv2dSame(1, 1, kernel, stride=2)
    torch.nn.init.ones_(conv.weight)
    with torch.no_grad():
        out = conv(torch.ones(1, 1, side, side))[0, 0]
    assert out.shape == (math.ceil(side / 2),) * 2
    assert (out[0, 0].item(), out[-1, -1].item()) == SAME_CORNERS[side, kernel]


@pytest.mark.parametrize("cls,size,sides", [(EfficientNetLite1, 240, [240, 120, 60, 30, 15, 8]),
                                            (EfficientNetLite2, 260, [260, 130, 65, 33, 17, 9])],
                         ids=["lite1-240", "lite2-260"])
def test_stride2_convs_see_the_expected_sides(cls, size, sides):
    model = cls().eval()
    seen: list[tuple[int, int, int]] = []  # (input side, kernel, output side)

    def record(module, inputs, output):
        seen.append((inputs[0].shape[-1], module.kernel_size[0], output.shape[-1]))

    hooks = [m.register_forward_hook(record)
             for m in model.modules() if isinstance(m, Conv2dSame) and m.stride[0] == 2]
    with torch.no_grad():
        model.forward_features(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    assert [s for s, _, _ in seen] + [seen[-1][2]] == sides
    assert {(s, k) for s, k, _ in seen} <= SAME_CORNERS.keys()  # each one checked above


def _assert_plausible_top5(model: torch.nn.Module, size: int) -> None:
    from torchvision.models import ResNet50_Weights  # the ImageNet class names (no download)

    images = shared("scene", "images")
    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    batch = torch.stack([_load_photo(images / name, size) for name in PHOTOS])
    with torch.no_grad():
        top5 = model(batch).topk(5).indices
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
        features = lite0.forward_features(x)
        logits = lite0(x)
    assert features.shape == (2, 1280) and logits.shape == (2, 1000)
    assert (features >= 0).all() and (features <= 6).all()  # ReLU6 before the pool
    torch.testing.assert_close(logits, lite0._fc(features))


@pytest.mark.slow
def test_lite1_lite2_backbones_load_strictly_and_pool_1280(lite12, no_network):
    variant, reference, size = lite12
    name = f"efficientnet_{variant}"
    model, spec = build_backbone(name)
    assert (spec.out_dim, spec.default_size, spec.mean, spec.std) == (1280, size, (0.5,) * 3, (0.5,) * 3)
    for key, value in model.state_dict().items():  # every packaged tensor, loaded as is
        assert torch.equal(value, reference.state_dict()[key]), key
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        features = model.eval()(x)
        torch.testing.assert_close(features, reference.forward_features(x))
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

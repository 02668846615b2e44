"""``retdmctl export``: ONNX and TorchScript files that reproduce PyTorch's probabilities
when fed images preprocessed from the exported metadata alone (PIL + NumPy, no retdmctl)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl.cli import app
from retdmctl.config import Config
from retdmctl.inference import load_predictor
from retdmctl.models.retdm import RETDM
from retdmctl.workspace import Workspace

from conftest import runner, shared, trained_workspace

TOL = 1e-4


def tiny_workspace(root: Path) -> Workspace:
    """ingest (demo) + classifier with a fine-tuned tiny CNN: the backbone is in the checkpoint."""
    cfg = Config()
    cfg.ingest.source, cfg.ingest.demo_images, cfg.ingest.demo_classes, cfg.ingest.workers = "demo", 60, 5, 1
    m = cfg.model
    m.backbone, m.pretrained, m.frozen_backbone, m.image_size, m.batch_size = "tiny_cnn", False, False, 48, 16
    cfg.runtime.workers, cfg.runtime.device, cfg.classifier.epochs = 0, "cpu", 2
    return trained_workspace(root, cfg)


def frozen_lite0_checkpoint(path: Path, labels: list[str]) -> Path:
    """A joint checkpoint as a frozen-backbone run writes it: heads only, no backbone keys;
    the backbone comes from the packaged EfficientNet-Lite0 weights."""
    torch.manual_seed(0)
    heads = RETDM(len(labels), 1280, 512, 0.2)
    torch.nn.init.normal_(heads.cls_head.weight, std=0.2)  # spread the probabilities out
    cfg = Config()
    cfg.model.frozen_backbone, cfg.model.image_size = True, 128
    torch.save({"stage": "joint", "model": heads.state_dict(), "class_names": labels, "backbone": "efficientnet_lite0",
                "feature_dim": 1280, "frozen_backbone": True, "config": cfg.sections(("model", "loss", "joint")),
                "history": [], "thresholds": [0.3 + 0.1 * i for i in range(len(labels))]}, path)
    return path


def generated_images(folder: Path) -> list[Path]:
    """Odd sizes and modes: portrait, landscape, square, tiny, grey, RGBA, palette; PNG and JPEG."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (w, h, mode, fmt) in enumerate([(300, 37, "RGB", "PNG"), (37, 300, "RGB", "JPEG"), (500, 333, "RGB", "JPEG"),
                                           (128, 128, "RGB", "PNG"), (20, 15, "RGB", "PNG"), (211, 157, "L", "PNG"),
                                           (190, 260, "RGBA", "PNG"), (99, 150, "P", "PNG")]):
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish content
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC).convert(mode)
        p = folder / f"gen{n}.{fmt.lower().replace('jpeg', 'jpg')}"
        img.save(p, format=fmt)
        out.append(p)
    return out


def scene_images(count: int = 6) -> list[Path]:
    folder = shared("scene", "images")
    return sorted(folder.glob("*.jpg"))[:count]


def preprocess_from_metadata(path: Path, meta: dict) -> np.ndarray:
    """The network input built from the metadata only: PIL + NumPy, no retdmctl code."""
    assert meta["layout"] == "NCHW" and meta["channel_order"] == "RGB" and meta["interpolation"] == "bilinear"
    img = Image.open(path).convert("RGB")
    w, h = img.size
    short = meta["resize_shorter_side"]
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    ch, cw = meta["crop_size"]
    top, left = int(round((nh - ch) / 2)), int(round((nw - cw) / 2))
    img = img.crop((left, top, left + cw, top + ch))
    x = np.asarray(img, dtype=np.float32) * np.float32(meta["pixel_scale"])
    x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    assert list(x.shape[:2]) == meta["input_size"]
    return x.transpose(2, 0, 1).astype(np.float32)


def torch_probabilities(predictor, paths: list[Path]) -> np.ndarray:
    return predictor.predict([Image.open(p).convert("RGB") for p in paths])


def export(ws_root: Path, *args: str):
    result = runner.invoke(app, ["-w", str(ws_root), "export", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("work"))


def needs_onnx():
    pytest.importorskip("onnx", reason="onnx is absent: pip install 'retdmctl[export]'")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is absent: pip install 'retdmctl[export]'")


def _onnx_check(model_path: Path, predictor, paths: list[Path]) -> float:
    ort = needs_onnx()
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(model_path)).metadata_props}["retdmctl"])
    assert meta["labels"] == predictor.class_names
    assert meta["thresholds"] == pytest.approx(list(predictor.thresholds))
    assert meta["opset"] == 17 and meta["version"] and meta["checkpoint"].endswith(".pt")
    x = np.stack([preprocess_from_metadata(p, meta) for p in paths])
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"images": x})
    assert probs.shape == (len(paths), len(meta["labels"]))
    plain = 1 / (1 + np.exp(-logits))
    if meta["fusion"] is None:
        assert np.allclose(probs, plain, atol=1e-6)
    else:  # (1 - w) sigmoid + w vote, the vote a convex mix of 0/1 labels
        w = meta["fusion"]["w"]
        assert (probs - (1 - w) * plain >= -1e-6).all() and (probs - (1 - w) * plain <= w + 1e-6).all()
    ref = torch_probabilities(predictor, paths)
    diff = float(np.abs(probs - ref).max())
    assert diff < TOL, diff
    # the batch dimension is dynamic: one image at a time gives the same
    (single,) = sess.run(["probabilities"], {"images": x[:1]})
    assert np.abs(single - probs[:1]).max() < 1e-5
    return diff


def test_onnx_parity_fine_tuned_tiny_cnn(tiny, tmp_path):
    needs_onnx()
    out = tmp_path / "model.onnx"
    result = export(tiny.root, "--format", "onnx", "--output", str(out))
    assert "opset 17" in result.output
    predictor = load_predictor(tiny.root, device="cpu")
    _onnx_check(out, predictor, generated_images(tmp_path / "gen"))


def test_onnx_parity_frozen_efficientnet_on_real_photos(tmp_path):
    needs_onnx()
    photos = scene_images()
    ckpt = frozen_lite0_checkpoint(tmp_path / "joint.pt", ["desert", "mountains", "sea", "sunset", "trees"])
    out = tmp_path / "lite0.onnx"
    export(tmp_path, "--format", "onnx", "--output", str(out), "--checkpoint", str(ckpt))
    predictor = load_predictor(ckpt, device="cpu")
    assert predictor.preprocess.input_size == (128, 128) and predictor.threshold_source == "checkpoint"
    diff = _onnx_check(out, predictor, photos + generated_images(tmp_path / "gen")[:3])
    print(f"ONNX vs PyTorch max |dp| on real photos: {diff:.2e}")


def test_torchscript_and_sidecar(tiny, tmp_path):
    out = tmp_path / "model.pt"
    export(tiny.root, "--format", "torchscript", "--output", str(out))
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    predictor = load_predictor(tiny.root, device="cpu")
    assert meta["labels"] == predictor.class_names and meta["layout"] == "NCHW"
    paths = generated_images(tmp_path / "gen")
    x = torch.from_numpy(np.stack([preprocess_from_metadata(p, meta) for p in paths]))
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        _, probs = loaded(x)
    assert np.abs(probs.numpy() - torch_probabilities(predictor, paths)).max() < TOL


def test_default_output_path(tiny):
    pytest.importorskip("onnx", reason="onnx is absent: pip install 'retdmctl[export]'")
    export(tiny.root, "--format", "onnx")
    assert (tiny.root / "export" / "classifier.onnx").is_file()


def test_missing_onnx_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    result = runner.invoke(app, ["-w", str(tiny.root), "export", "--format", "onnx"])
    assert result.exit_code == 1
    assert result.stderr.strip() == 'error: ONNX export needs the optional extra: pip install "retdmctl[export]"'


def test_onnx_parity_of_the_frozen_mode_default_tuned_model(tmp_path):
    """--frozen-backbone's default (auto: one tuned block, ten cached views): the joint
    checkpoint holds the whole backbone, and its ONNX export scores pixels as PyTorch does."""
    needs_onnx()
    w = ["-w", str(tmp_path / "ws")]
    assert runner.invoke(app, [*w, "ingest", "demo", "--images", "60"]).exit_code == 0
    result = runner.invoke(app, [*w, "run", "--frozen-backbone", "--set", "model.backbone=tiny_cnn", "--set", "model.pretrained=false",
                                 "--set", "model.image_size=32", "--set", "runtime.workers=0", "--set", "classifier.epochs=1",
                                 "--set", "metric.epochs=1", "--set", "joint.epochs=1", "--set", "decision.folds=0"])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "ws" / "joint" / "checkpoint.pt", weights_only=True)
    assert (ckpt["config"]["model"]["tune_blocks"], ckpt["config"]["model"]["views"]) == (1, 10)
    assert any(k.startswith("backbone.") for k in ckpt["model"])
    out = tmp_path / "tuned.onnx"
    export(tmp_path / "ws", "--format", "onnx", "--output", str(out))
    _onnx_check(out, load_predictor(tmp_path / "ws", device="cpu"), generated_images(tmp_path / "gen"))

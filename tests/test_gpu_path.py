"""The device-side image path (retdmctl.data.gpu) against the PIL transforms, on the CPU."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from retdmctl.data.gpu import (
    DevicePixelSource,
    DeviceTransform,
    crop_anchor,
    decode_batch,
    draw_augment,
    resized_size,
)
from retdmctl.data.loaders import decode, eval_transform
from retdmctl.data.store import ImageWriter

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _smooth_image(h: int, w: int, seed: int) -> Image.Image:
    """A smooth but asymmetric picture: distinct crops, little resampling noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(1, 4, 3)
    img = np.stack([
        127 + 120 * np.sin(a * 3 * xx + b * yy),
        127 + 120 * np.cos(b * 2 * yy - c * xx),
        255 * xx * (1 - yy) * c / 4,
    ], axis=-1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("shape", [(200, 300), (300, 200), (256, 256), (384, 256), (131, 517)])
def test_resized_size_matches_torchvision(shape):
    h, w = shape
    out = v2.Resize(256)(Image.new("RGB", (w, h)))
    assert resized_size(h, w, 256) == (out.height, out.width)


@pytest.mark.parametrize("shape", [(256, 341), (341, 256), (257, 300), (224, 224)])
def test_crop_anchors_match_five_crop(shape):
    h, w = shape
    img = torch.arange(h * w, dtype=torch.int64).view(1, h, w)
    crops = v2.FiveCrop(224)(img)
    for which, crop in enumerate(crops):
        top, left = crop_anchor(h, w, 224, which)
        assert torch.equal(img[..., top : top + 224, left : left + 224], crop)


def test_decode_matches_pil_and_falls_back_for_png():
    img = _smooth_image(120, 160, 0)
    datas = [_jpeg(img), _jpeg(img, "PNG")]
    jpg, png = decode_batch(datas, "cpu")
    assert jpg.dtype == torch.uint8 and jpg.shape == (3, 120, 160)
    ref = torch.from_numpy(np.array(decode(datas[0]))).permute(2, 0, 1)
    assert (jpg.int() - ref.int()).abs().float().mean() < 2  # libjpeg versions may round differently
    assert torch.equal(png, torch.from_numpy(np.array(img)).permute(2, 0, 1))


def _candidates(data: bytes, size: int) -> list[torch.Tensor]:
    """The ten outcomes of the PIL training transform: five crops, each plain and flipped."""
    img = v2.Resize(round(size * 256 / 224))(decode(data))
    tail = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))])
    out = []
    for crop in v2.FiveCrop(size)(img):
        t = tail(crop)
        out += [t, t.flip(-1)]
    return out


def test_eval_batch_is_close_to_the_pil_path():
    size = 96
    datas = [_jpeg(_smooth_image(h, w, s)) for s, (h, w) in enumerate([(120, 160), (160, 120), (120, 160), (200, 130)])]
    x = DeviceTransform(size, MEAN, STD, device="cpu", train=False)(datas)
    assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = torch.stack([eval_transform(size, MEAN, STD)(decode(d)) for d in datas])
    diff = (x - ref).abs()
    assert diff.mean() < 0.03  # a few 1/255 steps after normalisation
    assert torch.quantile(diff.flatten(), 0.99) < 0.1
    # the normalisation itself: same per-channel statistics
    assert torch.allclose(x.mean((0, 2, 3)), ref.mean((0, 2, 3)), atol=0.01)


def test_train_batch_takes_the_drawn_crop_and_flip():
    size = 64
    datas = [_jpeg(_smooth_image(90, 140, s)) for s in range(16)] + [_jpeg(_smooth_image(150, 90, s)) for s in range(16)]
    seed = 7
    x = DeviceTransform(size, MEAN, STD, device="cpu", train=True)(datas, torch.Generator().manual_seed(seed))
    crops, flips = draw_augment(len(datas), torch.Generator().manual_seed(seed))
    assert len(set(crops.tolist())) > 1 and 0 < int(flips.sum()) < len(datas)
    for i, data in enumerate(datas):
        cands = _candidates(data, size)
        dists = torch.stack([(x[i] - c).abs().mean() for c in cands])
        best = int(dists.argmin())
        assert best == 2 * int(crops[i]) + int(flips[i]), (i, dists)
        assert dists[best] < 0.03


def test_augmentation_is_deterministic_per_seed_and_uniform():
    datas = [_jpeg(_smooth_image(90, 140, s)) for s in range(6)]
    tf = DeviceTransform(64, MEAN, STD, device="cpu", train=True)
    a = tf(datas, torch.Generator().manual_seed(3))
    b = tf(datas, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    c1, f1 = draw_augment(4000, torch.Generator().manual_seed(1))
    c2, f2 = draw_augment(4000, torch.Generator().manual_seed(2))
    assert not torch.equal(c1, c2)
    counts = torch.bincount(c1, minlength=5).float() / 4000
    assert torch.all((counts - 0.2).abs() < 0.03)
    assert abs(float(f1.float().mean()) - 0.5) < 0.03


def test_device_pixel_source_over_lmdb(tmp_path):
    ids = [f"img{i}" for i in range(10)]
    writer = ImageWriter(tmp_path / "images.lmdb")
    writer.put_many((k, _jpeg(_smooth_image(80 + i, 120, i))) for i, k in enumerate(ids))
    writer.close()
    labels = (np.arange(30).reshape(10, 3) % 2).astype(np.uint8)
    info = SimpleNamespace(ids=ids, labels=labels)
    spec = SimpleNamespace(mean=MEAN, std=STD)
    src = DevicePixelSource(tmp_path / "images.lmdb", info, spec, 48, 4, "cpu")
    rows = np.arange(10)
    batches = list(src.eval_batches(rows))
    assert [len(r) for _, _, r in batches] == [4, 4, 2] == [len(x) for x, _, _ in batches]
    assert np.array_equal(np.concatenate([r for _, _, r in batches]), rows)
    x, y, r = batches[0]
    assert x.shape == (4, 3, 48, 48) and torch.equal(y, torch.from_numpy(labels[r].astype(np.float32)))
    t1 = [(x, r) for x, _, r in src.train_batches(rows, seed=5)]
    t2 = [(x, r) for x, _, r in src.train_batches(rows, seed=5)]
    assert all(torch.equal(a, b) and np.array_equal(ra, rb) for (a, ra), (b, rb) in zip(t1, t2))
    assert sorted(np.concatenate([r for _, r in t1]).tolist()) == list(range(10))
    assert src.num_batches(rows) == 3


def test_threaded_pixel_source_is_deterministic_and_matches_the_pil_transform(tmp_path):
    from retdmctl.data.prefetch import ThreadedPixelSource, augment_choice

    ids = [f"img{i}" for i in range(9)]
    blobs = [_jpeg(_smooth_image(90, 140, i)) for i in range(9)]
    writer = ImageWriter(tmp_path / "images.lmdb")
    writer.put_many(zip(ids, blobs))
    writer.close()
    info = SimpleNamespace(ids=ids, labels=np.eye(9, 3, dtype=np.uint8))
    src = ThreadedPixelSource(tmp_path / "images.lmdb", info, SimpleNamespace(mean=MEAN, std=STD), 64, 4)
    rows = np.arange(9)
    a = list(src.train_batches(rows, seed=11))
    b = list(src.train_batches(rows, seed=11))
    assert all(torch.equal(x1, x2) and np.array_equal(r1, r2) for (x1, _, r1), (x2, _, r2) in zip(a, b))
    for x, _, r in a:
        for xi, row in zip(x, r):
            crop, flip = augment_choice(11, int(row))
            assert torch.allclose(xi, _candidates(blobs[row], 64)[2 * crop + int(flip)])
    ev = torch.cat([x for x, _, _ in src.eval_batches(rows)])
    ref = torch.stack([eval_transform(64, MEAN, STD)(decode(d)) for d in blobs])
    assert torch.equal(ev, ref)
    next(iter(src.train_batches(rows, seed=1)))  # an abandoned epoch does not hang


# --- wired into the stages (runtime.decode) ---------------------------------------------


def test_runtime_decode_device_trains_and_scores_through_the_device_path(tmp_path):
    import io

    from rich.console import Console

    from retdmctl.config import validate
    from retdmctl.data.dataset import read_dataset
    from retdmctl.data.gpu import DevicePixelSource
    from retdmctl.errors import ConfigError
    from retdmctl.models.backbones import get_backbone_spec
    from retdmctl.pipeline import Context, run_stage
    from retdmctl.inputs import image_source
    from retdmctl.workspace import Workspace
    from stages import BY_NAME, PIPELINE
    from tests.conftest import tiny_config

    ws, cfg = Workspace(tmp_path), tiny_config()
    cfg.runtime.decode = "device"  # on the CPU here: the same code that runs on CUDA
    cfg.classifier.epochs = 1
    ctx = Context(ws, cfg, Console(file=io.StringIO()))
    for name in ("ingest", "classifier"):
        assert run_stage(ctx, BY_NAME[name], PIPELINE)
    info = read_dataset(ws.dataset)
    source = image_source(ws, cfg, info, get_backbone_spec("tiny_cnn"), torch.device("cpu"))
    assert isinstance(source, DevicePixelSource)
    # a rank's shard: exactly the given rows, in order, augmented from the seed
    parts = [np.array([3, 1, 4]), np.array([1, 5])]
    got = list(source.batches_of(parts, seed=7))
    assert [b[2].tolist() for b in got] == [[3, 1, 4], [1, 5]]
    again = list(source.batches_of(parts, seed=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, again))
    # scores (validation, thresholds, eval) come from the PIL pixels that predict uses
    from retdmctl.data.loaders import decode, eval_transform

    spec = get_backbone_spec("tiny_cnn")
    tf = eval_transform(cfg.model.image_size, spec.mean, spec.std)
    rows = info.split("test")
    x = torch.cat([b[0] for b in source.eval_batches(rows)])
    expected = torch.stack([tf(decode(source.reader.get(info.ids[r]))) for r in rows])
    assert torch.equal(x, expected)
    cfg.runtime.decode = "gpu"
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert str(exc.value) == "runtime.decode must be one of auto, cpu, device, got 'gpu'"

"""One decoding for ingest and the loader (``retdmctl.data.decode``): EXIF orientation,
16-bit and float images, transparency, palettes, grayscale and CMYK.

Every case is a generated image, ingested twice through a real csv ingest: re-encoded
(the pixels of the stored JPEG) and with ``--keep-original`` (the source bytes are stored,
the training loader converts them at read time). Both must show the same picture.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retdmctl.config import IngestConfig
from retdmctl.data.dataset import read_dataset
from retdmctl.data.decode import open_rgb, value_range
from retdmctl.data.ingest import run_ingest
from retdmctl.data.loaders import LmdbImages, decode
from retdmctl.data.readers.csvfile import read_csv_labels
from retdmctl.data.store import ImageReader
from retdmctl.workspace import Workspace
from tests.test_ingest_formats import FEW, QUIET

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
GRADIENT = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (40, 1))  # 256 wide, 40 high


def _exif6(path):
    """1200x800, the top-left quadrant red, the rest green, EXIF orientation 6 (the
    camera was turned: display rotated 90 degrees clockwise, 800x1200, red top-right)."""
    img = Image.new("RGB", (1200, 800), GREEN)
    img.paste(RED, (0, 0, 600, 400))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def _rgba(path):
    img = Image.new("RGBA", (60, 40), (*RED, 255))
    img.paste((0, 0, 0, 0), (0, 0, 24, 24))  # fully transparent black
    img.save(path, format="PNG")


def _palette(path, transparent: bool):
    img = Image.new("P", (60, 40), 1)
    img.putpalette([*BLACK, *BLUE] + [0] * 762)
    img.paste(0, (0, 0, 24, 24))
    if transparent:
        img.save(path, format="PNG", transparency=0)  # index 0 (black) is transparent
    else:
        img.save(path, format="PNG")


def _gray(path):
    Image.new("L", (60, 40), 77).save(path, format="PNG")


def _cmyk(path):
    Image.new("CMYK", (60, 40), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)


# name: (file name, writer, (width, height) re-encoded, (width, height) original, [(xy as
# fractions of the size, colour)], lossless source)
CASES = {
    "exif_orientation_6": (
        "exif.jpg", _exif6, (256, 384), (800, 1200),
        [((0.95, 0.05), RED), ((0.05, 0.05), GREEN), ((0.05, 0.95), GREEN), ((0.95, 0.95), GREEN)], False,
    ),
    "png_16bit": (
        "g16.png", lambda p: Image.fromarray(GRADIENT).save(p, format="PNG"), (256, 40), (256, 40),
        [((128 / 256, 0.5), (128,) * 3), ((0, 0.5), BLACK), ((255 / 256, 0.5), WHITE)], True,
    ),
    "tiff_16bit": (
        "g16.tif", lambda p: Image.fromarray(GRADIENT).save(p, format="TIFF"), (256, 40), (256, 40),
        [((128 / 256, 0.5), (128,) * 3), ((0, 0.5), BLACK), ((255 / 256, 0.5), WHITE)], True,
    ),
    "tiff_16bit_big_endian": (
        "g16b.tif", lambda p: Image.fromarray(GRADIENT.astype(">u2")).save(p, format="TIFF"), (256, 40), (256, 40),
        [((128 / 256, 0.5), (128,) * 3), ((255 / 256, 0.5), WHITE)], True,
    ),
    "tiff_float": (
        "f32.tif", lambda p: Image.fromarray((GRADIENT / 65535).astype(np.float32)).save(p, format="TIFF"),
        (256, 40), (256, 40), [((128 / 256, 0.5), (128,) * 3), ((255 / 256, 0.5), WHITE)], True,
    ),
    "rgba_transparent_pixel": (
        "rgba.png", _rgba, (60, 40), (60, 40), [((6 / 60, 6 / 40), WHITE), ((0.5, 0.5), RED)], True,
    ),
    "palette_with_transparency": (
        "pt.png", lambda p: _palette(p, True), (60, 40), (60, 40), [((6 / 60, 6 / 40), WHITE), ((0.5, 0.5), BLUE)], True,
    ),
    "palette_without_transparency": (
        "p.png", lambda p: _palette(p, False), (60, 40), (60, 40), [((6 / 60, 6 / 40), BLACK), ((0.5, 0.5), BLUE)], True,
    ),
    "grayscale": ("gray.png", _gray, (60, 40), (60, 40), [((0.5, 0.5), (77,) * 3)], True),
    "cmyk": ("cmyk.jpg", _cmyk, (60, 40), (60, 40), [((0.5, 0.5), RED)], False),
}  # fmt: skip


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Every case in one csv ingest, re-encoded and with --keep-original: the images as
    the training loader returns them, by case name and mode."""
    root = tmp_path_factory.mktemp("decode")
    images = root / "img"
    images.mkdir()
    for name, writer, *_ in CASES.values():
        writer(images / name)
    labels = root / "labels.csv"
    labels.write_text("".join(f"{name},x\n" for name, *_ in CASES.values()))
    out = {}
    for keep in (False, True):
        ws = Workspace(root / f"w-{keep}")
        summary = run_ingest(
            read_csv_labels(labels, images), ws, IngestConfig(path=str(labels), workers=1, keep_original=keep, **FEW), QUIET
        )
        assert summary["skipped"] == 0 and summary["images"] == len(CASES)
        info = read_dataset(ws.dataset)
        loader = LmdbImages(ImageReader(ws.lmdb), info.ids, info.labels, np.arange(len(info.ids)), lambda im: im)
        by_file = {info.ids[row]: loader[i][0] for i, row in enumerate(loader.rows)}
        for case, (name, *_rest) in CASES.items():
            out[case, keep] = by_file[name]
    return out


def _check(img: Image.Image, size, points, tolerance: int) -> None:
    assert img.mode == "RGB"
    assert img.size == size
    for (fx, fy), colour in points:
        xy = (min(size[0] - 1, int(fx * size[0])), min(size[1] - 1, int(fy * size[1])))
        got = img.getpixel(xy)
        assert all(abs(g - c) <= tolerance for g, c in zip(got, colour, strict=True)), (xy, got, colour)


@pytest.mark.parametrize("case", list(CASES))
def test_ingest_reencodes_the_corrected_picture(ingested, case):
    _, _, size, _, points, _ = CASES[case]
    _check(ingested[case, False], size, points, tolerance=8)  # a JPEG: a few levels off


@pytest.mark.parametrize("case", list(CASES))
def test_loader_converts_original_bytes_the_same_way(ingested, case):
    _, _, _, size, points, lossless = CASES[case]
    _check(ingested[case, True], size, points, tolerance=0 if lossless else 8)


def test_loader_decode_is_the_shared_function(tmp_path):
    _rgba(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert decode(data).tobytes() == open_rgb(data).tobytes()
    assert decode(data).getpixel((0, 0)) == WHITE
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == BLACK  # what PIL alone gives


def test_value_range_of_high_bit_depth_modes():
    assert value_range("I;16", np.array([0, 5], np.uint16)) == (0.0, 65535.0)
    assert value_range("I", np.array([0, 4095], np.int32)) == (0.0, 65535.0)
    assert value_range("I", np.array([-100, 100000], np.int32)) == (-100.0, 100000.0)
    assert value_range("F", np.array([0.0, 0.5], np.float32)) == (0.0, 1.0)
    assert value_range("F", np.array([0.0, 200.0], np.float32)) == (0.0, 255.0)
    assert value_range("F", np.array([-1.0, 1.0, np.nan], np.float32)) == (-1.0, 1.0)
    assert value_range("F", np.array([3.0, 3.0], np.float32)) == (0.0, 255.0)
    assert value_range("F", np.array([-3.0, -3.0], np.float32)) == (-3.0, -2.0)


def test_damaged_exif_keeps_the_image(tmp_path):
    img = Image.new("RGB", (30, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 99  # not an orientation
    img.save(tmp_path / "x.jpg", format="JPEG", exif=exif.tobytes())
    out = open_rgb((tmp_path / "x.jpg").read_bytes())
    assert out.size == (30, 20) and out.mode == "RGB"

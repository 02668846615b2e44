"""``retdmctl predict`` and the inference loader, on a tiny trained workspace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retdmctl import fusion
from retdmctl.cli import app
from retdmctl.config import Config
from retdmctl.data.dataset import read_dataset
from retdmctl.data.loaders import decode, eval_transform
from retdmctl.data.store import ImageReader
from retdmctl.errors import RetdmError
from retdmctl.inference import Preprocess, load_predictor
from retdmctl.inputs import image_source
from retdmctl.model_io.checkpoint import build_model, load_state
from retdmctl.model_io.scoring import predict_scores
from retdmctl.runtime import load_checkpoint
from retdmctl.workspace import Workspace
from tests.conftest import runner, trained_workspace


def tiny_config() -> Config:
    cfg = Config()
    cfg.ingest.source, cfg.ingest.demo_images, cfg.ingest.demo_classes, cfg.ingest.workers = "demo", 60, 5, 1
    m = cfg.model
    m.backbone, m.pretrained, m.frozen_backbone, m.image_size, m.batch_size = "tiny_cnn", False, False, 32, 16
    cfg.runtime.workers, cfg.runtime.device = 0, "cpu"
    cfg.classifier.epochs = 2
    return cfg


def make_workspace(root: Path) -> tuple[Workspace, Config]:
    """ingest (demo) + classifier: a trained checkpoint in a few seconds."""
    cfg = tiny_config()
    return trained_workspace(root, cfg), cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def images(trained, tmp_path_factory):
    """A folder tree of test-split images as files, plus a broken one."""
    ws, _ = trained
    info = read_dataset(ws.dataset)
    root = tmp_path_factory.mktemp("imgs")
    (root / "sub" / "deeper").mkdir(parents=True)
    reader = ImageReader(ws.lmdb)
    rows = info.split("test")[:6]
    paths = []
    for n, r in enumerate(rows):
        folder = root if n < 3 else root / "sub" / "deeper"
        p = folder / f"img{n}.png"
        decode(reader.get(info.ids[r])).save(p)
        paths.append(p)
    reader.close()
    (root / "sub" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root, paths, rows


def invoke(ws: Workspace, *args: str):
    return runner.invoke(app, ["-w", str(ws.root), "predict", *args])


def test_preprocess_is_the_eval_transform():
    pre = Preprocess.for_model(128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert pre.resize_shorter_side == round(128 * 256 / 224) == 146
    assert pre.crop_size == pre.input_size == (128, 128)
    assert pre.pixel_scale == pytest.approx(1 / 255)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 170, 3), dtype=np.uint8))
    ref = eval_transform(128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(img)
    assert torch.equal(pre(img), ref)
    meta = pre.to_dict()
    assert meta["layout"] == "NCHW" and meta["channel_order"] == "RGB" and meta["mean"] == [0.5, 0.5, 0.5]


def test_predictor_matches_the_eval_scores(trained):
    """One preprocessing: predicting the stored images gives eval's scores."""
    ws, cfg = trained
    info = read_dataset(ws.dataset)
    rows = info.split("test")[:8]
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    ckpt = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")
    load_state(model, ckpt["model"], "ckpt")
    vote = fusion.from_checkpoint(ckpt, "ckpt", embed_dim=cfg.model.embed_dim, num_classes=info.num_classes)  # as eval
    ref, _ = predict_scores(model, image_source(ws, cfg, info, spec), rows, torch.device("cpu"), vote)
    pred = load_predictor(ws.root, device="cpu")
    assert pred.stage == "classifier"  # no joint checkpoint: the classifier
    assert pred.class_names == info.class_names
    chosen = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["thresholds"]  # on validation
    assert list(pred.thresholds) == chosen and pred.threshold_source == "checkpoint"
    reader = ImageReader(ws.lmdb)
    got = pred.predict([decode(reader.get(info.ids[r])) for r in rows])
    reader.close()
    assert np.abs(got - ref).max() < 1e-5


def test_table_output_and_exit_code_3_for_skipped_files(trained, images):
    ws, _ = trained
    root, paths, _ = images
    result = invoke(ws, str(root))
    assert result.exit_code == 3, result.output
    assert "broken.jpg: not an image file" in result.stderr
    assert "notes.txt" not in result.output  # folders yield image files only
    for p in paths:
        assert p.name in result.stdout
    assert "6 scored, 1 skipped" in result.stderr


def test_jsonl_scores_and_labels(trained, images):
    ws, _ = trained
    _, paths, _ = images
    result = invoke(ws, *map(str, paths), "--format", "jsonl")
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in recs] == [str(p) for p in paths]
    names = read_dataset(ws.dataset).class_names
    cut = dict(zip(names, load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["thresholds"]))
    for r in recs:
        assert list(r["scores"]) == names
        assert r["labels"] == [n for n in sorted(r["scores"], key=lambda n: -r["scores"][n]) if r["scores"][n] >= cut[n]]


def test_threshold_and_top_k(trained, images):
    ws, _ = trained
    _, paths, _ = images
    every = [json.loads(x) for x in invoke(ws, str(paths[0]), "--format", "jsonl", "--threshold", "0").stdout.splitlines()]
    assert len(every[0]["labels"]) == 5
    top = [json.loads(x) for x in invoke(ws, str(paths[0]), "--format", "jsonl", "--threshold", "0", "--top-k", "2").stdout.splitlines()]
    assert top[0]["labels"] == every[0]["labels"][:2]
    none = [json.loads(x) for x in invoke(ws, str(paths[0]), "--format", "jsonl", "--threshold", "1").stdout.splitlines()]
    assert none[0]["labels"] == []


def test_predict_warns_when_an_upstream_stage_is_stale(trained, images, tmp_path):
    """The classifier's own manifest still matches, but ingest (which it reads from) is
    stale: predict says the model is out of date, as `retdmctl status` does."""
    ws, _ = trained
    root, paths, _ = images
    copy = Workspace(tmp_path / "work")
    shutil.copytree(ws.root, copy.root)
    (copy.root / ".retdm" / "state.json").unlink(missing_ok=True)  # keyed by absolute path
    result = invoke(copy, str(paths[0]))
    assert result.exit_code == 0 and "out of date" not in result.stderr
    cfg = copy.load_config()
    cfg.ingest.seed += 1  # ingest is now stale; dataset.h5, the classifier's input, is not changed yet
    copy.save_config(cfg)
    result = invoke(copy, str(paths[0]))
    assert result.exit_code == 0, result.output
    assert "warning: the classifier model is out of date (upstream ingest not up to date)" in result.stderr


def test_checkpoint_thresholds_are_used(trained, images, tmp_path):
    ws, _ = trained
    _, paths, _ = images
    ckpt = torch.load(ws.stage_dir("classifier") / "checkpoint.pt", weights_only=True)
    ckpt["thresholds"] = [0.0, 1.01, 1.01, 1.01, 1.01]
    path = tmp_path / "thr.pt"
    torch.save(ckpt, path)
    rec = json.loads(invoke(ws, str(paths[0]), "--format", "jsonl", "--checkpoint", str(path)).stdout)
    assert rec["labels"] == [read_dataset(ws.dataset).class_names[0]]


def test_csv_to_file_glob_and_list(trained, images, tmp_path):
    ws, _ = trained
    root, paths, _ = images
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{paths[0]}\n\n{root}/sub/**/*.png\n")
    out = tmp_path / "preds.csv"
    result = invoke(ws, f"@{listing}", "--output", str(out), "--batch-size", "2")
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:2] == ["path", "labels"] and len(lines[0].split(",")) == 2 + 5
    assert [line.split(",")[0] for line in lines[1:]] == [str(paths[0])] + [str(p) for p in paths[3:]]


def test_nothing_scorable_is_a_one_line_error(trained, images, tmp_path):
    ws, _ = trained
    root, _, _ = images
    result = invoke(ws, str(root / "sub" / "broken.jpg"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == "error: none of the 1 files could be scored"
    result = invoke(ws, str(tmp_path / "missing" / "*.jpg"))
    assert result.exit_code == 1 and "error: no image files to score" in result.stderr
    result = invoke(ws, str(root), "--checkpoint", "joint")
    assert result.exit_code == 1 and "error: no joint checkpoint" in result.stderr


def test_strict_loading_names_the_bad_keys(trained, tmp_path):
    ws, _ = trained
    ckpt = torch.load(ws.stage_dir("classifier") / "checkpoint.pt", weights_only=True)
    ckpt["model"]["cls_head.extra"] = torch.zeros(1)
    del ckpt["model"]["backbone.net.0.weight"]
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    with pytest.raises(RetdmError, match=r"\(heads\) does not fit the model; unexpected keys: cls_head\.extra \(1\)$"):
        load_predictor(path)
    ckpt["model"].pop("cls_head.extra")
    torch.save(ckpt, path)
    with pytest.raises(RetdmError, match=r"\(backbone\) does not fit the model; missing keys: net\.0\.weight"):
        load_predictor(path)


def test_help_has_an_example():
    for cmd in ("predict", "export"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0 and "Example: retdmctl" in result.output


def test_frozen_random_backbone_cannot_be_rebuilt(tmp_path):
    from retdmctl.models.retdm import RETDM

    heads = RETDM(3, 64, 16, 0.0)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": heads.state_dict(), "class_names": ["a", "b", "c"], "backbone": "tiny_cnn", "feature_dim": 64,
                "frozen_backbone": True, "config": {"model": {"embed_dim": 16, "dropout": 0.0, "image_size": 32}}}, path)
    with pytest.raises(RetdmError, match="randomly initialised tiny_cnn that cannot be rebuilt"):
        load_predictor(path)

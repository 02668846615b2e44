"""Per-row artifacts are bound to the ordered id list of ``dataset.h5`` (issue 19, item 2):
the backbone caches are keyed by it (and by the extraction precision), ``features.h5``,
``scores.h5`` and the neighbour vote's bank record it, and a reader of other rows either
rebuilds (a cache) or stops with one line (everything else), never reads them as these."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from retdmctl.config import Config, IngestConfig
from retdmctl.data.dataset import DatasetInfo, ids_digest, read_dataset, write_dataset
from retdmctl.data.ingest import run_ingest
from retdmctl.data.readers.csvfile import read_csv_labels
from retdmctl.data.readers.voc import read_voc
from retdmctl.errors import CheckpointError, InputError
from retdmctl.pipeline import Context
from retdmctl import inputs
from retdmctl.inputs import backbone_cache_path, ensure_backbone_cache
from retdmctl.training.setup import finish_training
from retdmctl.runtime import load_checkpoint, save_checkpoint
from retdmctl.sources import PixelSource, extract_backbone_features, read_cache_key, read_features
from retdmctl.workspace import Workspace
from stages import BY_NAME
from stages.evaluate import read_scores
from tests.conftest import tiny_pipeline
from tests.test_ingest_formats import make_jpeg, make_voc

QUIET = Console(file=io.StringIO())
CPU = torch.device("cpu")
FEW = {"test_fraction": 0.34, "val_fraction": 0.5, "workers": 1}


def frozen_config() -> Config:
    cfg = Config()
    m = cfg.model
    m.backbone, m.pretrained, m.frozen_backbone, m.image_size, m.batch_size = "tiny_cnn", False, True, 32, 1
    m.tune_blocks, m.views = 0, 1
    cfg.runtime.workers, cfg.runtime.device = 0, "cpu"
    return cfg


def fresh_features(ws: Workspace, cfg: Config, info: DatasetInfo, tmp: Path) -> np.ndarray:
    """The backbone's features of ``info``'s rows, extracted now into a file of their own
    (one image a batch: an image's features do not depend on its neighbours in a batch)."""
    backbone, spec = inputs.frozen_backbone(cfg)
    pixels = PixelSource(ws.lmdb, info, spec, cfg.model.image_size, cfg.model.batch_size, 0)
    out = tmp / "fresh.h5"
    extract_backbone_features(out, backbone, pixels, {}, CPU, torch.autocast("cpu", enabled=False))
    return read_features(out)


def cached_features_follow_the_rows(ws: Workspace, cfg: Config, ingest, tmp: Path) -> None:
    """Ingest, cache, re-ingest the same images in another order, cache again: the cache
    read for the new dataset.h5 is the fresh extraction, row by row."""
    ingest("first")
    first = read_dataset(ws.dataset)
    path = ensure_backbone_cache(ws, cfg, first, CPU, QUIET)
    before = read_features(path)
    store = ws.fingerprint(ws.lmdb)
    summary = ingest("second")
    again = read_dataset(ws.dataset)
    assert summary["store_reused"] and ws.fingerprint(ws.lmdb) == store  # the same store, rows reordered
    assert sorted(again.ids) == sorted(first.ids) and again.ids != first.ids
    after = read_features(ensure_backbone_cache(ws, cfg, again, CPU, QUIET))
    np.testing.assert_array_equal(after, fresh_features(ws, cfg, again, tmp))
    for row, key in enumerate(again.ids):  # every image keeps its own features
        np.testing.assert_array_equal(after[row], before[first.ids.index(key)])


def test_ids_digest_is_the_ordered_list():
    assert ids_digest(["a", "b"]) == ids_digest(["a", "b"]) != ids_digest(["b", "a"])
    assert ids_digest(["ab"]) != ids_digest(["a", "b"])


def test_reingesting_a_reordered_csv_never_reuses_the_cache_rows(tmp_path):
    images = tmp_path / "img"
    names = [f"im{i}.jpg" for i in range(9)]
    for i, name in enumerate(names):
        make_jpeg(images / name, seed=i)
    lines = [f"{name},{'a' if i % 2 else 'b'}|c" for i, name in enumerate(names)]
    ws = Workspace(tmp_path / "w")

    def ingest(which: str) -> dict:
        csv = tmp_path / f"{which}.csv"
        csv.write_text("\n".join(lines if which == "first" else lines[::-1]) + "\n")
        return run_ingest(read_csv_labels(csv, images), ws, IngestConfig(**FEW), QUIET)

    cached_features_follow_the_rows(ws, frozen_config(), ingest, tmp_path)


def test_reingesting_with_swapped_voc_years_never_reuses_the_cache_rows(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit")
    make_voc(root, {"2008_000008": ("trainval", [("horse", 0)]), "2008_000009": ("trainval", [("car", 0)]),
                    "2008_000010": ("test", [("dog", 0)])}, year="2012")
    ws = Workspace(tmp_path / "w")

    def ingest(which: str) -> dict:
        years = ["2007", "2012"] if which == "first" else ["2012", "2007"]
        return run_ingest(read_voc(root, years), ws, IngestConfig(**FEW), QUIET)

    cached_features_follow_the_rows(ws, frozen_config(), ingest, tmp_path)


# --- a finished tiny pipeline whose dataset.h5 is then reordered -------------------------


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("done"))


@pytest.fixture
def reordered(done, tmp_path) -> Workspace:
    """A copy of the finished pipeline whose dataset.h5 holds the same images in reverse."""
    shutil.copytree(done, tmp_path / "w")
    (tmp_path / "w" / ".retdm" / "state.json").unlink(missing_ok=True)
    ws = Workspace(tmp_path / "w")
    info = read_dataset(ws.dataset)
    n = len(info.ids)
    flipped = DatasetInfo(info.ids[::-1], info.labels[::-1].copy(), info.class_names,
                          {k: np.sort(n - 1 - v) for k, v in info.splits.items()})
    write_dataset(ws.dataset, flipped, source="demo", config={})
    return ws


def run_directly(ws: Workspace, stage: str) -> None:
    """The stage's own code on the workspace as it is (a library caller)."""
    BY_NAME[stage].run(Context(ws, ws.load_config(), QUIET, force=True))


@pytest.mark.parametrize("stage", ["metric", "joint"])
def test_features_h5_of_another_image_list_is_an_error(reordered, stage):
    run_directly(reordered, "knn")  # the graph rebuilt for the new order: features.h5 is what is left
    with pytest.raises(InputError) as err:
        run_directly(reordered, stage)
    assert str(err.value) == ("classifier/features.h5 was written for another image list than the dataset's "
                              "(re-ingested since?): re-run retdmctl train --stage classifier")


@pytest.mark.parametrize("stage", ["metric", "joint"])
def test_knn_h5_of_another_image_list_is_an_error(reordered, stage):
    with pytest.raises(InputError) as err:
        run_directly(reordered, stage)
    assert str(err.value) == ("knn.h5 was written for another image list than the dataset's "
                              "(re-ingested since?): re-run retdmctl knn")


def test_features_h5_that_records_no_image_list_is_an_error(done, tmp_path):
    shutil.copytree(done, tmp_path / "w")
    ws = Workspace(tmp_path / "w")
    with h5py.File(ws.stage_dir("classifier") / "features.h5", "a") as h5:
        del h5.attrs["ids_digest"]  # as written before the hash was recorded
    with pytest.raises(InputError) as err:
        run_directly(ws, "metric")
    assert str(err.value) == ("classifier/features.h5 records no image list (written by an older version): "
                              "re-run retdmctl train --stage classifier")


def test_the_vote_bank_of_another_image_list_is_an_error(reordered):
    path = reordered.stage_dir("joint") / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["fusion"]["w"] = 0.2  # a vote in use, whatever validation chose on this tiny set
    save_checkpoint(path, ckpt)
    with pytest.raises(CheckpointError) as err:
        run_directly(reordered, "eval")
    assert str(err.value) == ("joint/checkpoint.pt: its neighbour vote was written for another image list than the "
                              "dataset's (re-ingested since?): train again")


def test_predict_knows_no_bank_rows(done):
    from retdmctl import fusion

    ckpt = load_checkpoint(done / "joint" / "checkpoint.pt")
    ckpt["fusion"]["w"] = 0.2
    saved = ckpt["fusion"]
    assert saved["ids_digest"] == read_dataset(done / "data" / "dataset.h5").ids_digest
    vote = fusion.from_checkpoint(ckpt, "x", embed_dim=saved["bank"].shape[1], num_classes=saved["labels"].shape[1])
    assert len(vote.rows) == 0 and (vote.positions(saved["rows"].numpy()) == -1).all()


def test_scores_h5_of_another_image_list_is_an_error(done, reordered):
    info = read_dataset(done / "data" / "dataset.h5")
    saved = read_scores(done / "eval" / "scores.h5", info)
    assert [info.ids[r] for r in saved["rows"]] == [s.decode() for s in saved["ids"]]
    path = reordered.stage_dir("eval") / "scores.h5"
    with pytest.raises(InputError) as err:
        read_scores(path, read_dataset(reordered.dataset))
    assert str(err.value) == f"{path} was written for another image list than the dataset's (re-ingested since?): " \
                             "re-run retdmctl eval"


# --- the cache key: id list and precision -------------------------------------------------


def plant(path: Path, key: dict, n: int) -> None:
    """A cache file at ``path`` with ``key`` and features that no backbone makes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=np.full((n, 8), 7.0, np.float16))
        h5.attrs["key"] = json.dumps(key)


@pytest.fixture
def small(tmp_path, own_cache):  # a cache of its own: the planted files stay in this test
    from stages.ingest import read_source

    ws, cfg = Workspace(tmp_path / "w"), frozen_config()
    cfg.ingest.source, cfg.ingest.demo_images, cfg.ingest.demo_classes = "demo", 12, 3
    run_ingest(read_source(cfg), ws, IngestConfig(**FEW), QUIET)
    return ws, cfg, read_dataset(ws.dataset)


def test_a_cache_keyed_by_another_id_list_is_never_read(small, tmp_path):
    ws, cfg, info = small
    path = backbone_cache_path(ws, cfg, info, CPU)
    other = {**inputs.backbone_cache_key(ws, cfg, info, CPU), "ids": ids_digest(info.ids[::-1])}
    plant(path, other, len(info.ids))  # another list's cache, under this list's name
    assert ensure_backbone_cache(ws, cfg, info, CPU, QUIET) == path
    assert read_cache_key(path)["ids"] == info.ids_digest
    np.testing.assert_array_equal(read_features(path), fresh_features(ws, cfg, info, tmp_path))


def test_a_cache_made_in_another_precision_is_not_reused(small, tmp_path, monkeypatch):
    ws, cfg, info = small
    monkeypatch.setattr(inputs, "precision", lambda device: "bfloat16")  # as on a CUDA device
    cuda_path = backbone_cache_path(ws, cfg, info, CPU)
    plant(cuda_path, inputs.backbone_cache_key(ws, cfg, info, CPU), len(info.ids))
    assert ensure_backbone_cache(ws, cfg, info, CPU, QUIET) == cuda_path  # reused under its own precision
    monkeypatch.undo()
    path = ensure_backbone_cache(ws, cfg, info, CPU, QUIET)
    assert path != cuda_path and read_cache_key(path)["precision"] == "float32"
    np.testing.assert_array_equal(read_features(path), fresh_features(ws, cfg, info, tmp_path))


# --- the manifest's summary ---------------------------------------------------------------


def test_the_summary_reports_the_kept_epoch(tmp_path):
    history = [{"epoch": 1, "val_loss": 0.5, "val_mAP": 0.4, "kept": False},
               {"epoch": 2, "val_loss": 0.3, "val_mAP": 0.7, "kept": True},
               {"epoch": 3, "val_loss": 0.6, "val_mAP": 0.5, "kept": False}]
    summary = finish_training(tmp_path, {"stage": "x"}, history)
    assert summary == {"epochs": 3, "val_loss": 0.3, "val_mAP": 0.7, "kept_epoch": 2}

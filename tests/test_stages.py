"""Stages on tiny generated data: run, skip when up to date, re-run what a change
touches, resume after an interruption, train exactly the parameters they should."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import retdmctl.training.loop as loop
from retdmctl.errors import StageNotReadyError
from retdmctl.pipeline import Context, run_stage, status
from retdmctl.runtime import load_checkpoint
from retdmctl.workspace import Workspace
from stages import BY_NAME, PIPELINE
from tests.conftest import run_all, run_stages, tiny_config

NAMES = [s.name for s in PIPELINE]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("work"))
    cfg = tiny_config()
    ran = run_all(ws, cfg)
    return ws, cfg, ran


def test_every_stage_runs_and_writes_its_artifacts(finished):
    ws, cfg, ran = finished
    assert ran == dict.fromkeys(NAMES, True)
    for rel in ("data/images.lmdb", "data/dataset.h5", "knn.h5", "classifier/checkpoint.pt", "classifier/features.h5",
                "metric/checkpoint.pt", "joint/checkpoint.pt", "eval/scores.h5", "eval/metrics.json", "eval/report.html"):
        assert (ws.root / rel).exists(), rel
    assert not list(ws.root.rglob("resume.pt"))
    manifest = ws.read_manifest("knn")
    assert manifest["config"]["knn"] == {"k": 4, "index": "auto"} and manifest["config"]["labels"]["protocol"] == "full"
    assert manifest["version"]


def test_eval_writes_the_test_scores_and_their_metrics(finished):
    import json

    import h5py
    import numpy as np

    from retdmctl.data.dataset import read_dataset
    from retdmctl.metrics import compute_metrics
    from retdmctl.model_io.checkpoint import decision_rule

    ws, cfg, _ = finished
    info = read_dataset(ws.dataset)
    with h5py.File(ws.stage_dir("eval") / "scores.h5") as h5:
        rows, scores, labels = h5["rows"][()], h5["scores"][()], h5["labels"][()]
    assert list(rows) == list(info.split("test")) and (labels == info.labels[rows]).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    saved = json.loads((ws.stage_dir("eval") / "metrics.json").read_text())
    cut = np.array([saved["thresholds"]["values"][name] for name in info.class_names])
    assert saved["thresholds"]["rule"] == "per_class"
    ckpt = load_checkpoint(ws.stage_dir("joint") / "checkpoint.pt")
    # the thresholds chosen on validation for the scores eval wrote (fused with the
    # neighbour vote where validation chose one)
    rule = decision_rule(ckpt, "x", num_classes=info.num_classes, embed_dim=cfg.model.embed_dim, apply_vote=True)
    assert list(cut) == rule.choice["per_class"] == ckpt["thresholds"]
    assert saved["fusion"] == (None if ckpt["fusion"]["w"] == 0 else
                               {"k": ckpt["fusion"]["k"], "temp": ckpt["fusion"]["temp"], "w": ckpt["fusion"]["w"],
                                "bank_images": len(info.split("train")), "search": "exact"})
    assert saved["metrics"] == pytest.approx(compute_metrics(labels, scores, threshold=cut))
    assert saved["checkpoint"] == "joint/checkpoint.pt" and set(saved["per_class_ap"]) == set(info.class_names)
    page = (ws.stage_dir("eval") / "report.html").read_text()
    assert all(name in page for name in info.class_names)
    assert "every label (no protocol, no unknown entry)" in page  # the training labels row


def test_leftovers_of_a_killed_writer_are_removed_on_the_next_run(tmp_path):
    ws, cfg = Workspace(tmp_path), tiny_config()
    ctx = Context(ws, cfg, Console(file=io.StringIO()))
    run_stage(ctx, BY_NAME["ingest"], PIPELINE)
    leftover = ws.knn.with_name(".knn.h5.tmp-99999")  # as kill -9 mid-write leaves it
    leftover.write_bytes(b"half")
    run_stage(ctx, BY_NAME["knn"], PIPELINE)
    assert not leftover.exists() and ws.knn.exists()


def test_rerun_skips_everything(finished):
    ws, cfg, _ = finished
    assert run_all(ws, cfg) == dict.fromkeys(NAMES, False)
    assert all(status(ws, cfg, s, PIPELINE).state == "done" for s in PIPELINE)


def test_changing_knn_reruns_knn_and_what_reads_it_but_nothing_before(finished):
    ws, cfg, _ = finished
    cfg.knn.k = 3
    assert status(ws, cfg, BY_NAME["knn"], PIPELINE).state == "stale"
    ran = run_all(ws, cfg)
    # the classifier reads neither knn.h5 nor anything knn writes: it stays up to date
    assert ran == {"ingest": False, "knn": True, "classifier": False, "metric": True, "joint": True, "eval": True}
    assert run_all(ws, cfg) == dict.fromkeys(NAMES, False)


def test_metric_stage_trains_only_psi_and_w_r(finished):
    ws, _, _ = finished
    clf = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")["model"]
    met = load_checkpoint(ws.stage_dir("metric") / "checkpoint.pt")["model"]
    joint = load_checkpoint(ws.stage_dir("joint") / "checkpoint.pt")["model"]
    assert not any(k.startswith("backbone.") for k in met)  # the CNN is not even loaded
    for key in met:
        same = torch.equal(met[key], clf[key])
        if key.startswith(("label_net.", "rec_head.")):
            assert not same, f"metric stage did not train {key}"
        else:
            assert same, f"metric stage changed {key}"
    # the joint stage fine-tunes everything, the CNN included
    for key in ("backbone.net.0.weight", "embed.0.weight", "cls_head.weight", "label_net.fc1.weight"):
        ref = met.get(key, clf.get(key))
        assert not torch.equal(joint[key], ref), key


def test_classifier_stage_trains_phi_and_w_c_only(tmp_path, monkeypatch):
    ws, cfg = Workspace(tmp_path), tiny_config()
    cfg.classifier.epochs = 1
    captured = {}
    real_fit = loop.fit

    def spy(**kw):
        captured["params"] = {id(p) for group in kw["params"] for p in group["params"]}
        captured["model"] = kw["model"]
        return real_fit(**kw)

    monkeypatch.setattr("stages.classifier.fit", spy)
    run_stages(ws, cfg, "ingest", "classifier")
    model = captured["model"]
    trained = {n for n, p in model.named_parameters() if id(p) in captured["params"]}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(("backbone.", "embed.", "cls_head."))}


@pytest.mark.parametrize(
    "stage, before, cut, total",
    [("classifier", ["ingest"], 2, 3), ("joint", ["ingest", "knn", "classifier", "metric"], 1, 2)],
)
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, stage, before, cut, total):
    cfg = tiny_config()
    ref_ws, ws = Workspace(tmp_path / "ref"), Workspace(tmp_path / "cut")
    for w in (ref_ws, ws):
        for name in before:
            run_stage(Context(w, cfg, Console(file=io.StringIO())), BY_NAME[name], PIPELINE)
    run_stage(Context(ref_ws, cfg, Console(file=io.StringIO())), BY_NAME[stage], PIPELINE)

    real_save = loop.save_checkpoint

    def save_then_die(path, state, **kw):
        real_save(path, state, **kw)
        if state["epoch"] == cut:
            raise KeyboardInterrupt  # as if Ctrl-C arrived right after this epoch

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    ctx = Context(ws, cfg, Console(file=io.StringIO()))
    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx, BY_NAME[stage], PIPELINE)
    stage_dir = ws.stage_dir(stage)
    assert not (stage_dir / "checkpoint.pt").exists()  # no half-artifact for the next stage
    assert status(ws, cfg, BY_NAME[stage], PIPELINE).state == "missing"
    if stage == "classifier":
        run_stage(ctx, BY_NAME["knn"], PIPELINE)
        assert not (stage_dir / "features.h5").exists()
        with pytest.raises(StageNotReadyError, match=r"^classifier/checkpoint.pt does not exist yet: "
                           r"run `retdmctl train --stage classifier` first$"):
            run_stage(ctx, BY_NAME["metric"], PIPELINE)

    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    out = io.StringIO()
    assert run_stage(Context(ws, cfg, Console(file=out)), BY_NAME[stage], PIPELINE)
    assert f"resuming after epoch {cut} of {total}" in out.getvalue()
    got = load_checkpoint(stage_dir / "checkpoint.pt")
    ref = load_checkpoint(ref_ws.stage_dir(stage) / "checkpoint.pt")
    assert [h["epoch"] for h in got["history"]] == list(range(1, total + 1))
    for key in ref["model"]:
        assert torch.allclose(got["model"][key].float(), ref["model"][key].float(), atol=1e-6), key


def test_frozen_backbone_mode_caches_features_once(tmp_path, own_cache):
    ws, cfg = Workspace(tmp_path), tiny_config(frozen=True)
    cfg.joint.way2 = "forward"
    ran = run_all(ws, cfg)
    assert ran == dict.fromkeys(NAMES, True)
    from retdmctl.inputs import backbone_cache_path

    cache = backbone_cache_path(ws, cfg)
    assert ws.cache_dir == own_cache and list((own_cache / "backbone").glob("*.h5")) == [cache]
    mtime = cache.stat().st_mtime_ns
    cfg.classifier.lr = 0.02  # re-runs the classifier, but the backbone features still fit
    ran = run_all(ws, cfg)
    assert ran == {"ingest": False, "knn": False, "classifier": True, "metric": True, "joint": True, "eval": True}
    assert cache.stat().st_mtime_ns == mtime and backbone_cache_path(ws, cfg) == cache
    cfg.model.image_size = 48  # other features: a second cache beside the first, never replacing it
    run_all(ws, cfg)
    assert cache.stat().st_mtime_ns == mtime and len(list((own_cache / "backbone").glob("*.h5"))) == 2
    ckpt = load_checkpoint(ws.stage_dir("joint") / "checkpoint.pt")
    assert ckpt["frozen_backbone"] and not any(k.startswith("backbone.") for k in ckpt["model"])


def test_way2_forward_needs_frozen_backbone(tmp_path):
    cfg = tiny_config()
    cfg.joint.way2 = "forward"
    ctx = Context(Workspace(tmp_path), cfg, Console(file=io.StringIO()))
    with pytest.raises(StageNotReadyError, match=r"^joint.way2 = 'forward' needs model.frozen_backbone = true"):
        run_stage(ctx, BY_NAME["joint"], PIPELINE)


def test_param_groups_scale_the_backbone_learning_rate():
    from retdmctl.models.backbones import build_backbone
    from retdmctl.models.retdm import RETDM

    backbone, spec = build_backbone("tiny_cnn")
    model = RETDM(5, spec.out_dim, 16, backbone=backbone)
    heads, body = model.param_groups(model.image_parameters(), 0.1)
    assert body["lr_mult"] == 0.1 and {id(p) for p in body["params"]} == {id(p) for p in backbone.parameters()}
    assert heads["lr_mult"] == 1.0 and len(heads["params"]) == 4  # embed and W_c, weights and biases
    frozen = RETDM(5, spec.out_dim, 16)
    assert [g["lr_mult"] for g in frozen.param_groups(frozen.image_parameters(), 0.1)] == [1.0]

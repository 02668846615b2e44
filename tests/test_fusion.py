"""The neighbour vote fused with the classifier (retdmctl.fusion): against a hand
computation, chosen on validation only, and applied alike by eval, predict and export."""

from __future__ import annotations

import dataclasses
import io
import json

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

from retdmctl import fusion, thresholds
from retdmctl.cli import app
from retdmctl.config import Config
from retdmctl.data.dataset import read_dataset
from retdmctl.data.loaders import decode
from retdmctl.data.store import ImageReader
from retdmctl.inference import load_predictor
from retdmctl.metrics import compute_metrics
from retdmctl.pipeline import Context
from retdmctl.inputs import image_source
from retdmctl.model_io.checkpoint import build_model, decision_rule, restore_image_model
from retdmctl.model_io.scoring import predict_with_embeddings
from retdmctl.training.decision import choose_decision
from retdmctl.runtime import load_checkpoint
from stages import BY_NAME
from tests.conftest import runner, trained_workspace

CPU = torch.device("cpu")


def hand_vote(bank, labels, f, k, temp, skip=None):
    """The vote of DESIGN's kNN decoding, written out with NumPy for one query row."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = f / np.linalg.norm(f)
    sims = [(float(b[j] @ q), j) for j in range(len(b)) if j != skip]
    top = sorted(sims, reverse=True)[:k]
    e = np.array([np.exp(s / temp) for s, _ in top])
    return sum(wj / e.sum() * labels[j] for wj, (_, j) in zip(e, top))


def test_vote_and_fusion_match_a_hand_computation():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(7, 3))
    labels = rng.integers(0, 2, size=(7, 4)).astype(np.float32)
    f = rng.normal(size=(2, 3))
    p = rng.uniform(size=(2, 4)).astype(np.float32)
    vote = fusion.NeighbourVote(torch.from_numpy(bank).float(), torch.from_numpy(labels), torch.arange(7), k=3, temp=0.5, w=0.3)
    got = vote(torch.from_numpy(f).float(), torch.from_numpy(p)).numpy()
    for i in range(2):
        want = 0.7 * p[i] + 0.3 * hand_vote(bank, labels, f[i], 3, 0.5)
        assert np.allclose(got[i], want, atol=1e-6)


def test_a_bank_image_never_votes_for_itself():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(6, 3))
    labels = rng.integers(0, 2, size=(6, 2)).astype(np.float32)
    rows = np.array([3, 8, 9, 14, 20, 21])  # dataset rows of the bank images
    vote = fusion.NeighbourVote(torch.from_numpy(bank).float(), torch.from_numpy(labels), torch.from_numpy(rows), 2, 0.1, 1.0)
    query_rows = np.array([9, 5, 21])  # 9 and 21 are in the bank, 5 is not
    pos = vote.positions(query_rows)
    assert pos.tolist() == [2, -1, 5]
    f = torch.from_numpy(bank[[2, 0, 5]]).float()
    got = vote.vote(f, pos).numpy()
    assert np.allclose(got[0], hand_vote(bank, labels, bank[2], 2, 0.1, skip=2), atol=1e-6)
    assert np.allclose(got[1], hand_vote(bank, labels, bank[0], 2, 0.1), atol=1e-6)  # not excluded: itself at cos 1
    assert np.allclose(got[2], hand_vote(bank, labels, bank[5], 2, 0.1, skip=5), atol=1e-6)


def clustered(rng, n, classes=4, dim=8):
    """Embeddings that cluster by label set (the same centres for every call with the
    same ``rng`` state's first draw): neighbours know the labels."""
    y = (rng.uniform(size=(n, classes)) < 0.35).astype(np.uint8)
    y[np.arange(n), rng.integers(0, classes, n)] = 1
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    return y @ centres + rng.normal(size=(n, dim)), y


def mean_ap(y, s):
    return compute_metrics(y, s)["mAP"]


def test_choose_takes_the_vote_where_it_helps_validation():
    rng = np.random.default_rng(2)
    train_f, train_y = clustered(rng, 200)
    val_f, val_y = clustered(rng, 80)
    val_p = np.clip(0.5 * val_y + rng.uniform(size=val_y.shape), 0, 1).astype(np.float32)  # a weak classifier
    got = fusion.choose(train_f, train_y, np.arange(200), val_f, val_p, val_y)
    assert got["w"] > 0 and got["val_mAP"] > got["plain_val_mAP"] + 0.01
    assert got["plain_val_mAP"] == pytest.approx(mean_ap(val_y, val_p))
    # the reported validation mAP and thresholds are those of the vote it returns
    vote = fusion.NeighbourVote(got["bank"].float(), got["labels"], got["rows"], got["k"], got["temp"], got["w"])
    fused = vote(torch.from_numpy(val_f).float(), torch.from_numpy(val_p)).numpy()
    assert got["val_mAP"] == mean_ap(val_y, fused)  # the saved (float16) bank reproduces the choice exactly
    assert got["threshold_choice"] == thresholds.choose(val_y, fused)
    # no grid point beats the one chosen
    for k in fusion.GRID["k"]:
        for t in fusion.GRID["temp"]:
            for w in fusion.GRID["w"]:
                other = fusion.NeighbourVote(torch.from_numpy(train_f).float(), torch.from_numpy(train_y), torch.arange(200), k, t, w)
                s = other(torch.from_numpy(val_f).float(), torch.from_numpy(val_p)).numpy()
                assert mean_ap(val_y, s) <= got["val_mAP"] + 1e-6


def test_choose_switches_the_vote_off_where_it_does_not_help():
    rng = np.random.default_rng(3)
    train_f, train_y = rng.normal(size=(100, 8)), (rng.uniform(size=(100, 4)) < 0.4).astype(np.uint8)
    val_f, val_y = rng.normal(size=(40, 8)), (rng.uniform(size=(40, 4)) < 0.4).astype(np.uint8)
    val_y[0], val_y[1] = 1, 0
    val_p = val_y * 0.6 + 0.2  # a perfect ranking: nothing can beat it
    got = fusion.choose(train_f, train_y, np.arange(100), val_f, val_p.astype(np.float32), val_y)
    assert got["w"] == 0.0 and got["val_mAP"] == got["plain_val_mAP"] == 1.0
    ckpt = {"fusion": got, "threshold_choice": {"global": 0.5, "per_class": [0.5] * 4}}
    assert fusion.from_checkpoint(ckpt, "x", embed_dim=8, num_classes=4) is None  # w = 0: plain scores
    assert decision_rule(ckpt, "x", num_classes=4, embed_dim=8, apply_vote=True).choice == ckpt["threshold_choice"]


def test_a_vote_that_does_not_fit_the_model_is_refused():
    rng = np.random.default_rng(4)
    train_f, train_y = clustered(rng, 50)
    val_f, val_y = clustered(rng, 20)
    got = fusion.choose(train_f, train_y, np.arange(50), val_f, rng.uniform(size=val_y.shape).astype(np.float32), val_y)
    got["w"] = 0.2
    with pytest.raises(Exception, match=r"its neighbour vote does not fit the model \(bank \(50, 8\), labels \(50, 4\), "
                                        r"embedding 16, 4 classes\)"):
        fusion.from_checkpoint({"fusion": got}, "ckpt.pt", embed_dim=16, num_classes=4)


# --- in the product ----------------------------------------------------------------------


def tiny_config() -> Config:
    from test_predict import tiny_config as predict_config

    cfg = predict_config()  # tiny CNN fine-tuned on the demo set, 2 epochs
    cfg.ingest.demo_images = 80
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = tiny_config()
    return trained_workspace(tmp_path_factory.mktemp("work"), cfg), cfg


def restored(ws, cfg, info):
    model, spec = build_model(cfg, info.num_classes, pretrained=False)
    restore_image_model(model, load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt"), cfg, "ckpt")
    return model, image_source(ws, cfg, info, spec)


def plain_scores(ws, cfg, info, rows):
    """(scores, labels, f) of the classifier alone; the image store closed again after."""
    model, source = restored(ws, cfg, info)
    try:
        return predict_with_embeddings(model, source, rows, CPU)
    finally:
        source.reader.close()


def test_the_choice_reads_training_and_validation_rows_only(trained):
    """Scrambling every test label changes nothing the stage chooses; the bank holds the
    training rows only."""
    ws, cfg = trained
    info = read_dataset(ws.dataset)
    model, source = restored(ws, cfg, info)
    a = choose_decision(model, source, info, CPU)
    labels = info.labels.copy()
    test = info.split("test")
    labels[test] = 1 - labels[test]
    b = choose_decision(model, source, dataclasses.replace(info, labels=labels), CPU)
    source.reader.close()
    assert a["threshold_choice"] == b["threshold_choice"] and a["thresholds"] == b["thresholds"]
    for key in ("k", "temp", "w", "val_mAP", "plain_val_mAP", "threshold_choice"):
        assert a["fusion"][key] == b["fusion"][key]
    assert torch.equal(a["fusion"]["bank"], b["fusion"]["bank"])
    assert a["fusion"]["rows"].tolist() == info.split("train").tolist()
    # and the checkpoint holds the same choice the stage made
    saved = load_checkpoint(ws.stage_dir("classifier") / "checkpoint.pt")
    assert saved["fusion"]["rows"].tolist() == info.split("train").tolist()
    rule = decision_rule(saved, "x", num_classes=info.num_classes, embed_dim=cfg.model.embed_dim, apply_vote=True)
    assert saved["thresholds"] == rule.choice["per_class"]
    summary = ws.read_manifest("classifier")["summary"]["fusion"]
    assert summary == {k: saved["fusion"][k] for k in ("k", "temp", "w", "val_mAP", "plain_val_mAP")}


@pytest.fixture(scope="module")
def fused(trained, tmp_path_factory):
    """The trained workspace with its checkpoint's vote forced on (k 3, t 0.1, w 0.4),
    whatever validation chose, so that every consumer must apply it."""
    ws, cfg = trained
    path = ws.stage_dir("classifier") / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["fusion"].update(k=3, temp=0.1, w=0.4)
    ckpt["fusion"]["threshold_choice"] = {"global": 0.3, "per_class": [0.2, 0.3, 0.4, 0.5, 0.6]}
    ckpt["thresholds"] = ckpt["fusion"]["threshold_choice"]["per_class"]
    torch.save(ckpt, path)
    return ws, cfg, ckpt


def run_eval(ws, cfg, split="test", fuse=True, report="none"):
    """The eval stage's own run (the CLI would first retrain the tampered classifier)."""
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, checkpoint="classifier", report=report, split=split,
                                                            fusion=fuse))
    BY_NAME["eval"].run(Context(ws, cfg, Console(file=io.StringIO())))
    with h5py.File(ws.stage_dir("eval") / "scores.h5") as h5:
        scores, rows = h5["scores"][()], h5["rows"][()]
    return scores, rows, json.loads((ws.stage_dir("eval") / "metrics.json").read_text())


def test_eval_fuses_with_the_saved_vote_and_its_thresholds(fused):
    ws, cfg, ckpt = fused
    info = read_dataset(ws.dataset)
    scores, rows, metrics = run_eval(ws, cfg, report="html")
    page = (ws.stage_dir("eval") / "report.html").read_text()
    assert (f"Scores fused with the vote of the 3 nearest of {len(info.split('train'))} training images in embedding "
            "space (temperature 0.1, weight 0.4), chosen on validation.") in page
    plain, labels, f = plain_scores(ws, cfg, info, rows)
    bank, bank_y = ckpt["fusion"]["bank"].float().numpy(), ckpt["fusion"]["labels"].numpy()
    want = np.stack([0.6 * plain[i] + 0.4 * hand_vote(bank, bank_y, f[i], 3, 0.1) for i in range(len(rows))])
    assert np.abs(scores - want).max() < 1e-5
    assert metrics["fusion"] == {"k": 3, "temp": 0.1, "w": 0.4, "bank_images": len(info.split("train")), "search": "exact"}
    assert list(metrics["thresholds"]["values"].values()) == [0.2, 0.3, 0.4, 0.5, 0.6]
    assert metrics["metrics"]["C-F1"] == pytest.approx(
        compute_metrics(labels, want, threshold=np.array([0.2, 0.3, 0.4, 0.5, 0.6]))["C-F1"], abs=1e-9)
    # --no-fusion: the classifier's scores, at the thresholds chosen for them
    off, _, metrics_off = run_eval(ws, cfg, fuse=False)
    assert np.abs(off - plain).max() < 1e-6 and metrics_off["fusion"] is None
    assert list(metrics_off["thresholds"]["values"].values()) == ckpt["threshold_choice"]["per_class"]


def test_eval_on_the_training_split_leaves_each_image_out_of_its_own_vote(fused):
    ws, cfg, ckpt = fused
    info = read_dataset(ws.dataset)
    scores, rows, _ = run_eval(ws, cfg, split="train")
    plain, _, f = plain_scores(ws, cfg, info, rows)
    bank, bank_y = ckpt["fusion"]["bank"].float().numpy(), ckpt["fusion"]["labels"].numpy()
    pos = {int(r): i for i, r in enumerate(ckpt["fusion"]["rows"].tolist())}
    want = np.stack([0.6 * plain[i] + 0.4 * hand_vote(bank, bank_y, f[i], 3, 0.1, skip=pos[int(r)])
                     for i, r in enumerate(rows)])
    assert np.abs(scores - want).max() < 1e-5


def test_predict_gives_eval_scores_with_the_vote(fused, tmp_path):
    ws, cfg, ckpt = fused
    info = read_dataset(ws.dataset)
    scores, rows, _ = run_eval(ws, cfg)
    predictor = load_predictor(ws.root, device="cpu")
    assert predictor.vote is not None and list(predictor.thresholds) == [0.2, 0.3, 0.4, 0.5, 0.6]
    reader = ImageReader(ws.lmdb)
    images = [decode(reader.get(info.ids[r])) for r in rows]
    reader.close()
    assert np.abs(predictor.predict(images) - scores).max() < 1e-5
    plain = load_predictor(ws.root, device="cpu", fusion=False)
    assert plain.vote is None and list(plain.thresholds) == ckpt["threshold_choice"]["per_class"]
    # through the CLI, --no-fusion reaches the loader
    paths = []
    for n, img in enumerate(images[:3]):
        paths.append(tmp_path / f"{n}.png")
        img.save(paths[-1])
    on = runner.invoke(app, ["-w", str(ws.root), "predict", *map(str, paths), "--format", "jsonl"])
    off = runner.invoke(app, ["-w", str(ws.root), "predict", *map(str, paths), "--format", "jsonl", "--no-fusion"])
    assert on.exit_code == off.exit_code == 0, on.output + off.output
    got_on = [list(json.loads(line)["scores"].values()) for line in on.stdout.splitlines()]
    got_off = [list(json.loads(line)["scores"].values()) for line in off.stdout.splitlines()]
    assert np.abs(np.array(got_on) - predictor.predict(images[:3])).max() < 1e-5
    assert np.abs(np.array(got_off) - plain.predict(images[:3])).max() < 1e-5


def test_onnx_export_carries_the_vote(fused, tmp_path):
    pytest.importorskip("onnx", reason="onnx is absent: pip install 'retdmctl[export]'")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is absent: pip install 'retdmctl[export]'")
    import onnx

    ws, _, _ = fused
    out = tmp_path / "fused.onnx"
    result = runner.invoke(app, ["-w", str(ws.root), "export", "--format", "onnx", "--output", str(out), "--checkpoint", "classifier"])
    assert result.exit_code == 0, result.output
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["retdmctl"])
    assert meta["fusion"]["k"] == 3 and meta["thresholds"] == [0.2, 0.3, 0.4, 0.5, 0.6]
    predictor = load_predictor(ws.root, "classifier", device="cpu")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    (probs,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": x.numpy()})
    assert np.abs(probs - predictor.predict_tensor(x)).max() < 1e-4


def test_onnx_export_puts_large_weights_in_a_data_file_beside_the_model(fused, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="onnx is absent: pip install 'retdmctl[export]'")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is absent: pip install 'retdmctl[export]'")
    import onnx

    from retdmctl import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1000)  # the tiny model's weights are past it
    ws, _, _ = fused
    out = tmp_path / "fused.onnx"
    result = runner.invoke(app, ["-w", str(ws.root), "export", "--format", "onnx", "--output", str(out), "--checkpoint", "classifier"])
    assert result.exit_code == 0, result.output
    data = tmp_path / "fused.onnx.data"
    assert (f"its weights are in {data}: keep that file beside fused.onnx, it must travel with the model"
            in " ".join(result.output.split()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx", "fused.onnx.data"]  # no temporary left
    assert data.stat().st_size > 10 * out.stat().st_size
    meta = json.loads({p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}["retdmctl"])
    assert meta["external_data"] == "fused.onnx.data" and meta["fusion"]["search"] == "exact"
    predictor = load_predictor(ws.root, "classifier", device="cpu")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    (probs,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["probabilities"], {"images": x.numpy()})
    assert np.abs(probs - predictor.predict_tensor(x)).max() < 1e-4
    # exported again under the threshold: one file, the stale weights removed
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1 << 40)
    result = runner.invoke(app, ["-w", str(ws.root), "export", "--format", "onnx", "--output", str(out), "--checkpoint", "classifier"])
    assert result.exit_code == 0 and "travel" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx"]


def test_export_refuses_a_vote_that_searches_an_approximate_index(fused, tmp_path):
    pytest.importorskip("onnx", reason="onnx is absent: pip install 'retdmctl[export]'")
    from retdmctl.fusion.search import train_ivf

    ws, _, ckpt = fused
    ckpt = {**ckpt, "fusion": {**ckpt["fusion"], "search": train_ivf(ckpt["fusion"]["bank"].float())}}
    path = tmp_path / "ivf.pt"
    torch.save(ckpt, path)
    n = len(ckpt["fusion"]["rows"])
    for fmt, name in (("onnx", "ONNX"), ("torchscript", "TorchScript")):
        result = runner.invoke(app, ["-w", str(ws.root), "export", "--format", fmt, "--output", str(tmp_path / "m"),
                                     "--checkpoint", str(path)])
        assert result.exit_code == 1
        assert result.output == (f"error: this model's neighbour vote searches an approximate index (ivf, {n} training "
                                 f"images) that {name} cannot reproduce: export with --no-fusion\n")
    assert not (tmp_path / "m").exists()
    plain = runner.invoke(app, ["-w", str(ws.root), "export", "--format", "onnx", "--output", str(tmp_path / "m.onnx"),
                                "--checkpoint", str(path), "--no-fusion"])
    assert plain.exit_code == 0, plain.output
    # predict applies the IVF vote as saved: scanning all its lists here, it finds the exact
    # search's neighbours, at float16 cosines
    predictor = load_predictor(path, device="cpu")
    assert predictor.vote.kind == "ivf" and predictor.metadata()["fusion"]["search"] == "ivf"
    assert predictor.vote.index.nprobe == predictor.vote.index.nlist == round(n ** 0.5)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = load_predictor(ws.root, "classifier", device="cpu")
    assert np.abs(predictor.predict_tensor(x) - exact.predict_tensor(x)).max() < 1e-2

"""Unknown labels (``?name``) in evaluation: every metric, threshold and validation choice
leaves them out instead of reading them as negative."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from retdmctl import fusion, thresholds
from retdmctl.data.dataset import read_dataset
from retdmctl.errors import InputError
from retdmctl.metrics import METRIC_NAMES, compute_metrics, per_class_average_precision
from retdmctl.workspace import Workspace
from tests.test_ingest_formats import make_jpeg
from tests.test_metrics import _random_case
from tests.conftest import run_all, tiny_config

skm = pytest.importorskip("sklearn.metrics")


def _masked_case(seed: int, decimals: int | None = None):
    """``_random_case`` with about a quarter of the entries unknown (labels 0 there), one
    image with every label unknown and one with a single known label."""
    y, s = _random_case(seed, decimals=decimals)
    rng = np.random.default_rng(100 + seed)
    known = rng.random(y.shape) > 0.25
    known[5] = False
    known[6] = False
    known[6, 1] = True
    return y * known, s, known


def _reference(y, s, known, cut) -> dict[str, float]:
    """Each metric by its definition on the known entries only, built from scikit-learn
    calls on the known rows of a class (label-based) or the known labels of an image
    (example-based)."""
    pred = s >= cut
    ap, cp, cr = [], [], []
    for c in range(y.shape[1]):
        k = known[:, c]
        if y[k, c].any():
            ap.append(skm.average_precision_score(y[k, c], s[k, c]))
            cp.append(skm.precision_score(y[k, c], pred[k, c], zero_division=0))
            cr.append(skm.recall_score(y[k, c], pred[k, c]))
    flat_y, flat_p = y[known], pred[known]
    rank, cov, one, lrap = [], [], [], []
    for i in range(y.shape[0]):
        k = known[i]
        yi, si = y[i, k], s[i, k]
        if not yi.any():
            continue  # images without a (known) true label are left out, as without a mask
        if len(yi) == 1:  # one known label, a positive (sklearn takes one column for binary)
            rank.append(0.0), cov.append(0.0), one.append(0.0), lrap.append(1.0)
            continue
        rank.append(skm.label_ranking_loss(yi[None], si[None]))
        cov.append(skm.coverage_error(yi[None], si[None]) - 1)
        one.append(float(yi[np.argmax(si)] == 0))
        lrap.append(skm.label_ranking_average_precision_score(yi[None], si[None]))
    c_p, c_r = np.mean(cp), np.mean(cr)
    return {
        "mAP": np.mean(ap), "C-P": c_p, "C-R": c_r, "C-F1": 2 * c_p * c_r / (c_p + c_r),
        "O-P": skm.precision_score(flat_y, flat_p, zero_division=0),
        "O-R": skm.recall_score(flat_y, flat_p),
        "O-F1": skm.f1_score(flat_y, flat_p),
        "hamming_loss": float(np.mean(flat_y != flat_p)),
        "ranking_loss": np.mean(rank), "coverage": np.mean(cov), "one_error": np.mean(one),
        "average_precision": np.mean(lrap),
    }


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_masked_metrics_match_sklearn_on_the_known_entries(seed, decimals):
    y, s, known = _masked_case(seed, decimals)
    got = compute_metrics(y, s, threshold=0.5, known=known)
    want = _reference(y, s, known, 0.5)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
    ap = per_class_average_precision(y, s, known)
    for c in range(y.shape[1]):
        k = known[:, c]
        if y[k, c].any():
            assert ap[c] == pytest.approx(skm.average_precision_score(y[k, c], s[k, c]), abs=1e-12)
        else:
            assert math.isnan(ap[c])


def test_unknown_entries_change_the_numbers_and_an_all_known_mask_changes_nothing():
    y, s, known = _masked_case(0)
    plain = compute_metrics(y, s, threshold=0.5)
    assert compute_metrics(y, s, threshold=0.5, known=np.ones_like(known)) == plain
    masked = compute_metrics(y, s, threshold=0.5, known=known)
    assert masked["mAP"] != pytest.approx(plain["mAP"]) and masked["O-P"] != pytest.approx(plain["O-P"])


def test_a_known_mask_of_the_wrong_shape_is_an_error():
    y, s, known = _masked_case(1)
    with pytest.raises(InputError, match=r"^known must have the labels' shape \(60, 7\), got \(60, 6\)$"):
        compute_metrics(y, s, known=known[:, :6])


def test_thresholds_are_chosen_on_the_known_entries_of_each_class():
    y, s, known = _masked_case(1)
    got = thresholds.best_class_thresholds(y, s, known=known)
    for c in range(y.shape[1]):
        k = known[:, c]
        # one class alone: its own F1 optimum over its known rows (every class has a positive)
        assert got[c] == thresholds.best_class_thresholds(y[k, c:c + 1], s[k, c:c + 1])[0], c
    # an unknown entry scored high is no false positive: the cut does not move for it
    # positives at 0.9 and 0.4, a known negative at 0.2, unknown entries at 0.5, 0.6, 0.7
    y2 = np.array([[1], [1], [0], [0], [0], [0]])
    s2 = np.array([[0.9], [0.4], [0.2], [0.5], [0.6], [0.7]])
    # read as negatives: cuts in (0.7, 0.9] (F1 2/3) beat cuts in (0.2, 0.4] (F1 4/7)
    assert thresholds.best_class_thresholds(y2, s2)[0] == 0.71
    known2 = np.array([[True], [True], [True], [False], [False], [False]])
    assert thresholds.best_class_thresholds(y2, s2, known=known2)[0] == 0.4  # F1 1 in (0.2, 0.4]


def test_the_vote_choice_reads_the_known_validation_entries():
    rng = np.random.default_rng(0)
    train_f, train_y = rng.normal(size=(30, 8)).astype(np.float32), (rng.random((30, 3)) < 0.4).astype(np.uint8)
    val_f, val_p = rng.normal(size=(12, 8)).astype(np.float32), rng.random((12, 3)).astype(np.float32)
    val_y = (rng.random((12, 3)) < 0.5).astype(np.uint8)
    known = rng.random((12, 3)) > 0.3
    val_y[0], known[0] = 1, True  # every class keeps a known positive
    val_y *= known
    got = fusion.choose(train_f, train_y, np.arange(30), val_f, val_p, val_y, known)
    assert got["plain_val_mAP"] == pytest.approx(np.nanmean(per_class_average_precision(val_y, val_p, known)))
    assert got["plain_val_mAP"] != pytest.approx(np.nanmean(per_class_average_precision(val_y, val_p)))


# --- through the stages -----------------------------------------------------------------
@pytest.fixture(scope="module")
def unknown_run(tmp_path_factory):
    """A csv set of 80 images with ?name labels in every split, through the whole pipeline."""
    root = tmp_path_factory.mktemp("unknown")
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "bird", "fish"]
    lines = []
    for i in range(80):
        y = rng.random(4) < 0.4
        y[i % 4] = True
        unknown = ~y & (rng.random(4) < 0.3)
        labels = [n for n, p in zip(names, y) if p] + ["?" + n for n, u in zip(names, unknown) if u]
        make_jpeg(root / "img" / f"{i}.jpg", size=(40, 40), seed=i)
        lines.append(f"{i}.jpg,{'|'.join(labels)}")
    (root / "labels.csv").write_text("path,labels\n" + "\n".join(lines) + "\n")
    cfg = tiny_config(frozen=True)
    cfg.ingest.source, cfg.ingest.path, cfg.ingest.images = "csv", str(root / "labels.csv"), str(root / "img")
    ws = Workspace(root / "work")
    ran = run_all(ws, cfg)
    return ws, cfg, ran


def test_eval_leaves_unknown_test_labels_out_and_says_so(unknown_run):
    ws, _, ran = unknown_run
    assert all(ran.values())
    info = read_dataset(ws.dataset)
    with h5py.File(ws.stage_dir("eval") / "scores.h5") as h5:
        rows, scores, labels, known = h5["rows"][()], h5["scores"][()], h5["labels"][()], h5["known"][()]
    assert np.array_equal(known, info.known[rows])
    unknown = int((~known).sum())
    assert unknown > 0
    saved = json.loads((ws.stage_dir("eval") / "metrics.json").read_text())
    assert saved["unknown_labels"] == {"entries": unknown, "images": int((~known).any(axis=1).sum())}
    cut = np.array([saved["thresholds"]["values"][n] for n in info.class_names])
    assert saved["metrics"] == pytest.approx(_reference(labels, scores, known, cut))
    assert saved["metrics"] != pytest.approx(compute_metrics(labels, scores, threshold=cut))  # not read as negative
    for c, name in enumerate(info.class_names):
        k = known[:, c]
        assert saved["per_class_ap"][name] == pytest.approx(skm.average_precision_score(labels[k, c], scores[k, c]))
    page = (ws.stage_dir("eval") / "report.html").read_text()
    assert f"{unknown} unknown (?name) in {saved['unknown_labels']['images']} images, left out of every metric" in page


def test_training_validation_reads_the_known_entries(unknown_run, monkeypatch):
    """The classifier's validation mAP (epoch choice), its vote and its thresholds all get
    the validation split's known mask."""
    import io

    from rich.console import Console

    from retdmctl.pipeline import Context, run_stage
    from retdmctl.training import decision
    from stages import BY_NAME, PIPELINE

    ws, cfg, _ = unknown_run
    info = read_dataset(ws.dataset)
    want = info.known[info.split("val")]
    assert not want.all()
    seen: dict[str, list] = {"metrics": [], "thresholds": [], "vote": []}
    metrics, choose, vote = decision.compute_metrics, thresholds.choose, fusion.choose
    monkeypatch.setattr(decision, "compute_metrics", lambda *a, **k: (seen["metrics"].append(k["known"]), metrics(*a, **k))[1])
    monkeypatch.setattr(thresholds, "choose", lambda y, s, known=None: (seen["thresholds"].append(known), choose(y, s, known))[1])
    monkeypatch.setattr(fusion, "choose", lambda *a, **k: (seen["vote"].append(a[-1]), vote(*a, **k))[1])
    assert run_stage(Context(ws, cfg, Console(file=io.StringIO()), force=True), BY_NAME["classifier"], PIPELINE)
    assert len(seen["metrics"]) == cfg.classifier.epochs and len(seen["vote"]) == 1 and len(seen["thresholds"]) == 2
    for known in seen["metrics"] + seen["thresholds"] + seen["vote"]:
        assert np.array_equal(known, want)


def test_status_names_the_datasets_unknown_labels(unknown_run):
    from typer.testing import CliRunner

    from retdmctl.cli import app

    ws, _, _ = unknown_run
    unknown = int((~read_dataset(ws.dataset).known).sum())
    result = CliRunner().invoke(app, ["--workdir", str(ws.root), "status"])
    assert result.exit_code == 0, result.output
    assert (f"training labels: protocol full (seed 0), unknown read as negative; the dataset has {unknown} unknown "
            "labels (?name), left out of validation and test metrics") in " ".join(result.output.split())

"""Model selection on validation: thresholds, the kept epoch, and test read only by eval."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from retdmctl import thresholds
from retdmctl.metrics import compute_metrics


def test_the_global_threshold_is_the_c_f1_optimum_of_a_constructed_example():
    # class 0 positives score 0.62-0.70, negatives 0.30-0.58: any cut in (0.58, 0.62] is
    # perfect for it; class 1 positives score 0.35-0.40, negatives 0.05-0.20. One global
    # cut must trade them off: at 0.21-0.35 class 0 gets every negative above 0.3.
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0], [0, 0]])
    s = np.array(
        [[0.62, 0.10], [0.66, 0.05], [0.70, 0.20], [0.30, 0.35], [0.40, 0.40], [0.45, 0.15], [0.58, 0.10], [0.50, 0.12]]
    )
    t = thresholds.best_global_threshold(y, s)
    # brute force over the grid: the chosen cut reaches the best C-F1 of any grid cut
    best = max(compute_metrics(y, s, threshold=g)["C-F1"] for g in thresholds.GRID)
    assert compute_metrics(y, s, threshold=t)["C-F1"] == pytest.approx(best)
    assert t == 0.35  # cuts in (0.30, 0.35]: class 0 P 3/7, R 1; class 1 P 1, R 1 -> C-F1 0.833


def test_per_class_thresholds_are_each_class_f1_optimum_and_ties_go_to_half():
    y = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0], [0, 0]])
    s = np.array(
        [[0.62, 0.10], [0.66, 0.05], [0.70, 0.20], [0.30, 0.35], [0.40, 0.40], [0.45, 0.15], [0.58, 0.10], [0.50, 0.12]]
    )
    t = thresholds.best_class_thresholds(y, s)
    # class 0: every cut in (0.58, 0.62] gives F1 1 -> 0.59..0.62, closest to 0.5: 0.59
    # class 1: every cut in (0.20, 0.35] gives F1 1 -> 0.21..0.35, closest to 0.5: 0.35
    assert list(t) == [0.59, 0.35]
    assert compute_metrics(y, s, threshold=t)["C-F1"] == 1.0


def test_a_class_without_validation_positives_keeps_the_global_threshold():
    y = np.array([[1, 0], [0, 0], [1, 0]])
    s = np.array([[0.9, 0.8], [0.2, 0.1], [0.7, 0.3]])
    t = thresholds.best_class_thresholds(y, s)
    assert t[1] == thresholds.best_global_threshold(y, s)


def test_resolve_applies_the_rule():
    choice = {"global": 0.4, "per_class": [0.3, 0.6]}
    assert list(thresholds.resolve(choice, "per_class", 0.5, 2)) == [0.3, 0.6]
    assert list(thresholds.resolve(choice, "global", 0.5, 2)) == [0.4, 0.4]
    assert list(thresholds.resolve(choice, "fixed", 0.7, 2)) == [0.7, 0.7]


def test_training_reads_only_train_and_val_rows_never_test(tmp_path, monkeypatch):
    """Every row a training stage scores or trains on is in train or val; test is read
    only by eval."""
    from tests.conftest import tiny_config

    import retdmctl.model_io.scoring as scoring
    from retdmctl.data.dataset import read_dataset
    from retdmctl.pipeline import Context, run_stage
    from retdmctl.workspace import Workspace
    from stages import BY_NAME, PIPELINE

    ws, cfg = Workspace(tmp_path), tiny_config(frozen=True)
    cfg.joint.way2 = "forward"
    seen: dict[str, set[int]] = {}
    real_predict = scoring.score_rows  # every scoring and embedding pass of a split goes through it
    stage_now = {"name": ""}

    def spy_predict(model, source, rows, device, vote):
        seen.setdefault(stage_now["name"], set()).update(int(r) for r in rows)
        return real_predict(model, source, rows, device, vote)

    monkeypatch.setattr(scoring, "score_rows", spy_predict)
    from retdmctl import sources

    real_train = sources.CachedSource.train_batches

    def spy_train(self, rows, seed):
        seen.setdefault(stage_now["name"], set()).update(int(r) for r in rows)
        return real_train(self, rows, seed)

    monkeypatch.setattr(sources.CachedSource, "train_batches", spy_train)
    ctx = Context(ws, cfg, Console(file=io.StringIO()))
    for stage in PIPELINE:
        stage_now["name"] = stage.name
        run_stage(ctx, BY_NAME[stage.name], PIPELINE)
    info = read_dataset(ws.dataset)
    test = set(info.split("test").tolist())
    for name in ("classifier", "metric", "joint"):
        assert seen[name] and not seen[name] & test, name
    assert seen["eval"] == test  # eval reads test, once, at the end

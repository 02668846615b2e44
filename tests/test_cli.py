"""The CLI through Typer's CliRunner: exact one-line errors, help, status, run/skip."""

from __future__ import annotations

import json
import re

import pytest

from retdmctl.cli import app
from tests.conftest import invoke, runner


def test_every_command_help_has_an_example():
    for cmd in (["knn"], ["train"], ["eval"], ["run"], ["status"], ["quickstart"], ["ingest", "demo"],
                ["ingest", "scene"], ["ingest", "csv"], ["ingest", "coco"], ["ingest", "voc"],
                ["ingest", "mirflickr"], ["ingest", "nuswide"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0, cmd
        assert "Example: retdmctl" in result.output, cmd


def test_demo_labels_option_is_documented_and_checked(tmp_path):
    help_text = runner.invoke(app, ["ingest", "demo", "--help"], terminal_width=200).output
    assert "--labels" in help_text and "--classes 20 --labels 4-6" in help_text
    result = invoke("--workdir", str(tmp_path), "ingest", "demo", "--labels", "12")
    assert (result.exit_code, result.output) == (  # a bad option value: a usage error
        2, "error: ingest.demo_labels must be K or MIN-MAX with 1 <= MIN <= MAX <= 9 (e.g. 4-6), got '12'\n")
    result = invoke("--workdir", str(tmp_path), "ingest", "demo", "--classes", "5", "--labels", "4-6")
    assert result.exit_code == 1
    assert result.output.endswith("error: demo: --labels 4-6 needs at least 6 classes, got --classes 5\n")


NO_DATASET = (
    "error: no dataset yet: run `retdmctl ingest <format> PATH` first "
    "(formats: demo, scene, csv, coco, voc, mirflickr, nuswide)\n"
)


def test_a_stage_without_a_dataset_names_the_command_to_run_first(tmp_path):
    for command in (["knn"], ["run"], ["train", "--stage", "metric"], ["eval"]):
        result = invoke("--workdir", str(tmp_path), *command)
        assert (result.exit_code, result.output) == (1, NO_DATASET), command
    assert not (tmp_path / "retdm.toml").exists()


def test_missing_path_is_a_one_line_error(tmp_path):
    result = invoke("--workdir", str(tmp_path), "ingest", "scene", str(tmp_path / "nope"))
    assert result.exit_code == 2  # a usage error
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "nope" in result.output and "does not exist" in result.output


def test_bad_label_csv_is_a_one_line_error(tmp_path):
    (tmp_path / "img").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg,cat,dog\n")
    result = invoke("--workdir", str(tmp_path / "w"), "ingest", "csv", str(labels), "--images", str(tmp_path / "img"))
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: {labels}: line 1: expected 2 columns (path,label1|label2|...), got 3"


def test_unknown_label_is_a_one_line_error(tmp_path):
    (tmp_path / "img").mkdir()
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg,cat\nb.jpg,dog|cow\n")
    result = invoke("--workdir", str(tmp_path / "w"), "ingest", "csv", str(labels), "--images", str(tmp_path / "img"),
                    "--classes", "cat,dog")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: {labels}: line 2: unknown label 'cow'"


def test_unreadable_images_only_are_an_error(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"not a jpeg")
    labels = tmp_path / "labels.csv"
    labels.write_text("a.jpg,cat\n")
    result = invoke("--workdir", str(tmp_path / "w"), "ingest", "csv", str(labels), "--images", str(tmp_path / "img"),
                    "--workers", "1")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: {labels}: no readable image with labels found"


def test_bad_config_value_is_a_one_line_error(tmp_path):
    (tmp_path / "retdm.toml").write_text("[knn]\nk = 3\n")
    result = invoke("--workdir", str(tmp_path), "run", "--set", "knn.k=ten")
    assert result.exit_code == 2  # a bad --set is a usage error
    assert result.output == "error: knn.k must be an integer, got 'ten'\n"
    result = invoke("--workdir", str(tmp_path), "train", "--stage", "classifier", "--backbone", "alexnet")
    assert result.exit_code == 2
    assert result.output == "error: unknown backbone 'alexnet'; known: efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet50, tiny_cnn, vgg16, or timm:<name>\n"
    assert (tmp_path / "retdm.toml").read_text() == "[knn]\nk = 3\n"  # rejected values are not kept


@pytest.mark.slow
def test_run_status_and_skip_through_the_cli(tmp_path):
    w = str(tmp_path)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        '[ingest]\ndemo_images = 60\ndemo_classes = 5\nworkers = 1\n'
        '[model]\nbackbone = "tiny_cnn"\npretrained = false\nimage_size = 32\nbatch_size = 16\n'
        '[runtime]\nworkers = 0\ndevice = "cpu"\n'
        '[classifier]\nepochs = 1\n[metric]\nepochs = 1\n[joint]\nepochs = 1\n[decision]\nfolds = 0\n'
    )
    assert invoke("--workdir", w, "--config", str(cfg), "ingest", "demo").exit_code == 0
    result = invoke("--workdir", w, "status")
    assert re.search(r"ingest\s+│\s+done", result.output) and re.search(r"knn\s+│\s+missing", result.output)
    result = invoke("--workdir", w, "run")
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output and "pipeline finished" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["mAP"] <= 1
    result = invoke("--workdir", w, "run")
    assert result.output.count("up to date, skipped") == 6
    # a knn option given to its command is saved, so the next run keeps it
    result = invoke("--workdir", w, "knn", "--k", "2")
    assert "knn: running (config changed: knn.k=2)" in result.output
    result = invoke("--workdir", w, "status")
    assert re.search(r"metric\s+│\s+stale", result.output)
    assert re.search(r"classifier\s+│\s+done", result.output)
    result = invoke("--workdir", w, "run")
    assert [line.split(":")[0] for line in result.output.splitlines() if ": running" in line] == ["metric", "joint", "eval"]


def test_version():
    from retdmctl import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output == f"retdmctl {__version__}\n"


def test_tune_blocks_and_views_need_a_frozen_backbone(tmp_path):
    args = ["-w", str(tmp_path), "train", "--stage", "classifier", "--finetune-backbone"]
    result = runner.invoke(app, [*args, "--tune-blocks", "2"])
    assert result.exit_code == 2  # flags that do not go together: a usage error
    assert result.output.strip() == ("error: model.tune_blocks applies to --frozen-backbone (cached inputs); "
                                     "fine-tuning trains the whole backbone on freshly augmented images")
    result = runner.invoke(app, [*args, "--views", "4"])
    assert result.exit_code == 2 and "error: model.views applies to --frozen-backbone" in result.output
    result = runner.invoke(app, ["-w", str(tmp_path), "run", "--frozen-backbone", "--tune-blocks", "17"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: model.tune_blocks must be <= 16 for efficientnet_lite0, got 17"
    assert not (tmp_path / "retdm.toml").exists()  # nothing saved


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
    """ingest (demo) + classifier, through the stages: a workspace eval can score."""
    from tests.test_predict import make_workspace

    return make_workspace(tmp_path_factory.mktemp("eval"))


def test_eval_report_none_removes_an_earlier_report_once_it_succeeded(trained_classifier, monkeypatch):
    ws, _ = trained_classifier
    w, report = str(ws.root), ws.stage_dir("eval") / "report.html"
    result = invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--report", "html")
    assert result.exit_code == 0, result.output
    assert report.exists() and "removed" not in result.output
    # an eval that fails leaves the earlier report (and its manifest) as they were
    import stages.evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(stages.evaluate, "compute_metrics", broken)
    assert invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--report", "none").exit_code != 0
    assert report.exists() and ws.read_manifest("eval")["config"]["eval"]["report"] == "html"
    monkeypatch.undo()
    result = invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--report", "none")
    assert result.exit_code == 0, result.output
    assert "eval: removed eval/report.html, an earlier evaluation's report (report = none)\n" in result.output
    assert not report.exists() and not list(report.parent.glob(".report.html*"))
    assert (report.parent / "metrics.json").exists() and "eval/report.html" not in ws.read_manifest("eval")["outputs"]
    # nothing to remove, nothing said
    result = invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--report", "none", "--force")
    assert result.exit_code == 0 and "removed" not in result.output


def test_eval_on_val_says_validation_made_the_choices(trained_classifier):
    ws, _ = trained_classifier
    w = str(ws.root)
    note = "validation chose the epoch, the thresholds and the neighbour vote: figures on the val split are " \
           "optimistic, not a test result"
    result = invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--split", "val", "--report", "html")
    assert result.exit_code == 0, result.output
    assert f"eval: {note}\n" in result.output
    saved = json.loads((ws.stage_dir("eval") / "metrics.json").read_text())
    assert saved["split"] == "val" and saved["split_note"] == note
    page = (ws.stage_dir("eval") / "report.html").read_text()
    assert f'<div class="note">{note[0].upper() + note[1:]}.</div>' in page
    # a fixed threshold was not chosen on validation; the test split gets no such note
    result = invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--split", "val", "--threshold", "0.5",
                    "--report", "none")
    assert "eval: validation chose the epoch and the neighbour vote: figures on the val split are optimistic, " \
           "not a test result\n" in result.output
    result = invoke("--workdir", w, "eval", "--checkpoint", "classifier", "--split", "test", "--report", "none")
    assert result.exit_code == 0 and "validation chose" not in result.output
    assert json.loads((ws.stage_dir("eval") / "metrics.json").read_text())["split_note"] is None

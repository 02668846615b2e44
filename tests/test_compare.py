"""``retdmctl compare``: runs side by side, their metrics and the config keys that differ,
as a table, JSON or Markdown; a workspace without metrics is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retdmctl.compare import compare, differing
from retdmctl.metrics import METRIC_NAMES
from tests.conftest import TINY_TOML, invoke, tiny_pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two evaluated workspaces ``a`` and ``b`` (3 classifier epochs in b) and an empty ``c``."""
    base = tmp_path_factory.mktemp("compare")
    (base / "a").mkdir()
    tiny_pipeline(base / "a")
    (base / "b").mkdir()
    tiny_pipeline(base / "b", TINY_TOML.replace("[classifier]\nepochs = 2", "[classifier]\nepochs = 3"))
    (base / "c").mkdir()
    (base / "c" / "retdm.toml").write_text(TINY_TOML)
    return base


def metrics(base: Path, name: str) -> dict[str, float]:
    return json.loads((base / name / "eval" / "metrics.json").read_text())["metrics"]


def test_compare_reads_the_metrics_and_the_differing_keys(runs):
    result = compare([runs / "a", runs / "b"])
    assert [r["workspace"] for r in result["runs"]] == [str(runs / "a"), str(runs / "b")]
    assert result["metrics"] == list(METRIC_NAMES) and len(METRIC_NAMES) == 12
    assert result["runs"][1]["metrics"] == {k: metrics(runs, "b")[k] for k in METRIC_NAMES}
    assert result["differing"] == {"classifier.epochs": [2, 3]}
    assert compare([runs / "a", runs / "a"])["differing"] == {}


def test_differing_keys_name_a_missing_one_as_none_and_values_show_as_written():
    from retdmctl.compare import to_markdown

    assert differing([{"x": 1, "y": 2}, {"x": 1}]) == {"y": [2, None]}
    result = {"runs": [{"workspace": "p", "metrics": {}}, {"workspace": "q", "metrics": {}}], "metrics": [],
              "higher_is_better": {}, "differing": {"loss.alpha": [1.0, 0.5], "model.weights_file": ["", "w.pt"],
                                                    "x": [None, True]}}
    assert to_markdown(result).splitlines() == [
        "| metric / config | p | q |", "|---|---:|---:|", "| loss.alpha | 1.0 | 0.5 |",
        '| model.weights_file | "" | w.pt |', "| x | - | True |"]


def test_markdown_output(runs, monkeypatch):
    monkeypatch.chdir(runs)
    result = invoke("compare", "a", "b", "--format", "md")
    assert result.exit_code == 0, result.output
    a, b = metrics(runs, "a"), metrics(runs, "b")
    arrow = {n: "↓" if n in ("hamming_loss", "ranking_loss", "coverage", "one_error") else "↑" for n in METRIC_NAMES}
    want = ["| metric / config | a | b |", "|---|---:|---:|"]
    want += [f"| {n} {arrow[n]} | {a[n]:.4f} | {b[n]:.4f} |" for n in METRIC_NAMES]
    want += ["| classifier.epochs | 2 | 3 |"]
    assert result.output.splitlines() == want


def test_json_output_to_a_file(runs, monkeypatch):
    monkeypatch.chdir(runs)
    result = invoke("compare", "a", "b", "-o", "out.json")
    assert (result.exit_code, result.output) == (0, "wrote out.json\n")
    written = json.loads((runs / "out.json").read_text())
    assert written == json.loads(invoke("compare", "a", "b", "--format", "json").output)
    assert written["differing"] == {"classifier.epochs": [2, 3]}
    assert written["runs"][0] == {"workspace": "a", "checkpoint": "joint/checkpoint.pt", "split": "test",
                                  "images": 12, "metrics": {n: metrics(runs, "a")[n] for n in METRIC_NAMES}}


def test_the_table(runs, monkeypatch):
    monkeypatch.chdir(runs)
    result = invoke("compare", "a", "b")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    a, b = metrics(runs, "a"), metrics(runs, "b")
    assert lines[0].strip() == "retdmctl compare"
    assert lines[2] == "┃ metric / config     ┃      a ┃      b ┃"
    assert lines[4] == f"│ mAP ↑               │ {a['mAP']:.4f} │ {b['mAP']:.4f} │"
    assert lines[-3] == "├─────────────────────┼────────┼────────┤"  # metrics above, config keys below
    assert lines[-2] == "│ classifier.epochs   │      2 │      3 │"


def test_a_workspace_without_metrics_is_one_line(runs, monkeypatch):
    monkeypatch.chdir(runs)
    result = invoke("compare", "a", "c")
    assert (result.exit_code, result.output) == (1, "error: c: no eval/metrics.json: run `retdmctl -w c eval` first\n")
    result = invoke("compare", "a", "nope")
    assert (result.exit_code, result.output) == (1, "error: workspace nope does not exist\n")
    (runs / "c" / "eval").mkdir()
    (runs / "c" / "eval" / "metrics.json").write_text("{}")
    result = invoke("compare", "a", "c")
    assert (result.exit_code, result.output) == (
        1, "error: c/eval/metrics.json: not a readable metrics file: run `retdmctl -w c eval --force`\n")

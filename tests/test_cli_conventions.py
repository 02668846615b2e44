"""The command-line conventions every command follows (docs/cli.md): help without Python
types, the exit codes, --set and -c/--config after the command, status --json."""

from __future__ import annotations

import json
import re

import click
import pytest
import typer

from retdmctl.cli import app
from tests.conftest import TINY_TOML, invoke, runner
from tests.test_predict import images, trained  # noqa: F401 - module fixtures: a trained workspace, image files


def _command_paths() -> list[list[str]]:
    """Every command and sub-command of the app, as the words that name it."""
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    paths: list[list[str]] = [[]]

    def walk(cmd, prefix: list[str]) -> None:
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            paths.append([*prefix, name])
            if hasattr(sub, "list_commands"):  # a group: ingest
                walk(sub, [*prefix, name])

    walk(group, [])
    return paths


TYPE_SYNTAX = (
    re.compile(r"list\["),
    re.compile(r"Optional\["),
    re.compile(r"<[^>\s]*>"),  # <list[str]>, <dir>, <file>, <auto|cpu|cuda>, <int>
    re.compile(r"\{[^}]*\}"),  # {PATH...}..., {path}, {a|b}
)


def test_no_help_text_shows_python_type_syntax():
    paths = _command_paths()
    assert ["ingest", "coco"] in paths and ["predict"] in paths and len(paths) >= 17
    for words in paths:
        result = runner.invoke(app, [*words, "--help"], terminal_width=200)
        assert result.exit_code == 0, words
        for pattern in TYPE_SYNTAX:
            assert not pattern.search(result.output), (words, pattern.pattern, pattern.search(result.output).group())
    predict = runner.invoke(app, ["predict", "--help"], terminal_width=200).output
    assert "Usage: root predict [OPTIONS] PATH..." in predict and "--device auto|cpu|cuda" in predict
    coco = runner.invoke(app, ["ingest", "coco", "--help"], terminal_width=200).output
    assert "[OPTIONS] JSON..." in coco and "--images DIR" in coco and "--split train|test" in coco
    assert "  PATH  The scene folder" in runner.invoke(app, ["ingest", "scene", "--help"], terminal_width=200).output


def test_quickstart_help_shows_its_own_default_workdir():
    text = " ".join(runner.invoke(app, ["quickstart", "--help"], terminal_width=200).output.split())
    assert "[default: ./retdm-quickstart]" in text and "./retdm-work" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["knn", "--k", "ten"], "error: Invalid value for '--k': Input should be a valid integer, unable to parse string as an integer"),
        (["predict"], "error: Missing argument 'PATH...'."),
        (["ingest", "scene"], "error: Missing argument 'PATH'."),
        (["knn", "--set", "knn.k=ten"], "error: knn.k must be an integer, got 'ten'"),
        (["eval", "--set", "k=5"], "error: --set 'k=5': expected SECTION.KEY=VALUE, e.g. knn.k=5"),
        (["ingest", "demo", "--set", "ingest.seed=x"], "error: ingest.seed must be an integer, got 'x'"),
        (["predict", "a.jpg", "--threshold", "2"], "error: --threshold must be between 0 and 1, got 2.0"),
        (["predict", "a.jpg", "--top-k", "-1"], "error: --top-k must be 0 or more, got -1"),
        (["status", "--bogus"], "error: No such option: --bogus"),
    ],
)
def test_a_usage_error_exits_2_with_one_line(tmp_path, args, message):
    result = invoke("-w", tmp_path, *args)
    assert (result.exit_code, result.output) == (2, message + "\n")
    assert not (tmp_path / "retdm.toml").exists()


def test_an_error_exits_1(tmp_path):
    result = invoke("-w", tmp_path / "none", "status")
    assert (result.exit_code, result.output) == (
        1, f"error: workspace {tmp_path / 'none'} does not exist: run `retdmctl ingest <format> PATH` first\n")
    (tmp_path / "retdm.toml").write_text("[knn]\nk = 'ten'\n")  # the file is wrong, not the command line
    result = invoke("-w", tmp_path, "knn", "--set", "knn.index=exact")
    assert (result.exit_code, result.output) == (1, "error: knn.k must be an integer, got 'ten'\n")


def test_skipped_files_exit_3_and_all_scored_exit_0(trained, images):  # noqa: F811
    ws, _ = trained
    root, paths, _ = images
    result = runner.invoke(app, ["-w", str(ws.root), "predict", str(root)])
    assert result.exit_code == 3 and result.stderr.splitlines()[-1] == "6 scored, 1 skipped"
    result = runner.invoke(app, ["-w", str(ws.root), "predict", str(paths[0])])
    assert result.exit_code == 0, result.output


def test_predict_reads_set_and_config_after_the_command(trained, images, tmp_path):  # noqa: F811
    ws, _ = trained
    _, paths, _ = images
    result = runner.invoke(app, ["predict", str(paths[0]), "-w", str(ws.root), "--set", "ingest.seed=7"])
    assert result.exit_code == 0, result.output  # only judged: the model is now out of date
    assert "warning: the classifier model is out of date" in result.stderr
    cfg = tmp_path / "cpu.toml"
    cfg.write_text('[runtime]\ndevice = "cpu"\n')
    result = runner.invoke(app, ["predict", str(paths[0]), "-w", str(ws.root), "-c", str(cfg), "--format", "jsonl"])
    assert result.exit_code == 0 and json.loads(result.stdout)["path"] == str(paths[0])


def test_config_and_set_after_the_command_and_status_json(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    w = tmp_path / "w"
    result = invoke("ingest", "demo", "-w", w, "-c", cfg, "--set", "ingest.demo_images=50")
    assert result.exit_code == 0, result.output
    saved = (w / "retdm.toml").read_text()
    assert "demo_images = 50" in saved and 'backbone = "tiny_cnn"' in saved  # -c after the command, --set over it
    result = invoke("status", "-w", w, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["workspace"] == str(w) and got["labels"] is None
    assert [s["name"] for s in got["stages"]] == ["ingest", "knn", "classifier", "metric", "joint", "eval"]
    first, second = got["stages"][:2]
    assert first == {"name": "ingest", "state": "done", "reason": first["reason"], "command": first["command"]}
    assert first["command"].startswith("retdmctl ingest") and second["state"] == "missing"
    table = invoke("status", "-w", w).output
    assert second["reason"] in " ".join(table.split()) or second["reason"].split()[0] in table


def test_eval_takes_set_for_this_evaluation_only(tmp_path):
    from tests.conftest import tiny_pipeline

    (tmp_path / "w").mkdir()
    w = tiny_pipeline(tmp_path / "w")
    before = (w / "retdm.toml").read_text()
    result = invoke("eval", "-w", w, "--set", "eval.split=val", "--set", "eval.report=none", "--checkpoint", "classifier")
    assert result.exit_code == 0, result.output
    metrics = json.loads((w / "eval" / "metrics.json").read_text())
    assert (metrics["split"], metrics["checkpoint"]) == ("val", "classifier/checkpoint.pt")
    assert (w / "retdm.toml").read_text() == before  # not saved

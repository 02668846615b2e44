"""Runs side by side: each workspace's evaluation metrics (``eval/metrics.json``) and the
config keys whose values differ between them.

A run's config is what its stages ran with (the ``config`` of every stage manifest under
``.retdm/manifests``), over its ``retdm.toml`` (with the defaults) for the options no
stage records. :func:`compare` reads them into one dict; :func:`to_json`,
:func:`to_markdown` and :func:`to_table` render it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from retdmctl.errors import ConfigError, RetdmError
from retdmctl.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from retdmctl.workspace import Workspace


def compare(paths: list[str | Path]) -> dict[str, Any]:
    """The metrics of the runs in ``paths`` (workspaces, each evaluated) and their differing
    config keys::

        {"runs": [{"workspace": "w1", "checkpoint": "joint", "split": "test", "images": 400,
                   "metrics": {"mAP": 0.81, ...}}, ...],
         "metrics": ["mAP", ...],                      # the 12, in METRIC_NAMES order
         "higher_is_better": {"mAP": true, ...},
         "differing": {"model.views": [1, 10], ...}}   # one value per run, in run order

    A workspace that does not exist or has no ``eval/metrics.json`` is a RetdmError."""
    runs, configs = [], []
    for path in paths:
        ws = Workspace(Path(path))
        if not ws.root.is_dir():
            raise RetdmError(f"workspace {path} does not exist")
        metrics_file = ws.stage_dir("eval") / "metrics.json"
        try:
            result = json.loads(metrics_file.read_text())
            metrics = {name: result["metrics"][name] for name in METRIC_NAMES}
        except FileNotFoundError:
            raise RetdmError(f"{path}: no eval/metrics.json: run `retdmctl -w {path} eval` first") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise RetdmError(f"{metrics_file}: not a readable metrics file: run `retdmctl -w {path} eval --force`") from None
        runs.append({"workspace": str(path), "checkpoint": result.get("checkpoint"), "split": result.get("split"),
                     "images": result.get("images"), "metrics": metrics})
        configs.append(run_config(ws))
    return {"runs": runs, "metrics": list(METRIC_NAMES), "higher_is_better": dict(HIGHER_IS_BETTER),
            "differing": differing(configs)}


def run_config(ws: Workspace) -> dict[str, Any]:
    """The run's config as flat ``section.key`` values: retdm.toml with the defaults,
    overridden by what each stage's manifest says it ran with."""
    try:
        sections = ws.load_config().to_dict()
    except ConfigError:
        sections = {}
    flat = {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
    for manifest in sorted(ws.manifests.glob("*.json")):
        try:
            config = json.loads(manifest.read_text()).get("config") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for section, values in config.items():
            if isinstance(values, dict):
                flat.update({f"{section}.{key}": value for key, value in values.items()})
    return flat


def differing(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The keys whose values are not the same in every config (None where one lacks it),
    sorted by key."""
    keys = sorted(set().union(*configs)) if configs else []
    out = {}
    for key in keys:
        values = [config.get(key) for config in configs]
        if any(value != values[0] for value in values[1:]):
            out[key] = values
    return out


def _cell(value: Any) -> str:
    """A config value as written in retdm.toml's terms (a missing one as -)."""
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, str) and value == "" else str(value)


def _rows(result: dict[str, Any]) -> list[tuple[str, list[str]]]:
    rows = []
    for name in result["metrics"]:
        arrow = "↑" if result["higher_is_better"][name] else "↓"
        rows.append((f"{name} {arrow}", [f"{run['metrics'][name]:.4f}" for run in result["runs"]]))
    for key, values in result["differing"].items():
        rows.append((key, [_cell(v) for v in values]))
    return rows


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2) + "\n"


def to_markdown(result: dict[str, Any]) -> str:
    """A Markdown table: one column a run, the metrics (↑ higher is better, ↓ lower), then
    the config keys that differ."""
    head = ["metric / config", *(run["workspace"] for run in result["runs"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(result["runs"])) + "|"]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in _rows(result)]
    if not result["differing"]:
        lines += ["", "The runs' configs are the same."]
    return "\n".join(lines) + "\n"


def to_table(result: dict[str, Any]) -> Table:
    """The same as a rich table (a line between the metrics and the config keys)."""
    table = Table(title="retdmctl compare")
    table.add_column("metric / config")
    for run in result["runs"]:
        table.add_column(escape(run["workspace"]), justify="right")
    rows = _rows(result)
    for i, (label, cells) in enumerate(rows):
        table.add_row(escape(label), *map(escape, cells), end_section=i == len(result["metrics"]) - 1)
    return table

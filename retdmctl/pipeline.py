"""Stages and the rule that decides whether one must run (the rule DVC uses).

A stage declares the config sections it reads, its inputs and its outputs. When it
finishes it writes a manifest: the config it ran with, the fingerprints of its inputs
and of its outputs. It is *up to date* while all three still match and every stage it
reads from is up to date too (:func:`status`, the one definition: ``retdmctl status``,
every command and predict's warning use it); a stage whose upstream re-ran also sees new
input fingerprints.

Under torchrun rank 0 makes every decision (run or skip) and writes every manifest; a
stage marked ``parallel`` (one that trains or scores) runs on every rank, the others on
rank 0 only while the rest wait. The number of processes is recorded in the manifest
(``world_size``) but is not part of the fingerprint: it never makes a stage stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from retdmctl import distributed
from retdmctl.config import Config, concrete, config_hash
from retdmctl.errors import StageNotReadyError
from retdmctl.atomic import remove_stale_tmp, transaction
from retdmctl.workspace import Workspace, now_iso


@dataclass
class Context:
    ws: Workspace
    cfg: Config
    console: Console
    force: bool = False

    def __post_init__(self) -> None:
        concrete(self.cfg)  # auto values (model.tune_blocks, model.views) made concrete


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # how a user runs it alone, named in "run ... first" errors
    sections: tuple[str, ...]  # the config sections whose values it depends on
    inputs: Callable[[Workspace, Config], list[Path]]  # artifacts of earlier stages
    outputs: Callable[[Workspace, Config], list[Path]]
    run: Callable[[Context], dict[str, Any]]  # does the work, returns a summary
    # raw files outside the workspace (a dataset's own folder), fingerprinted by stat
    sources: Callable[[Workspace, Config], list[Path]] = field(default=lambda ws, cfg: [])
    # when given, replaces the stat walk of ``sources``: one fingerprint of exactly what
    # the stage reads (ingest: the parsed labels and the stat of the images they name)
    source_fingerprint: Callable[[Workspace, Config], str | None] | None = None
    # a one-line reason the stage cannot run with this config, or None
    blocked: Callable[[Config], str | None] = field(default=lambda cfg: None)
    # runs on every rank under torchrun (trains or scores); else on rank 0 only
    parallel: bool = False


@dataclass(frozen=True)
class Status:
    state: str  # done | stale | missing
    reason: str


def input_fingerprints(ws: Workspace, cfg: Config, stage: Stage, *, walk: bool = False) -> dict[str, str | None]:
    """``walk``: the sources as a manifest written before ``source_fingerprint`` has them
    (a stat walk of each), so that such a workspace is not re-run by the upgrade alone."""
    fps = {ws.rel(p): ws.fingerprint(p) for p in stage.inputs(ws, cfg)}
    if stage.source_fingerprint is not None and not walk:
        fps["sources"] = stage.source_fingerprint(ws, cfg)
    else:
        fps.update({f"source:{p}": ws.fingerprint(p, content=False) for p in stage.sources(ws, cfg)})
    return fps


# --- is a stage up to date? -------------------------------------------------------------
# DVC's ``changed()``: small named checks, each a Status when the stage must run, or None.
# The stage's own checks compare its manifest with the workspace as it is now; the last,
# ``upstream_not_done``, makes a stage stale while any stage it reads from is not done,
# even before that stage re-ran (its outputs, and so this stage's inputs, are unchanged).
def never_run(ws: Workspace, cfg: Config, stage: Stage, manifest: dict | None) -> Status | None:
    return Status("missing", "never run") if manifest is None else None


def outputs_changed(ws: Workspace, cfg: Config, stage: Stage, manifest: dict) -> Status | None:
    for path in stage.outputs(ws, cfg):
        recorded = manifest["outputs"].get(ws.rel(path))
        if recorded is None or ws.fingerprint(path) != recorded:
            return Status("stale" if path.exists() else "missing", f"{ws.rel(path)} changed or missing")
    return None


def config_changed(ws: Workspace, cfg: Config, stage: Stage, manifest: dict) -> Status | None:
    if manifest["config_hash"] != config_hash(cfg.sections(stage.sections)):
        changed_keys = _changed_keys(manifest["config"], cfg.sections(stage.sections))
        return Status("stale", "config changed: " + ", ".join(changed_keys))
    return None


def inputs_changed(ws: Workspace, cfg: Config, stage: Stage, manifest: dict) -> Status | None:
    legacy = stage.source_fingerprint is not None and "sources" not in manifest["inputs"]
    current = input_fingerprints(ws, cfg, stage, walk=legacy)
    for name, fp in current.items():
        if manifest["inputs"].get(name) != fp:
            return Status("stale", f"input {name} changed")
    return None


OWN_CHECKS = (never_run, outputs_changed, config_changed, inputs_changed)


def changed(ws: Workspace, cfg: Config, stage: Stage) -> Status | None:
    """The first of the stage's own checks (its manifest against the workspace) that
    fails, or None when its manifest still matches."""
    concrete(cfg)  # a config read straight from retdm.toml still says "auto"
    manifest = ws.read_manifest(stage.name)
    for check in OWN_CHECKS:
        if (found := check(ws, cfg, stage, manifest)) is not None:
            return found
    return None


def upstream_not_done(ws: Workspace, cfg: Config, stage: Stage, stages: list[Stage],
                      known: dict[str, Status] | None = None) -> Status | None:
    """Stale while a stage that produces one of its inputs is not done (by this same
    rule, so a stale stage anywhere upstream counts)."""
    known = {} if known is None else known
    producers = dict.fromkeys(p.name for p in (producer_of(i, ws, cfg, stages) for i in stage.inputs(ws, cfg)) if p)
    by_name = {s.name: s for s in stages}
    behind = [name for name in producers if status(ws, cfg, by_name[name], stages, known).state != "done"]
    return Status("stale", f"upstream {', '.join(behind)} not up to date") if behind else None


def status(ws: Workspace, cfg: Config, stage: Stage, stages: list[Stage],
           known: dict[str, Status] | None = None) -> Status:
    """The one definition of up to date: done when the stage's own manifest matches
    (:func:`changed`) and every stage upstream of it is done (:func:`upstream_not_done`).
    ``stages`` is the pipeline; ``known`` caches the statuses of one look at the workspace."""
    known = {} if known is None else known
    if stage.name not in known:
        found = changed(ws, cfg, stage) or upstream_not_done(ws, cfg, stage, stages, known)
        if found is None:
            finished = (ws.read_manifest(stage.name) or {}).get("finished_at", "?")
            found = Status("done", f"up to date (finished {finished})")
        known[stage.name] = found
    return known[stage.name]


def _changed_keys(old: dict, new: dict) -> list[str]:
    keys = []
    for section, entries in new.items():
        for key, value in entries.items():
            if old.get(section, {}).get(key) != value:
                keys.append(f"{section}.{key}={value!r}")
    return keys or ["(sections)"]


def producer_of(path: Path, ws: Workspace, cfg: Config, stages: list[Stage]) -> Stage | None:
    for stage in stages:
        if path in stage.outputs(ws, cfg):
            return stage
    return None


def upstream(stage: Stage, ws: Workspace, cfg: Config, stages: list[Stage]) -> list[Stage]:
    """Every stage whose outputs ``stage`` reads, directly or not, in pipeline order."""
    needed: set[str] = set()
    todo = [stage]
    while todo:
        current = todo.pop()
        for path in current.inputs(ws, cfg):
            producer = producer_of(path, ws, cfg, stages)
            if producer is not None and producer.name not in needed:
                needed.add(producer.name)
                todo.append(producer)
    return [s for s in stages if s.name in needed]


def check_ready(ws: Workspace, cfg: Config, stage: Stage, stages: list[Stage]) -> None:
    """Raise StageNotReadyError unless every input exists, was completely produced, and
    its producer is up to date: a stage never reads a stale or missing input."""
    reason = stage.blocked(cfg)
    if reason:
        raise StageNotReadyError(reason)
    checked: set[str] = set()
    known: dict[str, Status] = {}
    for path in stage.inputs(ws, cfg):
        producer = producer_of(path, ws, cfg, stages)
        hint = f": run `{producer.command}` first" if producer else ""
        if not path.exists():
            raise StageNotReadyError(f"{ws.rel(path)} does not exist yet{hint}")
        if producer is None:
            continue
        manifest = ws.read_manifest(producer.name)
        if manifest is None or manifest["outputs"].get(ws.rel(path)) != ws.fingerprint(path):
            raise StageNotReadyError(f"{ws.rel(path)} is incomplete or was changed by hand{hint}")
        if producer.name not in checked:
            checked.add(producer.name)
            st = status(ws, cfg, producer, stages, known)
            if st.state != "done":
                raise StageNotReadyError(f"{ws.rel(path)} is out of date ({producer.name}: {st.reason}){hint}")


def run_stage(ctx: Context, stage: Stage, stages: list[Stage]) -> bool:
    """Run ``stage`` unless it is up to date. Returns True when it ran.

    The stage's outputs are staged and renamed into place together once it has
    succeeded, and only then is its manifest written: a stage that fails or is killed
    leaves the previous artifacts and the previous manifest as they were.
    """
    ws, cfg = ctx.ws, ctx.cfg
    inputs = distributed.on_main(lambda: _prepare(ctx, stage, stages))
    if inputs is None:
        return False
    started = time.perf_counter()
    if stage.parallel:
        summary = _execute(ctx, stage)
    else:
        summary = distributed.on_main(lambda: _execute(ctx, stage))
    duration = time.perf_counter() - started
    world = distributed.world_size()
    distributed.on_main(lambda: ws.write_manifest(
        stage.name,
        {
            "config": cfg.sections(stage.sections),
            "config_hash": config_hash(cfg.sections(stage.sections)),
            "inputs": inputs,
            "outputs": {ws.rel(p): ws.fingerprint(p) for p in stage.outputs(ws, cfg)},
            "finished_at": now_iso(),
            "duration_s": round(duration, 3),
            "world_size": world,
            "summary": summary,
        },
    ))
    ctx.console.print(f"[green]{stage.name}[/]: done in {duration:.1f}s")
    return True


def _prepare(ctx: Context, stage: Stage, stages: list[Stage]) -> dict[str, str | None] | None:
    """The stage's input fingerprints when it must run, None when it is up to date."""
    ws, cfg = ctx.ws, ctx.cfg
    check_ready(ws, cfg, stage, stages)
    st = status(ws, cfg, stage, stages)
    if st.state == "done" and not ctx.force:
        ctx.console.print(f"[green]{stage.name}[/]: up to date, skipped")
        return None
    why = "forced" if ctx.force and st.state == "done" else st.reason
    ctx.console.print(f"[bold cyan]{stage.name}[/]: running ({escape(why)})")
    inputs = input_fingerprints(ws, cfg, stage)
    for path in stage.outputs(ws, cfg):
        remove_stale_tmp(path)
    return inputs


def _execute(ctx: Context, stage: Stage) -> dict[str, Any]:
    """The stage's run, its outputs committed together when it succeeds (a rank > 0
    writes nothing, so its transaction stays empty)."""
    with transaction():
        return stage.run(ctx)

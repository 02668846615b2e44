"""What the CLI modules share: the error-catching group, the config resolution that
saves flags into retdm.toml, and running stages by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from retdmctl.config import Config, parse_set
from retdmctl.errors import RetdmError
from retdmctl.workspace import Workspace

console = Console(highlight=False)


class ErrorCatchingGroup(TyperGroup):
    """Turns every RetdmError into ``error: <message>`` on stderr and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RetdmError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except typer.BadParameter as exc:  # e.g. a path that does not exist: one line, exit 1
            typer.echo(f"error: {exc.format_message()}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None


class State:
    workdir: Path = Path("retdm-work")
    config: Path | None = None


STATE = State()


def workspace() -> Workspace:
    return Workspace(STATE.workdir.resolve())


def configure(overrides: dict[str, dict[str, Any]], sets: list[str] | None = None) -> tuple[Workspace, Config]:
    """Resolve the config: retdm.toml < --config < --set < flags."""
    ws = workspace()
    merged = parse_set(sets or [])
    for section, values in overrides.items():
        merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return ws, ws.load_config(STATE.config, merged)


def run_stages(ws: Workspace, cfg: Config, names: list[str], force: bool) -> None:
    """Check the config against every named stage, save it to retdm.toml (so that a later
    ``retdmctl run`` uses the same values), then run the stages in order. A rejected
    value is never saved."""
    from retdmctl.errors import ConfigError
    from retdmctl.pipeline import Context, run_stage
    from stages import BY_NAME, PIPELINE

    for name in names:
        reason = BY_NAME[name].blocked(cfg)
        if reason and name != "ingest":  # ingest's only block is "no dataset yet"
            raise ConfigError(reason)
    ws.save_config(cfg)
    ctx = Context(ws, cfg, console, force=force)
    for name in names:
        run_stage(ctx, BY_NAME[name], PIPELINE)
    if "eval" in names:
        print_metrics(ws)


def print_metrics(ws: Workspace) -> None:
    from stages.evaluate import metrics_table

    result = json.loads((ws.stage_dir("eval") / "metrics.json").read_text())
    title = f"{result['checkpoint']} on the {result['split']} split ({result['images']} images)"
    console.print(metrics_table(result["metrics"], title))


Force = Annotated[bool, typer.Option("--force", help="Run even when up to date.")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Any option as SECTION.KEY=VALUE (repeatable).")]



"""What the CLI modules share: the error-catching group, option helpers, the config
resolution, and running stages under the workspace lock.

Under torchrun rank 0 resolves the config, plans the stages, holds the lock and saves
retdm.toml; the other ranks get its decisions (``retdmctl.distributed.on_main``)."""

from __future__ import annotations

import errno
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from retdmctl import distributed
from retdmctl.api import merge_overrides, resolve_config
from retdmctl.api import run_stages as api_run_stages
from retdmctl.config import CHOICES, Config
from retdmctl.errors import RetdmError
from retdmctl.workspace import Workspace

console = Console(highlight=False)

# The order `retdmctl --help` lists commands in: the pipeline's, then the tools.
COMMAND_ORDER = ("ingest", "knn", "train", "eval", "run", "status", "quickstart", "predict", "export")


def _os_error_message(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device{where}; the previous artifacts are unchanged, free some space and run the command again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where} (is the workspace read-only?)"
    return f"{exc.strerror or exc}{where}"


_UsageError = typer.BadParameter.__mro__[1]  # click's UsageError, as vendored by typer


class ErrorCatchingGroup(TyperGroup):
    """Turns every RetdmError (and an OS error such as a full disk or a read-only
    folder) into ``error: <message>`` on stderr and exit code 1."""

    def list_commands(self, ctx) -> list[str]:
        names = list(self.commands)
        return sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except distributed.PeerError:  # rank 0 failed and said why
            raise typer.Exit(1) from None
        except RetdmError as exc:
            typer.echo(f"error: {_rank_prefix()}{exc}", err=True)
            raise typer.Exit(1) from None
        except _UsageError as exc:  # a path that does not exist, an unknown option: one line, exit 1
            typer.echo(f"error: {exc.format_message()}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            typer.echo(f"error: {_rank_prefix()}{_os_error_message(exc)}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None


def _rank_prefix() -> str:
    """Names the rank of an error raised by a torchrun rank other than 0."""
    return "" if distributed.is_main() else f"rank {distributed.rank()}: "


class State:
    workdir: Path = Path("retdm-work")
    workdir_given: bool = False
    workdir_from_env: bool = False  # $RETDM_WORKDIR, which quickstart ignores
    config: Path | None = None


STATE = State()


def set_workdir(workdir: Path | None) -> None:
    """``-w/--workdir`` given after the subcommand wins over the one before it."""
    if workdir is not None:
        STATE.workdir, STATE.workdir_given = workdir, True


def workspace() -> Workspace:
    return Workspace(STATE.workdir.resolve())


def read_workspace() -> Workspace:
    """The workspace, for a command that only reads it: it must exist."""
    ws = workspace()
    if not ws.root.is_dir():
        raise RetdmError(f"workspace {ws.root} does not exist: run `retdmctl ingest <format> PATH` first")
    return ws


def resolve(overrides: dict[str, dict[str, Any]], sets: list[str] | None = None) -> Config:
    """The config: retdm.toml < --config < --set < flags (None = not given), validated,
    as asked for (:func:`retdmctl.api.resolve_config`, which the Python API uses too)."""
    merged = merge_overrides(sets or [], overrides)
    return resolve_config(workspace(), STATE.config, merged, origin="command line")


def run_stages(asked: Config, names: list[str], force: bool, *, persist: bool = True, with_upstream: bool = True) -> Workspace:
    """Run the named stages under the workspace lock, retdm.toml saved only after they
    all succeeded (:func:`retdmctl.api.run_stages`, which the Python API uses too);
    eval's metrics table printed."""
    ws = workspace()
    api_run_stages(ws, asked, names, force, console, persist=persist, with_upstream=with_upstream)
    if "eval" in names and distributed.is_main():
        print_metrics(ws)
    return ws


def print_metrics(ws: Workspace) -> None:
    from stages.evaluate import metrics_table

    result = json.loads((ws.stage_dir("eval") / "metrics.json").read_text())
    title = f"{result['checkpoint']} on the {result['split']} split ({result['images']} images)"
    console.print(metrics_table(result["metrics"], title))


def choice_enum(name: str, values: str | tuple[str, ...]) -> type[Enum]:
    """A str Enum for an option's choices: those of the config option ``values`` names
    (``section.key`` in :data:`retdmctl.config.CHOICES`), or the tuple given."""
    values = CHOICES[values] if isinstance(values, str) else values
    return Enum(name, {v: v for v in values}, type=str)


def default_of(name: str) -> str:
    """The built-in default of ``section.key``, for help texts."""
    section, key = name.split(".")
    return str(getattr(getattr(Config(), section), key))


def option(*decls: str, help: str, default: str | None = None, metavar: str | None = None, **kw) -> Any:
    """A typer.Option whose help shows where its default comes from. Options default to
    None (= not given, keep retdm.toml's value); ``default`` names the config key."""
    shown: str | bool = False
    if default is not None:
        shown = f"{default_of(default)}, or {default} in retdm.toml"
    return typer.Option(*decls, help=help, show_default=shown, metavar=metavar, **kw)


Force = Annotated[bool, typer.Option("--force", help="Run even when up to date.")]
Sets = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="SECTION.KEY=VALUE", help="Any config option, e.g. --set knn.k=5 (repeatable)."),
]
Workdir = Annotated[
    Optional[Path],
    typer.Option("--workdir", "-w", metavar="DIR", file_okay=False, show_default=False,
                 help="Where artifacts live (also accepted before the command).  [default: ./retdm-work or $RETDM_WORKDIR]"),
]

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
from retdmctl.config import CHOICES, Config, validate
from retdmctl.errors import ConfigError, RetdmError, UsageError
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

# The exit codes of every command (docs/cli.md).
EXIT_ERROR = 1  # the command failed: bad input data, a missing stage, a busy workspace, a full disk
EXIT_USAGE = 2  # the command line is wrong: an unknown option, a bad value, a missing argument, a bad --set
EXIT_SOME_SKIPPED = 3  # predict: some inputs could not be read and were skipped, the others were scored
EXIT_INTERRUPTED = 130  # Ctrl-C: finished work is kept


class ErrorCatchingGroup(TyperGroup):
    """Turns every RetdmError (and an OS error such as a full disk or a read-only
    folder) into ``error: <message>`` on stderr and exit code 1; a usage error (click's,
    or :class:`~retdmctl.errors.UsageError`) into the same one line and exit code 2.
    Its commands' help shows metavars, never Python types (:func:`plain_metavars`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        plain_metavars(self)

    def get_command(self, ctx, cmd_name: str):
        cmd = super().get_command(ctx, cmd_name)
        return plain_metavars(cmd) if cmd is not None else None

    def list_commands(self, ctx) -> list[str]:
        names = list(self.commands)
        return sorted(names, key=lambda n: (COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER), n))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except distributed.PeerError:  # rank 0 failed and said why
            raise typer.Exit(EXIT_ERROR) from None
        except RetdmError as exc:
            typer.echo(f"error: {_rank_prefix()}{exc}", err=True)
            raise typer.Exit(EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR) from None
        except _UsageError as exc:  # a path that does not exist, an unknown option: one line, exit 2
            typer.echo(f"error: {exc.format_message()}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except OSError as exc:
            typer.echo(f"error: {_rank_prefix()}{_os_error_message(exc)}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


def plain_metavars(cmd):
    """Show ``cmd``'s parameters as a man page does: ``PATH...`` or ``auto|cpu|cuda``,
    never Typer's type labels (``<list[str]>``, ``<dir>``) or its ``{PATH}`` usage
    braces. A parameter without a metavar gets one from its type: FILE, DIR, PATH,
    the choices joined by ``|``, or its name in capitals (an argument). Idempotent."""
    for param in getattr(cmd, "params", ()):
        if getattr(param, "_plain_metavar", False) or not hasattr(param, "display_type"):
            continue
        if param.metavar is None:
            param.metavar = _metavar_of(param)
        if param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None  # the metavar alone in the help
            param._usage_display_name = _usage_name(param)
        param._plain_metavar = True
    return cmd


def _metavar_of(param) -> str | None:
    """A metavar from Typer's type label: ``<list[Path]>`` -> ``PATH``, ``<dir>`` ->
    ``DIR``, ``<list[train|test]>`` -> ``train|test``; None (a flag) when it has none."""
    if getattr(param, "is_flag", False):
        return None
    try:
        label = param.display_type(None) or ""
    except Exception:  # noqa: BLE001 - no label: an argument is named by its name
        label = ""
    label = label.strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    if "|" in label:
        return label
    names = {"file": "FILE", "dir": "DIR", "path": "PATH", "Path": "PATH", "int": "N", "float": "X", "str": "VALUE"}
    if param.param_type_name == "argument":
        return param.name.upper() + ("..." if param.nargs != 1 else "")
    return names.get(label, label.upper() or None)


def _usage_name(param):
    def usage() -> str:
        name = param.metavar
        if param.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if param.required else f"[{name}]"

    return usage


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


def set_config(config: Path | None) -> None:
    """``-c/--config`` given after the subcommand wins over the one before it."""
    if config is not None:
        STATE.config = config


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
    as asked for (:func:`retdmctl.api.resolve_config`, which the Python API uses too).
    A bad ``--set``, or a value of the command line that makes the config invalid, is a
    usage error (exit 2); a bad value in retdm.toml or the --config file is an error (1)."""
    try:
        merged = merge_overrides(sets or [], overrides)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        return resolve_config(workspace(), STATE.config, merged, origin="command line")
    except distributed.PeerError:
        raise
    except RetdmError as exc:  # a bad value, an unknown backbone
        if merged:  # the files alone are valid (else that error): the command line's values are not
            validate(workspace().load_config(STATE.config))
            raise UsageError(str(exc)) from None
        raise


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
ConfigFile = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", metavar="FILE", exists=True, dir_okay=False, show_default=False,
                 help="A TOML config file; flags override it (also accepted before the command)."),
]
Workdir = Annotated[
    Optional[Path],
    typer.Option("--workdir", "-w", metavar="DIR", file_okay=False, show_default=False,
                 help="Where artifacts live (also accepted before the command).  [default: ./retdm-work or $RETDM_WORKDIR]"),
]

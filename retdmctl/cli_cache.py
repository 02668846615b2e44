"""``retdmctl cache`` (registered in :mod:`retdmctl.cli`): list and prune the backbone
cache shared by every workspace (:mod:`retdmctl.cache_admin` decides what goes)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from retdmctl.cache import display
from retdmctl.cache_admin import Listing, Pruned, created_text, human_size, list_caches, prune_caches
from retdmctl.cli_support import ConfigFile, Sets, Workdir, resolve, set_config, set_workdir, workspace
from retdmctl.errors import UsageError


def cache(
    prune: Annotated[bool, typer.Option(
        "--prune", help="Remove the unused entries: those this workspace extracted and its current config does not use, "
                        "orphans (their workspace is gone), unreadable files and what dead writers left. "
                        "Holds the workspace lock; skips an entry another process is writing.")] = False,
    all_: Annotated[bool, typer.Option(
        "--all", help="With --prune: also remove other workspaces' entries (never the one this workspace uses); "
                      "they extract them again when they next need them.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --prune: say what would be removed, remove nothing.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON instead of text: the listing, or with --prune what was removed and kept (docs/cache.md).")] = False,
    sets: Sets = None,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """List or prune the shared backbone cache.

    The cache holds the backbone features that frozen-backbone runs of every workspace
    extracted. Each entry is listed with its size, key, date and the workspace that
    extracted it; * marks the entry this workspace's current config uses (retdm.toml,
    -c and --set). Listing only reads.

    --prune removes the entries no live workspace claims: those this workspace made and
    no longer uses, orphans, and leftovers of dead writers. Other workspaces' entries
    stay unless --all is given; the entry in use always stays (docs/cache.md).

    Examples:

    \b
    retdmctl cache
    retdmctl cache --prune --dry-run
    retdmctl cache --prune --all --json
    """
    set_workdir(workdir)
    set_config(config)
    for flag, given in (("--all", all_), ("--dry-run", dry_run)):
        if given and not prune:
            raise UsageError(f"{flag} goes with --prune: retdmctl cache --prune {flag}")
    ws = workspace()
    if prune:
        listing, pruned = prune_caches(ws, lambda: resolve({}, sets), all_=all_, dry_run=dry_run)
        if as_json:
            typer.echo(json.dumps(pruned.to_json(), indent=2))
        else:
            for line in prune_lines(listing, pruned):
                typer.echo(line)
        return
    listing = list_caches(ws, resolve({}, sets))
    if as_json:
        typer.echo(json.dumps(listing.to_json(), indent=2))
        return
    for line in listing_lines(listing):
        typer.echo(line)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def listing_lines(listing: Listing) -> list[str]:
    """The text of ``retdmctl cache``: a header, one line per entry, the total."""
    lines = [f"cache: {display(listing.cache)} (shared by every workspace); workspace: {listing.workspace}"]
    rows = [("used", "size", "created", "key", "file", "extracted by")]
    for e in listing.entries:
        mark = "?" if e.used is None else "*" if e.used else ""
        who = {"this": "this workspace", "other": e.origin, "gone": f"{e.origin} (gone)",
               "unknown": "? (not recorded)"}[e.owner]
        rows.append((mark, human_size(e.size), created_text(e.created), e.summary, e.path.name, who))
    if listing.entries:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [str(c).rjust(w) if i == 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  ".join([*cells, str(row[-1])]))
    total = sum(e.size for e in listing.entries)
    used = "; * = used by this workspace's current config" if any(e.used for e in listing.entries) else ""
    lines.append(f"total: {_plural(len(listing.entries), 'entry', 'entries')}, {human_size(total)}{used}")
    if listing.note:
        lines.append(listing.note)
    if listing.leftovers:
        size = human_size(sum(x.size for x in listing.leftovers))
        lines.append(f"left by dead writers: {_plural(len(listing.leftovers), 'file', 'files')}, {size} (--prune removes them)")
    return lines


def prune_lines(listing: Listing, pruned: Pruned) -> list[str]:
    """The text of ``retdmctl cache --prune``: what went (or would go), what stayed and why."""
    verb = "would remove" if pruned.dry_run else "removed"
    lines = [f"{verb} {e.path.name} ({human_size(e.size)}): {why}" for e, why in pruned.removed]
    lines += [f"skipped {p.name}: {why}" for p, why in pruned.skipped]
    lines += [f"{verb} {x.path.name} ({human_size(x.size)}): left by a dead writer" for x in pruned.leftovers]
    entries = _plural(len(pruned.removed), "entry", "entries")
    lines.append(f"{'would free' if pruned.dry_run else 'freed'} {human_size(pruned.freed)} ({entries}"
                 f"{', ' + _plural(len(pruned.leftovers), 'leftover file', 'leftover files') if pruned.leftovers else ''})")
    if pruned.kept_used:
        lines.append(f"kept {pruned.kept_used[0].path.name}: this workspace's current config uses it")
    if pruned.kept_other:
        size = human_size(sum(e.size for e in pruned.kept_other))
        unrecorded = sum(e.owner == "unknown" for e in pruned.kept_other)
        some = f" ({unrecorded} of them not recorded)" if unrecorded else ""
        hint = "; --all removes them too" if listing.known else ""
        lines.append(f"kept {_plural(len(pruned.kept_other), 'entry', 'entries')} ({size}) that other workspaces extracted{some}{hint}")
    if pruned.kept_own:
        size = human_size(sum(e.size for e in pruned.kept_own))
        lines.append(f"kept {_plural(len(pruned.kept_own), 'entry', 'entries')} ({size}) that this workspace extracted: "
                     "it has no dataset, so which entry it uses is unknown")
    lines += [f"kept {e.path.name}: it cannot be read (is it another user's?); remove it by hand if it is no cache"
              for e in pruned.kept_unreadable]
    return lines

"""The Python API: what the command line does, callable from a notebook or a script.

    import retdmctl

    ws = retdmctl.Workspace("retdm-work")
    ws.ingest("csv", "labels.csv", images="photos")
    ws.run()                                   # every stage not up to date
    ws.status()["eval"]["state"]               # "done"
    ws.metrics()["mAP"]
    retdmctl.load_predictor(ws).predict(["a.jpg"])

The CLI commands are thin wrappers over the functions here (:func:`resolve_config`,
:func:`run_stages`, :meth:`Workspace.ingest`), so both follow the same rules: the
workspace lock is held while stages run, and retdm.toml is saved only after every stage
succeeded. Failures raise :class:`retdmctl.errors.RetdmError` (or a subclass); nothing
here exits or prints an error. Progress goes to the ``console`` given (default: quiet).

Config overrides are given as ``{"section.key": value}`` (``overrides=``) or as keyword
sections (``model={"backbone": "tiny_cnn"}``); both go over retdm.toml (and the
``config_file``), as ``--set`` and the flags do on the command line.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from retdmctl import distributed
from retdmctl.config import TRAINED_STAGES, Config, apply, concrete, load_toml, parse_set, validate
from retdmctl.errors import ConfigError, InputError, RetdmError, StageNotReadyError
from retdmctl.workspace import Workspace as Layout

if TYPE_CHECKING:
    from retdmctl.inference import Predictor

__all__ = ["Workspace", "load_predictor", "resolve_config", "run_stages"]

Overrides = Mapping[str, Any] | Iterable[str] | None

# Settings that belong to one dataset: reset when another dataset is ingested.
DATASET_SPECIFIC = (("model", "image_size"),)


def quiet_console() -> Console:
    return Console(quiet=True)


# --- the core the CLI shares --------------------------------------------------------------
def merge_overrides(overrides: Overrides = None, sections: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``{"section.key": value}`` (or ``["section.key=value", ...]``, as ``--set`` takes
    them) and ``{section: {key: value}}`` -> one ``{section: {key: value}}``; None values
    (= not given) are dropped."""
    if overrides is None:
        merged: dict[str, dict[str, Any]] = {}
    elif isinstance(overrides, Mapping):
        merged = {}
        for name, value in overrides.items():
            section, dot, key = str(name).partition(".")
            if not dot or not key:
                raise ConfigError(f"override {name!r}: expected 'section.key', e.g. 'knn.k'")
            merged.setdefault(section, {})[key] = value
    else:
        merged = parse_set(list(overrides))
    for section, values in (sections or {}).items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section}={values!r}: expected a dict of that section's options, e.g. {section}={{...}}")
        # a keyword left at None (a flag not given) never hides the same key given above
        merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return {s: {k: v for k, v in vals.items() if v is not None} for s, vals in merged.items()}


def resolve_config(layout: Layout, config_file: Path | None, overrides: dict[str, dict[str, Any]],
                   base: Config | None = None, origin: str = "overrides") -> Config:
    """The config: retdm.toml < ``config_file`` < ``overrides`` (or ``base`` < overrides
    when a Config is given), validated, as asked for (auto values kept: :func:`run_stages`
    makes them concrete); by rank 0 under torchrun: every rank gets its config, or its error."""

    def resolve() -> Config:
        asked = layout.load_config(config_file) if base is None else copy.deepcopy(base)
        apply(asked, overrides, origin)  # ``origin`` names them in errors
        validate(copy.deepcopy(asked))  # every value checked; the auto ones stay auto in ``asked``
        return asked

    return distributed.on_main(resolve)


def run_stages(layout: Layout, asked: Config, names: list[str], force: bool, console: Console, *,
               persist: bool = True, with_upstream: bool = True) -> None:
    """Run the named stages (and, first, every stage they read from that is not up to
    date) under the workspace lock, with ``asked`` (the config as resolved, auto values
    included) made concrete. ``asked`` is saved to retdm.toml only after every stage
    succeeded (``persist``), so a rejected or failed command leaves it as it was."""
    from retdmctl.lock import workspace_lock
    from retdmctl.pipeline import Context, run_stage, upstream
    from stages import BY_NAME, PIPELINE
    from stages.ingest import forget_parsed

    forget_parsed()  # labels parsed by an earlier command of this process may be stale
    cfg = concrete(copy.deepcopy(asked))

    def plan() -> list[str]:
        for name in names:
            reason = BY_NAME[name].blocked(cfg)
            if reason and name != "ingest":  # ingest's only block is "no dataset yet"
                raise RetdmError(reason)
        todo: list[str] = []
        for name in names:
            before = [s.name for s in upstream(BY_NAME[name], layout, cfg, PIPELINE)] if with_upstream else []
            todo += [n for n in before + [name] if n not in todo]
        return [s.name for s in PIPELINE if s.name in todo]

    todo = distributed.on_main(plan)
    with contextlib.ExitStack() as held:  # rank 0 holds the lock for every rank
        distributed.on_main(lambda: held.enter_context(workspace_lock(layout.root)))
        ctx = Context(layout, cfg, console, force=False)
        for name in todo:
            ctx.force = force and name in names
            run_stage(ctx, BY_NAME[name], PIPELINE)
        if persist:
            distributed.on_main(lambda: layout.save_config(asked))


def ingest_overrides(layout: Layout, config_file: Path | None, source: str, path: str, images: str,
                     options: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The overrides of an ingest, and the notes on what it reset: when the workspace held
    another dataset, that dataset's settings (DATASET_SPECIFIC and [ingest]) go back to
    their defaults (or the ``config_file``'s) unless given now."""
    previous = layout.load_config()
    overrides: dict[str, dict[str, Any]] = {"ingest": {**options, "source": source, "path": path, "images": images}}
    notes = []
    if previous.ingest.source and (previous.ingest.source, previous.ingest.path) != (source, path):
        fresh = Config()
        if config_file is not None:  # a config file still counts, retdm.toml's old values do not
            apply(fresh, load_toml(config_file), str(config_file))
        for section, key in DATASET_SPECIFIC + tuple(("ingest", k) for k in fresh.to_dict()["ingest"]):
            old, new = getattr(getattr(previous, section), key), getattr(getattr(fresh, section), key)
            if old != new and key not in ("source", "path", "images"):
                if overrides.setdefault(section, {}).get(key) is None:  # not given now
                    overrides[section][key] = new
                    notes.append(f"{section}.{key} reset from {old!r} to {new!r}")
    return overrides, notes


# The API's names for ingest options where the CLI's differ from the config's ([ingest]).
_DEMO_NAMES = {"images": "demo_images", "classes": "demo_classes", "labels": "demo_labels"}
_FORMAT_NAMES = {"split": "coco_splits", "year": "voc_years", "difficult": "voc_difficult"}
_SOURCES = ("demo", "scene", "csv", "coco", "voc", "mirflickr", "nuswide")


def _ingest_options(source: str, path: str | Path | list | None, images: Any, options: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(path, images, [ingest] options) of an API ingest call, named as in the CLI."""
    from stages.ingest import join_list

    if source not in _SOURCES:
        raise InputError(f"unknown dataset format {source!r}; known: {', '.join(_SOURCES)}")
    known = set(Config().to_dict()["ingest"]) - {"source", "path", "images"}
    opts: dict[str, Any] = {}
    renames = _DEMO_NAMES if source == "demo" else _FORMAT_NAMES
    if source == "demo":
        if path is not None:
            raise InputError("the demo set is generated: give no path (images=N sets its size)")
        opts["demo_images"], images = images, None
    for name, value in options.items():
        key = renames.get(name, name)
        if key not in known:
            raise ConfigError(f"unknown ingest option {name!r}; known: {', '.join(sorted(known | set(renames)))}")
        opts[key] = join_list(value) if isinstance(value, (list, tuple)) else value
    if source == "demo":
        return "", "", opts
    if path is None:
        raise InputError(f"ingest {source!r} needs a path")
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    folders = [Path(p) for p in (images if isinstance(images, (list, tuple)) else ([images] if images else []))]
    for p in paths + folders:
        if not p.exists():
            raise InputError(f"{p} does not exist")
    if source == "coco" and not folders:
        from retdmctl.data.readers.coco import default_image_dir

        folders = [default_image_dir(p) for p in paths]
        for ann, folder in zip(paths, folders, strict=True):
            if not folder.is_dir():
                raise InputError(f"{ann.resolve()}: image folder {folder} not found; give it with images=")
    if source == "csv" and not folders:
        raise InputError("ingest 'csv' needs images= (the folder the CSV's paths are relative to)")
    return join_list(p.resolve() for p in paths), join_list(p.resolve() for p in folders), opts


# --- the public API -------------------------------------------------------------------------
class Workspace:
    """A retdmctl workspace: the folder where a dataset's artifacts, models and
    ``retdm.toml`` live (what ``retdmctl -w DIR`` names).

    ``config_file`` is a TOML file read over retdm.toml, as ``retdmctl -c FILE``;
    ``console`` receives the progress lines (default: a quiet one).
    """

    def __init__(self, path: str | Path = "retdm-work", *, config_file: str | Path | None = None,
                 console: Console | None = None) -> None:
        self.root = Path(path).resolve()
        self.config_file = Path(config_file) if config_file is not None else None
        if self.config_file is not None and not self.config_file.is_file():
            raise ConfigError(f"{self.config_file}: config file not found")
        self.console = console if console is not None else quiet_console()

    def __repr__(self) -> str:
        return f"retdmctl.Workspace({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def layout(self) -> Layout:
        """Where each artifact lives (``stage_dir``, ``dataset``, manifests): the
        internal :class:`retdmctl.workspace.Workspace`."""
        return Layout(self.root)

    # --- config ---------------------------------------------------------------------
    def config(self, overrides: Overrides = None, **sections: Mapping[str, Any]) -> Config:
        """The config the next run would use: retdm.toml < ``config_file`` < the
        overrides given here, validated (auto values kept as auto)."""
        return resolve_config(self.layout, self.config_file, merge_overrides(overrides, sections))

    def _asked(self, overrides: Overrides, sections: Mapping[str, Mapping[str, Any]], config: Config | None) -> Config:
        return resolve_config(self.layout, self.config_file, merge_overrides(overrides, sections), base=config)

    def _run(self, asked: Config, names: list[str], force: bool, *, persist: bool = True) -> None:
        run_stages(self.layout, asked, names, force, self.console, persist=persist)

    # --- stages ---------------------------------------------------------------------
    def ingest(self, source: str, path: str | Path | list | None = None, *, images: Any = None,
               force: bool = False, **options: Any) -> Workspace:
        """Read a dataset into the workspace, as ``retdmctl ingest <source>`` does.

        ``source`` is demo, scene, csv, coco, voc, mirflickr or nuswide; ``path`` the
        dataset's folder or label file (coco: a list of instances_*.json files).
        ``images`` is the image folder (csv: required), or for demo the number of
        images. Other options are the CLI's (``classes``, ``labels``, ``seed``,
        ``val_fraction``, ``test_fraction``, ``short_side``, ``keep_original``,
        ``workers``, ``strict``, ``keep_empty``, ``split``, ``year``, ``difficult``) or
        any [ingest] key. Another dataset's settings are reset first (a note says so).

        Example: ``ws.ingest("demo", images=200)``; ``ws.ingest("csv", "labels.csv", images="photos")``
        """
        where, folders, opts = _ingest_options(source, path, images, options)
        return self.ingest_resolved(source, where, folders, opts, force)

    def ingest_resolved(self, source: str, path: str, images: str, options: dict[str, Any], force: bool = False,
                        sets: Overrides = None) -> Workspace:
        """:meth:`ingest` with resolved, "|"-joined paths and [ingest] keys (what the CLI
        passes); ``sets``: further overrides, as ``--set`` takes them."""
        overrides, notes = ingest_overrides(self.layout, self.config_file, source, path, images, options)
        asked = resolve_config(self.layout, self.config_file, merge_overrides(sets, overrides))
        return self.ingest_config(asked, notes, force)

    def ingest_config(self, asked: Config, notes: list[str], force: bool = False) -> Workspace:
        """Run ingest with ``asked`` (a config resolved from :func:`ingest_overrides`),
        saying first which settings of another dataset were reset (``notes``)."""
        if notes:
            self.console.print(escape("note: another dataset: " + "; ".join(notes)), soft_wrap=True)
        self._run(asked, ["ingest"], force)
        return self

    def run(self, until: str | None = None, *, force: bool = False, overrides: Overrides = None,
            config: Config | None = None, save: bool = True, **sections: Mapping[str, Any]) -> Workspace:
        """Run every stage in order up to ``until`` (default: eval), skipping those up
        to date, as ``retdmctl run``. ``force`` re-runs them all. The config used is saved
        to retdm.toml once every stage succeeded (``save=False``: not). ``config`` (a
        :class:`retdmctl.config.Config`) replaces retdm.toml as the base of the overrides.

        Example: ``ws.run(overrides={"knn.k": 5}, model={"frozen_backbone": True})``
        """
        from stages import PIPELINE

        names = [s.name for s in PIPELINE]
        if until is not None and until not in names:
            raise ConfigError(f"until must be one of {', '.join(names)}, got {until!r}")
        asked = self._asked(overrides, sections, config)
        self._run(asked, names[: names.index(until) + 1] if until else names, force, persist=save)
        return self

    def train(self, stage: str, *, force: bool = False, overrides: Overrides = None, config: Config | None = None,
              save: bool = True, **sections: Mapping[str, Any]) -> Workspace:
        """Train one stage (classifier, metric or joint), the stages it reads from first
        where they are not up to date, as ``retdmctl train --stage``.

        Example: ``ws.train("classifier", classifier={"epochs": 5})``
        """
        if stage not in TRAINED_STAGES:
            raise ConfigError(f"stage must be one of {', '.join(TRAINED_STAGES)}, got {stage!r}")
        self._run(self._asked(overrides, sections, config), [stage], force, persist=save)
        return self

    def evaluate(self, checkpoint: str | None = None, split: str | None = None, *, force: bool = False,
                 overrides: Overrides = None, config: Config | None = None, **sections: Mapping[str, Any]) -> dict[str, Any]:
        """Score a split with a trained model (as ``retdmctl eval``); the metrics (see
        :meth:`metrics`). Its options are for this evaluation only: retdm.toml is not
        changed.

        Example: ``ws.evaluate("classifier", "val")["mAP"]``
        """
        merged = merge_overrides(overrides, sections)
        merged.setdefault("eval", {}).update({k: v for k, v in {"checkpoint": checkpoint, "split": split}.items() if v is not None})
        asked = resolve_config(self.layout, self.config_file, merged, base=config)
        self._run(asked, ["eval"], force, persist=False)
        return self.metrics()

    # --- reading ----------------------------------------------------------------------
    def _existing(self) -> Layout:
        layout = self.layout
        if not layout.root.is_dir():
            raise RetdmError(f"workspace {layout.root} does not exist: run `retdmctl ingest <format> PATH` first")
        return layout

    def status(self) -> dict[str, dict[str, str]]:
        """Each stage, in pipeline order -> ``{"state": "done"|"stale"|"missing",
        "reason": ..., "command": the CLI command that runs it}``. Reads only."""
        from retdmctl.pipeline import Status
        from retdmctl.pipeline import status as stage_status
        from stages import PIPELINE

        layout = self._existing()
        cfg = layout.load_config(self.config_file)
        known: dict[str, Status] = {}
        out = {}
        for stage in PIPELINE:
            st = stage_status(layout, cfg, stage, PIPELINE, known)
            out[stage.name] = {"state": st.state, "reason": st.reason, "command": stage.command}
        return out

    def evaluation(self) -> dict[str, Any]:
        """The last evaluation's eval/metrics.json: checkpoint, split, images, metrics, ..."""
        path = self._existing().stage_dir("eval") / "metrics.json"
        if not path.is_file():
            raise StageNotReadyError(f"no metrics in {self.root}: run `retdmctl eval` (or Workspace.evaluate()) first")
        return json.loads(path.read_text())

    def metrics(self) -> dict[str, float]:
        """The last evaluation's metrics (mAP, C-F1, O-F1, one_error, ...) by name."""
        return dict(self.evaluation()["metrics"])

    def predictor(self, stage: str | None = None, *, device: str = "auto", fusion: bool = True) -> Predictor:
        """The trained model, ready to predict (see :func:`load_predictor`)."""
        return load_predictor(self, stage, device=device, fusion=fusion)

    # --- the shared cache -------------------------------------------------------------
    def caches(self, overrides: Overrides = None, **sections: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone caches shared by every workspace, as ``retdmctl cache --json``:
        ``entries`` (path, size, used by this workspace's current config, summary,
        created, extracted_by, owner, key), ``leftovers``, ``total``. Reads only.

        Example: ``[e["path"] for e in ws.caches()["entries"] if e["used"]]``
        """
        from retdmctl.cache_admin import list_caches

        return list_caches(self.layout, self.config(overrides, **sections)).to_json()

    def prune_caches(self, *, all: bool = False, dry_run: bool = False, overrides: Overrides = None,
                     **sections: Mapping[str, Any]) -> dict[str, Any]:
        """Remove the unused backbone caches, as ``retdmctl cache --prune`` (``all``:
        ``--all``; ``dry_run``: remove nothing): what was removed, skipped and kept, and
        the bytes freed (``retdmctl cache --prune --json``). docs/cache.md says which go.

        Example: ``ws.prune_caches(dry_run=True)["freed"]``
        """
        from retdmctl.cache_admin import prune_caches

        _, pruned = prune_caches(self.layout, lambda: self.config(overrides, **sections), all_=all, dry_run=dry_run)
        return pruned.to_json()


def load_predictor(source: Workspace | str | Path, stage: str | None = None, *, device: str = "auto",
                   fusion: bool = True) -> Predictor:
    """A trained model ready to predict: ``source`` is a :class:`Workspace`, a workspace
    folder or a checkpoint.pt file; ``stage`` classifier or joint (default: joint when
    trained, else classifier). ``.predict(images)`` takes PIL images or file paths and
    returns an ``(N, L)`` array of probabilities; ``.class_names`` and ``.thresholds``
    turn them into labels.
    """
    from retdmctl.inference import load_predictor as load

    root = source.root if isinstance(source, Workspace) else Path(source)
    return load(root, stage, device=device, fusion=fusion)

"""Stage ``ingest``: a dataset in its native format -> ``data/images.lmdb`` + ``data/dataset.h5``.

The source (``ingest.source``, ``ingest.path``) is part of the config, so ``retdmctl run``
re-ingests when the dataset's files or the ingest options change.
"""

from __future__ import annotations

from pathlib import Path

from retdmctl.config import Config
from retdmctl.data.ingest import SourceData, run_ingest
from retdmctl.errors import ConfigError
from retdmctl.pipeline import Context, Stage

READERS = ("demo", "scene", "csv")


def read_source(cfg: Config) -> SourceData:
    i = cfg.ingest
    if i.source == "demo":
        from retdmctl.data.readers.demo import read_demo

        return read_demo(i.demo_images, i.demo_classes, i.seed)
    if i.source == "scene":
        from retdmctl.data.readers.scene import read_scene

        return read_scene(Path(i.path))
    if i.source == "csv":
        from retdmctl.data.readers.csvfile import read_csv_labels

        return read_csv_labels(Path(i.path), Path(i.images))
    raise ConfigError(f"ingest.source must be one of {', '.join(READERS)}, got {i.source!r}")


def _blocked(cfg: Config) -> str | None:
    if not cfg.ingest.source:
        return "no dataset yet: run `retdmctl ingest demo` (or scene, csv) first"
    return None


def _sources(ws, cfg: Config) -> list[Path]:
    i = cfg.ingest
    return [Path(p) for p in (i.path, i.images) if p and i.source != "demo"]


def run(ctx: Context) -> dict:
    return run_ingest(read_source(ctx.cfg), ctx.ws, ctx.cfg.ingest, ctx.console)


STAGE = Stage(
    name="ingest",
    command="retdmctl ingest",
    sections=("ingest",),
    inputs=lambda ws, cfg: [],
    outputs=lambda ws, cfg: [ws.lmdb, ws.dataset],
    run=run,
    sources=_sources,
    blocked=_blocked,
)

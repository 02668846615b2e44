"""``retdmctl ingest <format>``: one command per dataset format."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from retdmctl.api import Workspace, ingest_overrides
from retdmctl.cli_support import (
    STATE,
    ConfigFile,
    ErrorCatchingGroup,
    Force,
    Sets,
    Workdir,
    choice_enum,
    console,
    resolve,
    set_config,
    set_workdir,
)
from retdmctl.config import Config
from retdmctl.errors import InputError

ingest_app = typer.Typer(
    cls=ErrorCatchingGroup,
    no_args_is_help=True,
    help="Read a dataset in its native format into data/images.lmdb and data/dataset.h5.",
)


# --- ingest ------------------------------------------------------------------
def _ingest(source: str, path: str, images: str, opts: dict[str, Any], force: bool, sets: list[str] | None = None) -> None:
    """Ingest with this command's flags (and ``--set``) over retdm.toml's [ingest]
    (:meth:`retdmctl.api.Workspace.ingest_resolved`): when the workspace held another
    dataset, the settings of that dataset are reset first and the command says so."""
    ws = Workspace(STATE.workdir, config_file=STATE.config, console=console)
    overrides, notes = ingest_overrides(ws.layout, STATE.config, source, path, images, opts)
    ws.ingest_config(resolve(overrides, sets), notes, force)  # a bad value given here: a usage error (2)


def _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction=None) -> dict:
    return {
        "seed": seed,
        "val_fraction": val_fraction,
        "short_side": short_side,
        "keep_original": keep_original,
        "workers": workers,
        "strict": strict,
        "test_fraction": test_fraction,
    }


def _opt(*decls: str, help: str, default: str, metavar: str | None = None, **kw):
    """An ingest option: its default is the built-in one (ingest starts afresh)."""
    shown = str(getattr(Config().ingest, default.split(".")[1]))
    return typer.Option(*decls, help=help, show_default=shown, metavar=metavar, **kw)


Seed = Annotated[Optional[int], _opt(metavar="N", default="ingest.seed", help="Seed of the random splits.")]
ValFraction = Annotated[Optional[float], _opt(metavar="F", default="ingest.val_fraction", help="Fraction of train held out for validation, in [0, 1).")]
TestFraction = Annotated[
    Optional[float], _opt(metavar="F", default="ingest.test_fraction", help="Fraction of images for the test split when the source has none, in [0, 1).")
]
ShortSide = Annotated[Optional[int], _opt(metavar="PX", default="ingest.short_side", help="Re-encode images to this shorter side (0 = keep the size).")]
KeepOriginal = Annotated[
    Optional[bool], _opt("--keep-original/--reencode", default="ingest.keep_original", help="Store the original bytes.")
]
Workers = Annotated[Optional[int], _opt(metavar="N", default="ingest.workers", help="Encoding processes (0 = one per core).")]
Strict = Annotated[Optional[bool], _opt("--strict/--lenient", default="ingest.strict", help="A bad image is an error, not a skip.")]
CarveFraction = TestFraction  # coco and voc: carved only when the source has no test split


@ingest_app.command("demo")
def ingest_demo(
    images: Annotated[Optional[int], typer.Option("--images", metavar="N", show_default="2000", help="Number of images.")] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", metavar="N", show_default="10", help="Number of classes (2-20).")] = None,
    labels: Annotated[Optional[str], typer.Option(
        "--labels", metavar="K|MIN-MAX", show_default="2-3",
        help="Labels per image: K, or a range drawn uniformly per image (at most 9 and at most --classes); "
        "e.g. --classes 20 --labels 4-6 for a dense set. Fixed by --seed like everything else.")] = None,
    seed: Seed = None,
    val_fraction: ValFraction = None,
    workers: Workers = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Generate the built-in procedural demo set (seconds; no download).

    Example: retdmctl ingest demo --images 2000 --classes 10

    A dense set, 4-6 of 20 labels per image: retdmctl ingest demo --classes 20 --labels 4-6
    """
    set_workdir(workdir)
    set_config(config)
    opts = _split_opts(seed, val_fraction, None, None, workers, None)
    opts.update({"demo_images": images, "demo_classes": classes, "demo_labels": labels})
    _ingest("demo", "", "", opts, force, sets)


@ingest_app.command("scene")
def ingest_scene(
    path: Annotated[Path, typer.Argument(help="The scene folder (labels.csv, images/).", exists=True, file_okay=False)],
    seed: Seed = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Read the MIML natural-scene set with the reference 80/20 split.

    Example: retdmctl ingest scene ../shared/data/scene --seed 0
    """
    set_workdir(workdir)
    set_config(config)
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, 0.2)
    _ingest("scene", str(path.resolve()), "", opts, force, sets)


@ingest_app.command("csv")
def ingest_csv(
    labels: Annotated[
        Path,
        typer.Argument(
            help="CSV lines: relative/path.jpg,label1|label2|?label3 (?name: unknown for this image).",
            exists=True,
            dir_okay=False,
        ),
    ],
    images: Annotated[Path, typer.Option("--images", help="Folder the paths are relative to.", exists=True, file_okay=False)],
    classes: Annotated[
        Optional[str],
        typer.Option(metavar="A,B,...", help="The allowed labels, comma-separated, in this order; any other label is an error.  [default: every label found, sorted]"),
    ] = None,
    seed: Seed = None,
    test_fraction: TestFraction = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Read your own images and a label CSV (random test split).

    A label written ?name is unknown for that image: neither positive nor negative
    (stored as dataset.h5 "known"); name and ?name on one line is an error.

    Example: retdmctl ingest csv labels.csv --images photos/ --classes cat,dog,car
    """
    set_workdir(workdir)
    set_config(config)
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction)
    opts["classes"] = classes
    _ingest("csv", str(labels.resolve()), str(images.resolve()), opts, force, sets)


KeepEmpty = Annotated[
    Optional[bool],
    typer.Option("--keep-empty/--drop-empty", help="Keep images without any label (default: drop and count them)."),
]


class CocoSplit(str, Enum):
    train = "train"
    test = "test"


Difficult = choice_enum("Difficult", "ingest.voc_difficult")


def _format_opts(keep_empty: bool | None, **extra: Any) -> dict:
    return {"keep_empty": keep_empty, **extra}


@ingest_app.command("coco")
def ingest_coco(
    annotations: Annotated[
        list[Path],
        typer.Argument(metavar="JSON...", help="instances_*.json files (2014 or 2017).", exists=True, dir_okay=False),
    ],
    images: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--images",
            metavar="DIR",
            help="Image folder (repeatable): one for all json files or one per file, in order "
            "(default: the official layout, annotations/../train2017 for instances_train2017.json).",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    split: Annotated[
        Optional[list[CocoSplit]],
        typer.Option("--split", help="(Repeatable) train or test per json file, in order (default: train* -> train, val* -> test)."),
    ] = None,
    keep_empty: KeepEmpty = None,
    seed: Seed = None,
    test_fraction: CarveFraction = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Read MS-COCO instances_*.json files: 80 classes, train* -> train, val* -> test.

    Example: retdmctl ingest coco coco/annotations/instances_train2017.json coco/annotations/instances_val2017.json
    """
    set_workdir(workdir)
    set_config(config)
    from retdmctl.data.readers.coco import default_image_dir
    from stages.ingest import join_list

    jsons = [a.resolve() for a in annotations]
    if images:
        folders = [p.resolve() for p in images]
    else:
        folders = [default_image_dir(a) for a in jsons]
        for ann, folder in zip(jsons, folders, strict=True):
            if not folder.is_dir():
                raise InputError(f"{ann}: image folder {folder} not found; give it with --images")
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction)
    opts.update(_format_opts(keep_empty, coco_splits=join_list(s.value for s in split or [])))
    _ingest("coco", join_list(jsons), join_list(folders), opts, force, sets)


@ingest_app.command("voc")
def ingest_voc(
    path: Annotated[
        Path,
        typer.Argument(help="The VOCdevkit folder (VOC2007/, VOC2012/) or one VOC20XX folder.", exists=True, file_okay=False),
    ],
    year: Annotated[
        Optional[list[str]],
        typer.Option("--year", metavar="YEAR", help="Use this year's folder, e.g. 2007 (repeatable; default: every one found)."),
    ] = None,
    difficult: Annotated[
        Optional[Difficult],
        typer.Option(help="Objects marked difficult: positive (they count, default) or ignore (they do not)."),
    ] = None,
    keep_empty: KeepEmpty = None,
    seed: Seed = None,
    test_fraction: CarveFraction = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Read PASCAL VOC 2007/2012: 20 classes, trainval -> train, test -> test.

    Example: retdmctl ingest voc VOCdevkit --year 2007
    """
    set_workdir(workdir)
    set_config(config)
    from stages.ingest import join_list

    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction)
    opts.update(
        _format_opts(
            keep_empty,
            voc_years=join_list(year or []),
            voc_difficult=difficult.value if difficult else None,
        )
    )
    _ingest("voc", str(path.resolve()), "", opts, force, sets)


@ingest_app.command("mirflickr")
def ingest_mirflickr(
    path: Annotated[
        Path,
        typer.Argument(
            help="The folder holding mirflickr/ (im1.jpg ...) and mirflickr25k_annotations_v080/.",
            exists=True,
            file_okay=False,
        ),
    ],
    images: Annotated[
        Optional[Path],
        typer.Option("--images", help="The image folder (default: PATH/mirflickr).", exists=True, file_okay=False),
    ] = None,
    keep_empty: KeepEmpty = None,
    seed: Seed = None,
    test_fraction: TestFraction = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Read MIRFLICKR-25K: 24 labels (the *_r1 files are ignored), seeded 80/20 split.

    Example: retdmctl ingest mirflickr ~/data/mirflickr25k --seed 0
    """
    set_workdir(workdir)
    set_config(config)
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict, test_fraction)
    opts.update(_format_opts(keep_empty))
    _ingest("mirflickr", str(path.resolve()), str(images.resolve()) if images else "", opts, force, sets)


@ingest_app.command("nuswide")
def ingest_nuswide(
    path: Annotated[
        Path,
        typer.Argument(
            help="The NUS-WIDE folder (ImageList/, Concepts81.txt, Groundtruth/TrainTestLabels/).",
            exists=True,
            file_okay=False,
        ),
    ],
    images: Annotated[
        Optional[Path],
        typer.Option("--images", help="The image folder, CONCEPT/FILE.jpg (default: PATH/Flickr).", exists=True, file_okay=False),
    ] = None,
    keep_empty: KeepEmpty = None,
    seed: Seed = None,
    val_fraction: ValFraction = None,
    short_side: ShortSide = None,
    keep_original: KeepOriginal = None,
    workers: Workers = None,
    strict: Strict = None,
    sets: Sets = None,
    force: Force = False,
    workdir: Workdir = None,
    config: ConfigFile = None,
) -> None:
    """Read NUS-WIDE: 81 concepts, the official train/test split; missing images are counted.

    Example: retdmctl ingest nuswide ~/data/NUS-WIDE --images ~/data/NUS-WIDE/Flickr
    """
    set_workdir(workdir)
    set_config(config)
    opts = _split_opts(seed, val_fraction, short_side, keep_original, workers, strict)
    opts.update(_format_opts(keep_empty))
    _ingest("nuswide", str(path.resolve()), str(images.resolve()) if images else "", opts, force, sets)

"""Issue 19, items 1 and 8: ingest and CLI edges a new user meets first (a workspace
inside the image folder, quickstart's workdir, one file under several spellings,
duplicate class names, rich markup in user strings, CSV encodings, FIFOs, a wrong
image folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from retdmctl.cli import app
from tests.conftest import invoke, runner
from tests.test_ingest_formats import make_jpeg

PETS = ["cat|dog", "dog|car", "car|cat"]
TINY = (
    '[ingest]\nworkers = 1\n'
    '[model]\nbackbone = "tiny_cnn"\npretrained = false\nimage_size = 32\nbatch_size = 16\n'
    '[runtime]\nworkers = 0\ndevice = "cpu"\n'
    '[classifier]\nepochs = 1\n'
)


def unwrapped(output: str) -> str:
    """Rich wraps long lines at a space, which it keeps: join them again."""
    return output.replace(" \n", " ")


def photos(folder: Path, n: int = 30) -> Path:
    """``n`` small JPEGs and ``l.csv`` listing each with two of cat/dog/car."""
    for i in range(n):
        make_jpeg(folder / f"n{i}.jpg", seed=i)
    (folder / "l.csv").write_text("".join(f"n{i}.jpg,{PETS[i % 3]}\n" for i in range(n)))
    return folder / "l.csv"


@pytest.fixture
def in_photos(tmp_path, monkeypatch):
    """The current folder is a folder of photos with its l.csv; no RETDM_WORKDIR."""
    folder = tmp_path / "photos"
    photos(folder)
    monkeypatch.chdir(folder)
    monkeypatch.delenv("RETDM_WORKDIR", raising=False)
    (tmp_path / "tiny.toml").write_text(TINY)
    return folder


# --- item 1: a workspace inside the image folder ----------------------------------------
@pytest.mark.slow
def test_a_workspace_inside_the_image_folder_runs_and_then_skips(in_photos):
    tiny = str(in_photos.parent / "tiny.toml")
    result = invoke("--config", tiny, "ingest", "csv", "l.csv", "--images", ".")
    assert result.exit_code == 0, result.output
    assert (in_photos / "retdm-work" / "data" / "dataset.h5").is_file()
    result = invoke("--config", tiny, "run", "--frozen-backbone", "--until", "classifier")
    assert result.exit_code == 0, result.output
    assert "ingest: up to date, skipped" in result.output
    assert [line.split(":")[0] for line in result.output.splitlines() if ": running" in line] == ["knn", "classifier"]
    (in_photos / "train.log").write_text("a log the user keeps next to the photos\n")
    result = invoke("--config", tiny, "run", "--frozen-backbone", "--until", "classifier")
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date, skipped") == 3


def test_ingest_is_stale_when_a_listed_image_or_the_labels_change_not_otherwise(in_photos):
    assert invoke("ingest", "csv", "l.csv", "--images", ".", "--workers", "1").exit_code == 0
    (in_photos / "notes.txt").write_text("not listed\n")
    (in_photos / "unlisted.jpg").write_bytes((in_photos / "n0.jpg").read_bytes())
    assert "ingest: up to date, skipped" in invoke("ingest", "csv", "l.csv", "--images", ".", "--workers", "1").output
    make_jpeg(in_photos / "n3.jpg", size=(40, 40), seed=99)  # a listed image replaced
    result = invoke("ingest", "csv", "l.csv", "--images", ".", "--workers", "1")
    assert "ingest: running (input sources changed)" in result.output
    with open(in_photos / "l.csv", "a") as fh:
        fh.write("unlisted.jpg,cat\n")
    result = invoke("ingest", "csv", "l.csv", "--images", ".", "--workers", "1")
    assert "ingest: running (input sources changed)" in result.output and "stored 31 images" in result.output


# --- item 8: quickstart never writes over another dataset ---------------------------------
def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_quickstart_ignores_retdm_workdir_and_refuses_a_workspace_with_another_dataset(tmp_path, monkeypatch):
    labels = photos(tmp_path / "photos")
    mine = tmp_path / "myproject"
    result = invoke("-w", str(mine), "ingest", "csv", str(labels), "--images", str(labels.parent), "--workers", "1")
    assert result.exit_code == 0, result.output
    before = snapshot(mine)
    monkeypatch.chdir(tmp_path)
    # ./retdm-quickstart holds a dataset of its own too, so that no demo runs here
    (tmp_path / "retdm-quickstart").mkdir()
    (tmp_path / "retdm-quickstart" / "retdm.toml").write_text('[ingest]\nsource = "csv"\n')
    monkeypatch.setenv("RETDM_WORKDIR", str(mine))
    result = runner.invoke(app, ["quickstart"])
    assert (result.exit_code, result.output) == (
        1, f"error: {tmp_path / 'retdm-quickstart'} holds another dataset (csv): quickstart would replace it "
           "with the demo's; give it an empty folder with -w DIR\n")
    for args in (["-w", str(mine), "quickstart"], ["quickstart", "-w", str(mine)]):
        result = runner.invoke(app, args)
        assert (result.exit_code, result.output) == (
            1, f"error: {mine} holds another dataset (csv): quickstart would replace it "
               "with the demo's; give it an empty folder with -w DIR\n"), args
    assert snapshot(mine) == before


# --- item 8: one file under several spellings is one image -------------------------------
SPELLINGS = ["n1.jpg", "./n1.jpg", ".//n1.jpg", "sub/../n1.jpg"]


def test_one_file_under_several_spellings_is_one_image_and_the_others_are_named(tmp_path):
    from retdmctl.data.readers.csvfile import read_csv_labels

    folder = tmp_path / "photos"
    photos(folder, n=9)
    (folder / "sub").mkdir()
    lines = [f"{name},{PETS[k % 3]}\n" for k, name in enumerate(SPELLINGS)]
    (folder / "l.csv").write_text("".join(lines) + "".join(f"n{i}.jpg,{PETS[i % 3]}\n" for i in range(2, 9)))
    src = read_csv_labels(folder / "l.csv", folder)
    assert [r.key for r in src.records] == ["n1.jpg"] + [f"n{i}.jpg" for i in range(2, 9)]
    assert src.skipped == [(s, "listed again (first as n1.jpg)") for s in SPELLINGS[1:]]
    result = invoke("-w", str(tmp_path / "w"), "ingest", "csv", str(folder / "l.csv"), "--images", str(folder),
                    "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "stored 8 images" in result.output
    assert ("skipped 3 items (listed again: 3), first: ./n1.jpg: listed again (first as n1.jpg); .//n1.jpg: listed "
            "again (first as n1.jpg); sub/../n1.jpg: listed again (first as n1.jpg)\n") in unwrapped(result.output)


def test_every_reader_stores_one_file_once(tmp_path):
    """COCO names one file as ``a.jpg`` and ``./a.jpg`` (two image ids); a symlink gives a
    second name to a third: the shared check in ingest keeps the first of each."""
    import json

    from retdmctl.data.dataset import read_dataset
    from retdmctl.data.readers.coco import read_coco
    from tests.test_ingest_formats import coco_json, ingest

    root = tmp_path / "coco"
    for k, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        make_jpeg(root / "train2017" / name, seed=k)
    (root / "train2017" / "e.jpg").symlink_to(root / "train2017" / "d.jpg")
    images = [(1, "a.jpg"), (2, "./a.jpg"), (3, "b.jpg"), (4, "c.jpg"), (5, "d.jpg"), (6, "e.jpg")]
    ann = root / "annotations" / "instances_train2017.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(coco_json(images, [(1, 1), (2, 3), (3, 1), (4, 17), (5, 1), (6, 3)])))
    summary, ws = ingest(read_coco([ann], [root / "train2017"]), tmp_path)
    assert sorted(read_dataset(ws.dataset).ids) == [f"train2017/{n}" for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")]
    assert summary["skipped_first"] == [f"{root / 'train2017' / 'a.jpg'}: duplicate id",
                                        "train2017/e.jpg: same file as train2017/d.jpg"]


# --- item 8: duplicate class names --------------------------------------------------------
def test_duplicate_class_names_are_refused_for_every_reader(tmp_path):
    import json

    from tests.test_ingest_formats import make_coco

    labels = photos(tmp_path / "photos")
    result = invoke("-w", str(tmp_path / "w"), "ingest", "csv", str(labels), "--images", str(labels.parent),
                    "--classes", "cat,cat,dog,car")
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, "error: csv: duplicate class names: cat; every class needs a name of its own")
    assert not (tmp_path / "w" / "data").exists()
    root = make_coco(tmp_path / "coco")
    ann = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann.read_text())
    data["categories"] = [{**c, "name": "person"} if c["id"] == 3 else c for c in data["categories"]]
    ann.write_text(json.dumps(data))
    result = invoke("-w", str(tmp_path / "w"), "ingest", "coco", str(ann), "--images", str(root / "train2017"))
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, "error: coco: duplicate class names: person; every class needs a name of its own")


# --- item 8: user strings are printed as they are, never read as rich markup ----------------
def test_paths_labels_and_file_names_are_printed_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    folder = tmp_path / "photos [i]"
    for i, name in enumerate(["a [b].jpg", "a [i].jpg", *(f"n{i}.jpg" for i in range(8))]):
        make_jpeg(folder / name, seed=i)
    names = ["a [b].jpg", "a [i].jpg", *(f"n{i}.jpg" for i in range(8))]
    (folder / "l.csv").write_text("".join(f"{n},{PETS[k % 3]}|[red]x[/]\n" for k, n in enumerate(names))
                                  + "gone [b].jpg,cat\n")
    work = tmp_path / "exp[v2]" / "[" / "]w"  # -w 'exp[v2]/[/]w'
    args = ["-w", str(work), "ingest", "csv", str(folder / "l.csv"), "--images", str(folder), "--workers", "1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "most frequent: [red]x[/] (10), " in result.output
    assert f"first: {folder / 'gone [b].jpg'}: missing file\n" in result.output
    result = invoke("-w", str(work), "status")
    assert result.exit_code == 0, result.output
    nowhere = tmp_path / "exp[v3]" / "[" / "]w"
    assert (invoke("-w", str(nowhere), "status").output ==
            f"error: workspace {nowhere} does not exist: run `retdmctl ingest <format> PATH` first\n")
    assert f"retdmctl status ({work})" in result.output
    other = tmp_path / "m [b].csv"
    other.write_text((folder / "l.csv").read_text())
    args[args.index("csv") + 1] = str(other)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"ingest: running (config changed: ingest.path='{other}')\n" in result.output


def test_the_prediction_table_prints_file_and_class_names_as_written():
    import io

    import numpy as np
    from rich.console import Console

    from retdmctl.predict import Prediction, table

    out = Console(file=io.StringIO(), width=200)
    preds = [Prediction("a [b].jpg", np.array([0.9, 0.2]), [("[red]x[/]", 0.9)]),
             Prediction("a [i].jpg", np.array([0.1, 0.8]), [("exp[v2]", 0.8)])]
    out.print(table(preds, "2 images, joint model (exp[v2])"))
    text = out.file.getvalue()
    assert "2 images, joint model (exp[v2])" in text
    assert "a [b].jpg" in text and "a [i].jpg" in text and "[red]x[/] (0.900)" in text and "exp[v2] (0.800)" in text


# --- item 8: what spreadsheet programs write ---------------------------------------------
def test_a_latin1_csv_is_one_line_naming_the_line_and_a_utf16_csv_is_read(tmp_path):
    from retdmctl.data.dataset import read_dataset

    labels = photos(tmp_path / "photos", n=12)
    text = labels.read_text().replace("n2.jpg,car|cat", "n2.jpg,car|café")
    labels.write_bytes(text.encode("latin-1"))
    args = ["ingest", "csv", str(labels), "--images", str(labels.parent), "--workers", "1"]
    result = invoke("-w", str(tmp_path / "w1"), *args)
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, f"error: {labels}: line 3: not UTF-8 (byte 0xe9); save it as UTF-8 (e.g. Latin-1 is not read)")
    labels.write_text(text, encoding="utf-16-le")  # without its byte order mark
    result = invoke("-w", str(tmp_path / "w1"), *args)
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, f"error: {labels}: line 1: NUL bytes (UTF-16 without a byte order mark?); save it as UTF-8")
    labels.write_text(text, encoding="utf-16")  # with its byte order mark
    result = invoke("-w", str(tmp_path / "w2"), *args)
    assert result.exit_code == 0, result.output
    assert read_dataset(tmp_path / "w2" / "data" / "dataset.h5").class_names == ["café", "car", "cat", "dog"]


# --- item 8: a FIFO listed as an image ------------------------------------------------------
def test_a_fifo_listed_as_an_image_is_skipped_and_named(tmp_path):
    import os

    labels = photos(tmp_path / "photos", n=12)
    os.mkfifo(labels.parent / "pipe.jpg")
    with open(labels, "a") as fh:
        fh.write("pipe.jpg,cat\n")
    for workers in ("1", "2"):
        result = invoke("-w", str(tmp_path / f"w{workers}"), "ingest", "csv", str(labels), "--images",
                        str(labels.parent), "--workers", workers)
        assert result.exit_code == 0, result.output
        assert "stored 12 images" in result.output
        assert (f"skipped 1 items (not a regular file: 1), first: {labels.parent / 'pipe.jpg'}: not a regular file "
                "(a FIFO, socket or device)\n") in unwrapped(result.output)


# --- item 8: a wrong image folder, refused paths --------------------------------------------
def test_a_wrong_image_folder_says_the_listed_files_are_not_there(tmp_path):
    labels = photos(tmp_path / "photos", n=30)
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    result = invoke("-w", str(tmp_path / "w"), "ingest", "csv", str(labels), "--images", str(wrong), "--workers", "1")
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, f"error: {labels}: no readable image with labels found: 30 of 30 listed files not found under {wrong} "
           "(first: n0.jpg, n1.jpg, n2.jpg)")
    (tmp_path / "abs.csv").write_text("".join(f"{labels.parent / f'n{i}.jpg'},cat\n" for i in range(3))
                                      + "../photos/n3.jpg,dog\n")
    result = invoke("-w", str(tmp_path / "w"), "ingest", "csv", str(tmp_path / "abs.csv"), "--images", str(wrong))
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, f"error: {tmp_path / 'abs.csv'}: no readable image with labels found: 4 listed paths refused as absolute "
           f"or outside the image folder (first: {labels.parent / 'n0.jpg'}, {labels.parent / 'n1.jpg'}, "
           f"{labels.parent / 'n2.jpg'})")


def test_run_reads_the_labels_once_and_each_command_afresh(in_photos, monkeypatch):
    import stages.ingest as ingest_stage

    reads = []
    real = ingest_stage.read_source
    monkeypatch.setattr(ingest_stage, "read_source", lambda cfg: reads.append(1) or real(cfg))
    tiny = str(in_photos.parent / "tiny.toml")
    assert invoke("--config", tiny, "ingest", "csv", "l.csv", "--images", ".").exit_code == 0
    reads.clear()
    result = invoke("--config", tiny, "run", "--until", "knn")
    assert result.exit_code == 0, result.output
    assert len(reads) == 1  # ingest's up-to-date check before ingest and before knn
    reads.clear()
    assert "ingest: up to date, skipped" in invoke("--config", tiny, "run", "--until", "knn").output
    assert len(reads) == 1


def test_a_manifest_from_before_keeps_its_workspace_up_to_date(tmp_path):
    """An ingest manifest written before (a stat walk per source folder) still counts
    while the walk matches: the upgrade alone re-runs nothing downstream."""
    import json

    from retdmctl.workspace import Workspace
    from stages.ingest import STAGE

    labels = photos(tmp_path / "photos", n=12)
    args = ["-w", str(tmp_path / "w"), "ingest", "csv", str(labels), "--images", str(labels.parent), "--workers", "1"]
    assert invoke(*args).exit_code == 0
    ws = Workspace(tmp_path / "w")
    manifest = json.loads(ws.manifest_path("ingest").read_text())
    del manifest["inputs"]["sources"]
    cfg = ws.load_config()
    manifest["inputs"].update({f"source:{p}": ws.fingerprint(p, content=False) for p in STAGE.sources(ws, cfg)})
    ws.manifest_path("ingest").write_text(json.dumps(manifest))
    assert "ingest: up to date, skipped" in invoke(*args).output
    (labels.parent / "new.txt").write_text("the old walk sees this\n")
    assert f"ingest: running (input source:{labels.parent} changed)" in unwrapped(invoke(*args).output)
    assert "sources" in json.loads(ws.manifest_path("ingest").read_text())["inputs"]
    (labels.parent / "newer.txt").write_text("the new fingerprint does not\n")
    assert "ingest: up to date, skipped" in invoke(*args).output

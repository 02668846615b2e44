"""``retdmctl cache``: the shared backbone cache listed with each entry's size, key, date
and extracting workspace, the entry in use marked; ``--prune`` removing only what no live
workspace claims (``--all``: other workspaces' too), never the entry in use, under the
workspace lock and each entry's own, with what dead writers left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import retdmctl
from retdmctl.cache_admin import human_size, key_summary
from retdmctl.config import concrete
from retdmctl.data.dataset import read_dataset
from retdmctl.inputs import backbone_cache_key, backbone_cache_path
from retdmctl.workspace import Workspace
from tests.conftest import TINY_TOML, invoke

ROOT = Path(__file__).resolve().parents[1]
CREATED = "2026-01-02T03:04:05+0000"
MIB = 1 << 20


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A workspace with the tiny demo set ingested (frozen tiny CNN, pooled features)."""
    root = tmp_path_factory.mktemp("ws").resolve()
    (root / "retdm.toml").write_text(TINY_TOML)
    assert invoke("-w", root, "ingest", "demo").exit_code == 0
    return root


def used_path_and_key(root: Path) -> tuple[Path, dict]:
    ws = Workspace(root)
    cfg = concrete(ws.load_config())
    return backbone_cache_path(ws, cfg), backbone_cache_key(ws, cfg, read_dataset(ws.dataset), torch.device("cpu"))


def write_entry(path: Path, key: dict | None, origin: str | None) -> Path:
    """A cache file as the extractors write it: 1 MiB of float16 features and the attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=np.zeros((MIB // 2 // 64, 64), np.float16))
        h5.attrs.update({"created": CREATED, "version": retdmctl.__version__})
        if key is not None:
            h5.attrs["key"] = json.dumps(key)
        if origin is not None:
            h5.attrs["workspace"] = origin
    return path


def lite0(size: int, precision: str = "float32", **extra) -> dict:
    return {"backbone": "efficientnet_lite0", "pretrained": True, "weights_file": None, "image_size": size,
            "images": "records:" + "2" * 64, "ids": "sha256:" + "1" * 64, "precision": precision,
            "version": 2, **extra}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def populated(work, own_cache, tmp_path):
    """The shared cache with one entry of each kind, and what dead writers left."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "retdm.toml").write_text(TINY_TOML)  # a live workspace
    folder = own_cache / "backbone"
    used, key = used_path_and_key(work)
    entries = {
        "own": write_entry(folder / "efficientnet_lite0-00000000000000000001.h5",
                           lite0(224, views=10, tune_blocks=1, version=3), str(work)),
        "other": write_entry(folder / "efficientnet_lite0-00000000000000000002.h5", lite0(224, "bfloat16"), str(other)),
        "orphan": write_entry(folder / "efficientnet_lite0-00000000000000000003.h5",
                              lite0(128, weights_file="sha256:abcdef0123" + "0" * 54, views=10, tune_blocks=0, version=3),
                              str(tmp_path / "gone")),
        "unrecorded": write_entry(folder / "efficientnet_lite0-00000000000000000004.h5", lite0(224), None),
        "used": write_entry(used, key, str(work)),
    }
    entries["junk"] = folder / "junk-00000000000000000005.h5"
    entries["junk"].write_bytes(b"\0" * MIB)  # not HDF5: no run can read it
    pid = dead_pid()
    tmp = folder / f".tiny_cnn-99999999999999999999.h5.tmp-{pid}"  # a killed writer's half file
    tmp.write_bytes(b"\0" * 100)
    stale_lock = folder / "tiny_cnn-99999999999999999999.h5.lock"
    stale_lock.touch()
    entries.update(tmp=tmp, stale_lock=stale_lock, other_ws=other)
    return entries


def ids8(work: Path) -> str:
    return read_dataset(Workspace(work).dataset).ids_digest[len("sha256:"):][:8]


def test_sizes_and_key_summaries_in_a_few_words():
    assert [human_size(n) for n in (0, 512, 1023, 1536, 5 * MIB, 188 * (1 << 30))] == \
        ["0 B", "512 B", "1023 B", "1.5 KiB", "5.0 MiB", "188.0 GiB"]
    assert key_summary(lite0(224)) == "efficientnet_lite0, 224 px, pooled, float32, pretrained, ids 11111111"
    assert key_summary(lite0(128, "bfloat16", views=10, tune_blocks=1)) == \
        "efficientnet_lite0, 128 px, 10 views, tune 1, bfloat16, pretrained, ids 11111111"
    assert key_summary(lite0(224, views=1, tune_blocks=3, pretrained=False)) == \
        "efficientnet_lite0, 224 px, 1 view, tune 3, float32, random init, ids 11111111"
    assert key_summary(None) == "unreadable (no key)"


def test_the_listing_marks_the_entry_in_use_and_says_who_extracted_each(work, populated, own_cache, tmp_path):
    result = invoke("-w", work, "cache")
    assert result.exit_code == 0, result.output
    used = populated["used"].name
    ids = ids8(work)
    assert result.output.splitlines() == [
        f"cache: {own_cache} (shared by every workspace); workspace: {work}",
        "used     size  created           key                                                                                    file                                        extracted by",
        "      1.0 MiB  2026-01-02 03:04  efficientnet_lite0, 224 px, 10 views, tune 1, float32, pretrained, ids 11111111        efficientnet_lite0-00000000000000000001.h5  this workspace",
        "      1.0 MiB  2026-01-02 03:04  efficientnet_lite0, 224 px, pooled, bfloat16, pretrained, ids 11111111                 efficientnet_lite0-00000000000000000002.h5  "
        f"{tmp_path / 'other'}",
        "      1.0 MiB  2026-01-02 03:04  efficientnet_lite0, 128 px, 10 views, pooled, float32, weights abcdef01, ids 11111111  efficientnet_lite0-00000000000000000003.h5  "
        f"{tmp_path / 'gone'} (gone)",
        "      1.0 MiB  2026-01-02 03:04  efficientnet_lite0, 224 px, pooled, float32, pretrained, ids 11111111                  efficientnet_lite0-00000000000000000004.h5  ? (not recorded)",
        "      1.0 MiB  ?                 unreadable (no key)                                                                    junk-00000000000000000005.h5                ? (not recorded)",
        f"*     1.0 MiB  2026-01-02 03:04  tiny_cnn, 32 px, pooled, float32, random init, ids {ids}                            {used}            this workspace",
        "total: 6 entries, 6.0 MiB; * = used by this workspace's current config",
        "left by dead writers: 2 files, 100 B (--prune removes them)",
    ]


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_prune_removes_what_no_live_workspace_claims_and_keeps_the_rest(work, populated, own_cache, tmp_path):
    folder = own_cache / "backbone"
    pid = populated["tmp"].name.rsplit("-", 1)[1]
    result = invoke("-w", work, "cache", "--prune")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "removed efficientnet_lite0-00000000000000000001.h5 (1.0 MiB): extracted by this workspace, unused by its current config",
        f"removed efficientnet_lite0-00000000000000000003.h5 (1.0 MiB): orphan: workspace {tmp_path / 'gone'} no longer exists",
        "removed junk-00000000000000000005.h5 (1.0 MiB): unreadable",
        f"removed .tiny_cnn-99999999999999999999.h5.tmp-{pid} (100 B): left by a dead writer",
        "removed tiny_cnn-99999999999999999999.h5.lock (0 B): left by a dead writer",
        "freed 3.0 MiB (3 entries, 2 leftover files)",
        f"kept {populated['used'].name}: this workspace's current config uses it",
        "kept 2 entries (2.0 MiB) that other workspaces extracted (1 of them not recorded); --all removes them too",
    ]
    # the entry in use, the live workspace's and the unrecorded one stay; no lock file is left
    assert names(folder) == sorted([populated["used"].name, populated["other"].name, populated["unrecorded"].name])
    again = invoke("-w", work, "cache", "--prune")
    assert again.output.splitlines()[0] == "freed 0 B (0 entries)"


def test_a_dry_run_says_what_would_go_and_removes_nothing(work, populated, own_cache):
    folder = own_cache / "backbone"
    before = names(folder)
    result = invoke("-w", work, "cache", "--prune", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split(" (")[0] for line in lines[:5]] == [
        "would remove efficientnet_lite0-00000000000000000001.h5",
        "would remove efficientnet_lite0-00000000000000000003.h5",
        "would remove junk-00000000000000000005.h5",
        f"would remove {populated['tmp'].name}",
        "would remove tiny_cnn-99999999999999999999.h5.lock",
    ]
    assert lines[5] == "would free 3.0 MiB (3 entries, 2 leftover files)"
    assert names(folder) == before


def test_all_removes_other_workspaces_entries_too_but_never_the_one_in_use(work, populated, own_cache, tmp_path):
    result = invoke("-w", work, "cache", "--prune", "--all")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:5] == [
        "removed efficientnet_lite0-00000000000000000001.h5 (1.0 MiB): extracted by this workspace, unused by its current config",
        f"removed efficientnet_lite0-00000000000000000002.h5 (1.0 MiB): extracted by workspace {tmp_path / 'other'} (--all)",
        f"removed efficientnet_lite0-00000000000000000003.h5 (1.0 MiB): orphan: workspace {tmp_path / 'gone'} no longer exists",
        "removed efficientnet_lite0-00000000000000000004.h5 (1.0 MiB): extracted by an unrecorded workspace (--all)",
        "removed junk-00000000000000000005.h5 (1.0 MiB): unreadable",
    ]
    assert lines[7:] == ["freed 5.0 MiB (5 entries, 2 leftover files)",
                         f"kept {populated['used'].name}: this workspace's current config uses it"]
    assert names(own_cache / "backbone") == [populated["used"].name]


HOLD_ENTRY = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_an_entry_another_process_is_writing_is_skipped_with_a_message(work, populated):
    own = populated["own"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ENTRY, str(own) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke("-w", work, "cache", "--prune")
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert f"skipped {own.name}: another process is writing it" in lines
        assert not any(line.startswith(f"removed {own.name}") for line in lines)
        assert "freed 2.0 MiB (2 entries, 2 leftover files)" in lines
        assert own.exists()
    finally:
        holder.kill()
        holder.wait()
    after = invoke("-w", work, "cache", "--prune")  # the writer is gone: now it goes
    assert after.output.splitlines()[0].startswith(f"removed {own.name} (1.0 MiB)")
    assert not own.exists() and not Path(str(own) + ".lock").exists()


def test_prune_is_refused_while_the_workspace_is_in_use_and_a_dry_run_still_works(work, populated, own_cache):
    from retdmctl.lock import workspace_lock

    before = names(own_cache / "backbone")
    with workspace_lock(work, command="retdmctl run"):
        result = invoke("-w", work, "cache", "--prune")
        assert (result.exit_code, result.output) == (1, f"error: workspace {work} is in use by pid {os.getpid()} (retdmctl run)\n")
        assert invoke("-w", work, "cache", "--prune", "--dry-run").exit_code == 0
        assert invoke("-w", work, "cache").exit_code == 0
    assert names(own_cache / "backbone") == before


def test_a_workspace_without_a_dataset_lists_and_prunes_only_orphans(populated, own_cache, tmp_path):
    empty = (tmp_path / "empty").resolve()
    empty.mkdir()
    (empty / "retdm.toml").write_text(TINY_TOML)
    mine = write_entry(own_cache / "backbone" / "tiny_cnn-00000000000000000006.h5", lite0(64), str(empty))
    listing = invoke("-w", empty, "cache")
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert {line[:4] for line in lines[2:9]} == {"?   "}  # no entry is known to be used, or unused
    assert lines[9:] == ["total: 7 entries, 7.0 MiB", "this workspace has no dataset yet: which entry it uses is unknown",
                         "left by dead writers: 2 files, 100 B (--prune removes them)"]
    refused = invoke("-w", empty, "cache", "--prune", "--all")
    assert (refused.exit_code, refused.output) == (1, "error: --all: this workspace has no dataset yet: which entry it uses "
                                                      "is unknown; prune --all from a workspace with a dataset\n")
    result = invoke("-w", empty, "cache", "--prune")
    assert result.exit_code == 0, result.output
    assert [line.split(" (")[0] for line in result.output.splitlines()] == [
        "removed efficientnet_lite0-00000000000000000003.h5",
        "removed junk-00000000000000000005.h5",
        f"removed {populated['tmp'].name}",
        "removed tiny_cnn-99999999999999999999.h5.lock",
        "freed 2.0 MiB",
        "kept 4 entries",
        "kept 1 entry",
    ]
    assert result.output.splitlines()[-2:] == [
        "kept 4 entries (4.0 MiB) that other workspaces extracted (1 of them not recorded)",
        "kept 1 entry (1.0 MiB) that this workspace extracted: it has no dataset, so which entry it uses is unknown",
    ]
    assert mine.exists() and populated["used"].exists() and not populated["orphan"].exists()


def test_all_and_dry_run_go_with_prune():
    for flag in ("--all", "--dry-run"):
        result = invoke("cache", flag)
        assert (result.exit_code, result.output) == (2, f"error: {flag} goes with --prune: retdmctl cache --prune {flag}\n")


def test_json_and_the_python_api_give_the_same_listing_and_report(work, populated, tmp_path):
    listing = json.loads(invoke("-w", work, "cache", "--json").output)
    assert listing == retdmctl.Workspace(work).caches()
    assert (listing["workspace"], listing["uses"], listing["known"]) == (str(work), str(populated["used"]), True)
    assert listing["total"] == {"entries": 6, "size": sum(populated[k].stat().st_size for k in
                                                          ("own", "other", "orphan", "unrecorded", "used", "junk"))}
    by_name = {Path(e["path"]).name: e for e in listing["entries"]}
    assert {name: (e["used"], e["owner"]) for name, e in by_name.items()} == {
        populated["own"].name: (False, "this"), populated["other"].name: (False, "other"),
        populated["orphan"].name: (False, "gone"), populated["unrecorded"].name: (False, "unknown"),
        populated["junk"].name: (False, "unknown"), populated["used"].name: (True, "this"),
    }
    assert by_name[populated["other"].name]["extracted_by"] == str(tmp_path / "other")
    assert by_name[populated["used"].name]["key"] == used_path_and_key(work)[1]
    dry = retdmctl.Workspace(work).prune_caches(dry_run=True)
    report = json.loads(invoke("-w", work, "cache", "--prune", "--json").output)
    assert dry == {**report, "dry_run": True}
    assert [Path(r["path"]).name for r in report["removed"]] == [populated[k].name for k in ("own", "orphan", "junk")]
    assert report["kept"] == {"used": {"entries": 1, "size": populated["used"].stat().st_size},
                              "other_workspaces": {"entries": 2, "size": 2 * populated["other"].stat().st_size},
                              "this_workspace_no_dataset": {"entries": 0, "size": 0},
                              "unreadable": {"entries": 0, "size": 0}}


def test_a_real_extraction_is_listed_as_used_and_goes_once_the_config_moves_on(work, own_cache):
    from io import StringIO

    from rich.console import Console

    from retdmctl.inputs import ensure_backbone_cache

    ws = Workspace(work)
    cfg = concrete(ws.load_config())
    path = ensure_backbone_cache(ws, cfg, read_dataset(ws.dataset), torch.device("cpu"), Console(file=StringIO()))
    entry, = json.loads(invoke("-w", work, "cache", "--json").output)["entries"]
    assert (entry["path"], entry["used"], entry["extracted_by"], entry["owner"]) == (str(path), True, str(work), "this")
    assert invoke("-w", work, "cache", "--prune").output.splitlines()[0] == "freed 0 B (0 entries)"
    moved = invoke("-w", work, "cache", "--prune", "--set", "model.image_size=64")  # another config: unused now
    assert moved.output.splitlines()[0].startswith(f"removed {path.name} (")
    assert not path.exists()


def test_a_file_that_cannot_be_opened_but_looks_like_hdf5_is_kept(work, own_cache):
    odd = own_cache / "backbone" / "tiny_cnn-00000000000000000007.h5"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 1000)  # HDF5's signature, then nothing valid
    entry, = json.loads(invoke("-w", work, "cache", "--json").output)["entries"]
    assert (entry["summary"], entry["damaged"], entry["used"]) == ("cannot be read", False, False)
    result = invoke("-w", work, "cache", "--prune", "--all")
    assert result.output.splitlines() == [
        "freed 0 B (0 entries)",
        f"kept {odd.name}: it cannot be read (is it another user's?); remove it by hand if it is no cache"]
    assert odd.exists()


def test_help_says_what_prune_keeps_and_shows_examples():
    result = invoke("cache", "--help", terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for part in ("List or prune the shared backbone cache.", "Other workspaces' entries stay unless --all is given",
                 "the entry in use always stays", "retdmctl cache --prune --dry-run", "-w, --workdir DIR",
                 "-c, --config FILE", "--set SECTION.KEY=VALUE", "--json"):
        assert part in text, part


def test_a_torchrun_shard_goes_only_when_no_writer_holds_its_entry(work, own_cache):
    """``.NAME.h5.partR``: a shard a process writes under torchrun (sources.part_path).
    While the entry's lock is held its writers are at work: the shard stays."""
    folder = own_cache / "backbone"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / "efficientnet_lite0-00000000000000000009.h5"
    part = folder / f".{entry.name}.part1"
    part.write_bytes(b"\0" * 2048)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_ENTRY, str(entry) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = invoke("-w", work, "cache", "--prune")
        assert busy.exit_code == 0, busy.output
        assert part.exists() and not any(part.name in line for line in busy.output.splitlines())
    finally:
        holder.kill()
        holder.wait()
    result = invoke("-w", work, "cache", "--prune")
    assert f"removed {part.name} (2.0 KiB): left by a dead writer" in result.output.splitlines()
    assert not part.exists()

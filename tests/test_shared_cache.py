"""The backbone cache shared by every workspace: where it lives, what its key holds (the
images by content, not by the workspace or the store's file bytes), that a second
workspace reuses what the first extracted and says so, and that two writers of one entry
extract it once."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import torch
from rich.console import Console

from retdmctl.cache import cache_root, display
from retdmctl.data.dataset import read_dataset
from retdmctl.inputs import _extract, backbone_cache_key, backbone_cache_path, ensure_backbone_cache, images_digest
from retdmctl.workspace import Workspace
from tests.conftest import TEST_CACHE, TINY_TOML, invoke, run_stages, tiny_config

CPU = torch.device("cpu")


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RETDM_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "retdmctl"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "retdmctl"
    monkeypatch.setenv("RETDM_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert Workspace(tmp_path / "w").cache_dir == tmp_path / "mine"


def test_the_test_session_never_writes_the_user_cache():
    assert cache_root() == TEST_CACHE and ".cache" not in TEST_CACHE.parts


def ingested(root: Path, **ingest) -> tuple[Workspace, object]:
    ws, cfg = Workspace(root), tiny_config(frozen=True)
    cfg.ingest.demo_images = 40
    for name, value in ingest.items():
        setattr(cfg.ingest, name, value)
    root.mkdir(parents=True)
    ws.save_config(cfg)
    run_stages(ws, cfg, "ingest")
    return ws, cfg


def test_two_workspaces_of_the_same_images_share_one_key_and_others_do_not(tmp_path):
    a, cfg = ingested(tmp_path / "a")
    b, _ = ingested(tmp_path / "b")
    c, _ = ingested(tmp_path / "c", jpeg_quality=80)  # the same ids, other bytes
    info = read_dataset(a.dataset)
    # by records, not by data.mdb's bytes: ingests with several workers lay those out differently
    assert images_digest(a) == images_digest(b) != images_digest(c)
    assert read_dataset(c.dataset).ids_digest == info.ids_digest
    assert backbone_cache_key(a, cfg, info, CPU) == backbone_cache_key(b, cfg, info, CPU)
    assert backbone_cache_path(a, cfg) == backbone_cache_path(b, cfg) != backbone_cache_path(c, cfg)
    assert backbone_cache_path(a, cfg).parent == TEST_CACHE / "backbone"


def test_a_second_workspace_reuses_the_features_and_says_whose(tmp_path, own_cache):
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        (root / "retdm.toml").write_text(TINY_TOML)
        assert invoke("-w", root, "ingest", "demo").exit_code == 0
    first = invoke("-w", one, "train", "--stage", "classifier")
    assert first.exit_code == 0, first.output
    assert "reusing cached" not in first.output
    second = invoke("-w", two, "train", "--stage", "classifier")
    assert second.exit_code == 0, second.output
    ws = Workspace(two)
    path = backbone_cache_path(ws, ws.load_config())
    assert path.parent == own_cache / "backbone" and list(path.parent.glob("*.h5")) == [path]
    assert f"reusing cached tiny_cnn features ({display(path)}, extracted by workspace {one.resolve()})" \
        in second.output.splitlines()  # one line, however long
    again = invoke("-w", one, "train", "--stage", "classifier", "--force")  # its own: no "extracted by"
    assert f"reusing cached tiny_cnn features ({display(path)})" in again.output.splitlines()


def test_a_writer_waits_for_another_writer_of_the_entry_and_then_reuses_its_file(tmp_path, own_cache):
    from retdmctl.cache import entry_lock

    a, cfg = ingested(tmp_path / "a")
    b, _ = ingested(tmp_path / "b")
    info = read_dataset(a.dataset)
    path = backbone_cache_path(a, cfg, info, CPU)
    out = io.StringIO()
    with entry_lock(path):  # "another process" is extracting
        waiter = threading.Thread(target=ensure_backbone_cache, args=(b, cfg, info, CPU, Console(file=out, width=300)))
        waiter.start()
        for _ in range(200):
            if "waiting" in out.getvalue():
                break
            time.sleep(0.05)
        assert out.getvalue() == f"waiting for another process writing {display(path)}\n"
        assert not path.exists()
        _extract(a, cfg, info, CPU, path, backbone_cache_key(a, cfg, info, CPU))
    waiter.join(60)
    assert out.getvalue().splitlines()[1] == \
        f"reusing cached tiny_cnn features ({display(path)}, extracted by workspace {a.root.resolve()})"
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".lock"]  # no temporary left

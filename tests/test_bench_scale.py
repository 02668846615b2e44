"""bench/scale.py: a child's own peak RSS, disk as du counts it, the growth exponent and
the issue's ratios by hand, and the whole bench end to end on a tiny set-up (pooled
features of a tiny CNN at a toy size), resumed from its saved results."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from bench.scale import checks, disk_bytes, fits, growth_exponent, main, run_child

TINY = ["--set", "model.backbone=tiny_cnn", "--set", "model.pretrained=false", "--set", "ingest.workers=1",
        "--set", "runtime.workers=0", "--set", "runtime.device=cpu", "--set", "classifier.epochs=1",
        "--set", "metric.epochs=1", "--set", "joint.epochs=1", "--set", "decision.folds=0"]
MIB = 1 << 20
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


SMALL_PARENT = """
import json, os, sys
from pathlib import Path
from bench.scale import run_child
tmp = Path(sys.argv[1])
big = "import sys, time; b = b'x' * (200 << 20); print('out'); print('err', file=sys.stderr); time.sleep(1)"
first = run_child([sys.executable, "-c", big], dict(os.environ), tmp / "big.log", cwd=tmp, poll=0.05)
small = run_child([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp / "small.log", cwd=tmp)
print(json.dumps([[c.rc, c.peak_rss_bytes, c.tree_rss_peak_bytes] for c in (first, small)]))
"""


def test_a_child_reports_its_own_peak_rss_not_the_largest_of_all_children(tmp_path):
    """Run from a small parent, as the bench is: Linux counts in a child's ru_maxrss the
    parent's memory at the fork (kept across exec), so pytest's own (torch loaded by
    earlier tests) would show in every child."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SMALL_PARENT, str(tmp_path)], capture_output=True, text=True,
                         env=env, check=True).stdout
    (rc, peak, tree), (small_rc, small_peak, _) = json.loads(out.splitlines()[-1])
    assert rc == 0 and peak >= 200 * MIB and tree >= 200 * MIB
    assert (tmp_path / "big.log").read_text().split() == ["out", "err"]
    # RUSAGE_CHILDREN would still say 200 MiB here: the largest child the bench ever reaped
    assert small_rc == 3 and 0 < small_peak < 100 * MIB


def test_disk_counts_allocated_blocks_and_each_hard_link_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").write_bytes(os.urandom(256 * 1024))
    os.link(tmp_path / "sub" / "data", tmp_path / "link")
    with open(tmp_path / "sparse", "wb") as fh:  # an LMDB map is sparse like this
        fh.truncate(100 * MIB)
    assert 256 * 1024 <= disk_bytes(tmp_path) < 256 * 1024 + 64 * 1024
    assert disk_bytes(tmp_path / "missing") == 0


def test_growth_exponent_is_the_least_squares_slope_in_log_log():
    # log10 N = 0, 1, 2 and log10 t = 0, 1, 3: slope = ((-1)(-4/3) + (1)(5/3)) / 2 = 1.5
    assert growth_exponent([(1, 1.0), (10, 10.0), (100, 1000.0)]) == pytest.approx(1.5)
    assert growth_exponent([(1000, 3.0), (8000, 3.0 * 8 ** 0.9)]) == pytest.approx(0.9)
    assert growth_exponent([(1000, 5.0)]) is None


def _run(mode, n, ms, rss, status="done"):
    return {"mode": mode, "images": n, "status": status, "total": {"per_image_ms": ms, "peak_rss_bytes": rss}}


def test_the_ratios_of_done_when_compare_the_largest_size_with_ten_thousand():
    runs = [_run("pooled", 1000, 9.0, 1e9), _run("pooled", 10000, 8.0, 2e9), _run("pooled", 100000, 9.0, 3.2e9),
            _run("middle", 2000, 60.0, 1.5e9), _run("middle", 20000, 50.0, 1.5e9),
            _run("middle", 40000, 0.0, 0.0, status="failed")]
    got = {c["name"]: (round(c["ratio"], 6), c["limit"], c["ok"]) for c in checks(runs, ref_size=10000)}
    assert got == {"pooled time per image, N=100000 / N=10000": (1.125, 1.25, True),
                   "pooled peak RSS, N=100000 / N=10000": (1.6, 1.5, False),
                   "middle peak RSS, N=20000 / N=2000": (1.0, 1.2, True)}
    # without a 10^4 run: the next smaller size
    got = [c["name"] for c in checks(runs[:1] + runs[2:3], ref_size=10000)]
    assert got == ["pooled time per image, N=100000 / N=1000", "pooled peak RSS, N=100000 / N=1000"]
    assert checks(runs[:1], ref_size=10000) == []


def test_a_stage_that_fails_ends_its_run_with_the_products_error(tmp_path, capsys):
    code = main(["--mode", "pooled", "--sizes", "30", "--root", str(tmp_path), "--set", "knn.k=0"])
    assert code == 1
    (run,) = json.loads((tmp_path / "scale-results.json").read_text())["runs"]
    assert run["status"] == "failed" and [s["stage"] for s in run["stages"]] == ["ingest"]
    assert run["error"] == "ingest exited 2: error: knn.k must be >= 1, got 0"
    assert "[pooled N=30] FAILED: ingest exited 2" in capsys.readouterr().out


@pytest.mark.slow
def test_the_bench_runs_every_stage_and_reuses_the_run_on_a_rerun(tmp_path, capsys):
    args = ["--mode", "pooled", "--sizes", "30", "--image-size", "32", "--root", str(tmp_path), *TINY]
    assert main([*args, "--out", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert [(r["mode"], r["images"], r["status"]) for r in result["runs"]] == [("pooled", 30, "done")]
    for run in result["runs"]:
        assert [s["stage"] for s in run["stages"]] == ["ingest", "knn", "classifier", "metric", "joint", "eval"]
        assert all(s["rc"] == 0 and s["stage_s"] is not None and s["peak_rss_bytes"] > 0 for s in run["stages"])
        assert "model.tune_blocks=0" in run["stages"][2]["argv"] and "model.image_size=32" in run["stages"][5]["argv"]
        assert run["total"]["wall_s"] == pytest.approx(sum(s["wall_s"] for s in run["stages"]))
        assert run["total"]["peak_rss_bytes"] == max(s["peak_rss_bytes"] for s in run["stages"])
        assert run["stages"][-1]["workspace_bytes"] > run["stages"][0]["workspace_bytes"] > 0
        assert not (tmp_path / f"pooled-{run['images']}" / "ws").exists()  # no --keep
        assert (tmp_path / f"pooled-{run['images']}" / "logs" / "eval.log").is_file()
    assert result["fits"]["pooled"]["wall"]["total"] is None and result["checks"] == []  # one size: no fit
    assert result["machine"]["cores"] == os.cpu_count() and result["machine"]["retdmctl"].startswith("retdmctl ")
    md = (tmp_path / "out.md").read_text()
    assert "## pooled: --frozen-backbone --tune-blocks 0 --views 1" in md and "| 30 | **total** |" in md
    capsys.readouterr()

    # the same root again: the run reused as measured, no stage re-run
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[pooled N=30] reused" in out and "ingest ..." not in out
    saved = json.loads((tmp_path / "scale-results.json").read_text())["runs"]
    assert [r["stages"] for r in saved] == [r["stages"] for r in result["runs"]]


def test_fits_give_each_stage_and_the_total_an_exponent_on_wall_and_in_stage_time():
    def run(n, scale):
        stages = [{"stage": s, "wall_s": 4.0 + scale, "stage_s": scale} for s in
                  ("ingest", "knn", "classifier", "metric", "joint", "eval")]
        return {"mode": "pooled", "images": n, "status": "done", "stages": stages,
                "total": {"wall_s": sum(s["wall_s"] for s in stages), "stage_s": sum(s["stage_s"] for s in stages)}}

    got = fits([run(1000, 1.0), run(10000, 10.0), run(4000, 0.0) | {"status": "failed"}])
    # wall: log10(14/5) per decade; in stage: exactly linear
    assert got["pooled"]["in_stage"] == {k: pytest.approx(1.0) for k in got["pooled"]["in_stage"]}
    assert got["pooled"]["wall"]["knn"] == pytest.approx(math.log10(14 / 5))
    assert got["pooled"]["wall"]["total"] == pytest.approx(math.log10(84 / 30)) and "middle" not in got

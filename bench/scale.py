"""Scale bench: the product's own stages on the dense demo set from 10^3 to 10^5 images.

For each mode and size, a fresh workspace gets the demo set
(``retdmctl ingest demo --images N --classes 20 --labels 4-6``) and then every stage in its
own ``retdmctl`` process: ``knn``, ``train --stage classifier``, ``train --stage metric``,
``train --stage joint``, ``eval``. Per stage it records

    wall time, and per image (wall / N; N counts every split),
    peak RSS of that process: ``ru_maxrss`` from ``os.wait4`` (the child's own high-water
        mark; a worker it forked and reaped counts as its own peak, never added; Linux
        also counts the parent's memory at the fork, kept across exec, so this script
        stays small: no torch, no data),
    the sampled peak of the process tree's summed RSS (the child and its workers, read
        from /proc every --poll seconds; what the machine had to hold),
    disk after the stage: the workspace and the backbone cache. Each run has its own
        RETDM_CACHE_DIR, so the cache size belongs to that run alone.

Modes (each also sets ``model.image_size``, --image-size, 128 px by default):

    pooled  --frozen-backbone --tune-blocks 0 --views 1 (pooled features of the centre
            crop), at every --sizes
    middle  --frozen-backbone with tune_blocks and views on auto (the default middle way:
            the last block trained on ten cached views), at every --middle-sizes

The backbone's features are extracted inside the first stage that needs them
(``train --stage classifier``), so that stage's time includes the extraction.

Then, per mode, the growth exponent of time in N (least squares of log wall time on
log N, per stage and for the total) and the ratios of issue 18's "Done when":
pooled time per image at the largest size / at --ref-size (10^4), pooled peak RSS at the
largest / at --ref-size (peak = the largest ru_maxrss of the run's stages), middle peak
RSS at its largest / smallest size. With --vote, bench/vote_scale.py (the vote's time
per query against bank size) is run too when it exists, its output kept verbatim.

Resuming: every finished (mode, size) is written to ROOT/scale-results.json as soon as
it ends. A rerun with the same --root reuses a finished entry with the same settings
(reported as reused, never re-timed) and times every other one from a fresh workspace:
a half-done workspace is deleted, never timed, since the product would skip the stages
it already finished. --fresh ignores the saved entries. Without --keep each run's
workspace and cache are deleted once measured (the logs stay under --root); with the
default --root (a temp dir) everything is removed at the end unless a stage failed.

    python bench/scale.py --out docs/bench-scale                        # the full bench
    python bench/scale.py --mode pooled --sizes 1000,10000,100000 --root /data/scale
    python bench/scale.py --sizes 200,400 --middle-sizes 200,400 --image-size 64   # toy

Writes the markdown table to stdout, and with --out PATH the JSON to PATH.json and the
markdown to PATH.md (a trailing .json or .md on PATH is dropped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = "scale-results.json"
STAGES = ("ingest", "knn", "classifier", "metric", "joint", "eval")
MODES = {
    "pooled": ["model.frozen_backbone=true", "model.tune_blocks=0", "model.views=1"],
    "middle": ["model.frozen_backbone=true"],  # tune_blocks and views on auto
}
MODE_FLAGS = {"pooled": "--frozen-backbone --tune-blocks 0 --views 1",
              "middle": "--frozen-backbone (tune_blocks, views: auto)"}
# issue 18, "Done when"
LIMIT_TIME_PER_IMAGE = 1.25
LIMIT_POOLED_RSS = 1.5
LIMIT_MIDDLE_RSS = 1.2


# --- one child process, measured ----------------------------------------------------------


@dataclass
class Child:
    rc: int
    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child (max with its reaped descendants)
    tree_rss_peak_bytes: int  # sampled peak of the summed RSS of the child's process tree


def _tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants (from /proc/PID/task/TID/children)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:  # gone meanwhile, or no /proc
            continue
    return pids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_child(argv: list[str], env: dict[str, str], log: Path, cwd: Path, poll: float = 0.2) -> Child:
    """Run ``argv`` with stdout and stderr streamed to ``log``; its wall time and memory.

    The process is reaped with ``os.wait4`` so that its own ``ru_maxrss`` is read (not
    the bench's cumulative RUSAGE_CHILDREN)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = [0]
    done = threading.Event()
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd)

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], sum(_rss(p) for p in _tree_pids(proc.pid)))
                done.wait(poll)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except KeyboardInterrupt:  # Ctrl-C reached the child too: let it stop cleanly
                _, status, _ = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                raise
            wall = time.perf_counter() - start
        finally:
            done.set()
            sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux
    return Child(proc.returncode, wall, usage.ru_maxrss * 1024, peak[0])


def stage_log(log: Path, stage: str) -> tuple[bool, float | None]:
    """Whether the log shows ``stage`` running (not skipped as up to date), and the time
    the product itself reports for it (``STAGE: done in 12.3s``: without the process's
    start-up and imports)."""
    ran, seconds = False, None
    with open(log, errors="replace") as fh:
        for line in fh:
            if line.startswith(f"{stage}: running"):
                ran = True
            elif line.startswith(f"{stage}: done in ") and line.rstrip().endswith("s"):
                try:
                    seconds = float(line.rstrip()[len(f"{stage}: done in "):-1])
                except ValueError:
                    pass
    return ran, seconds


def disk_bytes(path: Path) -> int:
    """Bytes allocated under ``path`` (like du: st_blocks, each hard link once; an LMDB
    map is sparse, so its apparent size would overstate it)."""
    if not path.exists():
        return 0
    seen, total = set(), 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


# --- the stages of one (mode, size) -------------------------------------------------------


def stage_args(stage: str, n: int, args: argparse.Namespace) -> list[str]:
    if stage == "ingest":
        return ["ingest", "demo", "--images", str(n), "--classes", str(args.classes),
                "--labels", args.labels, "--seed", str(args.seed)]
    if stage in ("classifier", "metric", "joint"):
        return ["train", "--stage", stage]
    return [stage]


def config_sets(mode: str, args: argparse.Namespace) -> list[str]:
    """The --set values every command of a run gets (the same config at every stage;
    ingest, knn and train also save it to retdm.toml)."""
    sets = [*MODES[mode], f"model.image_size={args.image_size}", *args.set]
    return [a for s in sets for a in ("--set", s)]


def run_key(mode: str, n: int, args: argparse.Namespace) -> dict:
    """What a saved entry must match to be reused."""
    return {"mode": mode, "images": n, "image_size": args.image_size, "classes": args.classes,
            "labels": args.labels, "seed": args.seed, "set": list(args.set)}


def run_one(mode: str, n: int, args: argparse.Namespace, root: Path) -> dict:
    """Every stage of ``mode`` at ``n`` images in a fresh workspace; the run's entry."""
    base = root / f"{mode}-{n}"
    ws, cache, logs = base / "ws", base / "cache", base / "logs"
    for path in (ws, cache, logs):  # never time a half-done workspace
        shutil.rmtree(path, ignore_errors=True)
    ws.mkdir(parents=True)
    cache.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "RETDM_WORKDIR"}
    env.update(RETDM_CACHE_DIR=str(cache), RETDM_NO_PROGRESS="1", PYTHONUNBUFFERED="1", COLUMNS="160",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    entry = {**run_key(mode, n, args), "flags": MODE_FLAGS[mode], "status": "running",
             "commit": args.commit, "started": _now(), "stages": []}
    sets = config_sets(mode, args)
    print(f"[{mode} N={n}] workspace {ws}, logs in {logs}", flush=True)
    for stage in STAGES:
        argv = [*args.retdmctl, "-w", str(ws), *stage_args(stage, n, args), *sets]
        log = logs / f"{stage}.log"
        print(f"[{mode} N={n}] {stage} ...", flush=True)
        load0 = os.getloadavg()[0]
        child = run_child(argv, env, log, cwd=base, poll=args.poll)
        ran, own_s = stage_log(log, stage)
        row = {"stage": stage, "argv": argv[len(args.retdmctl):], **asdict(child), "stage_s": own_s,
               "per_image_ms": 1000 * child.wall_s / n, "workspace_bytes": disk_bytes(ws),
               "cache_bytes": disk_bytes(cache), "load_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
               "log": str(log)}
        entry["stages"].append(row)
        own = "" if own_s is None else f", {own_s:.1f} s in the stage"
        print(f"[{mode} N={n}] {stage}: {child.wall_s:.1f} s{own} ({row['per_image_ms']:.2f} ms/image), "
              f"peak RSS {_size(child.peak_rss_bytes)} (tree {_size(child.tree_rss_peak_bytes)}), "
              f"workspace {_size(row['workspace_bytes'])}, cache {_size(row['cache_bytes'])}", flush=True)
        if child.rc != 0 or not ran:
            entry["status"] = "failed"
            entry["error"] = (f"{stage} exited {child.rc}: {_last_line(log)}" if child.rc
                              else f"{stage} did not run (up to date?): the time is not the stage's")
            print(f"[{mode} N={n}] FAILED: {entry['error']} (log: {log})", flush=True)
            return entry
    entry["status"] = "done"
    entry["finished"] = _now()
    entry["total"] = totals(entry["stages"], n)
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return entry


def totals(stages: list[dict], n: int) -> dict:
    wall = sum(s["wall_s"] for s in stages)
    return {"wall_s": wall, "per_image_ms": 1000 * wall / n,
            "stage_s": sum(s["stage_s"] or 0.0 for s in stages),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in stages),
            "tree_rss_peak_bytes": max(s["tree_rss_peak_bytes"] for s in stages),
            "disk_bytes": max(s["workspace_bytes"] + s["cache_bytes"] for s in stages)}


# --- fits and checks ----------------------------------------------------------------------


def growth_exponent(points: list[tuple[float, float]]) -> float | None:
    """Slope b of log t = a + b log N by least squares; None with fewer than two sizes."""
    if len({n for n, _ in points}) < 2 or any(t <= 0 for _, t in points):
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fits(runs: list[dict]) -> dict:
    """Per mode: the growth exponent of each stage's time and of the total, on wall time
    and on the time the product reports inside the stage (without start-up, which flattens
    the wall exponent at small N)."""
    out = {}
    for mode in MODES:
        done = [r for r in runs if r["mode"] == mode and r["status"] == "done"]
        if not done:
            continue
        out[mode] = {}
        for key in ("wall_s", "stage_s"):
            fit = {stage: growth_exponent([(r["images"], _stage(r, stage)[key] or 0.0) for r in done])
                   for stage in STAGES}
            fit["total"] = growth_exponent([(r["images"], r["total"].get(key) or 0.0) for r in done])
            out[mode]["wall" if key == "wall_s" else "in_stage"] = fit
    return out


def checks(runs: list[dict], ref_size: int) -> list[dict]:
    """The ratios of issue 18's "Done when", where the runs to compare finished."""
    out = []

    def done(mode):
        return {r["images"]: r for r in runs if r["mode"] == mode and r["status"] == "done"}

    pooled = done("pooled")
    if len(pooled) >= 2:
        top = max(pooled)
        ref = ref_size if ref_size in pooled and ref_size != top else max(n for n in pooled if n != top)
        for name, key, limit in (("pooled time per image", "per_image_ms", LIMIT_TIME_PER_IMAGE),
                                 ("pooled peak RSS", "peak_rss_bytes", LIMIT_POOLED_RSS)):
            ratio = pooled[top]["total"][key] / pooled[ref]["total"][key]
            out.append({"name": f"{name}, N={top} / N={ref}", "ratio": ratio, "limit": limit,
                        "ok": ratio <= limit})
    middle = done("middle")
    if len(middle) >= 2:
        top, low = max(middle), min(middle)
        ratio = middle[top]["total"]["peak_rss_bytes"] / middle[low]["total"]["peak_rss_bytes"]
        out.append({"name": f"middle peak RSS, N={top} / N={low}", "ratio": ratio,
                    "limit": LIMIT_MIDDLE_RSS, "ok": ratio <= LIMIT_MIDDLE_RSS})
    return out


# --- the machine, the vote bench, the report ----------------------------------------------


def machine(retdmctl: list[str]) -> dict:
    info = {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n")
        info["ram_bytes"] = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1]) * 1024
        cpuinfo = Path("/proc/cpuinfo").read_text().split("\n")
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for package in ("torch", "faiss-cpu", "numpy", "h5py"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    version = subprocess.run([*retdmctl, "--version"], capture_output=True, text=True, env=env)
    info["retdmctl"] = version.stdout.strip() or version.stderr.strip()
    info["commit"] = _commit()
    return info


def run_vote(args: argparse.Namespace, root: Path) -> dict:
    script = REPO / "bench" / "vote_scale.py"
    if not script.exists():
        print("--vote: bench/vote_scale.py not found; skipped", flush=True)
        return {"skipped": "bench/vote_scale.py not found"}
    argv = [sys.executable, str(script), *shlex.split(args.vote_args)]
    log = root / "vote" / "vote_scale.log"
    print(f"[vote] {shlex.join(argv)} ...", flush=True)
    child = run_child(argv, dict(os.environ), log, cwd=REPO, poll=args.poll)
    output = log.read_text(errors="replace")
    print(output, flush=True)
    return {"argv": argv[1:], **asdict(child), "output": output}


def markdown(result: dict) -> str:
    lines = ["# Scale bench (issue 18)", ""]
    m = result["machine"]
    lines += [f"`python bench/scale.py {result['settings']['command']}` on {m.get('cores_usable')} cores "
              f"({m.get('cpu', '?')}), {_size(m.get('ram_bytes', 0))} RAM, torch {m.get('torch', '?')}, "
              f"{m.get('retdmctl', '?')} ({m.get('commit')}); {result['started']}. Demo set, "
              f"{result['settings']['classes']} classes, {result['settings']['labels']} labels per image, "
              f"{result['settings']['image_size']} px.", "",
              "Wall: the stage's `retdmctl` process, start-up and imports included (ms / image: wall / N, "
              "N counting every split); in stage: the time the product reports for the stage itself. "
              "Peak RSS: `ru_maxrss` of the stage's process; tree: the sampled peak of the summed RSS "
              "of it and its workers (shared pages counted in each). Disk: the workspace and the run's "
              "backbone cache after the stage. `train --stage classifier` includes the feature extraction. "
              "The growth exponents and ratios use wall time.", ""]
    for mode in MODES:
        runs = [r for r in result["runs"] if r["mode"] == mode]
        if not runs:
            continue
        lines += [f"## {mode}: {MODE_FLAGS[mode]}", "",
                  "| images | stage | wall (s) | in stage (s) | ms / image | peak RSS | tree RSS | workspace | cache |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(runs, key=lambda r: r["images"]):
            for s in r["stages"]:
                flag = "" if s["rc"] == 0 else f" (exit {s['rc']})"
                own = "" if s.get("stage_s") is None else f"{s['stage_s']:.1f}"
                lines.append(f"| {r['images']:,} | {s['stage']}{flag} | {s['wall_s']:.1f} | {own} | {s['per_image_ms']:.2f} | "
                             f"{_size(s['peak_rss_bytes'])} | {_size(s['tree_rss_peak_bytes'])} | "
                             f"{_size(s['workspace_bytes'])} | {_size(s['cache_bytes'])} |")
            if r["status"] == "done":
                t = r["total"]
                reused = " (reused)" if r.get("reused") else ""
                lines.append(f"| {r['images']:,} | **total**{reused} | **{t['wall_s']:.1f}** | {t.get('stage_s', 0):.1f} | "
                             f"**{t['per_image_ms']:.2f}** | "
                             f"**{_size(t['peak_rss_bytes'])}** | {_size(t['tree_rss_peak_bytes'])} | "
                             f"{_size(t['disk_bytes'])} (both) | |")
            else:
                lines.append(f"| {r['images']:,} | **{r['status']}**: {r.get('error', '')} | | | | | | | |")
        lines.append("")
    if result["fits"]:
        modes = list(result["fits"])
        lines += ["## Growth exponent of time in N (least squares of log t on log N)", "",
                  "| stage | " + " | ".join(f"{m} (wall) | {m} (in stage)" for m in modes) + " |",
                  "|---|" + "---:|" * 2 * len(modes)]
        for stage in (*STAGES, "total"):
            cells = [result["fits"][mode][kind][stage] for mode in modes for kind in ("wall", "in_stage")]
            lines.append(f"| {stage} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
        lines.append("")
    if result["checks"]:
        lines += ["## Done when (issue 18)", "", "| ratio | value | limit | met |", "|---|---:|---:|---|"]
        for c in result["checks"]:
            lines.append(f"| {c['name']} | {c['ratio']:.2f} | {c['limit']:.2f} | {'yes' if c['ok'] else 'no'} |")
        lines.append("")
    if result.get("vote"):
        v = result["vote"]
        lines += ["## The vote: time per query against bank size (bench/vote_scale.py)", ""]
        lines += ([v["skipped"], ""] if "skipped" in v else ["```", v["output"].rstrip(), "```", ""])
    return "\n".join(lines)


# --- helpers, main ------------------------------------------------------------------------


def _commit() -> str | None:
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return git.stdout.strip() or None


def _stage(run: dict, stage: str) -> dict:
    return next(s for s in run["stages"] if s["stage"] == stage)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 1000,10000, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["pooled", "middle", "both"], default="both")
    p.add_argument("--sizes", type=_sizes, default=[1000, 10000, 100000], help="pooled sizes")
    p.add_argument("--middle-sizes", type=_sizes, default=[2000, 20000], help="middle-way sizes")
    p.add_argument("--ref-size", type=int, default=10000,
                   help="pooled size the largest is compared with (else the next smaller)")
    p.add_argument("--image-size", type=int, default=128, help="model.image_size (px)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--labels", default="4-6", help="labels per image of the demo set")
    p.add_argument("--seed", type=int, default=0, help="the demo set's seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed to every retdmctl command (repeatable)")
    p.add_argument("--root", type=Path, default=None, help="where workspaces and logs go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="leave each run's workspace and cache")
    p.add_argument("--fresh", action="store_true", help="re-time every run, reusing none from ROOT/" + RESULTS)
    p.add_argument("--poll", type=float, default=0.2, help="seconds between RSS samples of the process tree")
    p.add_argument("--vote", action="store_true", help="also run bench/vote_scale.py (when present)")
    p.add_argument("--vote-args", default="", help="arguments for bench/vote_scale.py (one string)")
    p.add_argument("--out", type=Path, default=None, help="write PATH.json and PATH.md")
    p.add_argument("--retdmctl", default=f"{shlex.quote(sys.executable)} -m retdmctl",
                   help="the command that runs the product")
    args = p.parse_args(argv)
    args.retdmctl = shlex.split(args.retdmctl)
    args.command = shlex.join(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temp_root = args.root is None
    root = Path(tempfile.mkdtemp(prefix="retdm-scale-")) if temp_root else args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    saved_path = root / RESULTS
    saved = json.loads(saved_path.read_text())["runs"] if saved_path.exists() else []
    args.commit = _commit()
    plan = [(mode, n) for mode in ("pooled", "middle") if args.mode in (mode, "both")
            for n in (args.sizes if mode == "pooled" else args.middle_sizes)]
    result = {"bench": "scale", "started": _now(), "machine": machine(args.retdmctl),
              "settings": {"command": args.command, "image_size": args.image_size, "classes": args.classes,
                           "labels": args.labels, "seed": args.seed, "set": args.set, "root": str(root),
                           "modes": {m: MODES[m] for m in MODES}},
              "runs": []}
    print(f"scale bench: {len(plan)} runs under {root}", flush=True)

    def save() -> None:
        result["fits"], result["checks"] = fits(result["runs"]), checks(result["runs"], args.ref_size)
        kept = {json.dumps(run_key(r["mode"], r["images"], args), sort_keys=True) for r in result["runs"]}
        others = [r for r in saved if json.dumps({k: r.get(k) for k in run_key("", 0, args)}, sort_keys=True) not in kept]
        runs = others + [{k: v for k, v in r.items() if k != "reused"} for r in result["runs"]]
        partial = saved_path.with_suffix(".partial")
        partial.write_text(json.dumps({"runs": runs}, indent=1))
        partial.replace(saved_path)  # never half a file, even when interrupted

    failed = False
    try:
        for mode, n in plan:
            key = run_key(mode, n, args)
            old = None if args.fresh else next(
                (r for r in saved if r["status"] == "done" and all(r.get(k) == v for k, v in key.items())), None)
            if old is not None:
                print(f"[{mode} N={n}] reused from {saved_path} (measured {old.get('finished')} "
                      f"at {old.get('commit')})", flush=True)
                if old.get("commit") != args.commit:
                    print(f"[{mode} N={n}] warning: measured at {old.get('commit')}, the code is now "
                          f"{args.commit}; --fresh re-times it", flush=True)
                result["runs"].append({**old, "reused": True})
                continue
            entry = run_one(mode, n, args, root)
            failed |= entry["status"] != "done"
            result["runs"].append(entry)
            save()
        if args.vote:
            result["vote"] = run_vote(args, root)
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved in " + str(saved_path), file=sys.stderr)
        save()
        return 130
    save()
    result["finished"] = _now()
    text = markdown(result)
    print()
    print(text)
    if args.out is not None:
        out = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_name(out.name + ".md").write_text(text + "\n")
        print(f"wrote {out}.json and {out}.md")
    if temp_root and not args.keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    elif failed:
        print(f"logs of the failed run(s) under {root}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Missing labels: the same bench with validation on full labels and under the protocol.

Reads two runs of ``bench/missing_labels.py`` with the same command apart from
``--set labels.val_protocol`` (``full`` and ``same``) and prints, per dataset, protocol
and variant, over the seeds both runs have: test mAP under each validation, their paired
difference (same - full: what a user whose validation labels are incomplete gets, against
what the full-validation table promised) and the share of the full-label gap each variant
closes against assume-negative BCE, under each validation.

    PYTHONPATH=. python bench/compare_val_protocols.py docs/bench-missing-labels-llr.json \\
        docs/bench-missing-labels-valsame.json
"""

from __future__ import annotations

import argparse
import json
import statistics

VARIANTS = ("bce", "llr", "llr_val", "llr_clml", "bce_clml")


def mean_std(values: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    m = statistics.mean(values)
    return f"{m:+.4f} ± {sd:.4f}".replace("-", "−") if signed else f"{m:.4f} ± {sd:.4f}"


def gap_share(results: dict, seeds: list[str], protocol: str, variant: str) -> str:
    """The share of (full-label bce − protocol bce) that ``variant`` closes, paired by seed."""
    gap = statistics.mean(results[s]["full"]["bce"]["mAP"] - results[s][protocol]["bce"]["mAP"] for s in seeds)
    gain = statistics.mean(results[s][protocol][variant]["mAP"] - results[s][protocol]["bce"]["mAP"] for s in seeds)
    return f"{round(100 * gain / gap) + 0:d} %".replace("-", "−") if gap > 0 else "n/a"


def gap_size(results: dict, seeds: list[str], protocol: str) -> str:
    gap = statistics.mean(results[s]["full"]["bce"]["mAP"] - results[s][protocol]["bce"]["mAP"] for s in seeds)
    return f"gap {gap:.4f}".replace("-", "−")


def compare(full: dict, same: dict) -> list[str]:
    lines = []
    for dataset in full["results"]:
        if dataset not in same["results"]:
            continue
        a, b = full["results"][dataset], same["results"][dataset]
        seeds = [s for s in a if s in b and all(p in b[s] and b[s][p] for p in a[s])]
        seeds = [s for s in seeds if all(v in b[s][p] for p in a[s] for v in a[s][p])]  # finished seeds only
        if not seeds:
            continue
        lines += [f"### {dataset} (seeds {', '.join(seeds)}; test mAP, per-class thresholds from validation)", "",
                  "| protocol | variant | validation full | validation same | same − full (seeds better) "
                  "| gap to full labels closed, full → same |", "|---|---|---|---|---|---|"]
        for protocol in a[seeds[0]]:
            if protocol == "full":
                continue
            for v in VARIANTS:
                if not all(v in a[s][protocol] and v in b[s][protocol] for s in seeds):
                    continue
                fa = [a[s][protocol][v]["mAP"] for s in seeds]
                fb = [b[s][protocol][v]["mAP"] for s in seeds]
                diff = [y - x for x, y in zip(fa, fb)]
                better = sum(d > 0 for d in diff)
                closed = (f"{gap_size(a, seeds, protocol)} → {gap_size(b, seeds, protocol)}" if v == "bce"
                          else f"{gap_share(a, seeds, protocol, v)} → {gap_share(b, seeds, protocol, v)}")
                lines.append(f"| {protocol} | {v} | {mean_std(fa)} | {mean_std(fb)} | "
                             f"{mean_std(diff, signed=True)} ({better}/{len(seeds)}) | {closed} |")
        full_bce = [a[s]["full"]["bce"]["mAP"] for s in seeds]
        same_full = [b[s]["full"]["bce"]["mAP"] for s in seeds]
        lines += ["", f"Full labels (bce, the ceiling): {mean_std(full_bce)} "
                  f"({'the same in both runs' if full_bce == same_full else 'DIFFERS between the runs'}).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", help="json of the run with labels.val_protocol = full")
    parser.add_argument("same", help="json of the run with labels.val_protocol = same")
    args = parser.parse_args()
    with open(args.full) as f, open(args.same) as g:
        print("\n".join(compare(json.load(f), json.load(g))))


if __name__ == "__main__":
    main()

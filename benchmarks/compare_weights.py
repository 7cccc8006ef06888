"""Compare two sets of DeMoE weights and apply the project's acceptance rule.

Runs the out-of-distribution benchmark (``ood.py``) and the in-distribution
quality benchmark (``quality.py``'s ``run()``) for both, DeMoE auto-routed (what
``deblur()`` gives a user), without the classical methods (they do not depend
on the weights), and prints one table: the OOD mean PSNR gain over the blurry
input per family and overall, the in-distribution mean PSNR per task and
overall, and the routing. The verdict:

    ACCEPT when the OOD mean PSNR gain improves by >= 0.1 dB and no
    in-distribution task's mean PSNR drops by more than 0.1 dB; else REJECT,
    with the reason.

Differences are compared to 1e-6 dB (float round-off); the exit code is 0
either way (2 for a bad argument, as argparse does).

    python benchmarks/compare_weights.py --new runs/round1/model.safetensors            # old: packaged
    python benchmarks/compare_weights.py --old A.safetensors --new B.safetensors --device cuda --json cmp.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import demoe
import ood
import quality

OOD_MIN_GAIN = 0.1  # dB the OOD mean gain must improve by
ID_MAX_DROP = 0.1  # dB any in-distribution task may lose at most
_ROUND = 6  # decimals (dB) kept before comparing, so float round-off cannot decide


def measure(model, device=None, limit: int | None = None) -> dict:
    """The figures the rule reads, for one model: OOD gains per family and their mean, ID PSNR per task."""
    out = ood.run(model, device=device, limit=limit, classical=False)
    rows, routed, _ = quality.run(model, device=device, limit=limit)  # DeMoE only: no settings
    auto = [(task, p) for (_, task, m, p, _) in rows if m == "demoe_auto"]
    id_psnr = {task: float(np.mean([p for t, p in auto if t == task])) for task in demoe.TASKS}
    return {
        "ood_gain": {f: out["auto_gain"][f] for f in ood.FAMILIES},
        "ood_mean_gain": out["auto_gain"]["mean"],
        "ood_routing": sum(r["routing"].get(r["expert"], 0) for r in out["families"].values())
        / sum(r["cases"] for r in out["families"].values()),
        "id_psnr": id_psnr,
        "id_mean_psnr": float(np.mean([p for _, p in auto])),
        "id_routing": float(np.mean([a == b for a, b in routed])),
    }


def _figures(result: dict) -> list[float]:
    """Every number in a :func:`measure` result."""
    values = []
    for v in result.values():
        values += list(v.values()) if isinstance(v, dict) else [v]
    return values


def json_safe(obj):
    """``obj`` with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def verdict(old: dict, new: dict) -> tuple[bool, str]:
    """The acceptance rule on two :func:`measure` results: (accepted, one line saying why).

    Weights whose figures are not all finite numbers (NaN from diverged training) are rejected.
    """
    broken = [name for name, result in (("old", old), ("new", new))
              if not all(math.isfinite(v) for v in _figures(result))]
    if broken:
        return False, f"REJECT: the {' and '.join(broken)} weights give figures that are not finite numbers (NaN)"
    ood_change = round(new["ood_mean_gain"] - old["ood_mean_gain"], _ROUND)
    drops = {t: round(old["id_psnr"][t] - new["id_psnr"][t], _ROUND) for t in old["id_psnr"]}
    reasons = []
    if ood_change < OOD_MIN_GAIN:
        reasons.append(f"the OOD mean gain changes by {ood_change:+.3f} dB (needs >= +{OOD_MIN_GAIN:.1f})")
    worse = [f"{t} {-d:+.3f} dB" for t, d in drops.items() if d > ID_MAX_DROP]
    if worse:
        reasons.append(f"in-distribution PSNR drops by more than {ID_MAX_DROP:.1f} dB: " + ", ".join(worse))
    if reasons:
        return False, "REJECT: " + "; ".join(reasons)
    task, drop = max(drops.items(), key=lambda kv: kv[1])
    return True, (f"ACCEPT: the OOD mean gain improves by {ood_change:+.3f} dB; the largest in-distribution "
                  f"change is {task} {-drop:+.3f} dB")


def table(old: dict, new: dict) -> list[str]:
    lines = ["| | old | new | change |", "|---|---|---|---|"]

    def row(label, a, b, unit=" dB", fmt="{:+.2f}"):
        lines.append(f"| {label} | {fmt.format(a)}{unit} | {fmt.format(b)}{unit} | {b - a:+.2f}{unit} |")

    for family in ood.FAMILIES:
        row(f"OOD {family}: PSNR gain", old["ood_gain"][family], new["ood_gain"][family])
    row("**OOD mean PSNR gain**", old["ood_mean_gain"], new["ood_mean_gain"])
    for task in demoe.TASKS:
        row(f"in-distribution {task}: PSNR", old["id_psnr"][task], new["id_psnr"][task], fmt="{:.2f}")
    row("**in-distribution mean PSNR**", old["id_mean_psnr"], new["id_mean_psnr"], fmt="{:.2f}")
    for key, label in (("ood_routing", "OOD routed to the closest expert"), ("id_routing", "in-distribution routing")):
        lines.append(f"| {label} | {old[key]:.0%} | {new[key]:.0%} | |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=None, help="the current weights (default: the packaged model)")
    parser.add_argument("--new", required=True, help="the candidate weights")
    parser.add_argument("--device", default="cpu", help="device for DeMoE (default cpu; e.g. cuda)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures and the verdict as JSON")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N images of each benchmark only, for a quick check")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    ood.check_file_options(parser, {"--json": args.json})
    models = {"old": ood.load(parser, args.old, args.device), "new": ood.load(parser, args.new, args.device)}

    t0 = time.time()
    figures = {name: measure(model, args.device, args.limit) for name, model in models.items()}
    accepted, why = verdict(figures["old"], figures["new"])
    elapsed = time.time() - t0
    command = " ".join(["python benchmarks/compare_weights.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"old: {models['old'].source}\nnew: {models['new'].source}\n"
          f"{command}; {ood.device_name(args.device)}, {elapsed:.0f} s"
          f"{'' if args.limit is None else f'; first {args.limit} image(s) of each benchmark only'}\n")
    print("\n".join(table(figures["old"], figures["new"])))
    print(f"\n{why}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {**figures, "accept": accepted, "verdict": why, "old_weights": models["old"].source,
                  "new_weights": models["new"].source, "device": args.device, "limit": args.limit}
        Path(args.json).write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

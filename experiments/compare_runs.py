"""Compare groups of runs (e.g. seeds of two recipes): validation curves and mean ± sd.

    python -m experiments.compare_runs --out DIR LABEL=RUN[,RUN...] [LABEL=RUN,...]

Each RUN is a run directory (or a copy of its ``metrics.jsonl``, ``eval.json``). Writes
``DIR/compare.png`` (validation loss against step, every run thin, each group's mean
thick) and ``DIR/compare.md`` (final validation loss per run and the group's mean ± sample
sd; with ``eval.json`` also nanoGPT's estimator at each scored context).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from experiments.train import read_metrics


def _curve(run: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl has no validation records")
    return np.array([r["step"] for r in rows]), np.array([r["val_loss"] for r in rows])


def _stat(values: list[float]) -> str:
    sd = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
    return f"{np.mean(values):.3f}{sd}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=pathlib.Path)
    ap.add_argument("groups", nargs="+", help="LABEL=RUN[,RUN...]")
    args = ap.parse_args(argv)
    groups = {}
    for item in args.groups:
        label, _, runs = item.partition("=")
        if not runs:
            ap.error(f"{item!r} must look like LABEL=RUN[,RUN...]")
        groups[label] = [pathlib.Path(r) for r in runs.split(",")]
        for run in groups[label]:
            if not (run / "metrics.jsonl").exists():
                ap.error(f"{run} has no metrics.jsonl")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = ["| group | run | final validation loss | nanoGPT estimator (context: loss) |", "| --- | --- | --- | --- |"]
    for color, (label, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], groups.items()):
        curves = [_curve(r) for r in runs]
        finals, estimators = [], {}
        for run, (steps, loss) in zip(runs, curves):
            ax.plot(steps, loss, color=color, alpha=0.35, lw=1)
            finals.append(float(loss[-1]))
            lm = json.loads((run / "eval.json").read_text()).get("lm", {}) if (run / "eval.json").exists() else {}
            for ctx, v in lm.items():
                estimators.setdefault(ctx, []).append(v["val_loss_nanogpt"])
            est = ", ".join(f"{c}: {v['val_loss_nanogpt']:.3f}" for c, v in lm.items())
            lines.append(f"| {label} | {run.name} | {loss[-1]:.3f} | {est} |")
        if len({len(s) for s, _ in curves}) == 1:
            ax.plot(curves[0][0], np.mean([c for _, c in curves], 0), color=color, lw=2.5,
                    label=f"{label} (n={len(runs)})")
        est = ", ".join(f"{c}: {_stat(v)}" for c, v in estimators.items())
        lines.append(f"| **{label}** | mean ± sd of {len(runs)} | **{_stat(finals)}** | {est} |")
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="validation loss per run")
    ax.legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "compare.png", dpi=110)
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark suite: jformer against Flax NNX, Flax Linen, Equinox and PyTorch, in one run.

    python -m benchmarks.suite                       # everything, 2 rounds, 20 timed steps
    python -m benchmarks.suite --workloads lm-small --rounds 1 --steps 5   # a quick look

Every (peer, workload) runs in a fresh process (``benchmarks.run``); peers are
interleaved — each round visits the workloads' peers in a rotated order — so slow
drift of the machine (thermal, neighbours) spreads over all of them, and two rounds
show how far a number moves by itself: a (peer, workload) whose round medians differ
by more than 10% is flagged. Also measured in the same run: the float32 matmul peak
(``benchmarks.peak``, the MFU denominator) and compile time against depth
(``benchmarks.compile_depth``).

Writes to ``--out`` (default ``benchmarks/results``): ``suite.jsonl`` (every raw
measurement), ``suite.md`` (tables with jformer/peer ratios) and ``suite.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from benchmarks.harness import KIND_PEERS
from benchmarks.workloads import WORKLOADS

DISAGREE = 0.10  # flag (peer, workload) pairs whose round medians differ by more than this


def machine() -> str:
    """CPU model and core count, for the report header."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


# glibc serves allocations above its mmap threshold (at most 32 MB) with fresh mmaps
# and unmaps them on free, so every train step page-faults its large XLA buffers back
# in (80k-280k faults per lm-small step for the JAX peers, 8-20% of their step time
# on this machine). With this tunable those regions are transparent huge pages.
HUGEPAGES_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def run_json(args: list[str], timeout: float, env: dict | None = None) -> list[dict]:
    """Run ``python -m <args>`` in a fresh process (``env`` added to the environment);
    its JSON stdout lines (an error row if it died)."""
    cmd = [sys.executable, "-m", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout:.0f} s"}]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not rows:
        reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip()[-300:]
        rows = [{"error": f"exit {proc.returncode}: {reason}"}]
    return rows


def schedule(workloads: list[str], peers: list[str] | None, rounds: int) -> list[tuple[int, str, str]]:
    """(round, workload, peer) in run order: each round rotates every workload's peer order by one."""
    plan = []
    for r in range(rounds):
        for w in workloads:
            names = [p for p in KIND_PEERS[WORKLOADS[w].kind] if peers is None or p in peers]
            k = r % max(len(names), 1)
            plan += [(r, w, p) for p in names[k:] + names[:k]]
    return plan


# ------------------------------------------------------------------ summary


def summarize(rows: list[dict]) -> dict:
    """{(workload, peer): aggregate}: medians over rounds of each metric, and the round spread."""
    groups = defaultdict(list)
    for row in rows:
        if "workload" in row and "peer" in row:
            groups[row["workload"], row["peer"]].append(row)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[key] = {"error": rs[-1].get("error", "failed")}
            continue
        agg = {"rounds": len(ok), "params": ok[0]["params"]}
        for metric in ("step_s", "forward_s", "compile_s", "peak_mb", "tokens_per_s", "cached_s", "full_s",
                       "cached_equals_full", "page_faults_per_step"):
            values = [r[metric] for r in ok if metric in r]
            if values:
                agg[metric] = statistics.median(values)
        main = "step_s" if "step_s" in agg else "cached_s" if "cached_s" in agg else "full_s"
        values = [r[main] for r in ok if main in r]
        agg["spread"] = max(values) / min(values) - 1 if len(values) > 1 else 0.0
        if "train_flops" in ok[0]:
            agg["train_flops"] = ok[0]["train_flops"]
        out[key] = agg
    return out


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def markdown(summary: dict, peak: dict, depth: list[dict], header: str) -> str:
    peak_gflops = peak.get("peak_gflops")
    lines = [header, ""]
    if peak_gflops:
        lines += [f"Measured float32 matmul peak: **{peak_gflops:.0f} GFLOP/s** (JAX "
                  f"{peak['jax_gflops']:.0f}, PyTorch {peak['torch_gflops']:.0f}); MFU = model FLOPs of a train "
                  "step (`Workload.train_flops`) / step time / peak.", ""]
    flagged = []
    for w in WORKLOADS.values():
        entries = {p: a for (wn, p), a in summary.items() if wn == w.name}
        if not entries:
            continue
        base = entries.get("jformer", {})
        if w.kind in ("lm", "s2s"):
            lines += [f"### {w.name} — train step (B {w.batch}, T {w.length}, D {w.d_model}, "
                      f"L {w.layers}{'+' + str(w.decoder_layers) if w.decoder_layers else ''}, V {w.vocab}, "
                      f"{w.num_params / 1e6:.1f}M params)", "",
                      "| peer | step (s) | peer / jformer | tokens/s | MFU | forward (s) | first step (s) "
                      "| peak memory (MB) | page faults / step | round spread |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for p, a in sorted(entries.items(), key=lambda kv: kv[1].get("step_s", 1e9)):
                if "error" in a:
                    lines.append(f"| {p} | failed: {a['error'][:80]} |" + " |" * 8)
                    continue
                ratio = a["step_s"] / base["step_s"] if "step_s" in base else None
                mfu = a["train_flops"] / a["step_s"] / (peak_gflops * 1e9) if peak_gflops else None
                lines.append(f"| {p} | {a['step_s']:.3f} | {_f(ratio, '{:.2f}')} | {a['tokens_per_s']:,.0f} | "
                             f"{_f(mfu, '{:.0%}')} | {a['forward_s']:.3f} | {a['compile_s']:.1f} | "
                             f"{a['peak_mb']:,.0f} | {_f(a.get('page_faults_per_step'), '{:,.0f}')} | "
                             f"{a['spread']:.0%} |")
        elif w.kind == "decode":
            lines += [f"### decode — greedy, {w.new_tokens} tokens, batch {w.batch}, lm-small model", "",
                      "| peer | KV cache (s) | full forward per token (s) | cache speedup | cache tokens/s "
                      "| cached == full tokens | round spread |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for p, a in entries.items():
                if "error" in a:
                    lines.append(f"| {p} | failed: {a['error'][:80]} |" + " |" * 5)
                    continue
                c, f = a.get("cached_s"), a.get("full_s")
                lines.append(f"| {p} | {_f(c)} | {_f(f)} | {_f(f / c if c and f else None, '{:.1f}x')} | "
                             f"{_f(w.batch * w.new_tokens / c if c else None, '{:,.0f}')} | "
                             f"{_f(a.get('cached_equals_full'), '{:.0%}')} | {a['spread']:.0%} |")
        else:
            continue
        lines.append("")
        flagged += [f"{w.name}/{p} ({a['spread']:.0%})" for p, a in entries.items()
                    if a.get("spread", 0) > DISAGREE]
    long_rows = [(w, p, a) for w in WORKLOADS.values() if w.kind == "long"
                 for (wn, p), a in summary.items() if wn == w.name]
    if long_rows:
        lines += ["### long — one causal attention layer (D 256, N 8, B 1), forward + backward", "",
                  "| T | peer | fwd+bwd (s) | forward (s) | peak memory (MB) | time / reference | "
                  "memory / reference |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for w, p, a in long_rows:
            ref = summary.get((w.name, "jformer-reference"), {})
            if "error" in a:
                lines.append(f"| {w.length} | {p} | failed: {a['error'][:60]} | | | | |")
                continue
            t_ratio = a["step_s"] / ref["step_s"] if "step_s" in ref else None
            m_ratio = a["peak_mb"] / ref["peak_mb"] if "peak_mb" in ref else None
            lines.append(f"| {w.length} | {p} | {a['step_s']:.3f} | {a['forward_s']:.3f} | {a['peak_mb']:,.0f} | "
                         f"{_f(t_ratio, '{:.2f}')} | {_f(m_ratio, '{:.3f}')} |")
        lines.append("")
    if depth:
        lines += ["### compile time against depth (jformer, lm-small train step, AOT lower + compile)", "",
                  "| layers | scanned stack (s) | unrolled (s) |", "| ---: | ---: | ---: |"]
        by = {(d["layers"], d["scan_layers"]): d["compile_s"] for d in depth if "compile_s" in d}
        for layers in sorted({d["layers"] for d in depth if "layers" in d}):
            lines.append(f"| {layers} | {_f(by.get((layers, True)), '{:.1f}')} | "
                         f"{_f(by.get((layers, False)), '{:.1f}')} |")
        lines.append("")
    lines.append("Rounds whose medians differ by more than 10%: " + (", ".join(flagged) if flagged else "none") + ".")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, header: str) -> None:
    """Bar charts: train step time per peer (lm/s2s) and long-attention time and memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [w for w in WORKLOADS.values() if w.kind in ("lm", "s2s")
             and any(wn == w.name for wn, _ in summary)]
    longs = [w for w in WORKLOADS.values() if w.kind == "long" and any(wn == w.name for wn, _ in summary)]
    n = len(train) + (2 if longs else 0)
    if n == 0:
        return
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    axes = axes[0]
    for ax, w in zip(axes, train):
        entries = sorted(((p, a["step_s"]) for (wn, p), a in summary.items() if wn == w.name and "step_s" in a),
                         key=lambda x: x[1])
        names = [p for p, _ in entries]
        ax.barh(names, [s for _, s in entries],
                color=["tab:red" if p == "jformer" else "tab:gray" for p in names])
        ax.invert_yaxis()
        ax.set_title(f"{w.name}: train step (s)")
    if longs:
        for ax, metric, title in ((axes[-2], "step_s", "long: fwd+bwd (s)"),
                                  (axes[-1], "peak_mb", "long: peak memory (MB)")):
            for p in KIND_PEERS["long"]:
                pts = [(w.length, summary[w.name, p][metric]) for w in longs
                       if metric in summary.get((w.name, p), {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_title(title)
            ax.legend(fontsize=7)
    fig.suptitle(header, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--peers", nargs="+", default=None, help="default: every peer of each workload")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed train steps per run (after warm-up)")
    ap.add_argument("--steps-for", nargs="*", default=[], metavar="WORKLOAD=N",
                    help="per-workload override of --steps, e.g. lm-medium=10")
    ap.add_argument("--no-depth", action="store_true", help="skip the compile-time-against-depth sweep")
    ap.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                    help=f"run every process with {HUGEPAGES_ENV['GLIBC_TUNABLES']} (the same for all peers)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--report", action="store_true",
                    help="only rebuild suite.md / suite.png from an existing suite.jsonl in --out")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per (peer, workload) run")
    ap.add_argument("--memory-limit-gb", type=float, default=0.85 * os.sysconf("SC_PHYS_PAGES")
                    * os.sysconf("SC_PAGE_SIZE") / 2**30, help="address-space cap of the long-attention runs")
    args = ap.parse_args(argv)
    steps = {w: args.steps for w in WORKLOADS}
    steps.update({k: int(v) for k, v in (item.split("=") for item in args.steps_for)})
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return write_report([json.loads(line) for line in (args.out / "suite.jsonl").open()], args.out)
    import jax
    import torch
    header = (f"{datetime.date.today().isoformat()} · {machine()} · jax {jax.__version__}, "
              f"torch {torch.__version__} · float32, {args.rounds} round(s), median of {args.steps} steps"
              + "".join(f" ({k}: {v})" for k, v in steps.items() if v != args.steps)
              + (f" · every peer under `GLIBC_TUNABLES={HUGEPAGES_ENV['GLIBC_TUNABLES']}`" if args.hugepages
                 else " · default glibc malloc"))
    env = HUGEPAGES_ENV if args.hugepages else None
    rows = []
    jsonl = (args.out / "suite.jsonl").open("w")

    def record(row):
        rows.append(row)
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()

    record({"kind": "header", "header": header})
    peaks = []
    plan = schedule(args.workloads, args.peers, args.rounds)
    for r, w, p in tqdm(plan, desc="benchmarks", unit="run"):
        if not peaks or r != plan[plan.index((r, w, p)) - 1][0]:  # once at the start of every round
            peak = run_json(["benchmarks.peak"], 600, env)[0]
            peaks.append(peak)
            record({"kind": "peak", "round": r, **peak})
        extra = ["--memory-limit-gb", f"{args.memory_limit_gb:.1f}"] if WORKLOADS[w].kind == "long" else []
        for row in run_json(["benchmarks.run", "--peer", p, "--workload", w, "--steps", str(steps[w]),
                             *extra], args.timeout, env):
            record({"round": r, "peer": p, "workload": w, **row})
    depth = []
    if not args.no_depth:
        depth = [{"round": 0, **d} for d in run_json(["benchmarks.compile_depth"], 3600, env)]
        for d in depth:
            record(d)
    jsonl.close()
    write_report(rows, args.out)


def write_report(rows: list[dict], out: Path) -> None:
    """suite.md and suite.png from the raw rows (as written to suite.jsonl)."""
    header = next((r["header"] for r in rows if r.get("kind") == "header"), "")
    peaks = [r for r in rows if r.get("kind") == "peak" and "peak_gflops" in r]
    peak = max(peaks, key=lambda p: p["peak_gflops"]) if peaks else {}
    depth = [r for r in rows if r.get("kind") == "compile-depth"]
    summary = summarize(rows)
    text = markdown(summary, peak, depth, header)
    (out / "suite.md").write_text(text)
    plot(summary, out / "suite.png", header)
    print(text)


if __name__ == "__main__":
    main()

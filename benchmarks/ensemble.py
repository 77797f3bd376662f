"""S members of a small LM trained in one jit (``jformer.ensemble``) vs a Python loop over S jitted steps.

    python -m benchmarks.ensemble [--sizes 1 2 4 8] [--repeats 10] [--write]

For each S: the vmapped ensemble step (``ensemble.make_train_step``, member i on its own batch
[S, B, T]) and S separate ``TrainState``s stepped one after the other by the same jitted
``training.make_train_step`` (one dispatch per member, blocked once after the loop; that
single-member program is compiled once for every S). Both run the same AdamW update on the
same data. Times: compilation is reported apart (``lower().compile()``), then one warm-up step
of each, then ``repeats`` rounds that time one vmapped step and one loop in turn (a shared
machine's load falls on both alike), each blocked on its results: median and min. Memory:
XLA's plan from ``compiled.memory_analysis()`` (nothing measured at run time): for the vmapped
step its arguments + outputs + temporaries less donated buffers; for the loop S members'
states (their arguments and outputs, donated) plus one step's temporaries, since the steps
run one at a time. ``--write`` saves the markdown table to ``benchmarks/results/ensemble.md``
(``--append``: adds it, for another size).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jformer
from jformer import ensemble, parallel, training

# A small GPT-style LM (Pre-LN, learned positions), about 0.1M parameters.
SMALL = jformer.TransformerConfig(vocab_size=128, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                                  dropout_rate=0.0, norm_position="pre", positions="learned", max_len=64,
                                  pad_id=None)
RESULTS = os.path.join(os.path.dirname(__file__), "results", "ensemble.md")
MIB = 2.0 ** 20


def _optimizer():
    tx, _ = training.make_optimizer("adamw", learning_rate=1e-3, warmup_steps=10, total_steps=1000,
                                    weight_decay=0.1, clip_norm=1.0)
    return tx


def _interleaved(runs: dict, repeats: int) -> dict:
    """``{name: (median, min, times)}`` of each blocking ``runs[name]()``: one warm-up call each, then
    ``repeats`` rounds that call every run once in turn, so that load from other processes on a
    shared machine falls on all of them alike."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t), t) for name, t in times.items()}


def _setup(cfg: jformer.TransformerConfig):
    tx = _optimizer()
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False)
    return tx, loss_fn


def compile_single(cfg: jformer.TransformerConfig = SMALL, *, batch_size: int = 16, seq_len: int = 64):
    """The single-member step (``training.make_train_step``) compiled once, its compile seconds and
    XLA's memory plan: the loop runs this same program for every member and every S."""
    tx, loss_fn = _setup(cfg)
    state = training.TrainState.create(jformer.init_lm(jax.random.key(0), cfg), tx, jax.random.key(1))
    tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    t0 = time.perf_counter()
    compiled = training.make_train_step(loss_fn, tx).lower(state, {"inputs": tokens, "targets": tokens}).compile()
    return compiled, time.perf_counter() - t0, parallel.memory_per_device(compiled)


def measure(S: int, *, cfg: jformer.TransformerConfig = SMALL, batch_size: int = 16, seq_len: int = 64,
            repeats: int = 10, single=None) -> dict:
    """One row: S members as one vmapped jit vs a loop over S jitted single steps (``single``:
    ``compile_single``'s result, compiled here if not given)."""
    tx, loss_fn = _setup(cfg)
    single = single or compile_single(cfg, batch_size=batch_size, seq_len=seq_len)
    one, loop_compile_s, mem = single
    keys = jax.random.split(jax.random.key(0), S)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (S, batch_size, seq_len + 1)).astype(np.int32)
    batches = {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:])}
    ens = ensemble.create(lambda k: jformer.init_lm(k, cfg), tx, keys)
    row = {"S": S, "params_per_member": int(sum(np.size(x) // S for x in jax.tree.leaves(ens.state.params)))}

    # (a) one jit: the ensemble, member i on batches[i]
    t0 = time.perf_counter()
    compiled = ensemble.make_train_step(loss_fn, tx, batch_axis=0).lower(ens, batches).compile()
    row["vmap_compile_s"] = time.perf_counter() - t0
    row["vmap_mib"] = parallel.memory_per_device(compiled)["total"] / MIB
    # (b) S separate states (own buffers: each is donated to its own step), the same batches
    states = [jax.tree.map(jnp.copy, ensemble.member(ens, i)) for i in range(S)]
    member_batches = [jax.tree.map(lambda x: x[i], batches) for i in range(S)]
    row["loop_compile_s"] = loop_compile_s
    # S states held (outputs alias them by donation) + one step's temporaries and non-aliased outputs
    row["loop_mib"] = (S * mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]) / MIB
    box = [ens]

    def run_vmap():
        box[0], metrics = compiled(box[0], batches)
        jax.block_until_ready((box[0], metrics))

    def run_loop():
        out = []
        for i in range(S):
            states[i], metrics = one(states[i], member_batches[i])
            out.append(metrics)
        jax.block_until_ready((states, out))

    timed = _interleaved({"vmap": run_vmap, "loop": run_loop}, repeats)
    for name, (median, best, times) in timed.items():
        row[f"{name}_s"], row[f"{name}_min_s"], row[f"{name}_times"] = median, best, times
    row["speedup"] = row["loop_s"] / row["vmap_s"]
    return row


def ensemble_table(sizes=(1, 2, 4, 8), *, cfg: jformer.TransformerConfig = SMALL, batch_size: int = 16,
                   seq_len: int = 64, repeats: int = 10) -> list[dict]:
    single = compile_single(cfg, batch_size=batch_size, seq_len=seq_len)
    return [measure(S, cfg=cfg, batch_size=batch_size, seq_len=seq_len, repeats=repeats, single=single)
            for S in sizes]


def markdown(rows: list[dict]) -> str:
    base_vmap = rows[0]["vmap_s"] / rows[0]["S"]
    lines = ["| S | vmapped ms / step (min) | loop ms / step (min) | loop / vmapped | vmapped ms / member "
             "| vmapped per member vs S=%d | XLA plan vmapped (MiB) | XLA plan loop (MiB) | compile vmapped (s) |"
             % rows[0]["S"],
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per_member = r["vmap_s"] / r["S"]
        lines.append(f"| {r['S']} | {r['vmap_s'] * 1e3:.1f} ({r['vmap_min_s'] * 1e3:.1f}) | "
                     f"{r['loop_s'] * 1e3:.1f} ({r['loop_min_s'] * 1e3:.1f}) | {r['speedup']:.2f}x | "
                     f"{per_member * 1e3:.1f} | {per_member / base_vmap:.2f} | {r['vmap_mib']:.1f} | "
                     f"{r['loop_mib']:.1f} | {r['vmap_compile_s']:.1f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--write", action="store_true", help=f"save the table to {RESULTS}")
    ap.add_argument("--append", action="store_true", help=f"add the table to {RESULTS} (another size)")
    ap.add_argument("--note", default="", help="a line to add under the table (e.g. that the machine was shared)")
    args = ap.parse_args(argv)
    if any(S < 1 for S in args.sizes):
        ap.error(f"--sizes must be >= 1, got {args.sizes}")
    if min(args.batch_size, args.seq_len, args.repeats) < 1:
        ap.error("--batch-size, --seq-len and --repeats must be >= 1")
    rows = ensemble_table(args.sizes, batch_size=args.batch_size, seq_len=args.seq_len, repeats=args.repeats)
    header = (f"S members of a {rows[0]['params_per_member']:,}-parameter LM (D={SMALL.d_model}, "
              f"L={SMALL.num_layers}, batch {args.batch_size} x {args.seq_len} per member, AdamW, float32): "
              f"one vmapped jit vs a Python loop over S jitted steps; median (and min) of {args.repeats} steps, "
              f"the two interleaved, after compiling and one warm-up step; the loop's single-member step "
              f"compiled once, in {rows[0]['loop_compile_s']:.1f} s. {machine()}, "
              f"{datetime.date.today().isoformat()}.")
    table = markdown(rows)
    print(header + "\n\n" + table)
    if args.note:
        print("\n" + args.note)
    if args.write or args.append:
        # the note is printed below the table; the command line only shows where it went
        flags = ["..." if args.note and a == args.note else "--note=..." if a.startswith("--note=") else a
                 for a in (argv if argv is not None else sys.argv[1:])]
        command = "python -m benchmarks.ensemble " + shlex.join(flags)
        section = f"`{command}`\n\n{header}\n\n{table}\n" + (f"\n{args.note}\n" if args.note else "")
        with open(RESULTS, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "# Ensembles by vmap (benchmarks/ensemble.py)\n\n") + section)
    return rows


if __name__ == "__main__":
    main()

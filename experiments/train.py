"""Train a jformer model from one command, resumably.

    python -m experiments.train --task {reverse,copy,sort,add,shakespeare,multi30k} --workdir DIR [key=value ...]

Writes to DIR: ``config.json``, tokenizers, ``checkpoints/`` (every
``checkpoint_every`` steps, the last two plus the best by validation loss),
``metrics.jsonl``, TensorBoard event files and ``curves.png`` (loss and learning
rate). Running the same command again resumes from the last good checkpoint,
with the same batches and dropout keys as an uninterrupted run; Ctrl-C saves a
checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from experiments import common
from experiments.config import PRESETS, TASKS, preset
from jformer import training
from jformer.checkpoint import Checkpointer


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` and TensorBoard event files."""

    def __init__(self, workdir: pathlib.Path):
        from tensorboardX import SummaryWriter

        self.path = workdir / "metrics.jsonl"
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(path: pathlib.Path, after_step: int | None = None) -> list[dict]:
    """Records of ``metrics.jsonl``; a resumed run's records past the restored step are dropped."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if after_step is None or r["step"] <= after_step]


def plot_curves(workdir: pathlib.Path) -> pathlib.Path:
    """``curves.png``: training and validation loss, and the learning rate, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir / "metrics.jsonl")
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax_loss.legend()
    pts = [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]
    if pts:
        ax_lr.plot(*zip(*pts))
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    fig.tight_layout()
    out = workdir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog=f"presets: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--workdir", required=True, type=pathlib.Path)
    ap.add_argument("--preset", help="named configuration (default: the task's own)")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. steps=500 model.d_model=128")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir: pathlib.Path = args.workdir
    cfg = preset(args.preset or args.task).override(args.overrides)
    if cfg.task != args.task:
        raise SystemExit(f"preset {args.preset!r} is for task {cfg.task!r}, not {args.task!r}")
    config_path = workdir / "config.json"
    if config_path.exists() and common.load_config(workdir) != cfg:
        raise SystemExit(f"{workdir} holds a run with a different configuration; resume it with the same "
                         "options or pick a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(cfg.to_json())

    if cfg.init_from:
        common.copy_tokenizers(pathlib.Path(cfg.init_from), workdir)
    task = common.build_task(cfg, workdir)
    tx, schedule = common.make_optimizer(cfg, task.model)
    state = common.init_state(task, tx)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    ckpt = Checkpointer(workdir / "checkpoints", keep=2, best_metric="val_loss", best_mode="min")
    restored = ckpt.restore(state)
    if restored is not None:
        state, data_state, _ = restored
        task.train_batches.restore(data_state)
    elif cfg.init_from:
        state = common.warm_start(task, state, pathlib.Path(cfg.init_from))
    start_step = int(state.step)
    # Keep the log consistent with the restored step: drop records a killed run wrote after it.
    rows = read_metrics(workdir / "metrics.jsonl", after_step=start_step)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = MetricsLog(workdir)
    print(f"{cfg.task}: {n_params:,} parameters, {cfg.steps} steps"
          + (f", resumed at step {start_step}" if start_step else ""))

    train_step = training.make_train_step(task.loss_fn, tx, learning_rate=schedule)
    eval_step = training.make_eval_step(task.loss_fn)
    tokens_seen, t0, last, evals = 0, time.perf_counter(), {}, None

    def checkpoint(step, metrics=None):
        ckpt.save(step, state, data_state=task.train_batches.state(), metrics=metrics)

    step = start_step
    try:
        with tqdm(total=cfg.steps, initial=start_step, desc=cfg.task, mininterval=1.0) as bar:
            while step < cfg.steps:
                batch = next(task.train_batches)
                state, metrics = train_step(state, batch)
                step += 1
                # Counted on the host batch: reading metrics here would block on the device every step.
                tokens_seen += int(np.count_nonzero(batch["tgt_out"] if "tgt_out" in batch else batch["targets"]))
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    last["tokens_per_second"] = tokens_seen / (time.perf_counter() - t0)
                    log.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                evals = None
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    evals = common.evaluate_loss(task, eval_step, state)
                    log.write(step, evals)
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    checkpoint(step, evals)
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}: saving a checkpoint, rerun the same command to resume")
        checkpoint(step)
        ckpt.close()
        log.close()
        return 130
    ckpt.close()
    log.close()
    wall = time.perf_counter() - t0
    summary = {"task": cfg.task, "parameters": n_params, "steps": step, "wall_seconds": wall,
               "tokens_per_second": last.get("tokens_per_second"), **(evals or {})}
    common.write_json(workdir / "summary.json", summary)
    print(f"plots: {plot_curves(workdir)}")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

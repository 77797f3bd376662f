"""Train a jformer model from one command, resumably.

    python -m experiments.train --task {reverse,copy,sort,add,shakespeare,multi30k} --workdir DIR [key=value ...]

Writes to DIR: ``config.json``, tokenizers, ``checkpoints/`` (every
``checkpoint_every`` steps, the last two plus the best by validation loss),
``metrics.jsonl``, TensorBoard event files and ``curves.png`` (loss and learning
rate). Running the same command again resumes from the last good checkpoint,
with the same batches and dropout keys as an uninterrupted run; Ctrl-C saves a
checkpoint before exiting.

Options and inputs (data files, ``init_from``, ``--mesh``) are checked before
anything is written, and a bad one exits with status 2 and a one-line message.
A workdir whose run never took a step (no metrics, no checkpoint) accepts a new
configuration; one that did refuses any but its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from experiments import common
from experiments.config import PRESETS, TASKS, ExperimentConfig, preset
from jformer import data, parallel, training
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
    ap.add_argument("--mesh", help="device mesh, e.g. data=8 (DP), fsdp=8 (FSDP), data=4,model=2 (DP x TP); "
                                   "see jformer.parallel. Default: one device")
    ap.add_argument("--processes", type=int, default=1,
                    help="train as N processes on this machine (jax.distributed); each process gets the "
                         "devices XLA_FLAGS gives it, and the mesh spans all of them (default data=-1)")
    ap.add_argument("--process-id", type=int, help=argparse.SUPPRESS)   # set by --processes for its children
    ap.add_argument("--coordinator", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def spawn(argv: list[str], n: int) -> int:
    """Run this command as ``n`` processes with a local coordinator (see :func:`run_processes`)."""
    import socket

    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    return run_processes([[sys.executable, "-m", "experiments.train", *argv, "--process-id", str(i),
                           "--coordinator", f"localhost:{port}"] for i in range(n)])


def run_processes(commands: list[list[str]]) -> int:
    """Run ``commands`` side by side; 0, or the exit code of the first to fail.

    When one fails the others are terminated: they would wait for it in their next collective.
    """
    import subprocess

    children = [subprocess.Popen(cmd) for cmd in commands]
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                print(f"process {failed[0]} exited with code {codes[failed[0]]}; stopping the others",
                      file=sys.stderr)
                for c in children:
                    if c.poll() is None:
                        c.terminate()
                for c in children:
                    c.wait()
                return codes[failed[0]]
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:  # the children got the signal too and save their checkpoint
        return max((c.wait() for c in children), key=abs)


def fail(message: str):
    """Exit with status 2 (argparse's for bad usage) after one line on stderr: a bad option or
    input is the user's to fix, and a traceback would bury the one line that says how."""
    print(f"experiments.train: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def make_config(args) -> ExperimentConfig:
    """The run's configuration: the preset (the task's own unless ``--preset``) with the overrides."""
    cfg = preset(args.preset or args.task).override(args.overrides)
    if cfg.task != args.task:
        raise ValueError(f"preset {args.preset!r} is for task {cfg.task!r}, not {args.task!r}")
    return cfg


TOKENIZER_FILES = {"shakespeare": ("tokenizer.json",), "multi30k": ("spm_de.model", "spm_en.model")}


def check_inputs(cfg: ExperimentConfig, mesh_spec: str | None) -> None:
    """Raise a one-line ValueError if something the run reads is missing or does not fit:
    the data files, the ``init_from`` run (config, tokenizers, a checkpoint, the same model),
    the mesh spec. Reads only, so a failure leaves the workdir as it was."""
    if mesh_spec:
        parallel.parse_mesh_spec(mesh_spec)
    try:
        needed = {"shakespeare": ["tinyshakespeare/input.txt"],
                  "multi30k": [f"multi30k/{name}.{lang}" for name in ("train", "val", "test_2016_flickr")
                               for lang in ("de", "en")]}.get(cfg.task, [])
        missing = [name for name in needed if not (data.default_data_dir() / name).is_file()]
    except FileNotFoundError as e:  # no data directory at all
        raise ValueError(f"task {cfg.task!r} needs its data files: {e}") from None
    if missing:
        raise ValueError(f"task {cfg.task!r} needs {missing} in {data.default_data_dir()}")
    if cfg.init_from:
        source = pathlib.Path(cfg.init_from)
        if not (source / "config.json").is_file():
            raise ValueError(f"init_from={cfg.init_from}: no config.json there; it must be a run directory "
                             "made by experiments.train")
        try:
            source_cfg = common.load_config(source)
        except (ValueError, TypeError) as e:
            raise ValueError(f"init_from={cfg.init_from}: its config.json cannot be read ({e})") from None
        if source_cfg.model != cfg.model:
            diff = config_diff(dataclasses.replace(cfg, model=source_cfg.model), cfg)
            raise ValueError(f"init_from={cfg.init_from}: its model config differs from this run's ({diff})")
        missing = [n for n in TOKENIZER_FILES.get(cfg.task, ()) if not (source / n).is_file()]
        if missing:
            raise ValueError(f"init_from={cfg.init_from}: tokenizer files {missing} missing there")
        ckpts = source / "checkpoints"
        if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
            raise ValueError(f"init_from={cfg.init_from}: no checkpoint in {ckpts}")


def run_started(workdir: pathlib.Path) -> bool:
    """Whether a run in ``workdir`` took a step: it has metrics or anything under ``checkpoints/``."""
    metrics = workdir / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        return True
    ckpts = workdir / "checkpoints"
    return ckpts.is_dir() and any(ckpts.iterdir())


# Config fields the tokenizers in a workdir depend on (trained on the first num_examples
# pairs with vocab_size pieces, or copied from init_from).
TOKENIZER_FIELDS = ("task", "vocab_size", "num_examples", "init_from")


def plan_workdir(workdir: pathlib.Path, cfg: ExperimentConfig) -> str:
    """What to do with ``workdir`` for ``cfg``; reads only.

    ``"new"`` (no run there), ``"resume"`` (a run with this very config), ``"reconfigure"``
    (a run that never took a step: its config is replaced, e.g. after a failed start), or a
    ValueError refusing to mix two configurations in one run's checkpoints and metrics.
    """
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} exists and is not a directory")
    if not (workdir / "config.json").exists():
        return "new"
    try:
        old = common.load_config(workdir)
    except (ValueError, TypeError) as e:  # unreadable, or invalid under today's checks
        if run_started(workdir):
            raise ValueError(f"{workdir}/config.json cannot be read ({e}); pick a new --workdir") from None
        return "reconfigure"
    if dataclasses.replace(old, exe=cfg.exe) == cfg:  # how it runs may change; what it is may not
        return "resume"
    if not run_started(workdir):
        return "reconfigure"
    raise ValueError(f"{workdir} holds a run with a different configuration ({config_diff(old, cfg)}); resume "
                     "it with the same options or pick a new --workdir")


def config_diff(old: ExperimentConfig, new: ExperimentConfig) -> str:
    """``"steps: 100 there, 20 here; model.d_model: ..."``: the fields that differ, model and exe
    fields one by one."""
    def flat(cfg):
        return {**{k: v for k, v in vars(cfg).items() if k not in ("model", "exe")},
                **{f"{part}.{k}": v for part in ("model", "exe") for k, v in vars(getattr(cfg, part)).items()}}

    a, b = flat(old), flat(new)
    return "; ".join(f"{k}: {a[k]!r} there, {b[k]!r} here" for k in a if a[k] != b[k])


def clear_stale_tokenizers(workdir: pathlib.Path, cfg: ExperimentConfig) -> None:
    """Before a never-started run's config is replaced: delete the tokenizers it made if the
    new config would make different ones (they are reused whenever present)."""
    try:
        old = common.load_config(workdir)
        same = all(getattr(old, k) == getattr(cfg, k) for k in TOKENIZER_FIELDS)
    except (ValueError, TypeError):
        same = False
    if not same:
        for path in common.tokenizer_files(workdir):
            path.unlink()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    workdir: pathlib.Path = args.workdir
    # Everything that can be checked is checked before anything is written: a run that fails
    # here leaves the workdir as it was, and the corrected command can use it.
    try:
        cfg = make_config(args)
        check_inputs(cfg, args.mesh)
        plan = plan_workdir(workdir, cfg)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    if args.processes > 1 and args.process_id is None:
        return spawn(argv, args.processes)  # checked above, so a bad input fails once, not once per process
    if args.process_id is not None:
        parallel.initialize_distributed(args.coordinator, args.processes, args.process_id)
    primary = jax.process_index() == 0  # writes the logs; every process trains and checkpoints
    try:
        mesh = parallel.make_mesh(args.mesh or "data=-1") if args.mesh or args.processes > 1 else None
    except ValueError as e:  # e.g. more mesh devices than there are
        fail(e)
    config_path = workdir / "config.json"
    # Every process has planned from the same files before the primary changes any of them.
    parallel.barrier("workdir-planned")
    # The primary writes the shared files (config, tokenizers) while the others wait, then they
    # read them: processes writing and reading one file at once read it half written.
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        if plan == "reconfigure":
            clear_stale_tokenizers(workdir, cfg)
            print(f"{workdir}: replacing the configuration of a run that never took a step")
        data.write_text_atomic(config_path, cfg.to_json())
        if cfg.init_from:
            common.copy_tokenizers(pathlib.Path(cfg.init_from), workdir)
        task = common.build_task(cfg, workdir)
    parallel.barrier("workdir-ready")
    if not primary:
        task = common.build_task(cfg, workdir)
    tx, schedule = common.make_optimizer(cfg, task.model)
    state = common.init_state(task, tx, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    # Orbax's first sync is a gloo collective, which fails when a process is 30 s late.
    parallel.barrier("checkpointer")
    ckpt = Checkpointer(workdir / "checkpoints", keep=2, best_metric="val_loss", best_mode="min")
    restored = ckpt.restore(state)
    if restored is not None:
        state, data_state, _ = restored
        task.train_batches.restore(data_state)
    elif cfg.init_from:
        state = common.warm_start(task, state, pathlib.Path(cfg.init_from), mesh)
    start_step = int(state.step)
    if primary:
        # Keep the log consistent with the restored step: drop records a killed run wrote after it.
        rows = read_metrics(workdir / "metrics.jsonl", after_step=start_step)
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = MetricsLog(workdir) if primary else None
    print(f"{cfg.task}: {n_params:,} parameters, {cfg.steps} steps"
          + (f", resumed at step {start_step}" if start_step else "")
          + (f", mesh {parallel.describe(mesh)} over {jax.process_count()} process(es)" if mesh else ""))

    if mesh is None:
        train_step = training.make_train_step(task.loss_fn, tx, learning_rate=schedule)
        eval_step = training.make_eval_step(task.loss_fn)
        put = None
    else:
        shardings = parallel.tree_shardings(state, mesh)
        train_step = parallel.make_sharded_train_step(task.loss_fn, tx, mesh, shardings, learning_rate=schedule)
        eval_step = jax.jit(training.eval_step_fn(task.loss_fn), out_shardings=parallel.replicated(mesh))
        put = functools.partial(parallel.shard_batch, mesh=mesh)
    tokens_seen, t0, last, evals = 0, time.perf_counter(), {}, None

    def checkpoint(step, metrics=None):
        ckpt.save(step, state, data_state=task.train_batches.state(), metrics=metrics)

    step = start_step
    try:
        with tqdm(total=cfg.steps, initial=start_step, desc=cfg.task, mininterval=1.0, disable=not primary) as bar:
            while step < cfg.steps:
                batch = next(task.train_batches)
                state, metrics = train_step(state, put(batch) if put else batch)
                step += 1
                out_of_time = cfg.max_minutes > 0 and time.perf_counter() - t0 > 60 * cfg.max_minutes
                if cfg.max_minutes > 0 and jax.process_count() > 1:  # all processes stop at the same step
                    out_of_time = bool(multihost_utils.broadcast_one_to_all(np.bool_(out_of_time)))
                last_step = step == cfg.steps or out_of_time
                # Counted on the host batch: reading metrics here would block on the device every step.
                tokens_seen += int(np.count_nonzero(batch["tgt_out"] if "tgt_out" in batch else batch["targets"]))
                bar.update(1)
                if step % cfg.log_every == 0 or last_step:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    last["tokens_per_second"] = tokens_seen / (time.perf_counter() - t0)
                    if log:
                        log.write(step, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                evals = None
                if step % cfg.eval_every == 0 or last_step:
                    evals = common.evaluate_loss(task, eval_step, state, put=put)
                    if log:
                        log.write(step, evals)
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
                if step % cfg.checkpoint_every == 0 or last_step:
                    checkpoint(step, evals)
                if out_of_time:
                    bar.write(f"max_minutes={cfg.max_minutes} reached at step {step}")
                    break
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}: saving a checkpoint, rerun the same command to resume")
        checkpoint(step)
        ckpt.close()
        if log:
            log.close()
        return 130
    ckpt.close()
    if not primary:
        return 0
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

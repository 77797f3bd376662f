"""Charged N-body: SE(3)-Transformer, EGNN, a plain Transformer and a linear model, seeds side by side.

``python -m experiments.nbody [--protocol egnn|paper] [--models a,b] [--seeds S] [--epochs E]
[--max-minutes M] [--quick] [--out DIR] [--data-dir DIR]``

Task (``jformer.data.nbody``): 5 charged particles; from positions x, velocities v and charges q
at one frame predict the positions ``x̂`` [N, 3] at a later one. ``"egnn"`` (Satorras et al. 2021):
frame 30 → 40 at sample frequency 100 (1,000 steps ahead), 3,000 / 2,000 / 2,000 trajectories;
published test MSE in ``nbody.PUBLISHED_MSE``. ``"paper"`` (Fuchs et al. 2020, RECONSTRUCTED): 500
steps ahead from a random start frame; the models here predict positions only, so the paper's
relative-velocity target is left out and the score is the position MSE (relative or absolute
positions give the same MSE).

Loss: ``MSE = Σ_{b,n,c} m_bn (x̂_bnc - x_bnc)² / (3 Σ_{b,n} m_bn)`` (mean over nodes and coordinates,
as EGNN reports). Adam, lr 5e-4, weight decay 1e-12 added to the gradient (torch's Adam), batch
100, every model the same number of epochs. S seeds per model train as one ``jformer.ensemble``;
member i shuffles with its own seed. Selection: fixed budget (the last step); the validation
curve is kept (with the best step), the test set is scored once, at the end.

Models come from a registry ``{name: (init_fn(key) -> params, predict(params, pos [N, 3], vel [N, 3],
charge [N], mask [N]) -> [N, 3])}``, by default ``jformer.equivariant.nbody_models.MODELS``;
``run(argv, registry=...)`` takes another one (the tests' stand-ins).

Also measured, per model: equivariance error ``E = mean ‖f(Rx, Rv, q) - R f(x, v, q)‖²`` over test
graphs with one random rotation each (and relative to ``mean ‖f(x, v, q) - x‖²``, the predicted
displacement), the Figure 3 analogue (one test input rotated about z in 10° steps, predictions
against the rotated ground truth), and seconds per epoch with the projection to EGNN's 10,000.

Outputs (``experiments/results/nbody/``, ``.../paper/`` for the paper protocol): ``summary.json``,
``table.md``, ``learning_curves.png``, ``rotation_sweep.png``, ``equivariance.png``,
``metrics.jsonl`` per model (``models/<name>.metrics.jsonl``), and the ``arms/`` /
``checkpoints/`` of ``experiments.studies.common`` (a rerun resumes).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.studies import common
from jformer import ensemble
from jformer.data import nbody

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "nbody"
DEFAULT_MODELS = ("se3_transformer", "egnn", "transformer", "linear")
REFERENCE_EPOCHS = 10_000  # EGNN's training length on this task
QUICK_SIZES = {"train": 200, "valid": 100, "test": 100}
CLAIM = "equivariant models (SE(3)-Transformer, EGNN) beat a plain Transformer on charged N-body"


def default_registry() -> dict:
    try:
        from jformer.equivariant.nbody_models import MODELS
    except ImportError as e:
        raise SystemExit(f"the model registry jformer.equivariant.nbody_models.MODELS is not available ({e})")
    return MODELS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.nbody", description=CLAIM)
    p.add_argument("--protocol", choices=sorted(nbody.PROTOCOLS), default="egnn")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registry names")
    p.add_argument("--seeds", type=int, default=3, help="members per model (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 100; --quick 2)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=None, help="epochs between validations (default epochs/20)")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop after this long; a rerun resumes")
    p.add_argument("--quick", action="store_true", help=f"tiny data {QUICK_SIZES} and 2 epochs (the tests)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--data-dir", type=pathlib.Path, default=None, help=f"dataset cache (default {nbody.DEFAULT_CACHE})")
    p.add_argument("--out", type=pathlib.Path, default=None, help=f"output directory (default {RESULTS})")
    args = p.parse_args(argv)
    for name in ("seeds", "epochs", "batch_size", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_minutes <= 0 or args.lr <= 0:
        p.error(f"--max-minutes and --lr must be > 0, got {args.max_minutes}, {args.lr}")
    args.models = [m for m in args.models.split(",") if m]
    args.epochs = args.epochs or (2 if args.quick else 100)
    args.eval_every = args.eval_every or max(1, args.epochs // 20)
    return args


# ------------------------------------------------------------------ the model side


def mse_loss(predict):
    """``loss_fn(params, model_state, batch, key, **_) -> (mse, ({"loss", "nll", "weight"}, state))``, the
    jformer loss contract; batch leaves ``pos``/``vel``/``target`` [B, N, 3], ``charge``/``mask`` [B, N]."""
    def loss_fn(params, model_state, batch, key=None, **_):
        pred = jax.vmap(predict, in_axes=(None, 0, 0, 0, 0))(params, batch["pos"], batch["vel"], batch["charge"],
                                                            batch["mask"])
        m = batch["mask"].astype(jnp.float32)[..., None]
        weight = 3.0 * m.sum()
        mse = jnp.sum(m * (pred.astype(jnp.float32) - batch["target"]) ** 2) / jnp.maximum(weight, 1.0)
        return mse, ({"loss": mse, "nll": mse, "weight": weight}, model_state)
    return loss_fn


def adam(lr: float):
    # torch.optim.Adam(weight_decay=1e-12), EGNN's optimiser: L2 added to the gradient, then Adam
    return optax.chain(optax.add_decayed_weights(1e-12), optax.adam(lr))


@functools.cache
def _batched(predict):
    return jax.jit(jax.vmap(predict, in_axes=(None, 0, 0, 0, 0)))


def rotation(axis, degrees: float) -> np.ndarray:
    """[3, 3] rotation by ``degrees`` about ``axis`` (Rodrigues: R = I + sin θ K + (1 - cos θ) K²)."""
    a = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def random_rotations(n: int, seed: int) -> np.ndarray:
    """[n, 3, 3] Haar-random proper rotations (QR of a Gaussian, signs fixed, det +1)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    return q


def rotation_sweep(predict_batch, ex: dict, index: int = 0, *, axis=(0, 0, 1), step_degrees: float = 10.0) -> dict:
    """Figure 3 analogue: graph ``index`` of ``ex`` rotated about ``axis`` by 0, 10, ... < 360 degrees.

    ``predict_batch(pos [A, N, 3], vel, charge [A, N], mask) -> [A, N, 3]``. Returns ``angles`` [A],
    ``pred`` [A, N, 3] = f(R_a x, R_a v), ``truth`` [A, N, 3] = R_a x_target, ``rotated_pred0`` = R_a f(x, v)
    and ``equivariance_mse`` = mean over angles, nodes, coordinates of (f(R x) - R f(x))².
    """
    angles = np.arange(0.0, 360.0, step_degrees)
    R = np.stack([rotation(axis, a) for a in angles])
    rot = lambda x: np.einsum("aij,nj->ani", R, x)  # noqa: E731  (x' = R x per node)
    A = len(angles)
    pred = np.asarray(predict_batch(rot(ex["pos"][index]).astype(np.float32), rot(ex["vel"][index]).astype(np.float32),
                                    np.repeat(ex["charge"][index][None], A, 0), np.repeat(ex["mask"][index][None], A, 0)),
                      np.float64)
    rotated_pred0 = rot(pred[0])
    return {"angles": angles, "pred": pred, "truth": rot(ex["target"][index]), "rotated_pred0": rotated_pred0,
            "equivariance_mse": float(np.mean((pred - rotated_pred0) ** 2))}


def equivariance_error(predict_batch, ex: dict, *, n: int = 200, seed: int = 0) -> dict:
    """``{"mse": mean ‖f(Rx, Rv) - R f(x, v)‖² / 3, "relative": that / (mean ‖f(x, v) - x‖² / 3)}``
    over the first ``n`` graphs of ``ex``, one Haar-random rotation each."""
    n = min(n, len(ex["pos"]))
    R = random_rotations(n, seed).astype(np.float32)
    rot = lambda x: np.einsum("bij,bnj->bni", R, x)  # noqa: E731
    args = (ex["charge"][:n], ex["mask"][:n])
    f = np.asarray(predict_batch(ex["pos"][:n], ex["vel"][:n], *args), np.float64)
    f_rot = np.asarray(predict_batch(rot(ex["pos"][:n]), rot(ex["vel"][:n]), *args), np.float64)
    mse = float(np.mean((f_rot - rot(f)) ** 2))
    return {"mse": mse, "relative": mse / max(float(np.mean((f - ex["pos"][:n]) ** 2)), 1e-30)}


# ------------------------------------------------------------------ the data side


def _take(ex: dict, idx) -> dict:
    return {k: ex[k][idx] for k in ("pos", "vel", "charge", "mask", "target")}


def member_batches(arrays: dict, params: dict, seeds: list[int], batch_size: int):
    """``step -> batch`` of [S, B, ...] leaves: member i's epoch e is a permutation drawn from
    (seed_i, e) (and, for ``"paper"``, start frames from (seed_i, e)); a pure function of the step."""
    n_train = len(arrays["train_charges"])
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_train} training trajectories")
    fixed = nbody.examples(arrays, params, "train") if params["protocol"] == "egnn" else None

    @functools.lru_cache(maxsize=2 * len(seeds))
    def epoch(i: int, e: int):
        ex = fixed if fixed is not None else nbody.examples(arrays, params, "train", epoch_seed=common._seed(seeds[i], e, 1))
        return ex, np.random.default_rng(common._seed(seeds[i], e)).permutation(n_train)

    def batch(step: int) -> dict:
        e, k = divmod(step, steps_per_epoch)
        parts = []
        for i in range(len(seeds)):
            ex, perm = epoch(i, e)
            parts.append(_take(ex, perm[k * batch_size:(k + 1) * batch_size]))
        return {name: np.stack([p[name] for p in parts]) for name in parts[0]}

    return batch, steps_per_epoch


def eval_batches(ex: dict, size: int = 500) -> list[dict]:
    n = len(ex["pos"])
    return [_take(ex, slice(lo, lo + size)) for lo in range(0, n, size)]


# ------------------------------------------------------------------ one model


class NBodyStudy(common.Study):
    """``common.Study`` whose deadline is not honoured at a step that already has a checkpoint.

    ``common.train_arm`` saves a checkpoint when it stops at a deadline, at the step it stops
    at; if that step was just saved after a validation (or is the step it resumed from),
    orbax refuses the second save (StepAlreadyExistsError). ``saved_step()`` (set per model)
    tells whether the next step is such a step; stopping then waits one step.
    """

    saved_step = staticmethod(lambda: False)

    def out_of_time(self) -> bool:
        return super().out_of_time() and not self.saved_step()


def train_model(study: NBodyStudy, name: str, init_fn, predict, *, arrays, params, args) -> dict | None:
    """Train ``study.S`` members of one model (``common.train_arm``); None past the deadline."""
    batch_fn, spe = member_batches(arrays, params, study.seeds, args.batch_size)
    valid = eval_batches(nbody.examples(arrays, params, "valid"))
    test_ex = nbody.examples(arrays, params, "test")
    loss_fn = mse_loss(predict)
    eval_step = ensemble.make_eval_step(loss_fn)
    clock = {"calls": [], "eval": []}  # wall times of batch() calls and of validations (timing)

    def batch(step):
        clock["calls"].append(time.monotonic())
        clock["next"] = step + 1
        return batch_fn(step)

    eval_steps = args.eval_every * spe
    # the next step was checkpointed (a validation step, or the resumed one before any step ran)
    study.saved_step = lambda: "next" not in clock or clock["next"] % eval_steps == 0

    def evaluate(ens):
        t0 = time.monotonic()
        out = {"val_mse": common.evaluate_batches(eval_step, ens, valid)["loss"]}
        clock["eval"].append((t0, time.monotonic()))
        return out

    def extra(ens):
        t_end = time.monotonic()
        test = common.evaluate_batches(eval_step, ens, eval_batches(test_ex))["loss"]  # scored once
        members = [ensemble.member(ens, i).params for i in range(ens.size)]
        fns = [functools.partial(_batched(predict), p) for p in members]
        out = {"test_mse": np.asarray(test).tolist(),
               "equivariance": [equivariance_error(f, test_ex, seed=7) for f in fns],
               "rotation_sweep": {k: np.asarray(v).tolist() for k, v in rotation_sweep(fns[0], test_ex).items()},
               "seconds_per_epoch": None, "steps_per_epoch": spe}
        calls = clock["calls"]
        if len(calls) >= 3:  # from the 2nd step of this process on: the step is compiled
            t0 = calls[1]
            evals = sum(b - max(a, t0) for a, b in clock["eval"] if b > t0)
            out["seconds_per_epoch"] = (t_end - t0 - evals) / (len(calls) - 1) * spe
        return out

    steps = args.epochs * spe
    return common.train_arm(study, name, init_params=init_fn, loss_fn=loss_fn, optimizer=adam(args.lr), steps=steps,
                            batch=batch, evaluate=evaluate, eval_every=eval_steps, extra=extra,
                            hparams=None)


# ------------------------------------------------------------------ outputs


def write_metrics_jsonl(out: pathlib.Path, name: str, result: dict) -> None:
    """One line per logged step: ``{"step", "epoch", "train_loss" | "val_mse": [S]}``."""
    spe = result["steps_per_epoch"]
    rows = [{"step": r["step"], "epoch": r["step"] / spe, "train_loss": r["loss"]} for r in result["train_loss"]]
    rows += [{"step": r["step"], "epoch": r["step"] / spe, "val_mse": r["val_mse"]} for r in result["curves"]]
    rows.sort(key=lambda r: (r["step"], "val_mse" in r))
    path = out / "models" / f"{name}.metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path, results: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        x = [c["step"] / r["steps_per_epoch"] for c in r["curves"]]
        y = np.array([c["val_mse"] for c in r["curves"]])
        ax.plot(x, y.mean(1), marker="o", ms=3, label=name)
        ax.fill_between(x, y.min(1), y.max(1), alpha=0.2)
    ax.set(yscale="log", xlabel="epoch", ylabel="validation MSE", title="N-body: validation MSE (mean, seed range)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path, results: dict) -> None:
    """Figure 3 analogue: x-y plane, one panel per model; filled dots: predictions for the input rotated
    in 10° steps about z, open circles: the rotated ground truth (an equivariant model sits on them)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        sw = {k: np.asarray(v) for k, v in r["rotation_sweep"].items()}
        for n in range(sw["pred"].shape[1]):
            ax.scatter(sw["truth"][:, n, 0], sw["truth"][:, n, 1], facecolors="none", edgecolors=f"C{n}", s=40)
            ax.scatter(sw["pred"][:, n, 0], sw["pred"][:, n, 1], color=f"C{n}", s=8)
        ax.set(title=f"{name}\nequivariance MSE {sw['equivariance_mse']:.2g}", aspect="equal", xlabel="x", ylabel="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_equivariance(path, results: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(results)
    vals = [[max(e["relative"], 1e-16) for e in results[n]["equivariance"]] for n in names]
    ax.bar(names, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=3)
    ax.set(yscale="log", ylabel="relative equivariance error", title="‖f(Rx) - Rf(x)‖² / ‖f(x) - x‖²")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict, args, params) -> str:
    S = len(next(iter(results.values()))["test_mse"]) if results else 0
    lines = [f"Protocol **{params['protocol']}**{' (reconstructed)' if params['protocol'] == 'paper' else ''}, "
             f"{args.epochs} epochs (fixed budget, last step), batch {args.batch_size}, Adam lr {args.lr}, "
             f"{S} seeds; sizes {params['sizes']}{' (--quick)' if args.quick else ''}.", "",
             "| model | params | test MSE (mean ± sd) | published (Satorras et al. 2021) | best val step / last | "
             "equivariance error (relative) | s / epoch (all seeds) | projected h for 10,000 epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        pub = nbody.PUBLISHED_MSE.get(name)
        val = np.array([c["val_mse"] for c in r["curves"]])
        best = r["curves"][int(np.argmin(val.mean(1)))]["step"]
        spe_s = r.get("seconds_per_epoch")
        rel = common.stats(e["relative"] for e in r["equivariance"])
        lines.append(f"| {name} | {r['params']:,} | {common.fmt(r['test_mse'], 4)} | "
                     f"{pub if pub is not None else '—'} | {best} / {r['steps']} | {rel['mean']:.2g} | "
                     f"{'—' if spe_s is None else f'{spe_s:.2f}'} | "
                     f"{'—' if spe_s is None else f'{spe_s * REFERENCE_EPOCHS / 3600:.1f}'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def run(argv=None, registry: dict | None = None) -> dict:
    args = parse_args(argv)
    registry = default_registry() if registry is None else registry
    unknown = [m for m in args.models if m not in registry]
    if unknown or not args.models:
        raise SystemExit(f"--models: unknown {unknown or args.models}; the registry has {sorted(registry)}")
    out = args.out or (RESULTS if args.protocol == "egnn" else RESULTS / args.protocol)
    out.mkdir(parents=True, exist_ok=True)
    study = NBodyStudy(name="nbody", claim=CLAIM, out=out, seeds=list(range(args.seeds)), quick=args.quick,
                         deadline=time.monotonic() + 60 * args.max_minutes)
    t0 = time.monotonic()
    arrays, params = nbody.load_dataset(args.protocol, seed=args.data_seed, sizes=QUICK_SIZES if args.quick else None,
                                        cache_dir=args.data_dir)
    data_seconds = time.monotonic() - t0
    results = common.run_arms(study, args.models, lambda m: train_model(
        study, m, *registry[m], arrays=arrays, params=params, args=args))
    done = {m: r for m, r in results.items() if r is not None}
    for m, r in done.items():
        write_metrics_jsonl(out, m, r)
    if done:
        plot_curves(out / "learning_curves.png", done)
        plot_sweep(out / "rotation_sweep.png", done)
        plot_equivariance(out / "equivariance.png", done)
    verdicts = []
    for eq in ("se3_transformer", "egnn"):
        if eq in done and "transformer" in done:
            verdicts.append(common.verdict(f"{eq} has a lower test MSE than the plain transformer", eq,
                                           done[eq]["test_mse"], "transformer", done["transformer"]["test_mse"],
                                           metric="test MSE"))
    settings = {**{k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
                "data": params, "data_seconds": data_seconds, "optimizer": "adam + L2 1e-12 (torch Adam)",
                "selection": "fixed budget (last step); test scored once", "reference_epochs": REFERENCE_EPOCHS}
    published = {"source": "Satorras et al. 2021, Table 2 (test MSE, EGNN protocol)", **nbody.PUBLISHED_MSE}
    return common.finish(study, settings=settings, arms=results, table=table(done, args, params), verdicts=verdicts,
                         notes="Protocol (b) 'paper' is a reconstruction of Fuchs et al. 2020 (position target only).",
                         published=published)


if __name__ == "__main__":
    run()

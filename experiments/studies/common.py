"""What every study shares: arms trained as vmapped ensembles, resumption, verdicts, outputs.

A study is one module under ``experiments/studies/`` run as ``python -m
experiments.studies.<name> [--quick] [--seeds S] [--max-minutes M] [--out DIR]``. It trains
its arms (S seeds each, one ``jformer.ensemble`` per arm whose members share shapes), and
writes to ``experiments/results/studies/<name>/`` (``--out``):

* ``summary.json``: every number, ``"seeds"``, the settings, wall time, versions, verdicts;
* ``table.md``: the table and the verdict lines;
* PNG plots; ``arms/<arm>.json``: each finished arm (a rerun skips it: resumption);
* ``checkpoints/<arm>/``: the unfinished arm's ensemble (a rerun continues it exactly).

Verdict rule (``verdict``): for a claim "A < B" on a metric, with means m, sample sds s and
n seeds per arm, the difference d = m_B - m_A is compared with twice its standard error
2·sqrt(s_A²/n_A + s_B²/n_B): d > 2·SE holds, d < -2·SE does not hold, otherwise
inconclusive. With 3 seeds this is a coarse test (about a 90% two-sided interval); the
table gives every seed so a reader can apply another.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jformer
from jformer import data, decoding, ensemble, training
from jformer.checkpoint import Checkpointer

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "studies"


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class Study:
    """One study's run: its output directory, seeds, budget and the arms finished so far."""

    name: str
    claim: str
    out: pathlib.Path
    seeds: list[int]
    quick: bool
    deadline: float | None
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def S(self) -> int:
        return len(self.seeds)

    def arm_path(self, arm: str) -> pathlib.Path:
        return self.out / "arms" / f"{arm}.json"

    def done(self, arm: str) -> dict | None:
        """The saved result of a finished arm, or None."""
        path = self.arm_path(arm)
        return json.loads(path.read_text()) if path.exists() else None

    def save_arm(self, arm: str, result: dict) -> None:
        write_json(self.arm_path(arm), result)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def keys(self) -> jax.Array:
        """[S] member keys, one per seed (member i of every arm starts from the same key)."""
        return jnp.stack([jax.random.key(s) for s in self.seeds])


def parse_args(name: str, claim: str, argv=None, *, default_minutes: float = 45.0,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Study, argparse.Namespace]:
    """The CLI every study shares; returns the ``Study`` and the parsed arguments."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.studies.{name}", description=claim)
    parser.add_argument("--quick", action="store_true", help="tiny budget (under 2 minutes; used by the tests)")
    parser.add_argument("--seeds", type=int, default=3, help="members (seeds) per arm, >= 1 (default 3)")
    parser.add_argument("--max-minutes", type=float, default=default_minutes,
                        help="stop starting new arms after this many minutes; a rerun resumes")
    parser.add_argument("--out", type=pathlib.Path, default=None, help=f"output directory (default {RESULTS}/{name})")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.max_minutes <= 0:
        parser.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    out = args.out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    study = Study(name=name, claim=claim, out=out, seeds=list(range(args.seeds)), quick=args.quick,
                  deadline=time.monotonic() + 60 * args.max_minutes)
    return study, args


# ------------------------------------------------------------ training arms


def train_arm(study: Study, arm: str, *, init_params: Callable, loss_fn: Callable, optimizer: Callable,
              steps: int, batch: Callable[[int], dict], evaluate: Callable[[ensemble.Ensemble], dict],
              eval_every: int | None = None, hparams: dict | None = None, loss_hparams: tuple = (),
              init_state: Callable | None = None, batch_axis: int | None = 0,
              extra: Callable[[ensemble.Ensemble], dict] | None = None,
              keys: jax.Array | None = None) -> dict:
    """Train one arm: ``study.S`` members by ``jformer.ensemble``, or load it if finished.

    ``batch(step)`` gives step's batch ([S, B, ...] with ``batch_axis=0``: member i's own
    data order; shared otherwise) as a pure function of the step, so a resumed arm sees the
    same batches. ``evaluate(ens) -> {metric: [S] values}`` runs every ``eval_every`` steps
    and at the end (the curves); ``extra(ens) -> dict`` runs once at the end (e.g. test
    scores, attention maps) and is stored as it is. Checkpoints every ``eval_every`` steps
    to ``checkpoints/<arm>``; a killed study continues from there.

    Returns None when the study's deadline passes first (the ensemble is checkpointed),
    else (and saves as ``arms/<arm>.json``): ``{"final": {metric: [S]}, "curves": [{"step",
    metric: [S]}...], "train_loss": [[S] per logged step], "seconds", "params" (per member),
    "hparams", **extra}``.

    ``keys``: the members' keys when an arm holds other than one member per seed (e.g. a
    grid of learning rates x seeds: M keys, ``hparams`` and ``batch`` then have M members
    too, and every "[S]" above reads "[M]"); default ``study.keys()``.
    """
    if (result := study.done(arm)) is not None:
        return result
    eval_every = eval_every or steps
    ens = ensemble.create(init_params, optimizer, study.keys() if keys is None else keys, hparams=hparams,
                          init_state=init_state)
    step_fn = ensemble.make_train_step(loss_fn, optimizer, loss_hparams=loss_hparams, batch_axis=batch_axis)
    ckpt_dir = study.out / "checkpoints" / arm
    curves, train_loss, start, seconds = [], [], 0, 0.0
    with Checkpointer(ckpt_dir, keep=1) as ckpt:
        restored = ckpt.restore(ens.state)
        if restored is not None:
            state, saved, start = restored
            ens = ens.replace(state=state)
            curves, train_loss, seconds = saved["curves"], saved["train_loss"], saved["seconds"]
        saved_step = start if restored is not None else None  # a step orbax holds already is not saved twice
        t0 = time.monotonic()
        with tqdm(total=steps, initial=start, desc=f"{study.name}/{arm}", mininterval=2.0) as bar:
            for step in range(start, steps):
                if study.out_of_time():  # keep what was trained; a rerun continues from here
                    if step != saved_step:
                        ckpt.save(step, ens.state, data_state={"curves": curves, "train_loss": train_loss,
                                                               "seconds": seconds + time.monotonic() - t0}, force=True)
                    return None
                ens, metrics = step_fn(ens, batch(step))
                bar.update(1)
                if (step + 1) % max(1, steps // 50) == 0 or step + 1 == steps:
                    loss = np.asarray(metrics["loss"]).tolist()
                    train_loss.append({"step": step + 1, "loss": loss})
                    bar.set_postfix(loss=f"{np.mean(loss):.3f}")
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    curves.append({"step": step + 1, **_lists(evaluate(ens))})
                    if step + 1 < steps:
                        ckpt.save(step + 1, ens.state, data_state={
                            "curves": curves, "train_loss": train_loss,
                            "seconds": seconds + time.monotonic() - t0})
                        saved_step = step + 1
        seconds += time.monotonic() - t0
    member0 = ensemble.member(ens, 0).params
    result = {"final": {k: v for k, v in curves[-1].items() if k != "step"}, "curves": curves,
              "train_loss": train_loss, "seconds": seconds, "steps": steps,
              "params": int(sum(np.size(x) for x in jax.tree.leaves(member0))),
              "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
              "hparams": {k: np.asarray(v).tolist() for k, v in (hparams or {}).items()}}
    if extra is not None:
        result.update(extra(ens))
    study.save_arm(arm, result)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the arm's numbers are saved; its weights are not results
    if not any(ckpt_dir.parent.iterdir()):
        ckpt_dir.parent.rmdir()
    return result


def _lists(metrics: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in metrics.items()}


# --------------------------------------------------------------- data: LM


@functools.cache
def shakespeare() -> tuple[data.CharTokenizer, np.ndarray, np.ndarray, np.ndarray]:
    """Tiny Shakespeare as characters: (tokenizer, train, val, test) streams, 90 / 5 / 5%.

    nanoGPT's split is 90 / 10; the last 10% is halved here so that settings and
    checkpoints are chosen on validation and the test half is scored once.
    """
    text = data.read_text(data.default_data_dir() / "tinyshakespeare" / "input.txt")
    tok = data.CharTokenizer.fit(text)
    tokens = np.asarray(tok.encode(text), np.int32)
    train, held_out = data.train_val_split(tokens, 0.1)
    half = len(held_out) // 2
    return tok, train, held_out[:half], held_out[half:]


def member_lm_batches(tokens: np.ndarray, *, S: int, batch_size: int, seq_len: int,
                      seed: int = 0) -> Callable[[int], dict]:
    """``step -> {"inputs", "targets"}`` of shape [S, B, T]: member i draws random windows
    with its own seed (``LMBatches(seed=seed + i)``), a pure function of the step."""
    streams = [data.LMBatches(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed + i) for i in range(S)]

    def batch(step: int) -> dict:
        parts = [s.batch(step) for s in streams]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    return batch


def evaluate_batches(eval_step: Callable, ens: ensemble.Ensemble, batches: Iterable[dict]) -> dict:
    """``training.eval_summary`` of ``eval_step(ens, b)`` summed over ``batches``: per-member
    [S] means (``loss``, ``nll``, ``perplexity``, and ``accuracy`` when the loss reports it)."""
    totals = None
    for b in batches:
        sums = eval_step(ens, b)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return training.eval_summary(totals)


def lm_evaluator(loss_fn: Callable, tokens: np.ndarray, *, seq_len: int, batch_size: int = 64,
                 max_batches: int | None = None) -> Callable[[ensemble.Ensemble], dict]:
    """``ens -> {"loss": [S], "perplexity": [S]}``: every member's mean token NLL over
    contiguous windows of ``tokens`` (the whole stream, or its first ``max_batches`` batches)."""
    eval_step = ensemble.make_eval_step(loss_fn)
    batches = list(data.lm_eval_batches(tokens, batch_size, seq_len))[:max_batches]

    def evaluate(ens):
        summary = evaluate_batches(eval_step, ens, batches)
        return {"loss": summary["nll"], "perplexity": summary["perplexity"]}

    return evaluate


# ---------------------------------------------------- data: generated seq2seq


def synthetic_batch(task: str, batch_size: int, *, seed: int, min_len: int = 4, max_len: int = 12,
                    num_symbols: int = 16) -> dict:
    """``batch_size`` generated pairs (``data.synthetic_pairs``) at fixed shapes: ``src`` [B, max_len],
    ``tgt_in`` [B, max_len + 1] (BOS + target), ``tgt_out`` [B, max_len + 1] (target + EOS), right-padded
    with PAD, so every step (and every ensemble member) has the same shapes. A function of the arguments."""
    pairs = data.synthetic_pairs(task, batch_size, seed=seed, min_len=min_len, max_len=max_len,
                                 num_symbols=num_symbols)
    src = np.full((batch_size, max_len), data.PAD, np.int32)
    tgt_in = np.full((batch_size, max_len + 1), data.PAD, np.int32)
    tgt_out = np.full((batch_size, max_len + 1), data.PAD, np.int32)
    for b, (s, t) in enumerate(pairs):
        if len(t) > max_len:
            raise ValueError(f"a {task!r} target of {len(t)} ids does not fit max_len={max_len}")
        src[b, :len(s)] = s
        tgt_in[b, :len(t) + 1] = [data.BOS, *t]
        tgt_out[b, :len(t) + 1] = [*t, data.EOS]
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def member_seq2seq_batches(task: str, *, S: int, batch_size: int, seed: int = 0,
                           **task_args) -> Callable[[int], dict]:
    """``step -> {"src", "tgt_in", "tgt_out"}`` of shape [S, B, ...]: member i's pairs of a step are
    ``synthetic_batch(task, seed=<(seed, i, step)>)``, a pure function of the step."""
    def batch(step: int) -> dict:
        parts = [synthetic_batch(task, batch_size, seed=_seed(seed, i, step), **task_args) for i in range(S)]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    return batch


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def greedy_accuracy(ens: ensemble.Ensemble, cfg: jformer.TransformerConfig, batch: dict) -> dict:
    """``{"exact": [S], "token": [S]}``: each member decodes ``batch["src"]`` greedily (BOS ... EOS,
    ``len(tgt_out)`` steps) and is scored against ``batch["tgt_out"]``: the fraction of sequences right
    at every non-PAD target position (EOS included), and of non-PAD target tokens right."""
    src, tgt_out = jnp.asarray(batch["src"]), np.asarray(batch["tgt_out"])
    weights = tgt_out != data.PAD
    exact, token = [], []
    for i in range(ens.size):
        pred = np.asarray(decoding.greedy_decode_seq2seq(ensemble.member(ens, i).params, src, cfg=cfg, bos_id=data.BOS,
                                                         eos_id=data.EOS, max_len=tgt_out.shape[1]))
        hit = pred == tgt_out
        exact.append(float((hit | ~weights).all(axis=1).mean()))
        token.append(float((hit & weights).sum() / weights.sum()))
    return {"exact": exact, "token": token}


def adamw(total_steps: int, *, weight_decay: float = 0.1, b2: float = 0.99, clip: float = 1.0,
          decay: str = "matrices") -> Callable[[dict], tuple]:
    """nanoGPT's optimizer as ``hparams -> (tx, lr)``: AdamW, warmup ``hparams["warmup"]`` (default
    100, at most a tenth of the steps) then cosine from ``hparams["lr"]`` (default 1e-3) to a tenth
    of it; both may be vmapped."""
    def make(hp):
        lr = hp.get("lr", 1e-3)
        warmup = hp.get("warmup", min(100, total_steps // 10))
        return training.make_optimizer("adamw", learning_rate=lr, warmup_steps=warmup,
                                       total_steps=total_steps, min_learning_rate=lr / 10, b2=b2, eps=1e-8,
                                       weight_decay=weight_decay, decay=decay, clip_norm=clip)
    return make


# -------------------------------------------------------------- the verdict


def stats(values: Iterable[float]) -> dict:
    """``{"mean", "sd" (sample, ddof=1; 0 for one value), "values"}`` of per-seed values."""
    v = np.asarray(list(values), np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "values": v.tolist()}


def fmt(values: Iterable[float], digits: int = 3) -> str:
    """'mean ± sd' of per-seed values."""
    s = stats(values)
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def verdict(claim: str, a_name: str, a: Iterable[float], b_name: str, b: Iterable[float], *,
            metric: str) -> dict:
    """Decide "``a`` is lower than ``b``" on ``metric`` by the module's rule (2 standard errors).

    Returns ``{"claim", "measured", "verdict", "difference", "threshold"}``; ``verdict`` is
    "holds", "does not hold" or "inconclusive". For "higher is better" pass the arms the
    other way round (or negated values) so that the claim reads as a < b.
    """
    sa, sb = stats(a), stats(b)
    na, nb = len(sa["values"]), len(sb["values"])
    diff = sb["mean"] - sa["mean"]
    threshold = 2 * math.sqrt(sa["sd"] ** 2 / na + sb["sd"] ** 2 / nb)
    if na < 2 or nb < 2:
        outcome = "inconclusive"  # no seed spread to compare against
    elif diff > threshold:
        outcome = "holds"
    elif diff < -threshold:
        outcome = "does not hold"
    else:
        outcome = "inconclusive"
    measured = (f"{metric}: {a_name} {sa['mean']:.4g} ± {sa['sd']:.2g} vs {b_name} {sb['mean']:.4g} ± "
                f"{sb['sd']:.2g} (difference {diff:+.4g}, 2·SE {threshold:.2g}, n = {na}, {nb})")
    return {"claim": claim, "measured": measured, "verdict": outcome, "difference": diff, "threshold": threshold}


# ------------------------------------------------------------------ outputs


def versions() -> dict:
    import flax
    import optax
    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "jformer": jformer.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "cpu": platform.processor() or platform.machine()}


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Atomically (write a temporary file, then rename), so an interrupted write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(x):
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


def finish(study: Study, *, settings: dict, arms: dict, table: str, verdicts: list[dict],
           notes: str = "", **numbers) -> dict:
    """Write ``summary.json`` and ``table.md``, print the verdict lines; returns the summary."""
    incomplete = [name for name, result in arms.items() if result is None]
    summary = {"study": study.name, "claim": study.claim, "seeds": study.seeds, "quick": study.quick,
               "settings": settings, "arms": arms, "verdicts": verdicts, "not_run": incomplete,
               "wall_seconds": time.monotonic() - study.started, "versions": versions(), **numbers}
    write_json(study.out / "summary.json", summary)
    lines = [f"# {study.name}: {study.claim}", "", table, "", "## Verdicts", ""]
    lines += [f"- {v['claim']} -> {v['measured']} -> **{v['verdict']}**" for v in verdicts]
    if incomplete:
        lines += ["", f"Not run within the budget (rerun to resume): {', '.join(incomplete)}"]
    if notes:
        lines += ["", notes]
    (study.out / "table.md").write_text("\n".join(lines) + "\n")
    for v in verdicts:
        print(f"{v['claim']} -> {v['measured']} -> {v['verdict']}")
    return summary


def run_arms(study: Study, names: Iterable[str], train: Callable[[str], dict]) -> dict:
    """``{name: train(name)}`` in order; past the deadline, finished arms are loaded and the rest are None."""
    results = {}
    for name in names:
        results[name] = study.done(name) if study.out_of_time() else train(name)
    return results


def plot(path: pathlib.Path, title: str, xlabel: str, ylabel: str,
         series: dict[str, tuple[list, list[list[float]]]], *, logx: bool = False) -> pathlib.Path:
    """Mean ± sd over seeds per x of each series ``{label: (xs, [per-x seed values])}``, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        m = [np.mean(y) for y in ys]
        s = [np.std(y, ddof=1) if len(y) > 1 else 0.0 for y in ys]
        ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

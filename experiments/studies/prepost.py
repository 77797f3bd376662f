"""Study — Post-LN needs learning-rate warmup and grows unstable with depth; Pre-LN does not.

Claim (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"): with Adam,
the original Post-LN Transformer needs a learning-rate warmup (IWSLT14 de-en BLEU: Post-LN
without warmup 8.45, with warmup about 34), while Pre-LN without warmup trains as well as with it.
Their explanation (their Figure 3, Theorem 1): at initialisation the gradient norm of Post-LN's
parameters grows toward the output layers (about ``O(d sqrt(ln d))`` at the last layer, independent
of depth), while Pre-LN's is the same at every layer and shrinks as ``O(d sqrt(ln d / L))``.

Arms: norm position in {post, pre} x depth in {6, 12}: four ensembles. Inside each, the members
are the grid {warmup, none} x 3 peak learning rates x S seeds (6·S members, one ``vmap``; hparams
``{"lr", "warmup"}``, warmup 0 = none); member (warmup, lr, seed s) starts from seed s's
initialisation and sees seed s's batches, so every comparison inside a seed is paired.

Model and data (chosen to fit the CPU budget): the Tiny Shakespeare character LM with the original
Transformer's blocks (ReLU FFN, sinusoidal positions, √D-scaled embeddings, Glorot init, biases,
untied head, no final norm for Post-LN), width 64, 4 heads, F 256, context 64, batch 8,
``--steps`` 300; AdamW (β2 0.98, ε 1e-8, no weight decay, **no gradient clipping**: clipping
would hide the instability), learning rates 1e-3, 3e-3, 1e-2 (a width-64 model tolerates larger
steps than Xiong's width 512), warmup a fifth of the steps (60) or none, then cosine decay to a
tenth. Metric: validation loss (first 4 batches of 64 x 64 characters of the validation stream).
A one-seed pilot set the grid (validation loss; the unigram model scores 3.33): Post-LN, 6 layers,
300 steps, lr 3e-3: 2.48 with warmup, 3.35 without (stuck at the unigram plateau), while at 3e-4
and 1e-3 warmup made no difference; Post-LN, 12 layers: 3.35 at 3e-4, 1e-3 and 3e-3, with or
without warmup; Pre-LN, 12 layers, 150 steps: 2.49-2.62 at 1e-3, 3e-3 and 1e-2 with or without.

Diverged runs are kept, not averaged silently: a member whose final validation loss or any
logged training loss is NaN/inf is "diverged"; members no better than the unigram model
(character frequencies of the training stream, scored on validation) are counted as "failed".
For the verdicts each member's loss is capped at ln V (uniform guessing), diverged members
counting as ln V, and the counts are printed with every verdict.

Gradient norm per layer at initialisation (Xiong's Figure 3, from jformer's own gradients):
``jax.grad`` of the LM loss at each seed's initial parameters on one batch of 32 x 64, then per
layer l (the [L] axis of ``params["decoder"]["layers"]``) the norm of the FFN output kernel
(``ffn/wo/kernel``, Xiong's W²) and of all the layer's parameters.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import jformer
from experiments.studies import common
from jformer import data, training

NAME = "prepost"
CLAIM = "Post-LN needs learning-rate warmup and grows unstable with depth; Pre-LN trains without warmup"
POSITIONS = ("post", "pre")
DEPTHS = (6, 12)
LRS = (1e-3, 3e-3, 1e-2)


def settings(quick: bool, steps: int) -> dict:
    if quick:
        return {"depths": (2,), "d_model": 16, "num_heads": 2, "d_ff": 32, "seq_len": 16, "batch_size": 4,
                "steps": steps, "warmup": max(steps // 5, 1), "lrs": LRS, "eval_batches": 1, "grad_batch": 8}
    return {"depths": DEPTHS, "d_model": 64, "num_heads": 4, "d_ff": 256, "seq_len": 64, "batch_size": 8,
            "steps": steps, "warmup": steps // 5, "lrs": LRS, "eval_batches": 4, "grad_batch": 32}


def model_config(position: str, depth: int, st: dict, vocab_size: int) -> jformer.TransformerConfig:
    """The original Transformer's blocks (jformer's defaults) at the study's width."""
    return jformer.TransformerConfig(vocab_size=vocab_size, d_model=st["d_model"], num_heads=st["num_heads"],
                                     num_layers=depth, d_ff=st["d_ff"], dropout_rate=0.0,
                                     max_len=st["seq_len"], norm="layer", norm_position=position)


def member_grid(warmup: int, lrs, seeds) -> list[dict]:
    """Members in order (warmup, none) x lrs x seeds: ``[{"warmup", "lr", "seed"}]``."""
    return [{"warmup": w, "lr": lr, "seed": s} for w in (warmup, 0) for lr in lrs for s in seeds]


# ------------------------------------------------------------- divergence


def outcomes(final: list[float], train_loss: list[dict] | None = None, *, unigram: float | None = None) -> dict:
    """Per-member outcome of a grid: ``"values"`` (final loss, or the string "diverged"), the
    ``"diverged"`` mask (final or any logged training loss non-finite) and, given the unigram
    loss, the ``"failed"`` mask (finite but no better than it)."""
    final = np.asarray(final, np.float64)
    bad = ~np.isfinite(final)
    for row in train_loss or ():
        bad |= ~np.isfinite(np.asarray(row["loss"], np.float64))
    failed = np.zeros_like(bad) if unigram is None else (~bad) & (final >= unigram)
    return {"values": ["diverged" if b else float(v) for v, b in zip(final, bad)],
            "diverged": bad.tolist(), "failed": failed.tolist()}


def capped(values: list, cap: float) -> list[float]:
    """Losses for a verdict: a diverged member (``"diverged"`` / non-finite) and any loss above
    ``cap`` count as ``cap`` (ln V: uniform guessing)."""
    out = []
    for v in values:
        v = float("nan") if isinstance(v, str) else float(v)
        out.append(cap if not math.isfinite(v) else min(v, cap))
    return out


def verdict_with_divergence(claim: str, a_name: str, a: list, b_name: str, b: list, *, metric: str,
                            cap: float) -> dict:
    """``common.verdict`` ("a lower than b") on ``capped`` losses; the measured line says how many
    members of each side diverged (and were counted as ``cap``)."""
    def n_div(values):
        return sum(1 for v in values if isinstance(v, str) or not math.isfinite(float(v)))

    out = common.verdict(claim, a_name, capped(a, cap), b_name, capped(b, cap), metric=metric)
    da, db = n_div(a), n_div(b)
    out["diverged"] = [da, db]
    out["measured"] += f"; diverged: {a_name} {da}/{len(a)}, {b_name} {db}/{len(b)} (counted as {cap:.3g})"
    return out


def format_cell(values: list, unigram: float) -> str:
    """'mean ± sd' of the finite members, with '[k diverged]' / '[k no better than unigram]'."""
    finite = [float(v) for v in values if not isinstance(v, str) and math.isfinite(float(v))]
    n_div = len(values) - len(finite)
    text = common.fmt(finite) if finite else "—"
    notes = []
    if n_div:
        notes.append(f"{n_div} diverged")
    failed = sum(1 for v in finite if v >= unigram)
    if failed:
        notes.append(f"{failed} ≥ unigram")
    return text + (f" [{', '.join(notes)}]" if notes else "")


# ------------------------------------------------- gradients at init


def _squares(layers) -> jax.Array:
    """[L]: the squared L2 norm of each layer's slice of a tree stacked on a leading [L] axis."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
               for x in jax.tree.leaves(layers))


def layer_gradient_norms(loss, params: dict, *args, stack=("decoder", "layers"), leaves: dict | None = None) -> dict:
    """``jax.grad(loss)(params, *args)`` reduced per layer of the stack at ``stack`` (layers on a
    leading [L] axis): ``{"layer": [L] norm of all the layer's gradients, name: [L] per ``leaves``
    entry}``, ``leaves`` mapping a name to a path inside a layer, e.g. ``{"ffn_wo": ("ffn", "wo",
    "kernel")}``. Traceable: jit / vmap it whole."""
    tree = jax.grad(loss)(params, *args)
    for k in stack:
        tree = tree[k]
    out = {"layer": jnp.sqrt(_squares(tree))}
    for name, path in (leaves or {}).items():
        sub = tree
        for k in path:
            sub = sub[k]
        out[name] = jnp.sqrt(_squares(sub))
    return out


def gradients_at_init(cfg: jformer.TransformerConfig, seeds, tokens: np.ndarray, *, batch_size: int) -> dict:
    """Per-layer gradient norms at each seed's initialisation (the parameters ``ensemble.create``
    gives member seed s: ``init_lm(split(key(s))[0])``), on one training batch per seed; one
    jitted ``vmap`` over the seeds. Returns ``{"layer": [L][S], "ffn_wo": [L][S]}``."""
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False, train=False)

    def one(key, batch):
        params = jformer.init_lm(jax.random.split(key)[0], cfg)
        return layer_gradient_norms(lambda p, b: loss_fn(p, {}, b)[0], params, batch,
                                    leaves={"ffn_wo": ("ffn", "wo", "kernel")})

    batches = [data.LMBatches(tokens, batch_size=batch_size, seq_len=cfg.max_len, seed=10_000 + s).batch(0)
               for s in seeds]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    norms = jax.jit(jax.vmap(one))(jnp.stack([jax.random.key(s) for s in seeds]), stacked)
    return {k: np.asarray(v).T.tolist() for k, v in norms.items()}  # [S, L] -> [L][S]


# ------------------------------------------------------------------ arms


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy on ``val`` of the training stream's character frequencies (add-one smoothed)."""
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def grid_arm(study: common.Study, position: str, depth: int, st: dict) -> dict:
    tok, train, val, _ = common.shakespeare()
    cfg = model_config(position, depth, st, tok.vocab_size)
    grid = member_grid(st["warmup"], st["lrs"], study.seeds)
    seed_index = np.asarray([study.seeds.index(m["seed"]) for m in grid])
    per_seed = common.member_lm_batches(train, S=study.S, batch_size=st["batch_size"], seq_len=st["seq_len"])
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False)

    def batch(step):
        return {k: v[seed_index] for k, v in per_seed(step).items()}

    return common.train_arm(
        study, f"{position}-L{depth}", init_params=lambda k: jformer.init_lm(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(st["steps"], weight_decay=0.0, b2=0.98, clip=None, decay="kernels"),
        steps=st["steps"], batch=batch,
        evaluate=common.lm_evaluator(loss_fn, val, seq_len=st["seq_len"], max_batches=st["eval_batches"]),
        eval_every=max(st["steps"] // 4, 1),
        hparams={"lr": [m["lr"] for m in grid], "warmup": [m["warmup"] for m in grid]},
        keys=jnp.stack([jax.random.key(m["seed"]) for m in grid]), extra=lambda ens: {"grid": grid})


def gradient_arm(study: common.Study, position: str, depth: int, st: dict) -> dict:
    """Gradient norms at init, saved like an arm (a rerun loads them)."""
    name = f"grad-{position}-L{depth}"
    if (done := study.done(name)) is not None:
        return done
    tok, train, _, _ = common.shakespeare()
    cfg = model_config(position, depth, st, tok.vocab_size)
    result = gradients_at_init(cfg, study.seeds, train, batch_size=st["grad_batch"])
    study.save_arm(name, result)
    return result


def cells(result: dict, unigram: float) -> dict:
    """``{(warmup, lr): outcomes}`` of one trained grid arm, each over its S seeds."""
    out = outcomes(result["final"]["loss"], result["train_loss"], unigram=unigram)
    by = {}
    for i, m in enumerate(result["grid"]):
        cell = by.setdefault((m["warmup"], m["lr"]), {"values": [], "diverged": [], "failed": []})
        for k in cell:
            cell[k].append(out[k][i])
    return by


# ------------------------------------------------------------------ the study


def main(argv=None) -> dict:
    study, args = common.parse_args(NAME, CLAIM, argv, add_arguments=lambda p: (
        p.add_argument("--steps", type=int, default=300, help="LM steps per arm"),))
    st = settings(study.quick, 12 if study.quick else args.steps)
    tok, train, val, _ = common.shakespeare()
    cap, unigram = math.log(tok.vocab_size), unigram_loss(train, val, tok.vocab_size)
    arms = [(p, d) for d in st["depths"] for p in POSITIONS]

    grads = {}
    for p, d in arms:
        if not study.out_of_time():
            grads[(p, d)] = gradient_arm(study, p, d, st)
    trained = common.run_arms(study, [f"{p}-L{d}" for p, d in arms],
                              lambda a: grid_arm(study, a.split("-")[0], int(a.split("-L")[1]), st))
    grid = {(p, d): cells(trained[f"{p}-L{d}"], unigram) for p, d in arms if trained[f"{p}-L{d}"]}

    warm = st["warmup"]
    rows = ["| position | depth | warmup | " + " | ".join(f"lr {lr:g}" for lr in st["lrs"]) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in st["lrs"]) + " |"]
    for p, d in arms:
        for w in (warm, 0):
            if (p, d) in grid:
                row = [format_cell(grid[(p, d)][(w, lr)]["values"], unigram) for lr in st["lrs"]]
            else:
                row = ["not run"] * len(st["lrs"])
            rows.append(f"| {p} | {d} | {w if w else 'none'} | " + " | ".join(row) + " |")
    g_rows = ["| position | depth | ‖∇W²‖ first layer | last layer | last / first (W²) | last / first (whole layer) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for (p, d), g in grads.items():
        w2, lay = np.asarray(g["ffn_wo"]), np.asarray(g["layer"])
        g_rows.append(f"| {p} | {d} | {common.fmt(w2[0], 4)} | {common.fmt(w2[-1], 4)} | "
                      f"{common.fmt(w2[-1] / w2[0], 2)} | {common.fmt(lay[-1] / lay[0], 2)} |")
    counts = {f"{p}-L{d}": {"diverged": int(sum(sum(c["diverged"]) for c in grid[(p, d)].values())),
                            "failed": int(sum(sum(c["failed"]) for c in grid[(p, d)].values())),
                            "members": int(sum(len(c["values"]) for c in grid[(p, d)].values()))}
              for p, d in arms if (p, d) in grid}
    table = ("Final validation loss, mean ± sd over seeds of the members that did not diverge:\n\n"
             + "\n".join(rows) + "\n\nGradient norms at initialisation (per seed, one batch):\n\n" + "\n".join(g_rows))

    verdicts = prepost_verdicts(grid, grads, st, cap)
    plots(study, st, grid, grads, trained, cap, unigram)
    return common.finish(
        study, settings={**st, "depths": list(st["depths"]), "lrs": list(st["lrs"]), "unigram_loss": unigram,
                         "cap_ln_V": cap, "anchor": "Xiong et al. 2020, Table/Figure on IWSLT14 and Figure 3"},
        arms={**trained, **{f"grad-{p}-L{d}": g for (p, d), g in grads.items()}}, table=table, verdicts=verdicts,
        notes=f"Diverged = NaN/inf loss; '≥ unigram' = no better than character frequencies ({unigram:.3f} nats). "
              f"Verdicts count every loss above ln V = {cap:.3f} (and every diverged member) as ln V.",
        outcomes={f"{p}-L{d}": {f"warmup={w} lr={lr:g}": c for (w, lr), c in grid[(p, d)].items()}
                  for p, d in arms if (p, d) in grid},
        divergence=counts)


def prepost_verdicts(grid: dict, grads: dict, st: dict, cap: float) -> list[dict]:
    verdicts, warm, lrs = [], st["warmup"], st["lrs"]

    def vals(p, d, w, lr):
        return grid[(p, d)][(w, lr)]["values"]

    def gaps(p, d):
        """none − warmup per (lr, seed), on capped losses: what warmup buys."""
        return [n - w for lr in lrs for n, w in zip(capped(vals(p, d, 0, lr), cap), capped(vals(p, d, warm, lr), cap))]

    for d in st["depths"]:
        if ("post", d) in grid:
            for lr in lrs:
                verdicts.append(verdict_with_divergence(
                    f"Post-LN, {d} layers, lr {lr:g}: warmup beats no warmup", "warmup", vals("post", d, warm, lr),
                    "no warmup", vals("post", d, 0, lr), metric="val loss", cap=cap))
        if ("post", d) in grid and ("pre", d) in grid:
            verdicts.append(common.verdict(
                f"{d} layers: warmup matters less for Pre-LN than for Post-LN (loss without − with warmup, "
                f"per lr and seed)", "Pre-LN", gaps("pre", d), "Post-LN", gaps("post", d), metric="warmup gain"))
            best = {p: min(lrs, key=lambda lr: np.mean(capped(vals(p, d, 0, lr), cap))) for p in POSITIONS}
            verdicts.append(verdict_with_divergence(
                f"{d} layers, no warmup, best lr each: Pre-LN beats Post-LN", f"Pre-LN (lr {best['pre']:g})",
                vals("pre", d, 0, best["pre"]), f"Post-LN (lr {best['post']:g})", vals("post", d, 0, best["post"]),
                metric="val loss", cap=cap))
    depths = [d for d in st["depths"] if ("post", d) in grid]
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        verdicts.append(common.verdict(f"Post-LN needs warmup more at {hi} layers than at {lo}",
                                       f"{lo} layers", gaps("post", lo), f"{hi} layers", gaps("post", hi),
                                       metric="warmup gain"))
    for d in st["depths"]:
        if ("post", d) in grads and ("pre", d) in grads:
            def ratio(p):
                g = np.asarray(grads[(p, d)]["ffn_wo"])
                return np.log(g[-1] / g[0])
            verdicts.append(common.verdict(
                f"At init, {d} layers: Post-LN's gradient norm grows toward the output layers more than Pre-LN's",
                "Pre-LN", ratio("pre"), "Post-LN", ratio("post"), metric="ln(‖∇W²‖ last / first layer)"))
    return verdicts


def plots(study, st, grid, grads, trained, cap, unigram):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths, warm = st["depths"], st["warmup"]
    if grads:
        fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 7), squeeze=False)
        for col, d in enumerate(depths):
            for row, (key, label) in enumerate((("ffn_wo", "‖∇ W² (FFN out)‖"), ("layer", "‖∇ layer params‖"))):
                ax = axes[row][col]
                for p in POSITIONS:
                    if (p, d) in grads:
                        g = np.asarray(grads[(p, d)][key])  # [L, S]
                        ax.errorbar(np.arange(1, d + 1), g.mean(1), yerr=g.std(1, ddof=1) if g.shape[1] > 1 else None,
                                    marker="o", capsize=3, label=f"{p.capitalize()}-LN")
                ax.set_yscale("log")
                ax.set(title=f"{d} layers: gradient norm at init", xlabel="layer", ylabel=label)
                ax.set_xticks(range(1, d + 1))
                ax.grid(alpha=0.3)
                ax.legend()
        fig.tight_layout()
        fig.savefig(study.out / "grad_norm_init.png", dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for p in POSITIONS:
            if (p, d) not in grid:
                continue
            for w, ls in ((warm, "-"), (0, "--")):
                ys = [capped(grid[(p, d)][(w, lr)]["values"], cap) for lr in st["lrs"]]
                line = ax.errorbar(st["lrs"], [np.mean(y) for y in ys],
                                   yerr=[np.std(y, ddof=1) if len(y) > 1 else 0 for y in ys], marker="o", ls=ls,
                                   capsize=3, label=f"{p.capitalize()}-LN, {'warmup' if w else 'no warmup'}")
                for lr in st["lrs"]:
                    k = sum(grid[(p, d)][(w, lr)]["diverged"])
                    if k:
                        ax.plot([lr], [cap], "x", ms=10, color=line[0].get_color())
                        ax.annotate(f"{k} div.", (lr, cap), fontsize=7)
        ax.axhline(unigram, color="gray", lw=0.8, ls=":", label="unigram")
        ax.set_xscale("log")
        ax.set(title=f"{d} layers: final validation loss", xlabel="peak learning rate",
               ylabel="val loss (diverged = ln V)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study.out / "lr_sweep.png", dpi=120)
    plt.close(fig)

    done = [(p, d) for d in depths for p in POSITIONS if trained.get(f"{p}-L{d}")]
    if done:
        fig, axes = plt.subplots(len(depths), len(POSITIONS), figsize=(11, 3.5 * len(depths)), squeeze=False)
        for (p, d) in done:
            ax = axes[depths.index(d)][POSITIONS.index(p)]
            r = trained[f"{p}-L{d}"]
            steps = [t["step"] for t in r["train_loss"]]
            losses = np.asarray([t["loss"] for t in r["train_loss"]], np.float64)  # [steps, M]
            for w, ls in ((warm, "-"), (0, "--")):
                for lr in st["lrs"]:
                    idx = [i for i, m in enumerate(r["grid"]) if m["warmup"] == w and m["lr"] == lr]
                    ax.plot(steps, np.minimum(np.nan_to_num(losses[:, idx], nan=cap, posinf=cap), cap).mean(1), ls=ls,
                            label=f"lr {lr:g}, {'warmup' if w else 'none'}")
            ax.set(title=f"{p.capitalize()}-LN, {d} layers: training loss", xlabel="step", ylabel="train loss (capped)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(study.out / "train_curves.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()

"""Study — masks: the causal mask keeps a decoder honest; the padding mask makes padding invisible.

Claims:

* A decoder trained without the causal mask "cheats": the target at position t is the input at
  t + 1, so with the mask off it can simply be read; the teacher-forced loss collapses toward 0
  while honest prediction, where a position may only see the past (as in generation), is garbage.
* With the padding mask the outputs at real positions do not depend on how many pad tokens follow;
  without it (pads treated as real tokens) they do.
* Causality by gradient (nanodo's test): with the mask, the loss at position t has exactly zero
  gradient with respect to the inputs after t.

Anchor: Vaswani et al. 2017, §3.2.3: "We need to prevent leftward information flow in the decoder
to preserve the auto-regressive property ... by masking out (setting to −∞) all values in the input
of the softmax which correspond to illegal connections."

Arms (S seeds each, one vmapped ensemble per arm):

* (a) ``lm-causal`` / ``lm-no-mask``: the Tiny Shakespeare character LM in nanoGPT's CPU
  configuration (4 layers, width 128, context 64, batch 12), trained with and without the causal
  mask (``jformer.lm_apply(causal=...)``).
  Reported: training loss and validation loss with the arm's own mask (teacher forced), validation
  loss with the causal mask put back, and the honest "prefix" loss: each prediction made from the
  prefix x_≤t alone (the arm's own attention inside the prefix; exactly what generation sees),
  plus sampled text.
* (b) ``pad-seq2seq``: an encoder-decoder trained on reversal (``data.synthetic_pairs``); for
  held-out sources of 8 tokens, the largest |change| of the decoder logits at real target positions
  when k pad tokens are appended to the source, with the padding mask on (``cfg.pad_id``) and off
  (``src_mask`` all True: the pads are attended as tokens); and the teacher-forced accuracy.
* (c) for both LM arms, |∂ loss_t / ∂ x_s| (x_s the input embedding at s, norm over its width) for
  every pair of positions, and the fraction of it that comes from the future (s > t).

Run: ``python -m experiments.studies.masks [--quick] [--seeds S] [--steps N] [--pad-steps N]
[--max-minutes M] [--out DIR]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jformer
from experiments.config import preset
from experiments.studies import common
from jformer import data, ensemble, training

NAME = "masks"
CLAIM = "without the causal mask a decoder cheats (loss ~0, honest prediction garbage); the padding mask hides padding"
LM_ARMS = {"lm-causal": True, "lm-no-mask": False}
SEQ_LEN = 64
PADS = (0, 1, 4, 16, 64)
QUICK_PADS = (0, 4, 64)
PAD_SRC_LEN = 8
PROMPT = "ROMEO:\n"


# ------------------------------------------------------ the switchable forward


def lm_forward(params: dict, tokens: jax.Array, *, cfg: jformer.TransformerConfig, causal: bool = True,
               valid: jax.Array | None = None, embeddings: jax.Array | None = None) -> jax.Array:
    """``jformer.lm_apply``'s logits [B, T, V] with the causal mask a switch; ``valid`` [B, T]: the
    keys that exist (False = masked out, e.g. the positions after a prefix)."""
    return jformer.lm_apply(params, tokens, cfg=cfg, causal=causal, tokens_mask=valid, embeddings=embeddings)[0]


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg", "causal"))
def own_and_causal_sums(params, inputs, targets, cfg, causal):
    """[S] NLL sums of a batch under the arm's own mask, and under the causal mask (params on [S])."""
    def one(p):
        own = token_nll(lm_forward(p, inputs, cfg=cfg, causal=causal), targets).sum()
        honest = token_nll(lm_forward(p, inputs, cfg=cfg, causal=True), targets).sum()
        return own, honest
    return jax.vmap(one)(params)


@functools.partial(jax.jit, static_argnames=("cfg", "causal"))
def prefix_sums(params, inputs, targets, cfg, causal):
    """[S]: NLL sums when the prediction at t is made from the prefix x_0..x_t alone (the keys after t
    do not exist), for every t: one forward pass per position, the arm's own mask inside the prefix."""
    T = inputs.shape[1]

    def one(p):
        def at(t):
            valid = jnp.broadcast_to(jnp.arange(T) <= t, inputs.shape)
            logits = lm_forward(p, inputs, cfg=cfg, causal=causal, valid=valid)
            return token_nll(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False),
                             jax.lax.dynamic_index_in_dim(targets, t, 1, keepdims=False)).sum()
        return jax.lax.map(at, jnp.arange(T)).sum()
    return jax.vmap(one)(params)


@functools.partial(jax.jit, static_argnames=("cfg", "causal"))
def gradient_map(params, inputs, targets, cfg, causal):
    """[S, T, T]: |∂ loss_t / ∂ x_s| (L2 over the embedding width, mean over the batch) per member."""
    def one(p):
        x = p["embed"]["token"]["embedding"][inputs]

        def losses(x):  # [T]: each position's loss summed over the batch (rows do not mix)
            return token_nll(lm_forward(p, inputs, cfg=cfg, causal=causal, embeddings=x), targets).sum(0)
        jac = jax.jacrev(losses)(x)  # [T(t), B, T(s), D]
        return jnp.sqrt((jac ** 2).sum(-1)).mean(1)
    return jax.vmap(one)(params)


def future_fraction(grad_map: np.ndarray) -> np.ndarray:
    """[S]: the share of Σ_{t,s} |∂ loss_t / ∂ x_s| that comes from s > t (the future)."""
    g = np.asarray(grad_map, np.float64)
    future = np.triu(np.ones(g.shape[-2:], bool), k=1)
    return (g * future).sum((-2, -1)) / g.sum((-2, -1))


def sample(params, cfg: jformer.TransformerConfig, causal: bool, tok: data.CharTokenizer, *, length: int,
           seed: int = 0, temperature: float = 1.0) -> str:
    """``length`` characters sampled after ``PROMPT``, each from the last ``SEQ_LEN`` characters only
    (nanoGPT's crop), with the model's own mask inside that window: honest generation."""
    @jax.jit
    def next_logits(params, window, n):
        valid = (jnp.arange(SEQ_LEN) < n)[None]
        return jax.lax.dynamic_index_in_dim(lm_forward(params, window, cfg=cfg, causal=causal, valid=valid)[0],
                                            n - 1, 0, keepdims=False)

    rng = np.random.default_rng(seed)
    ids = list(tok.encode(PROMPT))
    for _ in range(length):
        context = ids[-SEQ_LEN:]
        window = np.zeros((1, SEQ_LEN), np.int32)
        window[0, :len(context)] = context
        logits = np.asarray(next_logits(params, window, len(context)), np.float64) / temperature
        logits[:data.NUM_SPECIAL] = -np.inf  # specials never occur in the text
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return tok.decode(ids)


# --------------------------------------------------------------- (a) and (c)


def lm_cfg(quick: bool, vocab_size: int) -> jformer.TransformerConfig:
    base = preset("shakespeare").model
    if quick:
        base = base.replace(num_layers=1, d_model=32, d_ff=64)
    return base.replace(vocab_size=vocab_size, max_len=SEQ_LEN)


def lm_settings(quick: bool) -> dict:
    return {"val_windows": 64 if quick else 512, "prefix_windows": 8 if quick else 64,
            "gradient_windows": 2 if quick else 8, "batch": 32 if quick else 64, "sample_chars": 40 if quick else 300}


def windows(tokens: np.ndarray, n: int) -> dict:
    """The first ``n`` contiguous windows of ``tokens``: ``{"inputs", "targets"}`` [n, SEQ_LEN]."""
    return next(data.lm_eval_batches(tokens[: n * SEQ_LEN + 1], n, SEQ_LEN))


def lm_arm(study: common.Study, arm: str, *, steps: int, quick: bool) -> dict:
    causal = LM_ARMS[arm]
    tok, train, val, _ = common.shakespeare()
    cfg = lm_cfg(quick, tok.vocab_size)
    settings = lm_settings(quick)
    loss_fn = functools.partial(training.lm_loss, cfg=cfg, accuracy=False,
                                apply_fn=functools.partial(jformer.lm_apply, causal=causal))
    held_out = windows(val, settings["val_windows"])
    B = settings["batch"]

    def evaluate(ens):
        own = honest = 0.0
        for i in range(0, len(held_out["inputs"]), B):
            o, h = own_and_causal_sums(ens.state.params, held_out["inputs"][i:i + B], held_out["targets"][i:i + B],
                                       cfg, causal)
            own, honest = own + np.asarray(o), honest + np.asarray(h)
        n = held_out["inputs"].size
        return {"loss": own / n, "loss_causal_mask": honest / n}

    def extra(ens):
        prefix = windows(val, settings["prefix_windows"])
        total = 0.0
        for i in range(0, len(prefix["inputs"]), 8):
            total = total + np.asarray(prefix_sums(ens.state.params, prefix["inputs"][i:i + 8],
                                                   prefix["targets"][i:i + 8], cfg, causal))
        g = windows(val, settings["gradient_windows"])
        grads = np.asarray(gradient_map(ens.state.params, g["inputs"], g["targets"], cfg, causal))
        member0 = ensemble.member(ens, 0).params
        return {"prefix_loss": (total / prefix["inputs"].size).tolist(),
                "gradient_map": grads.mean(0).tolist(), "future_fraction": future_fraction(grads).tolist(),
                "sample": sample(member0, cfg, causal, tok, length=settings["sample_chars"])}

    return common.train_arm(
        study, arm, init_params=lambda k: jformer.init_lm(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.1), steps=steps,
        batch=common.member_lm_batches(train, S=study.S, batch_size=12, seq_len=SEQ_LEN),
        evaluate=evaluate, eval_every=max(steps // 8, 1), extra=extra)


# -------------------------------------------------------------------- (b)


def pad_cfg(quick: bool) -> jformer.TransformerConfig:
    return jformer.TransformerConfig(
        vocab_size=data.synthetic_vocab_size("reverse", 16), d_model=32 if quick else 64, num_heads=4,
        num_layers=1 if quick else 2, d_ff=64 if quick else 256, dropout_rate=0.0, norm_position="pre",
        positions="sinusoidal", max_len=13, pad_id=data.PAD)


def padding_effect(params: dict, cfg: jformer.TransformerConfig, batch: dict,
                   pads: tuple[int, ...] = PADS) -> dict:
    """For each k in ``pads``: k PAD tokens appended to sources that have none, the teacher-forced decoder
    logits at the real target positions compared with k = 0, for every member (``params`` on [S]).

    Returns ``{"pads", "change_on" / "change_off": [k][S] max |Δ logit|, "accuracy_on" / "accuracy_off":
    [k][S]}``; mask on: ``cfg.pad_id`` masks the pads; mask off: ``src_mask`` all True (pads attended).
    """
    src, tgt_in, tgt_out = (jnp.asarray(batch[k]) for k in ("src", "tgt_in", "tgt_out"))
    if (batch["src"] == data.PAD).any():
        raise ValueError("padding_effect needs sources without padding (k = 0 must have none)")
    real = tgt_out != data.PAD

    @jax.jit
    def logits(params, src):
        def one(p):
            on, _ = jformer.seq2seq_apply(p, src, tgt_in, cfg=cfg)
            off, _ = jformer.seq2seq_apply(p, src, tgt_in, cfg=cfg, src_mask=jnp.ones(src.shape, bool))
            return on, off
        return jax.vmap(one)(params)

    def accuracy(lg):  # [S]
        return np.asarray(((lg.argmax(-1) == tgt_out) & real).sum((1, 2)) / real.sum())

    base = dict(zip(("on", "off"), logits(params, src)))  # k = 0: each mode against itself
    out = {"pads": list(pads), "change_on": [], "change_off": [], "accuracy_on": [], "accuracy_off": []}
    for k in pads:
        padded = jnp.concatenate([src, jnp.full((src.shape[0], k), data.PAD, src.dtype)], 1)
        on, off = logits(params, padded)
        for name, lg in (("on", on), ("off", off)):
            change = jnp.where(real[None, ..., None], jnp.abs(lg - base[name]), 0.0).max((1, 2, 3))
            out[f"change_{name}"].append(np.asarray(change).tolist())
            out[f"accuracy_{name}"].append(accuracy(lg).tolist())
    return out


def pad_arm(study: common.Study, *, steps: int, quick: bool) -> dict:
    cfg = pad_cfg(quick)
    loss_fn = functools.partial(training.seq2seq_loss, cfg=cfg)
    eval_step = ensemble.make_eval_step(loss_fn)
    held_out = common.synthetic_batch("reverse", 128 if quick else 512, seed=10**9)
    unpadded = common.synthetic_batch("reverse", 64 if quick else 256, seed=10**9 + 1, min_len=PAD_SRC_LEN,
                                      max_len=PAD_SRC_LEN)

    def evaluate(ens):
        s = training.eval_summary(eval_step(ens, held_out))
        return {"loss": s["nll"], "accuracy": s["accuracy"]}

    return common.train_arm(
        study, "pad-seq2seq", init_params=lambda k: jformer.init_seq2seq(k, cfg), loss_fn=loss_fn,
        optimizer=common.adamw(steps, weight_decay=0.0, decay="kernels"), steps=steps,
        batch=common.member_seq2seq_batches("reverse", S=study.S, batch_size=64),
        evaluate=evaluate, eval_every=max(steps // 4, 1), hparams={"lr": [3e-3] * study.S},
        extra=lambda ens: {"padding": padding_effect(ens.state.params, cfg, unpadded, QUICK_PADS if quick else PADS)})


# -------------------------------------------------------------- verdicts


def verdicts(lm: dict, pad: dict | None) -> list[dict]:
    """The claims on the finished arms (``lm``: ``{"lm-causal", "lm-no-mask"}`` results or None)."""
    out = []
    causal, cheat = lm.get("lm-causal"), lm.get("lm-no-mask")
    if causal and cheat:
        out.append(common.verdict(
            "without the causal mask the teacher-forced loss collapses (no-mask < causal, each with its own mask)",
            "no-mask", cheat["final"]["loss"], "causal", causal["final"]["loss"], metric="val loss, own mask"))
        out.append(common.verdict(
            "honest prediction (each from its prefix only, as in generation) of the no-mask model is worse "
            "than the causal model's", "causal", causal["prefix_loss"], "no-mask", cheat["prefix_loss"],
            metric="val loss, prefix only"))
        out.append(common.verdict(
            "causality by gradient: the causal mask stops every gradient from the future (future share of "
            "|d loss_t / d x_s|, causal < no-mask)", "causal", causal["future_fraction"], "no-mask",
            cheat["future_fraction"], metric="future gradient share"))
    if pad:
        p = pad["padding"]
        out.append(common.verdict(
            f"the padding mask makes outputs independent of padding (max |Δ logit| with {p['pads'][-1]} pads "
            "appended: mask on < mask off)", "on", p["change_on"][-1], "off", p["change_off"][-1],
            metric="max |Δ logit|"))
    return out


# ------------------------------------------------------------------ the study


def main(argv=None) -> dict:
    study, args = common.parse_args(NAME, CLAIM, argv, add_arguments=lambda p: (
        p.add_argument("--steps", type=int, default=2000, help="LM steps per arm (nanoGPT: 2000)"),
        p.add_argument("--pad-steps", type=int, default=600, help="seq2seq steps of the padding arm")))
    lm_steps, pad_steps = (20, 30) if study.quick else (args.steps, args.pad_steps)
    lm = common.run_arms(study, list(LM_ARMS), lambda arm: lm_arm(study, arm, steps=lm_steps, quick=study.quick))
    pad = common.run_arms(study, ["pad-seq2seq"], lambda arm: pad_arm(study, steps=pad_steps, quick=study.quick))
    tok, train, val, _ = common.shakespeare()
    settings = lm_settings(study.quick)
    counts = np.bincount(train, minlength=tok.vocab_size) + 1.0
    unigram = float(-np.log(counts / counts.sum())[windows(val, settings["val_windows"])["targets"]].mean())

    rows = ["### (a) Character LM with and without the causal mask (nats/char)", "",
            "| arm | train loss (own mask) | val loss (own mask) | val loss (causal mask) | "
            "val loss (prefix only: honest) | future share of the gradient |", "| --- | --- | --- | --- | --- | --- |"]
    for arm, a in lm.items():
        if not a:
            rows.append(f"| {arm} | not run |")
            continue
        rows.append(f"| {arm} | {common.fmt(a['train_loss'][-1]['loss'])} | {common.fmt(a['final']['loss'])} | "
                    f"{common.fmt(a['final']['loss_causal_mask'])} | {common.fmt(a['prefix_loss'])} | "
                    f"{common.fmt(a['future_fraction'], 4)} |")
    rows += ["", f"Unigram (training-split character frequencies) on the same validation characters: {unigram:.3f}. "
             f"'Prefix only' scores {settings['prefix_windows']} windows; the rest {settings['val_windows']}.", ""]
    for arm, a in lm.items():
        if a:
            rows += [f"Sample of {arm} (seed 0, temperature 1, from {PROMPT!r}):", "", "```", a["sample"], "```", ""]
    p = pad["pad-seq2seq"]
    rows += ["### (b) Padding: decoder logits at real positions vs pad tokens appended to the source", ""]
    if p:
        rows += ["| pads appended | max abs change, mask on | mask off | token accuracy, mask on | mask off |",
                 "| --- | --- | --- | --- | --- |"]
        q = p["padding"]
        for i, k in enumerate(q["pads"]):
            rows.append(f"| {k} | {max(q['change_on'][i]):.2e} | {common.fmt(q['change_off'][i])} | "
                        f"{common.fmt(q['accuracy_on'][i])} | {common.fmt(q['accuracy_off'][i])} |")
        rows += ["", f"Sources of {PAD_SRC_LEN} tokens (none padded at k = 0); 'mask on' column: the largest over "
                 f"seeds. Held-out reversal accuracy (teacher forced): {common.fmt(p['final']['accuracy'])}."]
    else:
        rows.append("not run")

    found = verdicts(lm, p)
    plots(study, lm, p)
    return common.finish(study, settings={"lm_steps": lm_steps, "pad_steps": pad_steps, "seq_len": SEQ_LEN,
                                          "lm": {**settings, "batch_size": 12},
                                          "pads": QUICK_PADS if study.quick else PADS,
                                          "anchor": "Vaswani et al. 2017 §3.2.3; nanodo's causality test"},
                         arms={**lm, **pad}, table="\n".join(rows), verdicts=found, unigram_loss=unigram)


def plots(study, lm: dict, pad: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = {}
    for arm, a in lm.items():
        if a:
            steps = [c["step"] for c in a["curves"]]
            series[f"{arm}: own mask"] = (steps, [c["loss"] for c in a["curves"]])
            if not LM_ARMS[arm]:
                series[f"{arm}: causal mask"] = (steps, [c["loss_causal_mask"] for c in a["curves"]])
    if series:
        common.plot(study.out / "lm_curves.png", "Char LM validation loss while training", "step",
                    "val loss (nats/char)", series)
    maps = {arm: np.asarray(a["gradient_map"]) for arm, a in lm.items() if a}
    if maps:
        fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.2), squeeze=False)
        floor = 1e-8
        for ax, (arm, g) in zip(axes[0], maps.items()):
            im = ax.imshow(np.log10(np.maximum(g, floor)), cmap="magma", vmin=np.log10(floor), origin="upper")
            ax.set(title=f"{arm}: log10 |d loss_t / d x_s|", xlabel="input position s", ylabel="loss position t")
            fig.colorbar(im, ax=ax, shrink=0.85)
        fig.tight_layout()
        fig.savefig(study.out / "causality_gradients.png", dpi=120)
        plt.close(fig)
    if pad:
        q = pad["padding"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("on", "off"):
            v = np.maximum(np.asarray(q[f"change_{name}"]), 1e-12)  # [k, S]
            ax.errorbar(q["pads"], v.mean(1), yerr=v.std(1), marker="o", capsize=3, label=f"padding mask {name}")
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, max(q["pads"]) * 1.5)
        ax.set(title="Max |change| of decoder logits at real positions", xlabel="pad tokens appended to the source",
               ylabel="max |Δ logit| (floor 1e-12)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(study.out / "padding.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()

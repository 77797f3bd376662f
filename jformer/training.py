"""Training utilities: losses, metrics, learning-rate schedules, optimizers, train/eval steps.

* ``cross_entropy`` / ``token_accuracy`` / ``perplexity``: token metrics with padding weights.
* ``noam_schedule`` / ``make_schedule`` / ``make_optimizer``: the paper's Adam on the
  "Noam" schedule, or AdamW with linear warmup + cosine decay, built from optax.
* ``TrainState``: everything a resumed run needs, as one pytree (step, params,
  optimizer state, BatchNorm running statistics, PRNG key).
* ``lm_loss`` / ``seq2seq_loss``: model losses returning ``(loss, (metrics, new_model_state))``.
* ``make_train_step`` / ``make_eval_step``: jitted steps over a ``TrainState``.

Shape legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jformer import models
from jformer.layers import check_ids, in_range, nan_unless

Array = jax.Array
LossFn = Callable[..., tuple[Array, tuple[dict, Any]]]


# ------------------------------------------------------------- token metrics


def _weights(targets: Array, weights: Array | None) -> Array:
    if weights is None:
        return jnp.ones(targets.shape, jnp.float32)
    if weights.shape != targets.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match targets {tuple(targets.shape)}")
    return weights.astype(jnp.float32)


def cross_entropy(logits: Array, targets: Array, *, weights: Array | None = None,
                  label_smoothing: float = 0.0) -> tuple[Array, Array]:
    """Mean token cross-entropy over weighted positions, computed in float32.

    With the smoothed target distribution ``q = (1 - ε) · onehot(y) + ε / V``::

        loss_bt = -Σ_v q_v · log_softmax(logits_bt)_v
        loss    = Σ_bt w_bt · loss_bt / Σ_bt w_bt

    Args:
      logits: [B, T, V] (any float dtype; cast to float32).
      targets: integer ids [B, T].
      weights: [B, T] or None (all ones); 0 at padding so it is ignored.
      label_smoothing: ε in [0, 1).

    Returns:
      (loss scalar, total weight Σ w scalar). The loss is 0 when the total weight is 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + [V]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    check_ids("targets", targets, logits.shape[-1])
    w = _weights(targets, weights)
    per_token, _ = _token_losses(logits, targets, label_smoothing)
    total = w.sum()
    loss = (per_token * w).sum() / jnp.where(total > 0, total, 1.0)
    return loss, total


def _token_losses(logits: Array, targets: Array, label_smoothing: float) -> tuple[Array, Array]:
    """Per-token (smoothed loss, nll) [B, T], in float32.

    With q = (1 - ε) onehot(y) + ε / V, ``-Σ_v q_v log p_v = (1 - ε) nll - (ε / V) Σ_v log p_v``:
    a gather and a row sum, so no [B, T, V] one-hot is ever built.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    # An id outside [0, V) would wrap (-1 reads V - 1): NaN instead, so no plausible loss hides it.
    nll = nan_unless(in_range(targets, logits.shape[-1]), nll)
    if not label_smoothing:
        return nll, nll
    return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1), nll


def _correct(logits: Array, targets: Array, weights: Array | None) -> tuple[Array, Array]:
    """(Σ w · [logits[target] = max_v logits[v]], Σ w): a count, so sums over batches stay exact.

    That is argmax(logits) == target except that a tie for the top logit counts as a hit;
    the row max is the one log_softmax takes anyway, where an argmax is a second pass
    over [B, T, V] (an index-carrying reduction XLA:CPU runs slowly: 50 ms at V = 8000).
    """
    check_ids("targets", targets, logits.shape[-1])
    w = _weights(targets, weights)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    hit = nan_unless(in_range(targets, logits.shape[-1]), (target_logit >= logits.max(-1)).astype(jnp.float32))
    return (hit * w).sum(), w.sum()


def token_accuracy(logits: Array, targets: Array, weights: Array | None = None) -> Array:
    """Fraction of weighted positions where ``argmax(logits) == targets`` (a tie for the top counts).

    logits [B, T, V], targets [B, T], weights [B, T] or None -> scalar (0 if Σ w = 0).
    """
    correct, total = _correct(logits, targets, weights)
    return correct / jnp.where(total > 0, total, 1.0)


def perplexity(mean_loss: Array | float) -> Array:
    """``exp(mean_loss)``: perplexity from a mean per-token negative log-likelihood (nats).

    Pass the unsmoothed NLL (``metrics["nll"]``), not a label-smoothed loss.
    """
    return jnp.exp(jnp.asarray(mean_loss, jnp.float32))


# ------------------------------------------------------- schedules, optimizers


SCHEDULES = ("paper", "adamw")


def noam_schedule(d_model: int, warmup_steps: int, scale: float = 1.0) -> optax.Schedule:
    """The paper's learning rate (Vaswani et al. 2017, eq. 3) as an optax schedule.

        lr(n) = scale · d_model^-0.5 · min(s^-0.5, s · warmup^-1.5),   s = n + 1

    ``n`` is optax's update count (0 for the first update); counting ``s`` from 1
    avoids 0^-0.5 at the first update. Linear warmup to the peak
    ``scale · (d_model · warmup)^-0.5`` at s = warmup, then ∝ s^-0.5.
    """
    if d_model <= 0 or warmup_steps <= 0:
        raise ValueError(f"noam_schedule needs d_model > 0 and warmup_steps > 0, "
                         f"got {d_model}, {warmup_steps}")

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model ** -0.5 * jnp.minimum(s ** -0.5, s * warmup_steps ** -1.5)

    return schedule


def make_schedule(name: str, *, learning_rate: float | None = None, warmup_steps: int = 4000,
                  total_steps: int | None = None, d_model: int | None = None,
                  min_learning_rate: float = 0.0) -> optax.Schedule:
    """Learning rate as a function of the optimizer update count (0 for the first update).

    * ``"paper"``: ``noam_schedule(d_model, warmup_steps, scale=learning_rate)`` (default 1);
      ``learning_rate`` is the paper formula's multiplier (the "factor", e.g. 2.0),
      ``total_steps`` and ``min_learning_rate`` do not apply.
    * ``"adamw"``: linear warmup 0 -> ``learning_rate`` over ``warmup_steps``, then cosine
      decay to ``min_learning_rate`` at ``total_steps`` (warmup included), constant after.
    """
    if name == "paper":
        if d_model is None:
            raise ValueError('make_schedule("paper") needs d_model')
        return noam_schedule(d_model, warmup_steps, 1.0 if learning_rate is None else learning_rate)
    if name == "adamw":
        if learning_rate is None or total_steps is None:
            raise ValueError('make_schedule("adamw") needs learning_rate and total_steps')
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps,
                                                  end_value=min_learning_rate)
    raise ValueError(f"unknown optimizer/schedule {name!r}; valid: {SCHEDULES}")


DECAY_RULES = ("kernels", "matrices")


def _check_decay_rule(rule: str) -> None:
    if rule not in DECAY_RULES:
        raise ValueError(f"decay must be one of {DECAY_RULES}, got {rule!r}")


def decay_mask(params: Any, rule: str = "kernels") -> Any:
    """The tree of leaves AdamW decays: True where ``rule`` selects the leaf.

    * ``"kernels"``: ``kernel`` leaves only. Weight decay regularises the matrices
      that mix features. Biases and norm scales are per-feature offsets/gains whose
      decay toward 0 only fights the normalisation, and embeddings get sparse per-row
      gradients, so decaying every row at every step would shrink rare tokens toward
      0 — the usual choice (BERT, GPT-2, T5 ports) is to exclude all three.
    * ``"matrices"``: nanoGPT's ``configure_optimizers`` rule, decay every parameter
      with ``p.dim() >= 2`` in torch: all kernels and embeddings (token and learned
      position tables; a tied output head is the token embedding), no bias and no
      norm scale. GPT-2 style training decays embeddings too, since with a tied head
      the table is also the output projection. The rule goes by leaf name because
      jformer's ndim differs from torch's: stacked layers add a leading [L] axis (a
      LayerNorm scale is [L, D]) and attention biases keep their head axes ([N, H]).
      A leaf of any other name is decayed iff its ndim >= 2.
    """
    _check_decay_rule(rule)

    def name(path):
        return path[-1].key if path and isinstance(path[-1], jax.tree_util.DictKey) else None

    def decayed(path, leaf):
        if rule == "kernels":
            return name(path) == "kernel"
        return name(path) in ("kernel", "embedding") or (
            name(path) not in ("bias", "scale") and jnp.ndim(leaf) >= 2)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(name: str, *, learning_rate: float | None = None, warmup_steps: int = 4000,
                   total_steps: int | None = None, d_model: int | None = None,
                   min_learning_rate: float = 0.0, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-9,
                   weight_decay: float = 0.0, decay: str = "kernels", clip_norm: float | None = None,
                   accumulate_steps: int = 1) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Optimizer and its learning rate per train step (for logging).

    * ``"paper"``: Adam(β1=0.9, β2=0.98, ε=1e-9) on ``noam_schedule`` (``learning_rate``
      is its multiplier, default 1) — the paper's setting with the defaults; no weight
      decay (a nonzero one raises).
    * ``"adamw"``: AdamW on linear warmup + cosine decay (``make_schedule``), with
      decoupled weight decay ``θ ← θ - lr · weight_decay · θ`` on the leaves ``decay``
      selects (``decay_mask``): ``"kernels"`` (default) or ``"matrices"`` (every
      parameter a torch model would hold as a matrix: kernels and embeddings, as nanoGPT).
      ``eps`` is Adam's ε in ``m̂ / (√v̂ + ε)`` (the paper's 1e-9 by default; torch and
      nanoGPT use 1e-8).

    Optional ``clip_norm``: gradients are rescaled to global norm ≤ clip_norm
    before Adam. ``accumulate_steps = k > 1`` wraps everything in
    ``optax.MultiSteps``: the mean of k micro-batch gradients is applied every
    k-th call (params unchanged in between), so k micro-batches of a mean loss
    equal one step on their concatenation; clipping acts on that mean gradient.

    Returns:
      ``(tx, lr)`` where ``lr(step)`` is the learning rate applied by the update
      at train step ``step`` (``TrainState.step``; with accumulation, the schedule
      advances once per k train steps).
    """
    schedule = make_schedule(name, learning_rate=learning_rate, warmup_steps=warmup_steps,
                             total_steps=total_steps, d_model=d_model, min_learning_rate=min_learning_rate)
    if name == "paper":
        if weight_decay:
            raise ValueError('the "paper" optimizer has no weight decay; use "adamw"')
        tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
    else:
        _check_decay_rule(decay)  # here, not inside optax's first update
        tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                         mask=lambda params: decay_mask(params, decay))
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps).gradient_transformation()
    return tx, lambda step: schedule(jnp.asarray(step) // accumulate_steps)


# ---------------------------------------------------------------- train state


@flax.struct.dataclass
class TrainState:
    """Everything needed to continue training bit-for-bit, as one pytree.

    Attributes:
      step: int32 scalar array, number of train steps taken (micro-steps under accumulation).
      params: model parameters.
      opt_state: optimizer state of the ``tx`` passed to ``create``.
      model_state: BatchNorm running statistics (``jformer.init_state``); ``{}`` otherwise.
      key: typed PRNG key (``jax.random.key``); step n's dropout key is ``fold_in(key, n)``.
    """

    step: Array
    params: Any
    opt_state: Any
    model_state: Any
    key: Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, key: Array,
               model_state: Any = None) -> TrainState:
        """Step 0 state. ``key`` may be a typed key or legacy uint32 key data (wrapped here)."""
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   model_state={} if model_state is None else model_state, key=key)


# --------------------------------------------------------------------- losses


def _token_loss(logits: Array, targets: Array, pad_id: int | None,
                label_smoothing: float) -> tuple[Array, dict]:
    """Loss and metrics of logits [B, T, V] against targets [B, T], padding (== pad_id) excluded.

    Metrics: ``loss`` (the smoothed objective), ``nll`` (unsmoothed, for perplexity),
    ``weight`` (Σ w, number of scored tokens), ``correct`` (Σ w · hit), ``accuracy``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + [V]")
    weights = None if pad_id is None else targets != pad_id
    w = _weights(targets, weights)
    smoothed, nll = _token_losses(logits, targets, label_smoothing)
    weight = w.sum()
    safe = jnp.where(weight > 0, weight, 1.0)
    loss, nll = (smoothed * w).sum() / safe, (nll * w).sum() / safe
    correct, _ = _correct(logits, targets, weights)
    accuracy = correct / safe
    return loss, {"loss": loss, "nll": nll, "weight": weight, "correct": correct, "accuracy": accuracy}


def _apply(apply_fn, params, model_state, *tokens, cfg, train, key):
    """Run a model apply, threading BatchNorm statistics only for ``cfg.norm == "batch"``."""
    if cfg.norm != "batch":
        return apply_fn(params, *tokens, cfg=cfg, train=train, key=key), model_state
    logits, aux = apply_fn(params, *tokens, cfg=cfg, state=model_state, train=train, key=key)
    return logits, aux["state"]


def lm_loss(params: Any, model_state: Any, batch: dict, key: Array | None = None, *,
            cfg: models.TransformerConfig, label_smoothing: float = 0.0,
            train: bool = True) -> tuple[Array, tuple[dict, Any]]:
    """Decoder-only LM loss on ``batch = {"inputs": [B, T], "targets": [B, T]}``.

    Targets equal to ``cfg.pad_id`` are not scored. Dropout runs when ``train`` and
    a ``key`` is given; ``train`` also selects BatchNorm batch statistics.

    Returns:
      ``(loss, (metrics, new_model_state))`` — see ``_token_loss`` for the metrics.
    """
    logits, new_state = _apply(models.lm_apply, params, model_state, batch["inputs"], cfg=cfg,
                               train=train, key=key if train else None)
    loss, metrics = _token_loss(logits, batch["targets"], cfg.pad_id, label_smoothing)
    return loss, (metrics, new_state)


def seq2seq_loss(params: Any, model_state: Any, batch: dict, key: Array | None = None, *,
                 cfg: models.TransformerConfig, label_smoothing: float = 0.0,
                 train: bool = True) -> tuple[Array, tuple[dict, Any]]:
    """Encoder-decoder loss on ``batch = {"src": [B, S], "tgt_in": [B, T], "tgt_out": [B, T]}``.

    ``tgt_in`` is the teacher-forced decoder input (BOS-shifted ``tgt_out``);
    ``tgt_out`` positions equal to ``cfg.pad_id`` are not scored.

    Returns:
      ``(loss, (metrics, new_model_state))`` — see ``_token_loss`` for the metrics.
    """
    logits, new_state = _apply(models.seq2seq_apply, params, model_state, batch["src"], batch["tgt_in"],
                               cfg=cfg, train=train, key=key if train else None)
    loss, metrics = _token_loss(logits, batch["tgt_out"], cfg.pad_id, label_smoothing)
    return loss, (metrics, new_state)


# ------------------------------------------------------------ train/eval steps


def train_step_fn(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                  learning_rate: optax.Schedule | None = None,
                  axis_name: str | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure (unjitted) ``train_step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(params, model_state, batch, key)`` is ``lm_loss`` / ``seq2seq_loss`` with
    ``cfg`` bound (``functools.partial``). The dropout key of step n is
    ``fold_in(state.key, n)``: a function of the saved state only, so a run resumed
    from a checkpoint draws the same masks as an uninterrupted one.

    ``axis_name``: run once per device inside ``pmap`` / ``shard_map`` over that axis,
    each on its shard of the batch. The objective is the token mean over the *whole*
    batch, ``Σ_d w_d·loss_d / Σ_d w_d`` (w_d = scored tokens on device d), so its
    gradient is ``psum_d ∇(w_d·loss_d / Σ w)``: the same numbers as one device, even
    when padding leaves devices with different token counts (a plain ``pmean`` of
    per-device means would weight every device equally). Dropout keys also fold in
    the device index, so the shards draw independent masks.

    Metrics: the loss function's (whole-batch values), plus ``grad_norm`` (global L2
    norm of the raw, unclipped gradient) and ``learning_rate`` when ``learning_rate``
    (the ``lr`` returned by ``make_optimizer``) is given.
    """
    def objective(params, model_state, batch, key):
        loss, (metrics, new_state) = loss_fn(params, model_state, batch, key)
        if axis_name is None:
            return loss, (metrics, new_state)
        total = jax.lax.psum(metrics["weight"], axis_name)
        share = metrics["weight"] / jnp.where(total > 0, total, 1.0)
        return loss * share, (metrics, new_state)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            metrics = _whole_batch_metrics(metrics, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=model_state)
        return new_state, metrics

    return train_step


def _whole_batch_metrics(metrics: dict, axis_name: str) -> dict:
    """Per-device token means -> whole-batch token means (weighted by scored tokens)."""
    weight = jax.lax.psum(metrics["weight"], axis_name)
    correct = jax.lax.psum(metrics["correct"], axis_name)
    mean = {k: jax.lax.psum(metrics[k] * metrics["weight"], axis_name) / jnp.where(weight > 0, weight, 1.0)
            for k in ("loss", "nll")}
    return {**metrics, **mean, "weight": weight, "correct": correct,
            "accuracy": correct / jnp.where(weight > 0, weight, 1.0)}


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    learning_rate: optax.Schedule | None = None) -> Callable[[TrainState, dict],
                                                                             tuple[TrainState, dict]]:
    """Jitted ``train_step_fn(loss_fn, tx, learning_rate=...)``; ``state`` is donated.

    On one device, or on many when ``state`` and ``batch`` are sharded arrays (see
    ``jformer.parallel.make_sharded_train_step`` for explicit shardings).
    """
    return jax.jit(train_step_fn(loss_fn, tx, learning_rate=learning_rate), donate_argnums=0)


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, dict], dict]:
    """Jitted ``eval_step(state, batch) -> sums`` (no dropout, ``train=False``).

    Returns sums, so totals over batches (``jax.tree.map(jnp.add, a, b)``) are exact:
    ``loss_sum = Σ w · loss``, ``nll_sum = Σ w · nll``, ``weight = Σ w``,
    ``correct = Σ w · hit``. ``eval_summary`` turns totals into means.
    """
    return jax.jit(eval_step_fn(loss_fn))


def eval_step_fn(loss_fn: LossFn) -> Callable[[TrainState, dict], dict]:
    """The pure (unjitted) ``eval_step`` of ``make_eval_step``."""
    def eval_step(state: TrainState, batch: dict) -> dict:
        _, (m, _) = loss_fn(state.params, state.model_state, batch, None, train=False)
        return {"loss_sum": m["loss"] * m["weight"], "nll_sum": m["nll"] * m["weight"],
                "weight": m["weight"], "correct": m["correct"]}

    return eval_step


def eval_summary(totals: dict) -> dict:
    """Means from summed eval metrics: ``loss``, ``nll``, ``perplexity`` = exp(nll), ``accuracy``."""
    weight = jnp.maximum(totals["weight"], 1e-9)  # all-padding input -> 0, not NaN
    nll = totals["nll_sum"] / weight
    return {"loss": totals["loss_sum"] / weight, "nll": nll, "perplexity": perplexity(nll),
            "accuracy": totals["correct"] / weight}

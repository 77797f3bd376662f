"""Training utilities: losses, metrics, the train state, train/eval steps.

* ``cross_entropy`` / ``token_accuracy`` / ``perplexity``: token metrics with padding weights.
* ``noam_schedule`` / ``make_schedule`` / ``decay_mask`` / ``make_optimizer``: live in
  ``jformer.optim`` and are re-exported here.
* ``TrainState``: everything a resumed run needs, as one pytree (step, params,
  optimizer state, BatchNorm running statistics, PRNG key).
* ``lm_loss`` / ``seq2seq_loss``: model losses returning ``(loss, (metrics, new_model_state))``.
* ``make_train_step`` / ``make_eval_step``: jitted steps over a ``TrainState``.

Shape legend: B batch, S source length, T target length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jformer import config, models
from jformer.config import ExecConfig
from jformer.layers import check_ids, in_range, nan_unless
from jformer.optim import DECAY_RULES, decay_mask, make_optimizer, make_schedule, noam_schedule  # noqa: F401

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
    # A concrete 0 skips the row mean; a traced ε (one per ensemble member) always takes it.
    if isinstance(label_smoothing, (int, float)) and not label_smoothing:
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


# ---------------------------------------------------------------- train state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
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

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------- losses


def _token_loss(logits: Array, targets: Array, pad_id: int | None,
                label_smoothing: float, accuracy: bool = True) -> tuple[Array, dict]:
    """Loss and metrics of logits [B, T, V] against targets [B, T], padding (== pad_id) excluded.

    Metrics: ``loss`` (the smoothed objective), ``nll`` (unsmoothed, for perplexity),
    ``weight`` (Σ w, number of scored tokens) and, when ``accuracy``, ``correct``
    (Σ w · hit) and ``accuracy``. ``accuracy=False`` skips the row max over [B, T, V]
    those need (the loss is the same).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} + [V]")
    check_ids("targets", targets, logits.shape[-1])
    weights = None if pad_id is None else targets != pad_id
    w = _weights(targets, weights)
    smoothed, nll = _token_losses(logits, targets, label_smoothing)
    weight = w.sum()
    safe = jnp.where(weight > 0, weight, 1.0)
    loss, nll = (smoothed * w).sum() / safe, (nll * w).sum() / safe
    metrics = {"loss": loss, "nll": nll, "weight": weight}
    if accuracy:
        correct, _ = _correct(logits, targets, weights)
        metrics.update(correct=correct, accuracy=correct / safe)
    return loss, metrics


def _apply(apply_fn, params, model_state, *tokens, cfg, exe, train, key, axis_name):
    """Run a model apply, threading BatchNorm statistics only for ``cfg.norm == "batch"``;
    under a device ``axis_name`` BatchNorm averages its batch statistics over it."""
    batch_norm = getattr(cfg, "norm", None) == "batch"
    if axis_name is not None:
        exe = (exe or ExecConfig()).replace(batch_norm_axis_name=axis_name)
    logits, aux = apply_fn(params, *tokens, cfg=cfg, exe=exe, state=model_state if batch_norm else None,
                           train=train, key=key)
    return logits, (aux["state"] if batch_norm else model_state)


def lm_loss(params: Any, model_state: Any, batch: dict, key: Array | None = None, *,
            cfg: config.TransformerConfig, exe: ExecConfig | None = None, label_smoothing: float = 0.0,
            train: bool = True, accuracy: bool = True, axis_name: str | None = None,
            apply_fn: Callable = models.lm_apply) -> tuple[Array, tuple[dict, Any]]:
    """Decoder-only LM loss on ``batch = {"inputs": [B, T], "targets": [B, T]}``.

    Targets equal to ``cfg.pad_id`` are not scored. Dropout runs when ``train`` and
    a ``key`` is given; ``train`` also selects BatchNorm batch statistics. ``exe``
    says how the model runs (``ExecConfig``; None: the defaults). ``accuracy=False``
    leaves ``correct`` / ``accuracy`` out of the metrics (saves a pass over [B, T, V]).
    ``axis_name``: the device axis of a ``pmap`` / ``shard_map`` step (``train_step_fn``
    passes it), over which BatchNorm averages its batch statistics. ``apply_fn``: any
    model with ``lm_apply``'s signature and ``(logits, aux)`` return (e.g. ``lm_apply`` with
    ``causal=False`` bound, or ``recurrent.rnn_lm_apply``).

    Returns:
      ``(loss, (metrics, new_model_state))`` — see ``_token_loss`` for the metrics.
    """
    logits, new_state = _apply(apply_fn, params, model_state, batch["inputs"], cfg=cfg, exe=exe,
                               train=train, key=key if train else None, axis_name=axis_name)
    loss, metrics = _token_loss(logits, batch["targets"], cfg.pad_id, label_smoothing, accuracy)
    return loss, (metrics, new_state)


def seq2seq_loss(params: Any, model_state: Any, batch: dict, key: Array | None = None, *,
                 cfg: config.TransformerConfig, exe: ExecConfig | None = None, label_smoothing: float = 0.0,
                 train: bool = True, accuracy: bool = True, axis_name: str | None = None,
                 apply_fn: Callable = models.seq2seq_apply) -> tuple[Array, tuple[dict, Any]]:
    """Encoder-decoder loss on ``batch = {"src": [B, S], "tgt_in": [B, T], "tgt_out": [B, T]}``.

    ``tgt_in`` is the teacher-forced decoder input (BOS-shifted ``tgt_out``);
    ``tgt_out`` positions equal to ``cfg.pad_id`` are not scored. ``exe``,
    ``accuracy`` and ``axis_name`` as in ``lm_loss``. ``apply_fn``: any model with
    ``seq2seq_apply``'s signature and ``(logits, aux)`` return, e.g.
    ``recurrent.rnn_seq2seq_apply`` (its ``cfg`` then is that model's config).

    Returns:
      ``(loss, (metrics, new_model_state))`` — see ``_token_loss`` for the metrics.
    """
    logits, new_state = _apply(apply_fn, params, model_state, batch["src"], batch["tgt_in"],
                               cfg=cfg, exe=exe, train=train, key=key if train else None,
                               axis_name=axis_name)
    loss, metrics = _token_loss(logits, batch["tgt_out"], cfg.pad_id, label_smoothing, accuracy)
    return loss, (metrics, new_state)


# ------------------------------------------------------------ train/eval steps


def train_step_fn(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                  learning_rate: optax.Schedule | None = None, axis_name: str | None = None,
                  grad_norm: bool = True,
                  dropout: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure (unjitted) ``train_step(state, batch) -> (new_state, metrics)``.

    ``loss_fn(params, model_state, batch, key)`` is ``lm_loss`` / ``seq2seq_loss`` with
    ``cfg`` bound (``functools.partial``). The dropout key of step n is
    ``fold_in(state.key, n)``: a function of the saved state only, so a run resumed
    from a checkpoint draws the same masks as an uninterrupted one. ``dropout=False``
    folds no key and passes ``key=None`` (no dropout, whatever the config's rates).

    ``axis_name``: run once per device inside ``pmap`` / ``shard_map`` over that axis,
    each on its shard of the batch. The objective is the token mean over the *whole*
    batch, ``Σ_d w_d·loss_d / Σ_d w_d`` (w_d = scored tokens on device d), so its
    gradient is ``psum_d ∇(w_d·loss_d / Σ w)``: the same numbers as one device, even
    when padding leaves devices with different token counts (a plain ``pmean`` of
    per-device means would weight every device equally). Dropout keys also fold in
    the device index, so the shards draw independent masks. The loss is called with
    ``axis_name=`` (jformer's losses then synchronise BatchNorm statistics over it).

    Metrics: the loss function's (whole-batch values), plus ``grad_norm`` (global L2
    norm of the raw, unclipped gradient; left out with ``grad_norm=False``) and
    ``learning_rate`` when ``learning_rate`` (the ``lr`` returned by ``make_optimizer``)
    is given.
    """
    def objective(params, model_state, batch, key):
        if axis_name is None:
            return loss_fn(params, model_state, batch, key)
        loss, (metrics, new_state) = loss_fn(params, model_state, batch, key, axis_name=axis_name)
        total = jax.lax.psum(metrics["weight"], axis_name)
        share = metrics["weight"] / jnp.where(total > 0, total, 1.0)
        return loss * share, (metrics, new_state)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = None
        if dropout:
            key = jax.random.fold_in(state.key, state.step)
            if axis_name is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
        if axis_name is not None:
            grads = jax.lax.psum(grads, axis_name)
            metrics = _whole_batch_metrics(metrics, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if grad_norm:
            metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        if learning_rate is not None:
            metrics = {**metrics, "learning_rate": learning_rate(state.step)}
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  opt_state=opt_state, model_state=model_state)
        return new_state, metrics

    return train_step


def _whole_batch_metrics(metrics: dict, axis_name: str) -> dict:
    """Per-device token means -> whole-batch token means (weighted by scored tokens).

    ``correct`` / ``accuracy`` are combined only when the loss reported them.
    """
    weight = jax.lax.psum(metrics["weight"], axis_name)
    safe = jnp.where(weight > 0, weight, 1.0)
    out = {**metrics, "weight": weight}
    out.update({k: jax.lax.psum(metrics[k] * metrics["weight"], axis_name) / safe for k in ("loss", "nll")})
    if "correct" in metrics:
        correct = jax.lax.psum(metrics["correct"], axis_name)
        out.update(correct=correct, accuracy=correct / safe)
    return out


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    learning_rate: optax.Schedule | None = None, grad_norm: bool = True,
                    dropout: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Jitted ``train_step_fn(loss_fn, tx, ...)`` with these options; ``state`` is donated.

    On one device, or on many when ``state`` and ``batch`` are sharded arrays (see
    ``jformer.parallel.make_sharded_train_step`` for explicit shardings).
    """
    return jax.jit(train_step_fn(loss_fn, tx, learning_rate=learning_rate, grad_norm=grad_norm, dropout=dropout),
                   donate_argnums=0)


def make_eval_step(loss_fn: LossFn) -> Callable[[TrainState, dict], dict]:
    """Jitted ``eval_step(state, batch) -> sums`` (no dropout, ``train=False``).

    Returns sums, so totals over batches (``jax.tree.map(jnp.add, a, b)``) are exact:
    ``loss_sum = Σ w · loss``, ``nll_sum = Σ w · nll``, ``weight = Σ w``, and
    ``correct = Σ w · hit`` when the loss reports it (not with ``accuracy=False``).
    ``eval_summary`` turns totals into means.
    """
    return jax.jit(eval_step_fn(loss_fn))


def eval_step_fn(loss_fn: LossFn) -> Callable[[TrainState, dict], dict]:
    """The pure (unjitted) ``eval_step`` of ``make_eval_step``."""
    def eval_step(state: TrainState, batch: dict) -> dict:
        _, (m, _) = loss_fn(state.params, state.model_state, batch, None, train=False)
        sums = {"loss_sum": m["loss"] * m["weight"], "nll_sum": m["nll"] * m["weight"], "weight": m["weight"]}
        if "correct" in m:
            sums["correct"] = m["correct"]
        return sums

    return eval_step


def eval_summary(totals: dict) -> dict:
    """Means from summed eval metrics: ``loss``, ``nll``, ``perplexity`` = exp(nll), and
    ``accuracy`` when the totals have ``correct``."""
    weight = jnp.maximum(totals["weight"], 1e-9)  # all-padding input -> 0, not NaN
    nll = totals["nll_sum"] / weight
    summary = {"loss": totals["loss_sum"] / weight, "nll": nll, "perplexity": perplexity(nll)}
    if "correct" in totals:
        summary["accuracy"] = totals["correct"] / weight
    return summary

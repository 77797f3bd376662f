"""Training utilities: token cross-entropy (label smoothing, padding weights) and accuracy.

Shape legend: B batch, T target length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


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
    w = _weights(targets, weights)
    labels = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    per_token = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)  # [B, T]
    total = w.sum()
    loss = (per_token * w).sum() / jnp.where(total > 0, total, 1.0)
    return loss, total


def token_accuracy(logits: Array, targets: Array, weights: Array | None = None) -> Array:
    """Fraction of weighted positions where ``argmax(logits) == targets``.

    logits [B, T, V], targets [B, T], weights [B, T] or None -> scalar (0 if Σ w = 0).
    """
    w = _weights(targets, weights)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    total = w.sum()
    return (correct * w).sum() / jnp.where(total > 0, total, 1.0)

"""Optimizers and learning-rate schedules, built from optax.

* ``noam_schedule``: the paper's d^-0.5 · min(s^-0.5, s · w^-1.5).
* ``make_schedule``: Noam, or linear warmup + cosine decay, or a caller's schedule.
* ``decay_mask``: which leaves weight decay acts on (``DECAY_RULES``), by parameter path.
* ``make_optimizer``: the paper's Adam or AdamW (or a caller's optax transformation),
  with clipping and gradient accumulation, and the learning rate per step for logging.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array

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


def make_schedule(name: str, *, learning_rate: float | optax.Schedule | None = None, warmup_steps: int = 4000,
                  total_steps: int | None = None, d_model: int | None = None,
                  min_learning_rate: float = 0.0) -> optax.Schedule:
    """Learning rate as a function of the optimizer update count (0 for the first update).

    * ``"paper"``: ``noam_schedule(d_model, warmup_steps, scale=learning_rate)`` (default 1);
      ``learning_rate`` is the paper formula's multiplier (the "factor", e.g. 2.0),
      ``total_steps`` and ``min_learning_rate`` do not apply.
    * ``"adamw"``: linear warmup 0 -> ``learning_rate`` over ``warmup_steps``, then cosine
      decay to ``min_learning_rate`` at ``total_steps`` (warmup included), constant after.

    A callable ``learning_rate`` is an optax schedule of the caller's (``count -> lr``,
    e.g. ``optax.constant_schedule(3e-4)``) and is returned as it is, for either name;
    ``warmup_steps``, ``total_steps``, ``d_model`` and ``min_learning_rate`` then do not apply.
    """
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(f"unknown optimizer/schedule {name!r}; valid: {SCHEDULES}")
    if callable(learning_rate):
        return learning_rate
    if learning_rate is not None and not _is_scalar(learning_rate):
        raise ValueError(f"learning_rate must be a number or an optax schedule (a callable step -> lr), "
                         f"got {learning_rate!r}")
    if name == "paper":
        if d_model is None:
            raise ValueError('make_schedule("paper") needs d_model')
        return noam_schedule(d_model, warmup_steps, 1.0 if learning_rate is None else learning_rate)
    if learning_rate is None or total_steps is None:
        raise ValueError('make_schedule("adamw") needs learning_rate and total_steps')
    return warmup_cosine_schedule(learning_rate, warmup_steps, total_steps, min_learning_rate)


def warmup_cosine_schedule(peak: float | Array, warmup_steps: int | Array, total_steps: int | Array,
                           end: float | Array = 0.0) -> optax.Schedule:
    """Linear warmup 0 -> ``peak`` over ``warmup_steps``, cosine decay to ``end`` at ``total_steps``.

        lr(n) = peak · n / w                                    n < w
        lr(n) = end + (peak - end) · ½ (1 + cos(π · min(n - w, D) / D))   otherwise, D = total - w

    The values of ``optax.warmup_cosine_decay_schedule(0, peak, w, total, end)`` (tested
    equal), written in ``jnp`` so that every argument may be a traced scalar: an
    ensemble (``jformer.ensemble``) then gives each member its own peak and warmup
    inside one ``vmap``. Concrete arguments are checked (``0 <= w < total``).
    """
    concrete = [not isinstance(v, jax.core.Tracer) for v in (warmup_steps, total_steps)]
    if all(concrete) and not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")

    def schedule(count):
        n = jnp.asarray(count, jnp.float32)
        w = jnp.asarray(warmup_steps, jnp.float32)
        decay_steps = jnp.maximum(jnp.asarray(total_steps, jnp.float32) - w, 1.0)
        cosine = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(n - w, 0.0, decay_steps) / decay_steps))
        return jnp.where(n < w, peak * n / jnp.maximum(w, 1.0), cosine)

    return schedule


def _is_scalar(x: Any) -> bool:
    """A real number: a Python / numpy scalar or a 0-d numeric array (not a bool)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.ndarray, jax.Array)):
        return False
    return np.ndim(x) == 0 and np.issubdtype(np.result_type(x), np.number)


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


def _decay_mask_arg(decay: Any) -> Any:
    """optax's ``mask`` for ``decay``: a rule of ``decay_mask``, or the caller's tree of bools / callable."""
    if isinstance(decay, str):
        _check_decay_rule(decay)  # here, not inside optax's first update
        return lambda params: decay_mask(params, decay)
    if callable(decay):
        return decay
    leaves = jax.tree.leaves(decay)
    if not leaves or not all(isinstance(leaf, bool) or getattr(leaf, "dtype", None) == np.bool_ for leaf in leaves):
        raise ValueError(f"decay must be one of {DECAY_RULES}, a pytree of bools (True: decayed) or a "
                         f"callable params -> pytree of bools, got {decay!r:.200}")
    return decay


def make_optimizer(name: str | optax.GradientTransformation, *,
                   learning_rate: float | optax.Schedule | None = None, warmup_steps: int = 4000,
                   total_steps: int | None = None, d_model: int | None = None,
                   min_learning_rate: float = 0.0, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-9,
                   weight_decay: float = 0.0, decay: str | Any | Callable[[Any], Any] = "kernels",
                   clip_norm: float | None = None, accumulate_steps: int = 1,
                   schedule: float | optax.Schedule | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
    """Optimizer and its learning rate per train step (for logging).

    ``name`` chooses the optimizer:

    * ``"paper"``: Adam(β1=0.9, β2=0.98, ε=1e-9) on ``noam_schedule`` (``learning_rate``
      is its multiplier, default 1) — the paper's setting with the defaults; no weight
      decay (a nonzero one raises).
    * ``"adamw"``: AdamW on linear warmup + cosine decay (``make_schedule``), with
      decoupled weight decay ``θ ← θ - lr · weight_decay · θ`` on the leaves ``decay``
      selects. ``eps`` is Adam's ε in ``m̂ / (√v̂ + ε)`` (the paper's 1e-9 by default;
      torch and nanoGPT use 1e-8).
    * an ``optax.GradientTransformation`` the caller built (``optax.lion(1e-4)``, a
      chain, ...): used as it is. ``learning_rate``, ``weight_decay`` and ``decay`` do
      not apply (passing one raises), nor do the Adam and schedule arguments; give
      ``schedule`` (a schedule or a number) to have its learning rate logged, else the
      returned ``lr`` is None.

    ``learning_rate`` of a named optimizer is a number (the Noam multiplier for
    ``"paper"``, the peak of warmup + cosine for ``"adamw"``) or any optax schedule
    (a callable ``count -> lr`` of the optimizer update count, e.g.
    ``optax.constant_schedule(3e-4)`` for a constant rate), which then replaces the
    built-in schedule; ``warmup_steps``, ``total_steps``, ``d_model`` and
    ``min_learning_rate`` only shape the built-in ones.

    ``decay`` (``"adamw"``) is a rule of ``decay_mask``: ``"kernels"`` (default) or
    ``"matrices"`` (every parameter a torch model would hold as a matrix: kernels and
    embeddings, as nanoGPT); or the caller's mask as optax takes it: a pytree of bools
    shaped like the params (True: decayed), or a callable ``params -> pytree of bools``.

    Optional ``clip_norm``: gradients are rescaled to global norm ≤ clip_norm
    before the optimizer. ``accumulate_steps = k > 1`` wraps everything in
    ``optax.MultiSteps``: the mean of k micro-batch gradients is applied every
    k-th call (params unchanged in between), so k micro-batches of a mean loss
    equal one step on their concatenation; clipping acts on that mean gradient.
    Both apply to a caller's transformation too.

    Returns:
      ``(tx, lr)`` where ``lr(step)`` is the learning rate applied by the update
      at train step ``step`` (``TrainState.step``; with accumulation, the schedule
      advances once per k train steps); ``lr`` is None for a caller's transformation
      given without ``schedule``.
    """
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    if isinstance(name, optax.GradientTransformation):
        given = {"learning_rate": learning_rate, "weight_decay": weight_decay or None,
                 "decay": None if isinstance(decay, str) and decay == "kernels" else decay}
        given = ", ".join(f"{arg}={value!r:.100}" for arg, value in given.items() if value is not None)
        if given:
            raise ValueError(f"{given}: does not apply to an optax.GradientTransformation passed as name "
                             f"(it carries its own); pass its learning rate as schedule= to log it")
        if schedule is not None and not callable(schedule):
            if not _is_scalar(schedule):
                raise ValueError(f"schedule must be None, a number or an optax schedule (a callable "
                                 f"step -> lr), got {schedule!r}")
            schedule = optax.constant_schedule(schedule)
        tx = name
    elif schedule is not None:
        raise ValueError(f"schedule={schedule!r} is the logged learning rate of an optax.GradientTransformation "
                         f"passed as name; for {name!r} pass the schedule as learning_rate")
    else:
        if not isinstance(name, str) or name not in SCHEDULES:
            raise ValueError(f"unknown optimizer {name!r}; valid: {SCHEDULES} or an optax.GradientTransformation")
        schedule = make_schedule(name, learning_rate=learning_rate, warmup_steps=warmup_steps,
                                 total_steps=total_steps, d_model=d_model, min_learning_rate=min_learning_rate)
        if name == "paper":
            if weight_decay:
                raise ValueError('the "paper" optimizer has no weight decay; use "adamw"')
            tx = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
        else:
            tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=_decay_mask_arg(decay))
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps).gradient_transformation()
    if schedule is None:
        return tx, None
    return tx, lambda step: schedule(jnp.asarray(step) // accumulate_steps)

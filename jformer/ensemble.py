"""S independent models trained as one program: ``vmap`` over a leading member axis.

A study needs several seeds per arm, and on a small machine S separate runs cost S times
the wall time of one. Here S parameter trees are stacked on a new leading axis (init
``vmap``-ped over S keys) and the whole train step, optimizer included, is ``vmap``-ped
over that axis: one ``jit``, one dispatch per step, and XLA batches the S models' matmuls
together. Member i of an ensemble is exactly the model a single run with member i's keys
and hyper-parameters would train (tested equal to a Python loop over members).

Per-member hyper-parameters are ``[S]`` arrays in ``Ensemble.hparams``, vmapped with the
state, so members may differ in any value that leaves shapes equal (learning rate, warmup,
weight decay, label smoothing). The optimizer is given as ``hparams -> (tx, lr)`` and the
loss receives the names listed in ``loss_hparams`` as keyword arguments::

    ens = ensemble.create(lambda k: init_lm(k, cfg), lambda hp: make_optimizer(
        "adamw", learning_rate=hp["lr"], warmup_steps=hp["warmup"], total_steps=T),
        jax.random.split(jax.random.key(0), 6), hparams={"lr": lrs, "warmup": warmups})
    step = ensemble.make_train_step(partial(lm_loss, cfg=cfg), optimizer)
    ens, metrics = step(ens, batch)          # metrics[name]: [S]

Settings that change shapes or the program (width, heads, norm kind) are different
configs: one ensemble per such arm. Dropout *rates* live in the static config, so they are
per-arm too. Checkpoints: ``Checkpointer.save(step, ens.state)`` / ``restore(template.state)``
(the hyper-parameters are configuration, rebuilt by ``create``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jformer import training
from jformer.training import LossFn, TrainState

Array = jax.Array
Optimizer = optax.GradientTransformation | Callable[[dict], tuple[optax.GradientTransformation, Any]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ensemble:
    """S train states stacked on a leading member axis, and their hyper-parameters.

    Attributes:
      state: a ``TrainState`` whose every leaf has a leading [S] axis (``step`` is [S]).
      hparams: name -> [S] array, member i's value at index i.
    """

    state: TrainState
    hparams: dict

    @property
    def size(self) -> int:
        """S, the number of members."""
        return int(self.state.step.shape[0])

    def replace(self, **changes) -> Ensemble:
        return dataclasses.replace(self, **changes)


def _optimizer(tx: Optimizer, hparams: dict) -> tuple[optax.GradientTransformation, Any]:
    """``(tx, lr)`` of one member: ``tx`` as given, or the caller's ``hparams -> (tx, lr)``."""
    if isinstance(tx, optax.GradientTransformation):
        return tx, None
    out = tx(hparams)
    if isinstance(out, optax.GradientTransformation):
        return out, None
    return out


def _check_hparams(hparams: dict, size: int) -> dict:
    """``[S]`` float32/int32 arrays, one per name; a clear error for any other shape."""
    out = {}
    for name, value in hparams.items():
        array = jnp.asarray(value)
        if array.shape != (size,):
            raise ValueError(f"hparams[{name!r}] must have one value per member, shape ({size},), "
                             f"got shape {tuple(array.shape)}")
        out[name] = array
    return out


def create(init_params: Callable[[Array], Any], tx: Optimizer, keys: Array, *, hparams: dict | None = None,
           init_state: Callable[[Any], Any] | None = None) -> Ensemble:
    """An ensemble of S = len(keys) members at step 0.

    Member i: ``init_key, train_key = jax.random.split(keys[i])``; parameters
    ``init_params(init_key)``, model state ``init_state(params)`` (BatchNorm statistics;
    None: ``{}``), and ``TrainState.create(params, tx_i, train_key, model_state)`` whose key
    draws member i's dropout masks. ``tx`` is one optax transformation for every member,
    or ``hparams_i -> (tx, lr)`` (e.g. a ``make_optimizer`` call on ``hparams_i["lr"]``).

    Args:
      keys: [S] typed keys (``jax.random.split(key, S)``) or [S, 2] raw uint32 keys.
      hparams: name -> S values (list or [S] array) per member.
    """
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    if keys.ndim != 1 or keys.shape[0] < 1:
        raise ValueError(f"keys must be [S] PRNG keys with S >= 1, got shape {tuple(keys.shape)}")
    hparams = _check_hparams(hparams or {}, keys.shape[0])

    def member(key, hp):
        init_key, train_key = jax.random.split(key)
        params = init_params(init_key)
        model_state = None if init_state is None else init_state(params)
        return TrainState.create(params, _optimizer(tx, hp)[0], train_key, model_state)

    # Runs once: the least-optimised compile is ~5x faster to build and the values are the same.
    init = jax.jit(jax.vmap(member), compiler_options={"xla_backend_optimization_level": 0})
    return Ensemble(state=init(keys, hparams), hparams=hparams)


def member(ens: Ensemble, i: int) -> TrainState:
    """Member ``i`` as an ordinary ``TrainState`` (decode it, save it, plot it)."""
    if not -ens.size <= i < ens.size:
        raise IndexError(f"member {i} out of range for an ensemble of {ens.size}")
    return jax.tree.map(lambda x: x[i], ens.state)


def stack(states: Sequence[TrainState], hparams: dict | None = None) -> Ensemble:
    """The ensemble of separately built ``states`` (same tree structure and shapes)."""
    if not states:
        raise ValueError("stack needs at least one TrainState")
    structures = {jax.tree.structure(s) for s in states}
    if len(structures) != 1:
        raise ValueError(f"states differ in tree structure: {structures}")
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return Ensemble(state=state, hparams=_check_hparams(hparams or {}, len(states)))


def train_step_fn(loss_fn: LossFn, tx: Optimizer, *, loss_hparams: Sequence[str] = (), batch_axis: int | None = None,
                  grad_norm: bool = True, dropout: bool = True) -> Callable[[Ensemble, dict], tuple[Ensemble, dict]]:
    """The pure ``step(ens, batch) -> (ens, metrics)``: ``training.train_step_fn`` vmapped over members.

    Member i runs ``training.train_step_fn(loss_i, tx_i, learning_rate=lr_i)`` where
    ``loss_i = partial(loss_fn, **{n: hparams_i[n] for n in loss_hparams})`` and
    ``(tx_i, lr_i)`` is ``tx`` or ``tx(hparams_i)``: the same update, bit for bit up to
    XLA's batching, as a single run of member i. ``batch_axis=None``: every member sees
    the same batch (members differ by init, dropout and hyper-parameters); ``0``: batch
    leaves are [S, B, ...], member i trains on ``batch[i]`` (its own data order).

    Metrics: the single-run metrics with a leading [S] axis.
    """
    if batch_axis not in (None, 0):
        raise ValueError(f"batch_axis must be None (shared batch) or 0 (one batch per member), got {batch_axis!r}")

    def one(state, hp, batch):
        loss = _bind(loss_fn, hp, loss_hparams)
        step_tx, lr = _optimizer(tx, hp)
        step = training.train_step_fn(loss, step_tx, learning_rate=lr, grad_norm=grad_norm, dropout=dropout)
        return step(state, batch)

    def step(ens: Ensemble, batch: dict) -> tuple[Ensemble, dict]:
        _check_member_batch(batch, ens.size, batch_axis)
        state, metrics = jax.vmap(one, in_axes=(0, 0, batch_axis))(ens.state, ens.hparams, batch)
        return ens.replace(state=state), metrics

    return step


def _bind(loss_fn: LossFn, hp: dict, names: Sequence[str]) -> LossFn:
    unknown = [n for n in names if n not in hp]
    if unknown:
        raise ValueError(f"loss_hparams {unknown} are not in the ensemble's hparams {sorted(hp)}")
    bound = {n: hp[n] for n in names}
    return lambda params, model_state, batch, key=None, **kw: loss_fn(params, model_state, batch, key,
                                                                     **bound, **kw)


def _check_member_batch(batch: dict, size: int, batch_axis: int | None) -> None:
    if batch_axis is None:
        return
    for name, x in batch.items():
        if np.ndim(x) < 1 or np.shape(x)[0] != size:
            raise ValueError(f"batch_axis=0 needs batch[{name!r}] of shape [S={size}, ...], "
                             f"got {tuple(np.shape(x))}")


def make_train_step(loss_fn: LossFn, tx: Optimizer, *, loss_hparams: Sequence[str] = (),
                    batch_axis: int | None = None, grad_norm: bool = True,
                    dropout: bool = True) -> Callable[[Ensemble, dict], tuple[Ensemble, dict]]:
    """Jitted ``train_step_fn(...)``; the ensemble is donated. Members sharded over a mesh axis
    (``shard_members``) stay sharded: each device steps its own members."""
    return jax.jit(train_step_fn(loss_fn, tx, loss_hparams=loss_hparams, batch_axis=batch_axis,
                                 grad_norm=grad_norm, dropout=dropout), donate_argnums=0)


def make_eval_step(loss_fn: LossFn, *, loss_hparams: Sequence[str] = (),
                   batch_axis: int | None = None) -> Callable[[Ensemble, dict], dict]:
    """Jitted ``eval_step(ens, batch) -> sums`` with a leading [S] axis (``training.make_eval_step``
    per member; ``training.eval_summary`` of the totals gives per-member means)."""
    if batch_axis not in (None, 0):
        raise ValueError(f"batch_axis must be None or 0, got {batch_axis!r}")

    def one(state, hp, batch):
        return training.eval_step_fn(_bind(loss_fn, hp, loss_hparams))(state, batch)

    @jax.jit
    def eval_step(ens: Ensemble, batch: dict) -> dict:
        _check_member_batch(batch, ens.size, batch_axis)
        return jax.vmap(one, in_axes=(0, 0, batch_axis))(ens.state, ens.hparams, batch)

    return eval_step


def shard_members(ens: Ensemble, mesh: Mesh, axis: str = "data") -> Ensemble:
    """Place member i's arrays on the devices of ``mesh`` by splitting the member axis over
    ``axis`` (S must be divisible by its size): S models on S devices train without any
    communication. Every other axis is replicated."""
    size = mesh.shape[axis]
    if ens.size % size:
        raise ValueError(f"{ens.size} members do not split evenly over mesh axis {axis!r} of size {size}")
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return jax.device_put(ens, jax.tree.map(lambda _: sharding, ens))

"""Many devices, same numbers: meshes, sharding rules, sharded and ``pmap`` train steps.

One rule table, two steps from parameter to device::

    parameter path  --PARAM_AXES-->  logical axes  --MESH_RULES-->  mesh axes
    .../query/kernel [D, N, H]       (embed, heads, head_dim)       (fsdp, model, None)

The mesh always has the three axes ``data``, ``fsdp`` and ``model`` (absent ones
have size 1), so the strategy is the mesh shape alone:

==============  ===================  ===============================================
``--mesh``      strategy             what is split
==============  ===================  ===============================================
``data=8``      data parallel (DP)   the batch; params and optimizer replicated
``fsdp=8``      fully sharded (FSDP) the batch, and params + optimizer state on D
``model=8``     tensor parallel (TP) attention heads, FFN hidden width, vocabulary
``data=4,model=2``  DP × TP          both
``fsdp=4,model=2``  FSDP × TP        both
==============  ===================  ===============================================

Model code never mentions devices: ``jax.jit`` is given the shardings of its
inputs and outputs, and XLA's sharding propagation places every intermediate and
inserts the collectives. Optimizer states (Adam's ``mu``/``nu``) mirror the
parameter tree, so the same path rules shard them.

``make_pmap_train_step`` is the classic alternative: one replica per device,
gradients summed with ``lax.psum`` (token-weighted, so equal to one device), and
BatchNorm statistics synchronised over the device axis, which the step passes to the
loss (``axis_name=``; the model config knows nothing of devices).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jformer import training

MESH_AXES = ("data", "fsdp", "model")

# Logical axes of each parameter kind, matched (re.search) against the "/"-joined path.
# A stacked (scanned) layer parameter has one extra leading axis, "layers".
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(query|key|value)/kernel$", ("embed", "heads", "head_dim")),
    (r"(query|key|value)/bias$", ("heads", "head_dim")),
    (r"out/kernel$", ("heads", "head_dim", "embed")),
    (r"(wi|gate)/kernel$", ("embed", "mlp")),
    (r"(wi|gate)/bias$", ("mlp",)),
    (r"wo/kernel$", ("mlp", "embed")),
    (r"token/embedding$", ("vocab", "embed")),
    (r"position/embedding$", (None, "embed")),
    (r"head/kernel$", ("embed", "vocab")),
    (r"head/bias$", ("vocab",)),
    (r"(bias|scale|mean|var)$", ("embed",)),  # norms and output biases of width D
)

# Logical axis -> mesh axes. "batch" is the leading axis of every input array.
MESH_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("model",),
    "mlp": ("model",),
    "vocab": ("model",),
}


# ------------------------------------------------------------------- meshes


def parse_mesh_spec(spec: str | dict[str, int]) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "fsdp": 1, "model": 2}`` (checked)."""
    if isinstance(spec, str):
        sizes = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, eq, size = item.partition("=")
            if not eq or not size.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec item {item!r} must look like axis=size, e.g. 'data=4,model=2'")
            sizes[name.strip()] = int(size)
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    if any(v < 1 and v != -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh sizes must be >= 1 (at most one -1 = the remaining devices), got {sizes}")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "model")`` over ``devices`` (default: all).

    ``spec``: ``"data=4,model=2"`` or a dict; absent axes have size 1 and one size
    may be -1 (the remaining devices). Sizes must multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if len(devices) % known:
            raise ValueError(f"mesh {spec!r}: {len(devices)} devices do not divide by {known}")
        sizes = {a: len(devices) // known if v == -1 else v for a, v in sizes.items()}
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {spec!r} has {math.prod(sizes.values())} devices, but {len(devices)} are "
                         "given (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax "
                         "is imported)")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh) -> str:
    """``"fsdp=4 x model=2 (FSDP x TP)"`` — the strategy a mesh gives."""
    names = {"data": "DP", "fsdp": "FSDP", "model": "TP"}
    used = [a for a in MESH_AXES if mesh.shape[a] > 1]
    if not used:
        return "1 device"
    return " x ".join(f"{a}={mesh.shape[a]}" for a in used) + f" ({' x '.join(names[a] for a in used)})"


# ---------------------------------------------------------------- shardings


def _path_names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def logical_axes(path: str | Sequence, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the array at ``path`` (a key path or "a/b/c") with ``ndim`` dims.

    Arrays matching no rule, or whose rank fits neither the rule nor the rule plus a
    leading "layers" axis, are replicated (all None) — e.g. Adam's step count.
    """
    name = path if isinstance(path, str) else "/".join(_path_names(path))
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            if ndim == len(axes):
                return axes
            if ndim == len(axes) + 1:
                return ("layers", *axes)
            break
    return (None,) * ndim


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: dict[str, tuple[str, ...]] = MESH_RULES) -> P:
    """``PartitionSpec`` of an array of ``shape`` with logical ``axes`` on ``mesh``.

    A dimension is split over the rule's mesh axes of size > 1 that are not
    already used by another dimension, and only if their size product divides it
    (e.g. 2 key/value heads stay whole on ``model=8``); otherwise it is replicated.
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
        else:
            spec.append(None)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: dict[str, tuple[str, ...]] = MESH_RULES) -> Any:
    """``NamedSharding`` for every array leaf of ``tree`` (params, a ``TrainState``, ...) by path."""
    def one(path, x):
        return NamedSharding(mesh, partition_spec(logical_axes(path, x.ndim), x.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Inputs: leading (batch) axis split over ``data`` and ``fsdp``, the rest replicated."""
    return NamedSharding(mesh, P(tuple(a for a in MESH_RULES["batch"] if mesh.shape[a] > 1) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a host batch (every process holds the same global batch) on ``mesh``.

    Each process builds only its addressable shards (``make_array_from_callback``),
    so this works unchanged on one process or many.
    """
    sharding = batch_sharding(mesh)
    size = math.prod(mesh.shape[a] for a in MESH_RULES["batch"])

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % size:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {size} data-parallel devices "
                             f"({describe(mesh)}); use a batch size divisible by {size}")
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {k: put(v) for k, v in batch.items()}


def shard_state(state: Any, mesh: Mesh) -> tuple[Any, Any]:
    """``(state placed on mesh, its shardings)``; from host or single-device arrays."""
    shardings = tree_shardings(state, mesh)
    return jax.device_put(state, shardings), shardings


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, **jit_options) -> tuple[Any, Any]:
    """``(init_fn() created directly in its shards, shardings)`` — no device holds it whole.

    ``init_fn`` takes no arguments (close over keys and configs); it is traced once
    with ``jax.eval_shape`` to find the shapes and rule-based shardings.
    ``jit_options`` go to ``jax.jit`` (e.g. ``compiler_options``).
    """
    shardings = tree_shardings(jax.eval_shape(init_fn), mesh)
    return jax.jit(init_fn, out_shardings=shardings, **jit_options)(), shardings


# --------------------------------------------------------------- train steps


def make_sharded_train_step(loss_fn: training.LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                            state_shardings: Any, *, learning_rate: optax.Schedule | None = None):
    """``train_step(state, batch)`` jitted with explicit shardings on ``mesh``.

    ``state`` (sharded as ``state_shardings``, donated) and the batch (``shard_batch``)
    are global arrays; the step is the single-device ``training.train_step_fn``, so the
    loss and update are the whole-batch ones and equal one device's up to the order
    of floating-point reductions. Metrics come back replicated.
    """
    step = training.train_step_fn(loss_fn, tx, learning_rate=learning_rate)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def make_pmap_train_step(loss_fn: training.LossFn, tx: optax.GradientTransformation, *,
                         learning_rate: optax.Schedule | None = None, axis_name: str = "batch",
                         devices: Sequence[jax.Device] | None = None):
    """``jax.pmap`` data-parallel ``train_step(replicated_state, split_batch)``.

    ``replicate(state)`` gives every device a copy; ``split_batch(batch, n)`` reshapes
    inputs to [n, B/n, ...]. Gradients are token-weighted and summed over
    ``axis_name`` (see ``training.train_step_fn``), which is also passed to the loss,
    so BatchNorm's batch statistics are the whole batch's. Metrics come back per device
    (identical): take ``[0]``.
    """
    step = training.train_step_fn(loss_fn, tx, learning_rate=learning_rate, axis_name=axis_name)
    return jax.pmap(step, axis_name=axis_name, devices=devices, donate_argnums=0)


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy of ``tree`` per device, stacked on a new leading axis (``pmap`` input)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("replica",)), P("replica"))
    return jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices), *x.shape)), tree), sharding)


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a ``replicate``d tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] for every input array (``pmap`` input)."""
    def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over {n} devices")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


# ------------------------------------------------------------ multi-process


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed.initialize`` for N processes (CPU collectives through gloo).

    Call before any other JAX call. ``coordinator`` is ``host:port`` of process 0
    (``localhost:PORT`` for processes on one machine). Afterwards ``jax.devices()``
    lists every process's devices and a mesh over them spans the processes.
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"need 0 <= process_id < num_processes, got {process_id}, {num_processes}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Block until every process has called ``barrier(name)``; nothing with one process.

    Waits through the coordinator's key-value store, not a collective: XLA:CPU's gloo
    collectives give up when a peer is 30 s late, and a process waiting for another to
    write tokenizers or compile can be later than that.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def memory_per_device(compiled) -> dict[str, float]:
    """Per-device bytes of a compiled computation (``jit(...).lower(...).compile()``):
    arguments, outputs, temporaries, and their sum less donated (aliased) buffers."""
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return {k: float(v) for k, v in out.items()}


def sharded_bytes(tree: Any, shardings: Any) -> float:
    """Bytes of ``tree`` held by one device under ``shardings`` (largest shard per leaf)."""
    def one(x, s):
        shard = s.shard_shape(x.shape)
        return math.prod(shard) * jnp.dtype(x.dtype).itemsize

    return float(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))

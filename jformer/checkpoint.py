"""Checkpoints of a ``TrainState`` with orbax: keep the last few and the best, survive corruption.

Layout (one orbax ``CheckpointManager`` directory)::

    <directory>/<step>/state/   the TrainState pytree (OCDBT/zarr arrays; the PRNG key as raw key data)
    <directory>/<step>/meta/    JSON: format version, PRNG implementation, data-iterator state
    <directory>/<step>/metrics/ JSON: the metrics passed to ``save`` (rank the best checkpoint)
    <directory>/corrupt/<step>  unreadable checkpoints moved aside by ``restore``

Why it is safe to kill a run at any moment: orbax writes each step into
``<step>.orbax-checkpoint-tmp-<n>`` and renames it to ``<step>`` only once every
file is written (atomic finalization). A process killed mid-save leaves only a
temporary directory, which is never listed as a step and is deleted when the next
``Checkpointer`` opens the directory. Damage after the fact (a truncated or
deleted file, a step directory half-written by other means) is caught at restore
time: the step is reported with the reason and the next older one is tried; once
an older one restores, the unreadable newer ones are moved to ``corrupt/``.

What is verified on restore, and how:

* Integrity. ``save`` records a CRC-32 of every array's bytes (C order, in the saved
  dtype, whole array whatever its sharding) in ``meta`` under ``"crc32"``, keyed by the
  leaf's tree path (``params/dense/kernel``, ``opt_state/0/mu/dense/kernel``, ``key``).
  ``restore`` recomputes them on the arrays it read. Tensorstore's own CRC-32C covers only
  the OCDBT index nodes: a flipped byte in an array's data file would otherwise come back
  as a plausible, finite, wrong parameter. A mismatch is handled like any unreadable step
  (warning naming the step and the arrays, fall back, ``corrupt/``). Checkpoints of format
  1 (before checksums) still restore, with a warning that they cannot be verified.
  Multi-process runs: an array that is not fully addressable from a process cannot be
  hashed there without gathering every parameter across hosts at every save, so its
  checksum is stored as null and not verified (neither is an array the restoring process
  cannot see whole); everything else is.
* Fit to the template. Before reading any array, the tree paths and shapes stored in the
  checkpoint (orbax's metadata) are compared with the template's; a difference raises
  ``TemplateMismatchError`` naming the entries at once. It is a wrong template, not damage:
  no other step is tried and nothing is moved to ``corrupt/``. Dtypes may differ: arrays
  are read in the saved dtype (that is what the checksums cover) and then cast, so such a
  restore briefly holds both copies.

Params-only restore (``restore_params``, ``Checkpointer.restore_params``): evaluation and
generation read the ``params`` and ``model_state`` entries alone, from templates of those
two (no optimizer, no ``TrainState``), with the same checks: checksums of what is read,
fallback past damaged steps, ``TemplateMismatchError`` naming the entries that do not fit.

No pickle: arrays go through tensorstore, everything else is JSON.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jformer.integrity import (CheckpointError, CorruptCheckpointError, TemplateMismatchError,  # noqa: F401
                               check_fits, crc32, flat, verify)
from jformer.training import TrainState

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: meta["crc32"] holds a checksum per array; 1: no checksums (still readable)
READABLE_FORMATS = (1, 2)
BEST_MODES = ("min", "max")


class _LatestAndBest:
    """Orbax preservation policy: the last ``keep`` steps, plus the best one by ``metric``.

    Steps whose metrics lack ``metric`` never count as best (orbax's ``BestN`` would
    rank them), so "best" is exactly the best among checkpoints that reported it.
    """

    def __init__(self, keep: int, metric: str, mode: str):
        self.keep, self.metric, self.mode = keep, metric, mode

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        keep = [i >= len(checkpoints) - self.keep for i in range(len(checkpoints))]
        best = _best_index([info.metrics for info in checkpoints], self.metric, self.mode)
        if best is not None:
            keep[best] = True
        return keep


def _best_index(all_metrics: Sequence[dict | None], metric: str, mode: str) -> int | None:
    """Index of the best value of ``metric`` (min or max; ties: the later step), None if absent."""
    scored = [(m[metric], i) for i, m in enumerate(all_metrics) if m and metric in m]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda vi: (sign * vi[0], vi[1]))[1]


def _key_impl_name(key: jax.Array) -> str:
    return str(jax.random.key_impl(key))


class Checkpointer:
    """Save / restore ``TrainState`` checkpoints in ``directory``.

    Args:
      directory: checkpoint root (created if missing).
      keep: how many most recent checkpoints to keep.
      best_metric: name in the ``metrics`` passed to ``save`` by which the best
        checkpoint is chosen; that one is kept in addition to the last ``keep``.
      best_mode: ``"min"`` (losses) or ``"max"`` (accuracies, BLEU).
      async_save: write in a background thread (``save`` returns once the arrays
        are copied to host memory, so the state may be donated right after).
        Call ``wait_until_finished()`` or ``close()`` before relying on the files.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, best_metric: str = "val_loss",
                 best_mode: str = "min", async_save: bool = True):
        if best_mode not in BEST_MODES:
            raise ValueError(f"best_mode must be one of {BEST_MODES}, got {best_mode!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric, self.best_mode = best_metric, best_mode
        worst = float("inf") if best_mode == "min" else float("-inf")
        # Remove what a killed save left behind, synchronously: orbax's own cleanup runs in a
        # background thread and raced with the first save after a SIGKILL (rmtree of a path
        # already gone). Unfinalized directories are never listed as steps either way.
        for leftover in glob.glob(os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(leftover, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_LatestAndBest(keep, best_metric, best_mode),
            # Orbax writes metrics only when it tracks a best_fn; ranking and deletion
            # are ours (_LatestAndBest, best_step), which skip steps without the metric.
            best_fn=lambda m: m.get(best_metric, worst),
            best_mode=best_mode,
            create=True,
            cleanup_tmp_directories=False,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------- queries

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, ascending (readability not checked)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def metrics(self, step: int) -> dict | None:
        """Metrics saved with ``step`` ({} if saved without; None if missing or unreadable)."""
        try:
            return self._manager.metrics(step)
        except Exception:  # a corrupt metadata file only costs the metrics
            return None

    def best_step(self) -> int | None:
        """Step with the best ``best_metric`` among the kept checkpoints (None if none reported it)."""
        steps = self.all_steps()
        best = _best_index([self.metrics(s) for s in steps], self.best_metric, self.best_mode)
        return None if best is None else steps[best]

    # ---------------------------------------------------------------- save

    def save(self, step: int, train_state: TrainState, *, data_state: dict | None = None,
             metrics: dict | None = None, force: bool = False) -> bool:
        """Save ``train_state`` (all of it, PRNG key included) as checkpoint ``step``.

        A CRC-32 of each array is computed here, synchronously, and saved in ``meta`` so
        that ``restore`` can tell a damaged array from a good one.

        Args:
          step: checkpoint number (usually ``int(train_state.step)``).
          data_state: JSON-serialisable data-iterator state restored alongside.
          metrics: scalar metrics (JSON); ``metrics[best_metric]`` ranks the best checkpoint.
          force: save even if orbax's policy would skip this step (e.g. ``step`` not
            after the latest); saving over an existing step is an error either way.

        Returns:
          Whether a checkpoint was started.
        """
        # Typed PRNG keys are stored as their raw uint32 data plus the implementation
        # name (in JSON), and rewrapped on restore: the round trip then does not
        # depend on orbax's key metadata, and the key dtype is never silently lost.
        storable = train_state.replace(key=jax.random.key_data(train_state.key))
        # Computed before orbax takes the arrays: with async_save the caller may donate them
        # as soon as this returns. Costs a device-to-host copy and a CRC pass (~3.8 GB/s on one core).
        checksums = {name: crc32(x) for name, x in flat(storable).items()}
        meta = {"format": FORMAT, "key_impl": _key_impl_name(train_state.key), "data_state": data_state,
                "crc32": checksums}
        # {} rather than None: orbax tracks a best_fn, so it expects metrics with every save.
        metrics = {name: float(value) for name, value in (metrics or {}).items()}
        return self._manager.save(
            int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(storable), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=force)

    def wait_until_finished(self) -> None:
        """Block until an asynchronous save is finalized on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- restore

    def restore(self, template_state: TrainState) -> tuple[TrainState, dict | None, int] | None:
        """Restore the latest readable checkpoint into the structure of ``template_state``.

        ``template_state`` gives the tree structure, shapes and dtypes (e.g. a fresh
        ``TrainState.create(...)`` or its ``jax.eval_shape``); its values are not used;
        leaves are restored in the template's dtypes and shardings. An unreadable
        checkpoint is logged as a warning with its step and reason and the next older
        one is tried. Unreadable means a file is missing, truncated or undecodable, or an
        array differs from the checksum saved with it. When one succeeds, the unreadable
        newer ones are moved to ``<directory>/corrupt/`` (kept for inspection) so that
        they no longer count as the latest and the resumed run can save those steps
        again. If none succeeds nothing is moved.

        Returns:
          ``(train_state, data_state, step)``, or None if there are no checkpoints.

        Raises:
          TemplateMismatchError: the tree paths or shapes of the newest step whose
            metadata is readable differ from the template's (the message lists the
            entries; also a ValueError); no older step is tried and nothing is moved:
            a wrong template is not damage.
          CheckpointError: checkpoints exist but none is readable (the reasons are listed).
        """
        self.wait_until_finished()
        self._manager.reload()  # list the directory afresh: another process may have written to it
        steps = self.all_steps()
        if not steps:
            return None
        return self._restore_first_good(steps[::-1], lambda step: self._restore_step(step, template_state), "latest")

    def restore_best(self, template_state: TrainState) -> tuple[TrainState, dict | None, int] | None:
        """Like ``restore`` for the checkpoint with the best ``best_metric`` (then the next best...).

        Damaged ones (checksums included) are skipped and moved to ``corrupt/`` as in
        ``restore``. Returns None if no checkpoint reported ``best_metric``.
        """
        ranked = self._best_first()
        if not ranked:
            return None
        return self._restore_first_good(ranked, lambda step: self._restore_step(step, template_state),
                                        f"best by {self.best_metric}")

    def restore_params(self, params: Any, model_state: Any = None, *,
                       best: bool = False) -> tuple[Any, Any, int] | None:
        """Only the parameters and BatchNorm statistics of the latest (or ``best``) readable checkpoint.

        For evaluation and generation: neither an optimizer nor a ``TrainState`` template is
        needed, and the optimizer state and PRNG key are not read. ``params`` and
        ``model_state`` are templates as in ``restore`` (concrete or ``jax.eval_shape``
        arrays, whose dtypes and shardings the restored leaves get); ``model_state=None``
        means ``{}`` (no BatchNorm), so a checkpoint that holds statistics does not fit it.

        The arrays read are verified against the checksums saved with them, and the
        fallback is ``restore``'s (``restore_best``'s with ``best``): an unreadable or
        damaged step is reported and the next one tried, and once one restores the
        unreadable newer ones are moved to ``corrupt/``. The entries and shapes under
        ``params/`` and ``model_state/`` must match the checkpoint's
        (``TemplateMismatchError`` naming them otherwise).

        Returns:
          ``(params, model_state, step)``, or None if there is no checkpoint (with
          ``best``: none that reported ``best_metric``).
        """
        template = {"params": params, "model_state": {} if model_state is None else model_state}
        if best:
            candidates, what = self._best_first(), f"best by {self.best_metric}"
        else:
            self.wait_until_finished()
            self._manager.reload()
            candidates, what = self.all_steps()[::-1], "latest"
        if not candidates:
            return None
        restored, _, step = self._restore_first_good(
            candidates, lambda s: self._restore_step(s, template, params_only=True), what)
        return restored["params"], restored["model_state"], step

    def _best_first(self) -> list[int]:
        """The steps that reported ``best_metric``, best first."""
        self.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        ranked = []
        all_metrics = [self.metrics(s) for s in steps]
        while (best := _best_index(all_metrics, self.best_metric, self.best_mode)) is not None:
            ranked.append(steps[best])
            all_metrics[best] = None
        return ranked

    def _restore_first_good(self, candidates: list[int], read: Callable[[int], tuple[Any, dict | None]],
                            what: str):
        """``(*read(step), step)`` of the first candidate that reads; the failures before it are quarantined."""
        failed = []
        for step in candidates:
            try:
                state, data_state = read(step)
            except TemplateMismatchError:
                raise  # the template is wrong, not the checkpoint: falling back would quarantine good steps
            except Exception as e:  # orbax/tensorstore raise ValueError, OSError, JSON and bare Exceptions
                text = str(e).strip()
                reason = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
                logger.warning("checkpoint step %d in %s is unreadable (%s)%s", step, self.directory, reason,
                               "; falling back to the previous checkpoint" if step != candidates[-1] else "")
                failed.append((step, reason))
                continue
            # The same template restored this step, so the failures above were damaged
            # checkpoints, not a wrong template: move them aside, so that they no longer
            # count as the latest or occupy a `keep` slot, and the resumed run can save
            # those step numbers again.
            for bad, _ in failed:
                logger.warning("moved unreadable checkpoint step %d to %s", bad, self._quarantine(bad))
            if failed:
                self._manager.reload()
            return state, data_state, step
        raise CheckpointError(f"no readable checkpoint ({what}) in {self.directory}: "
                              + "; ".join(f"step {s}: {r}" for s, r in failed))

    def _restore_step(self, step: int, template: Any, params_only: bool = False) -> tuple[Any, dict | None]:
        """Read and verify one step. TemplateMismatchError for a wrong template; anything else: damage.

        ``template`` is a ``TrainState``, or with ``params_only`` a dict of some of its
        fields (``{"params": ..., "model_state": ...}``), which alone are read.
        """
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
            raise ValueError(f"meta item is not a jformer checkpoint of format {READABLE_FORMATS}: {meta!r:.200}")
        abstract = _abstract(template) if params_only else _storable_target(template, meta["key_impl"])
        target = flat(abstract)
        saved = self._saved_arrays(step)
        wanted = {n: a for n, a in saved.items() if n.split("/")[0] in template} if params_only else saved
        part = "the params and model_state of " if params_only else ""
        check_fits(wanted, target, f"{part}checkpoint step {step} in {self.directory}")
        checksums = meta.get("crc32") if meta["format"] >= 2 else None
        if meta["format"] >= 2 and (not isinstance(checksums, dict) or set(checksums) != set(saved)):
            raise CorruptCheckpointError(f"meta's checksums do not list the stored arrays: {checksums!r:.200}")
        # Read in the saved dtypes, which the checksums cover; cast to the template's after.
        read_as = {name: jax.ShapeDtypeStruct(t.shape, saved[name].dtype, sharding=t.sharding)
                   for name, t in target.items()}
        treedef = jax.tree.structure(abstract)
        item = jax.tree.unflatten(treedef, list(read_as.values()))
        if params_only:
            restored = self._restore_part(step, item)
        else:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))
            restored = restored["state"]
        restored = jax.block_until_ready(restored)  # surface lazy read errors here, not later
        leaves = dict(zip(target, jax.tree.leaves(restored)))
        if checksums is not None:
            verify(leaves, checksums)
        else:
            logger.warning("checkpoint step %d in %s has no checksums (format %s, saved before they were "
                           "added): its arrays cannot be verified", step, self.directory, meta["format"])
        restored = jax.tree.unflatten(treedef, [
            x if x.dtype == target[n].dtype else x.astype(target[n].dtype) for n, x in leaves.items()])
        if params_only:
            return restored, meta["data_state"]
        state = restored.replace(key=jax.random.wrap_key_data(restored.key, impl=meta["key_impl"]))
        return state, meta["data_state"]

    def _restore_part(self, step: int, item: dict) -> dict:
        """The subtrees of the stored state named by ``item``'s keys (abstract arrays), nothing else read.

        Orbax's partial restore, through its PyTree handler on the ``state`` item's directory
        (the manager's ``StandardRestore`` reads whole trees only). Empty subtrees are not
        asked of orbax and come back as they are.
        """
        asked = {k: v for k, v in item.items() if jax.tree.leaves(v)}
        handler = ocp.PyTreeCheckpointHandler()
        try:
            restored = handler.restore(epath.Path(self.directory) / str(step) / "state", args=ocp.args.PyTreeRestore(
                item=asked, restore_args=ocp.checkpoint_utils.construct_restore_args(asked), partial_restore=True))
        finally:
            handler.close()
        return {k: restored[k] if k in asked else v for k, v in item.items()}

    def _saved_arrays(self, step: int) -> dict[str, Any]:
        """Tree path -> orbax ArrayMetadata (``.shape``, ``.dtype``) of the arrays stored at ``step``."""
        handler = ocp.StandardCheckpointHandler()
        try:
            return flat(handler.metadata(epath.Path(self.directory) / str(step) / "state").tree)
        finally:
            handler.close()

    def _quarantine(self, step: int) -> str:
        """Move step's directory to ``corrupt/<step>-<time>`` (not a step name, so orbax ignores it)."""
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, "corrupt", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        except OSError as e:
            return f"nowhere ({e})"
        return dst


def restore_params(directory: str | os.PathLike, params: Any, model_state: Any = None, *, best: bool = False,
                   best_metric: str = "val_loss", best_mode: str = "min") -> tuple[Any, Any, int] | None:
    """The parameters and BatchNorm statistics of the checkpoints in ``directory``, nothing else.

    ``Checkpointer(directory, best_metric=..., best_mode=...).restore_params(params,
    model_state, best=best)``, closed after (see there): verified against the saved
    checksums, falling back past damaged steps, ``TemplateMismatchError`` for a template
    that does not fit. Returns ``(params, model_state, step)``, or None if ``directory``
    does not exist or has no checkpoint (with ``best``: none that reported ``best_metric``).
    """
    if not os.path.isdir(directory):
        return None
    with Checkpointer(directory, best_metric=best_metric, best_mode=best_mode) as ckpt:
        return ckpt.restore_params(params, model_state, best=best)


def _storable_target(template: TrainState, key_impl: str) -> TrainState:
    """Abstract arrays (shape, dtype, sharding) of the stored form of ``template``.

    The key leaf becomes raw key data of the saved implementation ``key_impl``
    ([*key.shape, 2] uint32 for threefry); other leaves keep the template's
    shapes, dtypes and (when it has them) shardings.
    """
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=key_impl)))
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    key_data = jax.ShapeDtypeStruct(tuple(template.key.shape) + key_data.shape, key_data.dtype,
                                    sharding=getattr(template.key, "sharding", None) or default)
    return _abstract(template.replace(key=key_data))


def _abstract(tree: Any) -> Any:
    """Abstract arrays (shape, dtype, sharding) of ``tree``'s leaves; without a sharding, the first local device."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(x):
        sharding = getattr(x, "sharding", None) if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else None
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or default)

    return jax.tree.map(abstract, tree)

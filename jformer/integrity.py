"""What a checkpoint verifies: tree paths as names, CRC-32 checksums of arrays, template fit.

Used by ``jformer.checkpoint``; apart from it because none of it depends on orbax: a leaf's
name is its tree path (``params/dense/kernel``, the names orbax gives the same leaves), its
checksum a CRC-32 of its bytes in C order, and a template fits a checkpoint when the names
and shapes agree.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

SHOWN = 8  # entries named in an error message before "... (n more)"


class CheckpointError(RuntimeError):
    """No readable checkpoint although the directory has some (base of the errors below)."""


class TemplateMismatchError(CheckpointError, ValueError):
    """The template's entries or shapes differ from the checkpoint's: a wrong template, not damage."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's arrays differ from the checksums saved with them."""


def path_name(path: tuple) -> str:
    """``params/dense/kernel``: the names orbax gives the same leaves, so the two can be matched."""
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flat(tree: Any) -> dict[str, Any]:
    """Tree path name -> leaf, in leaf order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = {path_name(path): leaf for path, leaf in leaves}
    if len(flat) != len(leaves):  # e.g. keys containing "/": checksums would be matched to the wrong arrays
        names = [path_name(path) for path, _ in leaves]
        raise ValueError(f"tree paths collide as names: {shown(sorted({n for n in names if names.count(n) > 1}))}")
    return flat


def crc32(x: Any) -> int | None:
    """CRC-32 of the whole array's bytes in C order; None if this process cannot see all of it.

    Assembled shard by shard into a fresh buffer because ``np.asarray(x)`` would keep a
    host copy cached on ``x`` (the whole train state, on an accelerator) for its lifetime.
    """
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:  # multi-process: see the module docstring
            return None
        host = np.empty(x.shape, x.dtype)
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                host[shard.index] = np.asarray(shard.data)
    elif isinstance(x, np.ndarray):
        host = np.ascontiguousarray(x)
    else:
        return None
    return zlib.crc32(host.reshape(-1).view(np.uint8))


def shown(names: Sequence[str], limit: int = SHOWN) -> str:
    names = list(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def describe(x: Any) -> str:
    return f"{np.dtype(x.dtype).name}{list(x.shape)}"


def check_fits(saved: dict[str, Any], target: dict[str, Any], what: str) -> None:
    """Raise TemplateMismatchError naming the entries where ``target`` (the template) and ``saved`` differ."""
    only_saved = [n for n in saved if n not in target]
    only_template = [n for n in target if n not in saved]
    shapes = [f"{n} (checkpoint {describe(saved[n])}, template {describe(target[n])})"
              for n in saved if n in target and tuple(saved[n].shape) != tuple(target[n].shape)]
    problems = []
    if only_saved:
        problems.append(f"in the checkpoint but not the template: {shown(only_saved)}")
    if only_template:
        problems.append(f"in the template but not the checkpoint: {shown(only_template)}")
    if shapes:
        problems.append(f"shapes differ: {shown(shapes)}")
    if problems:
        raise TemplateMismatchError(f"{what} does not fit the template ({len(saved)} arrays saved, "
                                    f"{len(target)} in the template): " + "; ".join(problems))


def verify(leaves: dict[str, Any], checksums: dict[str, int | None]) -> None:
    """Raise CorruptCheckpointError naming the arrays whose CRC-32 differs from the saved one."""
    bad = []
    for name, x in leaves.items():
        expected = checksums[name]
        if expected is not None and (actual := crc32(x)) is not None and actual != expected:
            bad.append(f"{name} (crc32 {actual:08x}, saved {expected:08x})")
    if bad:
        raise CorruptCheckpointError(f"{len(bad)} of {len(leaves)} arrays differ from their saved checksums: "
                                     f"{shown(bad, 3)}")  # few: the warning keeps 300 characters

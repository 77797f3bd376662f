"""Deterministic, resumable batching: length-bucketed seq2seq batches, random LM windows,
a contiguous LM evaluation pass and a train / validation split.

Batches are dicts of numpy ``int32`` arrays, right-padded with ``PAD``. Everything random
is a function of an explicit integer seed.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np

from jformer.data.tokenizers import BOS, EOS, PAD

__all__ = ["Seq2SeqBatches", "LMBatches", "lm_eval_batches", "train_val_split"]


def _rng(*seeds: int) -> np.random.Generator:
    return np.random.default_rng([int(s) for s in seeds])


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _round_up(n: int, multiple: int, cap: int | None) -> int:
    n = -(-n // multiple) * multiple
    return n if cap is None else min(n, max(cap, 1))


class Seq2SeqBatches:
    """Length-bucketed, padded seq2seq batches; an endless, resumable iterator over epochs.

    Each yielded batch is a dict of numpy int32 arrays right-padded with PAD:
    ``src`` [B, S], ``tgt_in`` [B, T] (BOS + target), ``tgt_out`` [B, T] (target + EOS) and
    ``index`` [B] (the examples' positions in ``pairs``). The source gets no specials. With
    ``add_bos_eos=False`` the targets must already be ``BOS ... EOS``-framed:
    ``tgt_in = target[:-1]``, ``tgt_out = target[1:]``.

    Exactly one of ``batch_size`` (examples per batch) or ``batch_tokens`` (padded size
    ``B * max(S, T)`` at most this; an example bigger than that alone gets its own batch)
    sets the batch size. Every example appears exactly once per epoch; the last batch of
    each pool may be smaller.

    Epoch ``e`` is a function of ``(seed, e)`` only: with ``shuffle`` the examples are
    permuted; with ``bucket`` they are cut into pools of ``pool_size`` examples (default:
    about 100 batches' worth; the whole set when not shuffling) and stably sorted by
    length (longer of source / target, then the shorter) within each pool before being
    grouped into batches, so batches hold similar lengths; with ``shuffle`` the batch
    order is then permuted. ``S`` and ``T`` are the batch maxima rounded up to a multiple
    of ``pad_to_multiple`` (8 limits the number of distinct shapes and so recompiles;
    never above ``max_len``).

    ``fixed_shapes``: pad S and T to one length L (their rounded maximum) and B to
    ``batch_size`` or ``batch_tokens // L`` with all-PAD rows (``index`` -1), so a jitted
    step sees one shape per length bucket and compiles a handful of times rather than
    once per batch. All-PAD rows carry zero loss weight.

    ``max_len``: examples whose source or ``tgt_in`` (target + 1) is longer are dropped,
    as are examples with an empty source (nothing to attend to); ``num_dropped`` counts
    them, ``dropped`` breaks them down. Ids must be >= 0 and not PAD (it would be masked).

    Resume: ``state()`` -> ``{"epoch", "position", "seed", "num_examples"}`` (JSON-safe);
    ``restore(state)`` continues with exactly the batches that would have followed.
    ``epoch_batches()`` is one ordered pass without shuffling (evaluation) that does not
    touch the iterator's position.
    """

    def __init__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int | None = None,
                 batch_tokens: int | None = None, seed: int, shuffle: bool = True, bucket: bool = True,
                 add_bos_eos: bool = True, max_len: int | None = None, pad_to_multiple: int = 1,
                 pool_size: int | None = None, fixed_shapes: bool = False):
        if (batch_size is None) == (batch_tokens is None):
            raise ValueError("give exactly one of batch_size (examples per batch) or batch_tokens "
                             f"(padded tokens per batch), got batch_size={batch_size}, batch_tokens={batch_tokens}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {pool_size}")
        self.seed = _check_seed(seed)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.shuffle, self.bucket, self.add_bos_eos = shuffle, bucket, add_bos_eos
        self.max_len, self.pad_to_multiple = max_len, pad_to_multiple
        self.fixed_shapes = fixed_shapes
        self.num_examples = len(pairs)

        # Flat storage: all sources / raw targets concatenated, with per-example offsets.
        n = len(pairs)
        s_len = np.fromiter((len(p[0]) for p in pairs), np.int64, n)
        t_len = np.fromiter((len(p[1]) for p in pairs), np.int64, n)
        self._src_flat = np.fromiter(itertools.chain.from_iterable(p[0] for p in pairs), np.int64, s_len.sum())
        self._tgt_flat = np.fromiter(itertools.chain.from_iterable(p[1] for p in pairs), np.int64, t_len.sum())
        self._src_off = np.concatenate([[0], np.cumsum(s_len)])
        self._tgt_off = np.concatenate([[0], np.cumsum(t_len)])
        for name, flat, off in (("source", self._src_flat, self._src_off), ("target", self._tgt_flat, self._tgt_off)):
            bad = np.flatnonzero((flat < 0) | (flat == PAD))
            if bad.size:
                i = int(np.searchsorted(off, bad[0], side="right") - 1)
                raise ValueError(f"example {i}: {name} ids must be >= 0 and not PAD={PAD}, got "
                                 f"{flat[off[i]:off[i + 1]].tolist()}")
        self._src_flat = self._src_flat.astype(np.int32)
        self._tgt_flat = self._tgt_flat.astype(np.int32)
        if not add_bos_eos and (t_len < 2).any():
            i = int(np.flatnonzero(t_len < 2)[0])
            raise ValueError(f"example {i}: with add_bos_eos=False the target must hold BOS ... EOS "
                             f"(at least 2 ids), got {list(pairs[i][1])}")
        tin_len = t_len + 1 if add_bos_eos else t_len - 1           # length of tgt_in / tgt_out
        empty = s_len == 0
        too_long = ~empty & ((s_len > max_len) | (tin_len > max_len)) if max_len is not None else np.zeros(n, bool)
        self.dropped = {"too_long": int(too_long.sum()), "empty_source": int(empty.sum())}
        keep = np.flatnonzero(~empty & ~too_long)
        if not keep.size:
            raise ValueError(f"no examples left out of {self.num_examples} (dropped: {self.dropped})")
        self._index = keep.astype(np.int32)                         # kept position -> index in pairs
        self._src_len = s_len[keep]
        self._tgt_len = tin_len[keep]
        if pool_size is None:
            per_batch = batch_size or max(1, batch_tokens // int(np.maximum(self._src_len, self._tgt_len).mean()))
            pool_size = 100 * per_batch
        self.pool_size = pool_size
        self.epoch, self.position = 0, 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __len__(self) -> int:
        """Number of examples kept."""
        return len(self._index)

    # -- planning --------------------------------------------------------------------------

    def _padded(self, length: int) -> int:
        return _round_up(int(length), self.pad_to_multiple, self.max_len)

    def _group(self, order: np.ndarray) -> list[np.ndarray]:
        if self.batch_size is not None:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches, start, s_max, t_max = [], 0, 0, 0
        for j, k in enumerate(order.tolist()):
            s, t = max(s_max, self._src_len[k]), max(t_max, self._tgt_len[k])
            if j > start and (j - start + 1) * max(self._padded(s), self._padded(t)) > self.batch_tokens:
                batches.append(order[start:j])
                start, s, t = j, self._src_len[k], self._tgt_len[k]
            s_max, t_max = s, t
        batches.append(order[start:])
        return batches

    def _plan(self, epoch: int, shuffle: bool) -> list[np.ndarray]:
        """Batches of epoch ``epoch``: arrays of positions into the kept examples."""
        n = len(self._index)
        rng = _rng(self.seed, epoch)
        order = rng.permutation(n) if shuffle else np.arange(n)
        if not self.bucket:
            batches = self._group(order)
        else:
            longer = np.maximum(self._src_len, self._tgt_len)
            shorter = np.minimum(self._src_len, self._tgt_len)
            pool = self.pool_size if shuffle else n
            batches = []
            for i in range(0, n, pool):
                chunk = order[i:i + pool]
                chunk = chunk[np.lexsort((shorter[chunk], longer[chunk]))]  # stable: primary key last
                batches += self._group(chunk)
        if shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """Example positions (into ``pairs``) of each batch of training epoch ``epoch``."""
        return [self._index[b] for b in self._epoch(epoch)]

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches in training epoch ``epoch`` (default: the current one)."""
        return len(self._epoch(self.epoch if epoch is None else epoch))

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._plan(epoch, self.shuffle))
        return self._plan_cache[1]

    def _make(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        S = self._padded(self._src_len[rows].max())
        T = self._padded(self._tgt_len[rows].max())
        B = len(rows)
        if self.fixed_shapes:
            S = T = max(S, T)
            B = max(B, self.batch_size or self.batch_tokens // S)
        src = np.full((B, S), PAD, np.int32)
        tgt_in = np.full((B, T), PAD, np.int32)
        tgt_out = np.full((B, T), PAD, np.int32)
        index = np.full((B,), -1, self._index.dtype)
        index[:len(rows)] = self._index[rows]
        for r, i in enumerate(self._index[rows].tolist()):
            src_ids = self._src_flat[self._src_off[i]:self._src_off[i + 1]]
            tgt_ids = self._tgt_flat[self._tgt_off[i]:self._tgt_off[i + 1]]
            src[r, :len(src_ids)] = src_ids
            if self.add_bos_eos:
                L = len(tgt_ids)
                tgt_in[r, 0], tgt_in[r, 1:L + 1] = BOS, tgt_ids
                tgt_out[r, :L], tgt_out[r, L] = tgt_ids, EOS
            else:
                tgt_in[r, :len(tgt_ids) - 1] = tgt_ids[:-1]
                tgt_out[r, :len(tgt_ids) - 1] = tgt_ids[1:]
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out, "index": index}

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self) -> Seq2SeqBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._epoch(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._epoch(self.epoch)
        batch = self._make(plan[self.position])
        self.position += 1
        return batch

    def epoch_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One deterministic pass over every kept example, unshuffled (length-sorted if
        ``bucket``, else in the given order); independent of the iterator's state."""
        for rows in self._plan(0, shuffle=False):
            yield self._make(rows)

    def state(self) -> dict:
        """JSON-serializable position: ``{"epoch", "position", "seed", "num_examples"}``."""
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": self.seed,
                "num_examples": self.num_examples}

    def restore(self, state: dict) -> Seq2SeqBatches:
        """Continue from ``state`` (from :meth:`state` of an iterator over the same data)."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"state lacks {key!r}: got keys {sorted(state)}")
        for key in ("seed", "num_examples"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]}, this iterator has "
                                 f"{key}={getattr(self, key)}")
        if int(state["epoch"]) < 0 or int(state["position"]) < 0:
            raise ValueError(f"state epoch/position must be >= 0, got {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        return self


class LMBatches:
    """Random windows of a token stream, nanoGPT style: an endless, resumable iterator.

    Batch ``i`` is drawn from an RNG seeded by ``(seed, i)`` alone: ``B`` start offsets
    ``o`` uniform in ``[0, N - T - 1]``; ``inputs[b] = tokens[o_b : o_b + T]`` and
    ``targets[b] = tokens[o_b + 1 : o_b + T + 1]`` (int32 [B, T]). ``tokens`` [N] may be
    any integer array (e.g. a ``np.memmap``); it is not copied.

    ``state()`` -> ``{"step", "seed"}``; ``restore(state)`` resumes at that step.
    """

    def __init__(self, tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int):
        self.tokens = _check_stream(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, _check_seed(seed)
        self.step = 0

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` (a pure function of ``seed`` and ``step``)."""
        starts = _rng(self.seed, step).integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        window = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        return {"inputs": np.ascontiguousarray(window[:, :-1]), "targets": np.ascontiguousarray(window[:, 1:])}

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"step": int(self.step), "seed": self.seed}

    def restore(self, state: dict) -> LMBatches:
        if "step" not in state:
            raise ValueError(f"state lacks 'step': got keys {sorted(state)}")
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']}, this iterator has seed={self.seed}")
        if int(state["step"]) < 0:
            raise ValueError(f"state step must be >= 0, got {state['step']}")
        self.step = int(state["step"])
        return self


def _check_stream(tokens, seq_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array [N], got shape {tokens.shape} dtype {tokens.dtype}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens for one window, got {len(tokens)}")
    return tokens


def lm_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """A deterministic pass over contiguous, non-overlapping windows (validation loss).

    Window ``k`` (k = 0 .. W - 1, ``W = (N - 1) // T``): ``inputs = tokens[kT : kT + T]``,
    ``targets = tokens[kT + 1 : kT + T + 1]``, so every target position 1 .. WT is scored
    exactly once; the last ``(N - 1) % T`` tokens (fewer than T) are left out. Batches of
    ``batch_size`` windows (int32 [B, T]); the last batch may be smaller.
    """
    tokens = _check_stream(tokens, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_windows = (len(tokens) - 1) // seq_len
    offsets = np.arange(seq_len + 1)
    for first in range(0, num_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, num_windows)) * seq_len
        window = tokens[starts[:, None] + offsets].astype(np.int32)
        yield {"inputs": np.ascontiguousarray(window[:, :-1]), "targets": np.ascontiguousarray(window[:, 1:])}


def train_val_split(tokens, val_fraction: float = 0.1):
    """(first ``1 - val_fraction``, last ``val_fraction``) of a sequence, as nanoGPT splits
    Shakespeare: ``n = int((1 - val_fraction) * len(tokens))``; works on arrays, lists, str."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = int((1.0 - val_fraction) * len(tokens))
    return tokens[:n], tokens[n:]

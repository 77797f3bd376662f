"""Generated seq2seq tasks ("copy", "reverse", "sort", "add") as id pairs, a function of a seed.

Symbols start after the special ids (``NUM_SPECIAL``); "add" has its own digit / "+" ids
(``ADD_DIGIT0``, ``ADD_PLUS``).
"""

from __future__ import annotations

import numpy as np

from jformer.data.tokenizers import NUM_SPECIAL

__all__ = ["SYNTHETIC_TASKS", "ADD_DIGIT0", "ADD_PLUS", "synthetic_vocab_size", "synthetic_pairs"]

SYNTHETIC_TASKS = ("copy", "reverse", "sort", "add")
ADD_DIGIT0 = NUM_SPECIAL          # "add": digit d is id 4 + d (ids 4..13)
ADD_PLUS = ADD_DIGIT0 + 10        # "add": "+" is id 14


def synthetic_vocab_size(task: str, num_symbols: int = 16) -> int:
    """Vocabulary size of a generated task: ``4 + num_symbols``, or 15 for "add"."""
    _check_task(task)
    return ADD_PLUS + 1 if task == "add" else NUM_SPECIAL + num_symbols


def _check_task(task: str) -> None:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"task must be one of {SYNTHETIC_TASKS}, got {task!r}")


def synthetic_pairs(task: str, num_examples: int, *, seed: int, min_len: int = 4, max_len: int = 12,
                    num_symbols: int = 16) -> list[tuple[list[int], list[int]]]:
    """Generated (source ids, target ids) pairs, no specials added; a function of the arguments.

    Source lengths are uniform in [min_len, max_len].

    * "copy" / "reverse" / "sort": source symbols uniform in ids ``4 .. 3 + num_symbols``;
      the target is the source, reversed, or sorted ascending.
    * "add": source ``a + b`` written as digit tokens (digit d is id ``4 + d``, "+" is id 14,
      most significant digit first, no leading zeros); the source length L (>= 3, so
      ``min_len >= 3``) is split at random into the digit counts of a and b
      (1 .. L - 2 digits for a); target: the digits of a + b. ``num_symbols`` is unused;
      vocabulary size 15.
    """
    _check_task(task)
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=num_examples)
    if task != "add":
        if num_symbols < 1:
            raise ValueError(f"num_symbols must be >= 1, got {num_symbols}")
        symbols = rng.integers(NUM_SPECIAL, NUM_SPECIAL + num_symbols, size=(num_examples, max_len))
        out = []
        for row, n in zip(symbols.tolist(), lengths.tolist()):
            src = row[:n]
            tgt = src[::-1] if task == "reverse" else sorted(src) if task == "sort" else list(src)
            out.append((src, tgt))
        return out

    if min_len < 3:
        raise ValueError(f"task 'add' needs min_len >= 3 (a digit, '+', a digit), got {min_len}")

    def number(digits: int) -> int:
        first = rng.integers(1 if digits > 1 else 0, 10)
        rest = rng.integers(0, 10, size=digits - 1)
        return int("".join(map(str, [first, *rest.tolist()])))

    def tokens(value: int) -> list[int]:
        return [ADD_DIGIT0 + int(d) for d in str(value)]

    out = []
    for n in lengths.tolist():
        a_digits = int(rng.integers(1, n - 1))          # 1 .. n - 2
        a, b = number(a_digits), number(n - 1 - a_digits)
        out.append((tokens(a) + [ADD_PLUS] + tokens(b), tokens(a + b)))
    return out


# ----------------------------------------------------------------------------------------
# Batching

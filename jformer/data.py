"""Data: tokenizers, file readers, generated tasks and deterministic, resumable batching.

Pure Python + numpy (``sentencepiece`` is imported only by :class:`SubwordTokenizer`); no
jax, no pickle. Everything that is random is a function of an explicit integer seed.

Special ids, shared by every tokenizer and task here (``TransformerConfig.pad_id`` defaults
to ``PAD``)::

    PAD = 0   padding; masked in attention and given weight 0 in the loss
    BOS = 1   start of a target sequence (first decoder input)
    EOS = 2   end of a target sequence (last decoder output)
    UNK = 3   unknown character / piece

Batches are dicts of numpy ``int32`` arrays, right-padded with ``PAD``:

* :class:`Seq2SeqBatches`: ``src`` [B, S], ``tgt_in`` [B, T] (BOS + target),
  ``tgt_out`` [B, T] (target + EOS), ``index`` [B] (positions of the examples in the
  ``pairs`` list given to the constructor).
* :class:`LMBatches` / :func:`lm_eval_batches`: ``inputs`` [B, T], ``targets`` [B, T]
  (the same window of the token stream shifted by one).

Shape legend: B batch, S source length, T target / window length, N stream length.

Typical use::

    text = read_text(default_data_dir() / "tinyshakespeare" / "input.txt")
    tok = CharTokenizer.fit(text)
    train, val = train_val_split(np.asarray(tok.encode(text), np.int32), 0.1)
    batches = LMBatches(train, batch_size=12, seq_len=64, seed=0)
    batch = next(batches)                  # {"inputs": [12, 64], "targets": [12, 64]}
    saved = batches.state()                # JSON-serializable; restore(saved) resumes exactly

    pairs = read_parallel(root / "train.de", root / "train.en")
    de = SubwordTokenizer.train([s for s, _ in pairs], 8000, run_dir / "spm_de")
    en = SubwordTokenizer.train([t for _, t in pairs], 8000, run_dir / "spm_en")
    train = Seq2SeqBatches(encode_pairs(pairs, de, en), batch_tokens=4096, seed=0, max_len=64)
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
NUM_SPECIAL = 4
SPECIAL_IDS = (PAD, BOS, EOS, UNK)

PathLike = str | os.PathLike

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "NUM_SPECIAL", "SPECIAL_IDS",
    "CharTokenizer", "SubwordTokenizer", "load_tokenizer", "encode_pairs",
    "default_data_dir", "read_text", "read_lines", "read_parallel", "load_tinyshakespeare", "load_multi30k",
    "SYNTHETIC_TASKS", "ADD_DIGIT0", "ADD_PLUS", "synthetic_pairs", "synthetic_vocab_size",
    "Seq2SeqBatches", "LMBatches", "lm_eval_batches", "train_val_split",
]


# ----------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------

class CharTokenizer:
    """Character-level tokenizer: ids 0-3 are the specials, then the sorted distinct characters.

    ``encode`` maps characters missing from the vocabulary to ``UNK``; ``decode`` drops
    PAD/BOS/EOS and writes ``UNK`` as ``UNK_TEXT`` (U+FFFD). Saved as JSON.
    """

    UNK_TEXT = "\ufffd"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        bad = [f"[{i}] {c!r}" for i, c in enumerate(chars) if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"CharTokenizer vocabulary entries must be single characters; "
                             f"{len(bad)} are not: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}")
        if len(set(chars)) != len(chars):
            seen: set[str] = set()
            dups = sorted({c for c in chars if c in seen or seen.add(c)})
            raise ValueError(f"CharTokenizer vocabulary has duplicate characters: {dups[:10]}")
        self.chars: tuple[str, ...] = tuple(chars)
        self._ids = {c: i + NUM_SPECIAL for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, text: str | Iterable[str]) -> CharTokenizer:
        """Vocabulary = the sorted distinct characters of ``text`` (a string or strings)."""
        seen = set(text) if isinstance(text, str) else set().union(*map(set, text))
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included: ``4 + len(chars)``."""
        return NUM_SPECIAL + len(self.chars)

    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def encode(self, text: str) -> list[int]:
        """str -> ids (no BOS/EOS added); unknown characters -> UNK."""
        get = self._ids.get
        return [get(c, UNK) for c in text]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> str, dropping PAD/BOS/EOS; UNK -> ``UNK_TEXT``. Raises ValueError on ids >= vocab_size."""
        out = []
        for i in map(int, ids):
            if i >= NUM_SPECIAL:
                if i >= self.vocab_size:
                    raise ValueError(f"id {i} out of range for CharTokenizer with vocab_size {self.vocab_size}")
                out.append(self.chars[i - NUM_SPECIAL])
            elif i == UNK:
                out.append(self.UNK_TEXT)
            elif i < 0:
                raise ValueError(f"negative token id {i}")
        return "".join(out)

    def save(self, path: PathLike) -> None:
        """Write the vocabulary as JSON (``{"type": "char", "specials": ..., "chars": [...]}``)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        obj = {"type": "char", "specials": {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK},
               "chars": list(self.chars)}
        write_text_atomic(path, json.dumps(obj, ensure_ascii=True))

    @classmethod
    def load(cls, path: PathLike) -> CharTokenizer:
        """Read a file written by :meth:`save`.

        Raises FileNotFoundError if it is missing, and ValueError naming the file and what
        is wrong if it is not UTF-8 JSON (truncated, garbled), lacks ``"chars"``, or its
        entries are not distinct single characters: a damaged vocabulary would otherwise
        shift every id after the damage.
        """
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CharTokenizer file {str(path)!r} not found")
        where = f"CharTokenizer file {str(path)!r}"
        try:
            obj = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}; "
                             f"truncated or damaged?)") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where} holds a JSON {type(obj).__name__}, expected an object "
                             f'{{"type": "char", "chars": [...]}}')
        if obj.get("type") != "char":
            raise ValueError(f"{where} is not a CharTokenizer JSON file (expected type 'char', "
                             f"got {obj.get('type')!r:.50})")
        if "chars" not in obj:
            raise ValueError(f"{where} is missing key 'chars' (has {sorted(obj)})")
        if not isinstance(obj["chars"], list):
            raise ValueError(f"{where}: 'chars' must be a list of single characters, "
                             f"got {type(obj['chars']).__name__}")
        specials = obj.get("specials", {})
        if specials and specials != {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK}:
            raise ValueError(f"{where} uses special ids {specials}, expected PAD=0 BOS=1 EOS=2 UNK=3")
        try:
            return cls(obj["chars"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:  # optional dependency: jformer[experiments]
        raise ImportError("SubwordTokenizer needs sentencepiece: pip install 'sentencepiece>=0.2'") from e
    return sentencepiece


class SubwordTokenizer:
    """A sentencepiece model (unigram or BPE) whose special ids are PAD=0, BOS=1, EOS=2, UNK=3.

    Train with :meth:`train` (writes ``<prefix>.model`` and ``<prefix>.vocab``), reopen with
    :meth:`load`. For a translation task train one tokenizer per language (pass each side's
    sentences) or a joint one (pass both sides' sentences).
    """

    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, processor, path: PathLike | None = None):
        ids = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
        if ids != SPECIAL_IDS:
            raise ValueError(f"sentencepiece model {str(path)!r} has (pad, bos, eos, unk) ids {ids}, "
                             f"expected {SPECIAL_IDS}; train it with SubwordTokenizer.train")
        self.processor = processor
        self.path = None if path is None else pathlib.Path(path)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path_prefix: PathLike, *,
              model_type: str = "unigram", character_coverage: float = 1.0,
              normalization_rule_name: str = "nmt_nfkc", seed: int = 0, **options) -> SubwordTokenizer:
        """Train on ``texts`` (one sentence each), write ``<path_prefix>.model`` / ``.vocab``, load it.

        Deterministic for the same input: every sentence is used in the given order
        (``input_sentence_size=0``, ``shuffle_input_sentence=False``), ``num_threads=1`` and the
        sentencepiece generator is seeded. Quiet (``minloglevel=2``). ``character_coverage=1.0``
        keeps every character (suits small Latin-script corpora; use 0.9995 for large
        alphabets). ``options`` are passed on to ``SentencePieceTrainer.train`` and override
        these defaults. The parent directory of ``path_prefix`` is created.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be one of ('unigram', 'bpe'), got {model_type!r}")
        spm = _sentencepiece()
        prefix = pathlib.Path(path_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        sentences = [t for t in texts if t]
        if not sentences:
            raise ValueError("SubwordTokenizer.train got no non-empty texts")
        spm.set_random_generator_seed(seed)
        kwargs = dict(
            model_prefix=str(prefix), vocab_size=int(vocab_size), model_type=model_type,
            character_coverage=character_coverage, normalization_rule_name=normalization_rule_name,
            pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
        kwargs.update(options)
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **kwargs)
        return cls.load(f"{prefix}.model")

    @classmethod
    def load(cls, path: PathLike) -> SubwordTokenizer:
        """Open a ``.model`` file written by :meth:`train`.

        Raises FileNotFoundError if it is missing, and ValueError naming the file if
        sentencepiece cannot parse it (truncated, not a model) or its special ids are not
        PAD=0 BOS=1 EOS=2 UNK=3. The format has no checksum: damage that still parses
        (e.g. one changed byte inside a piece) cannot be detected here.
        """
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {str(path)!r} not found")
        spm = _sentencepiece()
        try:
            processor = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:  # sentencepiece reports every parse failure as RuntimeError
            raise ValueError(f"sentencepiece model {str(path)!r} ({path.stat().st_size} bytes) cannot be "
                             f"loaded, truncated or not a sentencepiece model: {e}") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """str -> piece ids (no BOS/EOS added). Text is normalized first (NFKC by default)."""
        return self.processor.encode(text, out_type=int)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> str, dropping PAD/BOS/EOS (UNK is written as sentencepiece's `` ⁇ ``)."""
        return self.processor.decode([int(i) for i in ids if int(i) not in (PAD, BOS, EOS)])

    def pieces(self) -> list[str]:
        """The vocabulary: piece strings in id order."""
        return [self.processor.id_to_piece(i) for i in range(self.vocab_size)]

    def __repr__(self) -> str:
        return f"SubwordTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


def load_tokenizer(path: PathLike) -> CharTokenizer | SubwordTokenizer:
    """A ``.json`` file -> :class:`CharTokenizer`; anything else -> :class:`SubwordTokenizer`.

    Raises FileNotFoundError / ValueError (naming the file) as those loaders do.
    """
    return CharTokenizer.load(path) if str(path).endswith(".json") else SubwordTokenizer.load(path)


def encode_pairs(pairs: Iterable[tuple[str, str]], src_tokenizer, tgt_tokenizer=None
                 ) -> list[tuple[list[int], list[int]]]:
    """Text pairs -> id pairs (no specials added); ``tgt_tokenizer`` defaults to the source one."""
    pairs = list(pairs)
    tgt_tokenizer = src_tokenizer if tgt_tokenizer is None else tgt_tokenizer
    src = src_tokenizer.encode_batch([s for s, _ in pairs])
    tgt = tgt_tokenizer.encode_batch([t for _, t in pairs])
    return list(zip(src, tgt))


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

_DATA_HINT = ("the datasets live in ../shared/data beside the repository checkout "
              "(see jformer.data.default_data_dir(); set JFORMER_DATA to use another directory)")


def default_data_dir() -> pathlib.Path:
    """The data directory: ``$JFORMER_DATA`` if set, else the first ``<ancestor>/shared/data``
    above this file (for a checkout at ``/work/main`` that is ``/work/shared/data``, i.e.
    ``../shared/data`` relative to the repository root).

    Raises FileNotFoundError, listing what was tried, if none exists.
    """
    env = os.environ.get("JFORMER_DATA")
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"JFORMER_DATA={env!r} is not a directory")
        return path
    tried = []
    for parent in pathlib.Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
        tried.append(str(candidate))
    raise FileNotFoundError(f"no data directory found (tried {tried}); {_DATA_HINT}")


def _check_file(path: PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found; {_DATA_HINT}")
    return path


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``path`` so that a reader, or a writer killed midway, leaves the old file or the new
    one, never part of it (a temporary file beside it, then an atomic rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding=encoding)
    os.replace(tmp, path)


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
    """The whole file as a str (newlines kept exactly as stored)."""
    with open(_check_file(path), encoding=encoding, newline="") as f:
        return f.read()


def read_lines(path: PathLike, encoding: str = "utf-8") -> list[str]:
    """The file's lines without their line endings ("\\n" or "\\r\\n").

    Splits on "\\n" only (``str.splitlines`` would also split on U+2028, U+0085, ... and
    break the line alignment of parallel corpora). A final newline does not add an empty line.
    """
    text = read_text(path, encoding)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_parallel(src_path: PathLike, tgt_path: PathLike, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """Line-aligned parallel files -> [(source line, target line)], newlines stripped.

    Raises ValueError naming both files and their line counts if the counts differ.
    """
    src, tgt = read_lines(src_path, encoding), read_lines(tgt_path, encoding)
    if len(src) != len(tgt):
        raise ValueError(f"parallel files are misaligned: {str(src_path)!r} has {len(src)} lines but "
                         f"{str(tgt_path)!r} has {len(tgt)} lines")
    return list(zip(src, tgt))


def load_tinyshakespeare(data_dir: PathLike | None = None) -> str:
    """``<data_dir>/tinyshakespeare/input.txt`` as a str (1,115,394 ASCII characters)."""
    root = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    return read_text(root / "tinyshakespeare" / "input.txt")


MULTI30K_SPLITS = ("train", "val", "test_2016_flickr")


def load_multi30k(split: str = "train", *, src: str = "de", tgt: str = "en",
                  data_dir: PathLike | None = None) -> list[tuple[str, str]]:
    """Multi30k task 1 raw text pairs of ``split`` (29,000 / 1,014 / 1,000 lines)."""
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"split must be one of {MULTI30K_SPLITS}, got {split!r}")
    if {src, tgt} != {"de", "en"}:
        raise ValueError(f"src/tgt must be 'de' and 'en' (either way round), got {src!r}, {tgt!r}")
    root = (pathlib.Path(data_dir) if data_dir is not None else default_data_dir()) / "multi30k"
    return read_parallel(root / f"{split}.{src}", root / f"{split}.{tgt}")


# ----------------------------------------------------------------------------------------
# Generated tasks
# ----------------------------------------------------------------------------------------

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
# ----------------------------------------------------------------------------------------

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

"""Tokenizers and the special-id convention they share with every task and batch iterator.

Special ids (``TransformerConfig.pad_id`` defaults to ``PAD``)::

    PAD = 0   padding; masked in attention and given weight 0 in the loss
    BOS = 1   start of a target sequence (first decoder input)
    EOS = 2   end of a target sequence (last decoder output)
    UNK = 3   unknown character / piece

:class:`CharTokenizer` (JSON vocabulary) and :class:`SubwordTokenizer` (sentencepiece,
imported only when used); :func:`load_tokenizer` opens either; :func:`encode_pairs` encodes
text pairs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Sequence

from jformer.data.corpora import PathLike, write_text_atomic

PAD, BOS, EOS, UNK = 0, 1, 2, 3
NUM_SPECIAL = 4
SPECIAL_IDS = (PAD, BOS, EOS, UNK)

__all__ = ["PAD", "BOS", "EOS", "UNK", "NUM_SPECIAL", "SPECIAL_IDS",
           "CharTokenizer", "SubwordTokenizer", "load_tokenizer", "encode_pairs"]


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

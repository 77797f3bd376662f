"""Data: tokenizers, file readers, generated tasks and deterministic, resumable batching.

Pure Python + numpy (``sentencepiece`` is imported only by :class:`SubwordTokenizer`); no
jax, no pickle, nothing from jformer's model modules. Everything that is random is a
function of an explicit integer seed.

What lives where (every public name is re-exported here, so ``jformer.data.X`` works):

* :mod:`jformer.data.tokenizers`: the special ids ``PAD BOS EOS UNK`` / ``NUM_SPECIAL`` /
  ``SPECIAL_IDS``, :class:`CharTokenizer`, :class:`SubwordTokenizer`, :func:`load_tokenizer`,
  :func:`encode_pairs`.
* :mod:`jformer.data.corpora`: :func:`default_data_dir`, :func:`read_text`,
  :func:`read_lines`, :func:`read_parallel`, :func:`write_text_atomic`,
  :func:`load_multi30k`.
* :mod:`jformer.data.tasks`: generated tasks (``SYNTHETIC_TASKS``), :func:`synthetic_pairs`,
  :func:`synthetic_vocab_size`, the "add" task's ids ``ADD_DIGIT0`` / ``ADD_PLUS``.
* :mod:`jformer.data.batching`: :class:`Seq2SeqBatches`, :class:`LMBatches`,
  :func:`lm_eval_batches`, :func:`train_val_split`.

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

from jformer.data.corpora import (MULTI30K_SPLITS, PathLike, default_data_dir, load_multi30k, read_lines,
                                  read_parallel, read_text, write_text_atomic)
from jformer.data.tokenizers import (BOS, EOS, NUM_SPECIAL, PAD, SPECIAL_IDS, UNK, CharTokenizer,
                                     SubwordTokenizer, encode_pairs, load_tokenizer)
from jformer.data.tasks import ADD_DIGIT0, ADD_PLUS, SYNTHETIC_TASKS, synthetic_pairs, synthetic_vocab_size
from jformer.data.batching import LMBatches, Seq2SeqBatches, lm_eval_batches, train_val_split

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "NUM_SPECIAL", "SPECIAL_IDS",
    "CharTokenizer", "SubwordTokenizer", "load_tokenizer", "encode_pairs",
    "default_data_dir", "read_text", "read_lines", "read_parallel", "write_text_atomic", "load_multi30k",
    "SYNTHETIC_TASKS", "ADD_DIGIT0", "ADD_PLUS", "synthetic_pairs", "synthetic_vocab_size",
    "Seq2SeqBatches", "LMBatches", "lm_eval_batches", "train_val_split",
]

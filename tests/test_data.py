"""Tests for jformer.data: tokenizers, readers, generated tasks, batching."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from jformer import data
from jformer.data import BOS, EOS, PAD, UNK


def _data_dir() -> pathlib.Path:
    try:
        return data.default_data_dir()
    except FileNotFoundError:
        pytest.skip("../shared/data not found")


@pytest.fixture(scope="module")
def shakespeare() -> str:
    path = _data_dir() / "tinyshakespeare" / "input.txt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return data.read_text(path)


@pytest.fixture(scope="module")
def multi30k_en() -> list[str]:
    root = _data_dir() / "multi30k"
    if not (root / "train.en").exists():
        pytest.skip(f"{root} not found")
    return data.read_lines(root / "train.en")[:3000]


# -- tokenizers ---------------------------------------------------------------------------

def test_special_ids():
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3) == data.SPECIAL_IDS


def test_char_tokenizer_round_trip_and_save(shakespeare, tmp_path):
    tok = data.CharTokenizer.fit(shakespeare)
    assert tok.vocab_size == 4 + 65
    assert list(tok.chars) == sorted(set(shakespeare))
    piece = shakespeare[:2000]
    ids = tok.encode(piece)
    assert min(ids) >= 4 and len(ids) == len(piece)
    assert tok.decode(ids) == piece
    assert tok.decode([BOS, *ids, EOS, PAD, PAD]) == piece
    assert tok.encode("a\u00e9") == [tok.encode("a")[0], UNK]
    assert tok.decode(tok.encode("\u00e9")) == tok.UNK_TEXT
    tok.save(tmp_path / "tok.json")
    json.loads((tmp_path / "tok.json").read_text())  # plain JSON
    loaded = data.CharTokenizer.load(tmp_path / "tok.json")
    assert loaded == tok and loaded.encode(piece) == ids
    assert isinstance(data.load_tokenizer(tmp_path / "tok.json"), data.CharTokenizer)
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_char_tokenizer_unicode(tmp_path):
    tok = data.CharTokenizer.fit(["über", "Straße"])
    assert tok.chars == tuple(sorted(set("überStraße")))
    tok.save(tmp_path / "t.json")
    assert data.CharTokenizer.load(tmp_path / "t.json").decode(tok.encode("Straße")) == "Straße"


def test_subword_tokenizer(multi30k_en, tmp_path):
    pytest.importorskip("sentencepiece")
    tok = data.SubwordTokenizer.train(multi30k_en, 500, tmp_path / "run" / "spm_en")
    assert (tmp_path / "run" / "spm_en.model").exists() and (tmp_path / "run" / "spm_en.vocab").exists()
    assert tok.vocab_size == 500
    assert tok.pieces()[:4] == ["<pad>", "<s>", "</s>", "<unk>"]
    sentence = "A man in a blue shirt is standing on a ladder cleaning windows."
    ids = tok.encode(sentence)
    assert all(i >= 4 for i in ids)
    assert tok.decode(ids) == sentence                      # NFKC leaves this ASCII text unchanged
    assert tok.decode([BOS, *ids, EOS, PAD]) == sentence
    # Deterministic: training again gives the same vocabulary and scores.
    again = data.SubwordTokenizer.train(multi30k_en, 500, tmp_path / "run2" / "spm_en")
    assert again.pieces() == tok.pieces()
    assert [again.processor.get_score(i) for i in range(500)] == [tok.processor.get_score(i) for i in range(500)]
    # Save/load gives the same ids.
    loaded = data.SubwordTokenizer.load(tmp_path / "run" / "spm_en.model")
    assert loaded.encode(sentence) == ids
    assert isinstance(data.load_tokenizer(tmp_path / "run" / "spm_en.model"), data.SubwordTokenizer)
    pairs = data.encode_pairs([(sentence, "Two dogs.")], tok)
    assert pairs[0][0] == ids and tok.decode(pairs[0][1]) == "Two dogs."


def test_subword_bpe_and_missing_model(multi30k_en, tmp_path):
    pytest.importorskip("sentencepiece")
    tok = data.SubwordTokenizer.train(multi30k_en[:1000], 300, tmp_path / "bpe", model_type="bpe")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("Two dogs play.")) == "Two dogs play."
    with pytest.raises(FileNotFoundError, match="nope.model"):
        data.SubwordTokenizer.load(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="model_type"):
        data.SubwordTokenizer.train(["a"], 10, tmp_path / "x", model_type="word")


# -- readers ------------------------------------------------------------------------------

def test_read_text_missing_names_path(tmp_path):
    missing = tmp_path / "nowhere" / "input.txt"
    with pytest.raises(FileNotFoundError) as err:
        data.read_text(missing)
    assert str(missing) in str(err.value) and "../shared/data" in str(err.value)


def test_read_parallel(tmp_path):
    (tmp_path / "a.de").write_text("eins\nzwei\u2028zwei\ndrei\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("one\r\ntwo\nthree", encoding="utf-8")
    assert data.read_parallel(tmp_path / "a.de", tmp_path / "a.en") == [
        ("eins", "one"), ("zwei\u2028zwei", "two"), ("drei", "three")]
    (tmp_path / "b.en").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(ValueError) as err:
        data.read_parallel(tmp_path / "a.de", tmp_path / "b.en")
    msg = str(err.value)
    assert "a.de" in msg and "b.en" in msg and "3 lines" in msg and "2 lines" in msg


def test_default_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JFORMER_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.setenv("JFORMER_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="JFORMER_DATA"):
        data.default_data_dir()


def test_multi30k_aligned():
    root = _data_dir()
    if not (root / "multi30k" / "val.de").exists():
        pytest.skip("multi30k not found")
    pairs = data.load_multi30k("val", data_dir=root)
    assert len(pairs) == 1014 and all(s and t and "\n" not in s + t for s, t in pairs)


# -- generated tasks ----------------------------------------------------------------------

@pytest.mark.parametrize("task", data.SYNTHETIC_TASKS)
def test_synthetic_tasks(task):
    pairs = data.synthetic_pairs(task, 300, seed=3, min_len=3, max_len=9, num_symbols=7)
    assert pairs == data.synthetic_pairs(task, 300, seed=3, min_len=3, max_len=9, num_symbols=7)
    assert pairs != data.synthetic_pairs(task, 300, seed=4, min_len=3, max_len=9, num_symbols=7)
    vocab = data.synthetic_vocab_size(task, 7)
    lengths = set()
    for src, tgt in pairs:
        lengths.add(len(src))
        assert all(4 <= i < vocab for i in src + tgt)
        if task == "copy":
            assert tgt == src
        elif task == "reverse":
            assert tgt == src[::-1]
        elif task == "sort":
            assert tgt == sorted(src)
        else:
            assert src.count(data.ADD_PLUS) == 1 and data.ADD_PLUS not in tgt
            digits = "".join("+" if i == data.ADD_PLUS else str(i - data.ADD_DIGIT0) for i in src)
            a, b = digits.split("+")
            assert a and b and (a == "0" or a[0] != "0") and (b == "0" or b[0] != "0")
            assert int("".join(str(i - data.ADD_DIGIT0) for i in tgt)) == int(a) + int(b)
    assert lengths == set(range(3, 10))
    assert vocab == (15 if task == "add" else 11)


def test_synthetic_errors():
    with pytest.raises(ValueError, match="copy"):
        data.synthetic_pairs("rotate", 1, seed=0)
    with pytest.raises(ValueError, match="min_len"):
        data.synthetic_pairs("add", 1, seed=0, min_len=2)


# -- Seq2SeqBatches -----------------------------------------------------------------------

def _pairs(n=500, seed=0):
    return data.synthetic_pairs("reverse", n, seed=seed, min_len=1, max_len=30)


def _check_batch(batch, pairs):
    assert set(batch) == {"src", "tgt_in", "tgt_out", "index"}
    assert all(v.dtype == np.int32 for v in batch.values())
    B = len(batch["index"])
    assert batch["src"].shape[0] == batch["tgt_in"].shape[0] == B
    assert batch["tgt_in"].shape == batch["tgt_out"].shape
    for row, i in enumerate(batch["index"]):
        src, tgt = pairs[i]
        S, T = len(src), len(tgt) + 1
        assert batch["src"][row, :S].tolist() == src and (batch["src"][row, S:] == PAD).all()
        assert batch["tgt_in"][row, :T].tolist() == [BOS] + tgt and (batch["tgt_in"][row, T:] == PAD).all()
        assert batch["tgt_out"][row, :T].tolist() == tgt + [EOS] and (batch["tgt_out"][row, T:] == PAD).all()
        # Teacher forcing: tgt_out is tgt_in shifted left by one.
        assert batch["tgt_in"][row, 1:T].tolist() == batch["tgt_out"][row, :T - 1].tolist()
    # Padded to the batch maximum.
    assert batch["src"].shape[1] == max(len(pairs[i][0]) for i in batch["index"])
    assert batch["tgt_in"].shape[1] == max(len(pairs[i][1]) for i in batch["index"]) + 1


@pytest.mark.parametrize("size", [{"batch_size": 32}, {"batch_tokens": 300}])
def test_seq2seq_batches_epoch(size):
    pairs = _pairs()
    it = data.Seq2SeqBatches(pairs, seed=0, **size)
    for epoch in range(2):
        n = it.num_batches(epoch)
        seen = []
        for _ in range(n):
            batch = next(it)
            _check_batch(batch, pairs)
            seen += batch["index"].tolist()
            if "batch_tokens" in size:
                B, L = len(batch["index"]), max(batch["src"].shape[1], batch["tgt_in"].shape[1])
                assert B * L <= 300 or B == 1
            else:
                assert len(batch["index"]) <= 32
        assert sorted(seen) == list(range(len(pairs)))     # each example exactly once per epoch
        assert it.state()["epoch"] == epoch and it.state()["position"] == n
    assert it.epoch_plan(0)[0].tolist() != it.epoch_plan(1)[0].tolist()   # reshuffled each epoch


def _padding_fraction(batches) -> float:
    real = padded = 0
    for b in batches:
        real += (b["src"] != PAD).sum() + (b["tgt_in"] != PAD).sum()
        padded += b["src"].size + b["tgt_in"].size
    return 1 - real / padded


def test_bucketing_reduces_padding():
    pairs = _pairs(2000)
    epoch = lambda it: [next(it) for _ in range(it.num_batches(0))]  # noqa: E731
    bucketed = _padding_fraction(epoch(data.Seq2SeqBatches(pairs, batch_size=32, seed=0)))
    random = _padding_fraction(epoch(data.Seq2SeqBatches(pairs, batch_size=32, seed=0, bucket=False)))
    assert bucketed < 0.5 * random


@pytest.mark.parametrize("size", [{"batch_size": 16}, {"batch_tokens": 200}])
def test_seq2seq_determinism_and_restore(size):
    pairs = _pairs()
    make = lambda seed=0: data.Seq2SeqBatches(pairs, seed=seed, **size)  # noqa: E731
    a, b = make(), make()
    assert a.num_batches(0) < 50
    first = [next(a) for _ in range(50)]      # crosses into epoch 1
    for x, y in zip(first, [next(b) for _ in range(50)]):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    c = make(seed=1)
    assert any(not np.array_equal(x["index"], next(c)["index"]) for x in first[:5])

    for stop in (0, 10, 31, 32, 45):
        it = make()
        for _ in range(stop):
            next(it)
        saved = json.loads(json.dumps(it.state()))
        expected = [next(it) for _ in range(20)]
        resumed = make().restore(saved)
        for x, y in zip(expected, [next(resumed) for _ in range(20)]):
            assert all(np.array_equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="seed"):
        make(seed=5).restore(saved)


def test_seq2seq_epoch_batches_and_options():
    pairs = _pairs(300) + [([], [5]), ([4] * 40, [5])]
    it = data.Seq2SeqBatches(pairs, batch_size=64, seed=0, max_len=31, pad_to_multiple=8)
    assert it.dropped == {"too_long": 1, "empty_source": 1} and it.num_dropped == 2 and len(it) == 300
    batches = list(it.epoch_batches())
    again = list(it.epoch_batches())
    assert all(np.array_equal(x["index"], y["index"]) for x, y in zip(batches, again))
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(300))
    # Unshuffled pass: sorted by length (for "reverse" the longer side is tgt_in, len + 1).
    lengths = [len(pairs[i][1]) for b in batches for i in b["index"].tolist()]
    assert lengths == sorted(lengths)
    for b in batches:
        assert b["src"].shape[1] % 8 == 0 or b["src"].shape[1] == 31
        assert b["tgt_in"].shape[1] <= 31
    assert it.state() == {"epoch": 0, "position": 0, "seed": 0, "num_examples": 302}
    # Pre-framed targets.
    framed = data.Seq2SeqBatches([([4, 5], [BOS, 6, 7, EOS])], batch_size=1, seed=0, add_bos_eos=False)
    b = next(framed)
    assert b["tgt_in"].tolist() == [[BOS, 6, 7]] and b["tgt_out"].tolist() == [[6, 7, EOS]]
    with pytest.raises(ValueError, match="exactly one"):
        data.Seq2SeqBatches(pairs, seed=0)
    with pytest.raises(ValueError, match="PAD"):
        data.Seq2SeqBatches([([4, 0], [5])], batch_size=1, seed=0)


# -- LM batches ---------------------------------------------------------------------------

def test_lm_batches():
    stream = np.arange(10, 5010, dtype=np.int32)          # distinct values reveal positions
    it = data.LMBatches(stream, batch_size=8, seq_len=16, seed=0)
    batches = [next(it) for _ in range(5)]
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (8, 16)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        starts = b["inputs"][:, 0] - 10
        assert (starts >= 0).all() and (starts + 16 < len(stream)).all()
        np.testing.assert_array_equal(b["inputs"], stream[starts[:, None] + np.arange(16)])
        np.testing.assert_array_equal(b["targets"], stream[starts[:, None] + np.arange(1, 17)])
    # Batch i depends only on (seed, i).
    np.testing.assert_array_equal(data.LMBatches(stream, batch_size=8, seq_len=16, seed=0).batch(3)["inputs"],
                                  batches[3]["inputs"])
    assert not np.array_equal(data.LMBatches(stream, batch_size=8, seq_len=16, seed=1).batch(0)["inputs"],
                              batches[0]["inputs"])
    saved = json.loads(json.dumps(it.state()))
    assert saved == {"step": 5, "seed": 0}
    expected = [next(it) for _ in range(3)]
    resumed = data.LMBatches(stream, batch_size=8, seq_len=16, seed=0).restore(saved)
    for x in expected:
        y = next(resumed)
        assert np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
    with pytest.raises(ValueError, match="seq_len"):
        data.LMBatches(stream[:16], batch_size=1, seq_len=16, seed=0)


def test_lm_eval_batches_cover_stream():
    stream = np.arange(1003)
    T = 10
    batches = list(data.lm_eval_batches(stream, 16, T))
    assert [len(b["inputs"]) for b in batches] == [16] * 6 + [4]     # W = 1002 // 10 = 100 windows
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(inputs, stream[:1000])
    np.testing.assert_array_equal(targets, stream[1:1001])
    assert batches[0]["inputs"].dtype == np.int32


def test_train_val_split(shakespeare):
    tok = data.CharTokenizer.fit(shakespeare)
    tokens = np.asarray(tok.encode(shakespeare), np.int32)
    train, val = data.train_val_split(tokens, 0.1)
    assert len(train) == int(0.9 * len(tokens)) and len(train) + len(val) == len(tokens)
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    b = next(data.LMBatches(train, batch_size=4, seq_len=32, seed=0))
    assert tok.decode(b["inputs"][0][1:]) == tok.decode(b["targets"][0][:-1])
    with pytest.raises(ValueError):
        data.train_val_split(tokens, 1.0)


def test_fixed_shapes_pad_batch_and_lengths():
    pairs = data.synthetic_pairs("reverse", 300, seed=0, min_len=3, max_len=30)
    it = data.Seq2SeqBatches(pairs, batch_tokens=256, seed=0, pad_to_multiple=16, fixed_shapes=True)
    shapes, seen = set(), []
    for batch in it.epoch_batches():
        B, S = batch["src"].shape
        assert batch["tgt_in"].shape == batch["tgt_out"].shape == (B, S) and B == 256 // S
        real = batch["index"] >= 0
        assert (batch["src"][~real] == data.PAD).all() and (batch["tgt_out"][~real] == data.PAD).all()
        shapes.add((B, S))
        seen += batch["index"][real].tolist()
    assert sorted(seen) == list(range(300)) and len(shapes) <= 2

"""KV-cache decoding: cached logits equal the full forward pass; greedy, beam search and
sampling against references computed by full recomputation or brute force."""

import functools
import inspect
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer as jf
from tests.hlo_text import computations

# The suite is compile-bound: compile without XLA backend optimisation.
OPT0 = {"xla_backend_optimization_level": 0}
_jit = functools.partial(jax.jit, static_argnames=("cfg", "exe"), compiler_options=OPT0)


def _fast(public):
    """A public decoder re-jitted with OPT0 (same static arguments);
    test_whole_decode_is_one_compiled_loop runs the public jit itself."""
    fn = public.__wrapped__
    static = {"cfg", "exe", "bos_id", "eos_id", "max_len", "max_new_tokens", "beam_size", "alpha", "temperature",
              "top_k", "top_p"} & set(inspect.signature(fn).parameters)
    return jax.jit(fn, static_argnames=tuple(static), compiler_options=OPT0)


greedy_decode_seq2seq = _fast(jf.decoding.greedy_decode_seq2seq)
sample_seq2seq = _fast(jf.decoding.sample_seq2seq)
beam_search_seq2seq = _fast(jf.decoding.beam_search_seq2seq)
generate_lm = _fast(jf.decoding.generate_lm)
beam_search_lm = _fast(jf.decoding.beam_search_lm)
lm_apply, seq2seq_apply = _jit(jf.lm_apply), _jit(jf.seq2seq_apply)
lm_step = lm_apply  # with cache=...


@_jit
def seq2seq_step(params, tgt_in, *, cfg, state, cache, exe=None):
    return jf.seq2seq_decode(params, None, None, tgt_in, cfg=cfg, exe=exe, state=state, cache=cache)


@functools.partial(_jit, static_argnames=("cfg", "exe", "max_len"))
def seq2seq_cache(params, src, *, cfg, state, max_len, exe=None):
    memory, _ = jf.seq2seq_encode(params, src, cfg=cfg, exe=exe, state=state)
    return jf.decoding.init_seq2seq_cache(params, memory, src, cfg=cfg, max_len=max_len)


CFG = jf.TransformerConfig(vocab_size=20, d_model=32, num_heads=4, num_layers=2, d_ff=48, dropout_rate=0.0,
                           max_len=16, pad_id=0)
SRC = jnp.array([[5, 6, 7, 8, 9, 0], [3, 4, 5, 0, 0, 0], [7, 7, 2, 9, 4, 3]])
PROMPT = jnp.array([[3, 9, 4], [0, 11, 6]])  # a padded prompt position is masked, as in lm_apply
BOS = 1
# EOS ids that the seed-0 models emit after a different number of steps in each row (or
# never; checked in the tests): decoding must stop every row at its own EOS.
S2S_EOS, LM_EOS = 12, 5
MAX_LEN, NEW = 8, 6


def logits_of(out):
    return out[0] if isinstance(out, tuple) else out


@functools.lru_cache(maxsize=None)
def model(kind, cfg=CFG, seed=0):
    init = {"lm": jf.init_lm, "seq2seq": jf.init_seq2seq}[kind]
    params = init(jax.random.key(seed), cfg)
    return params, (jf.init_state(params, cfg) if cfg.norm == "batch" else None)


def lp(n, alpha=0.6):
    return ((5.0 + n) / 6.0) ** alpha


# --------------------------------------------------- (a) cached == full pass


CACHE_CASES = [
    dict(positions="sinusoidal"),
    dict(positions="learned", norm="batch"),
    dict(positions="rope", num_kv_heads=2, norm_position="pre", activation="swiglu"),
    dict(positions="alibi", num_kv_heads=2, exe=jf.ExecConfig(scan_layers=False)),
]


def split_exe(overrides):
    """(model overrides, ExecConfig or None) of a CACHE_CASES entry."""
    overrides = dict(overrides)
    return overrides, overrides.pop("exe", None)


@pytest.mark.parametrize("overrides", CACHE_CASES, ids=lambda o: o["positions"])
def test_cached_lm_matches_full_forward(overrides):
    """Teacher forcing through the cache (a 3-token prefill, then one token per call)
    gives the logits of one full pass, padding (id 0) included."""
    overrides, exe = split_exe(overrides)
    cfg = CFG.replace(**overrides)
    params, state = model("lm", cfg)
    # Padding, but no leading pad: a query that may attend to no key has no defined output.
    tokens = jnp.array([[3, 9, 4, 0, 12, 5, 7, 2], [4, 11, 0, 0, 1, 19, 3, 8]])
    full = logits_of(lm_apply(params, tokens, cfg=cfg, exe=exe, state=state))
    cache = jf.decoding.init_lm_cache(params, cfg, 2, 10)
    chunks = []
    for lo, hi in [(0, 3)] + [(t, t + 1) for t in range(3, 8)]:
        logits, aux = lm_step(params, tokens[:, lo:hi], cfg=cfg, exe=exe, state=state, cache=cache)
        chunks.append(logits)
        cache = aux["cache"]
    assert int(cache["index"]) == 8
    np.testing.assert_allclose(jnp.concatenate(chunks, 1), full, atol=1e-4)


@pytest.mark.parametrize("overrides", CACHE_CASES, ids=lambda o: o["positions"])
def test_cached_seq2seq_decoder_matches_full_forward(overrides):
    overrides, exe = split_exe(overrides)
    cfg = CFG.replace(**overrides)
    params, state = model("seq2seq", cfg)
    tgt_in = jnp.array([[1, 9, 8, 7, 6, 3], [1, 5, 4, 0, 0, 0], [1, 2, 2, 2, 2, 2]])
    full = logits_of(seq2seq_apply(params, SRC, tgt_in, cfg=cfg, exe=exe, state=state))
    cache = seq2seq_cache(params, SRC, cfg=cfg, exe=exe, state=state, max_len=7)
    assert len(cache["layers"]) == 2 and cache["layers"][1]["cross_key"].shape == (3, cfg.kv_heads, 6, 8)
    steps = []
    for t in range(6):
        logits, aux = seq2seq_step(params, tgt_in[:, t:t + 1], cfg=cfg, exe=exe, state=state, cache=cache)
        cache = aux["cache"]
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4)


def test_reorder_cache_follows_rows():
    params, _ = model("lm")
    cache = jf.decoding.init_lm_cache(params, CFG, 2, 4)
    cache = lm_step(params, jnp.array([[3, 4], [5, 0]]), cfg=CFG, cache=cache)[1]["cache"]
    moved = jf.decoding.reorder_cache(cache, jnp.array([1, 1, 0]))
    for before, after in zip(cache["layers"], moved["layers"]):
        np.testing.assert_array_equal(after["key"][2], before["key"][0])
        np.testing.assert_array_equal(after["value"][:2], before["value"][jnp.array([1, 1])])
    np.testing.assert_array_equal(moved["valid"][:2], cache["valid"][jnp.array([1, 1])])
    assert int(moved["index"]) == 2


# ---------------------------------------------- (b) greedy == recomputation


def greedy_by_recomputation(kind, params, inputs, n, eos_id, cfg=CFG, state=None):
    """Stepwise argmax of a full forward pass over a fixed-length buffer (causal: the
    not-yet-decoded positions cannot influence position t); pad after EOS."""
    B = inputs.shape[0]
    out = np.full((B, n), cfg.pad_id, np.int32)
    done = np.zeros(B, bool)
    for t in range(n):
        if kind == "lm":
            buf = jnp.concatenate([inputs, jnp.asarray(out)], 1)
            logits = logits_of(lm_apply(params, buf, cfg=cfg, state=state))[:, inputs.shape[1] - 1 + t]
        else:
            buf = jnp.concatenate([jnp.full((B, 1), BOS), jnp.asarray(out[:, :-1])], 1)
            logits = logits_of(seq2seq_apply(params, inputs, buf, cfg=cfg, state=state))[:, t]
        token = np.where(done, cfg.pad_id, np.asarray(jnp.argmax(logits, -1)))
        out[:, t] = token
        done |= token == eos_id
    return out


def greedy_seq2seq(params, eos_id, cfg=CFG, state=None, src=SRC):
    return np.asarray(greedy_decode_seq2seq(params, src, cfg=cfg, bos_id=BOS, eos_id=eos_id, max_len=MAX_LEN,
                                            state=state))


def greedy_lm(params, eos_id=None, prompt=PROMPT, n=NEW):
    return np.asarray(generate_lm(params, prompt, cfg=CFG, max_new_tokens=n, eos_id=eos_id))


def eos_steps(out, eos, pad=CFG.pad_id):
    """Checks that every position after a row's first EOS is padding; returns the step of
    each row's first EOS (the row length if none)."""
    steps = []
    for row in np.asarray(out):
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert (row[hits[0] + 1:] == pad).all(), row
        steps.append(hits[0] if hits.size else len(row))
    return np.array(steps)


def test_greedy_seq2seq_equals_recomputation_and_pads_after_eos():
    params, _ = model("seq2seq")
    np.testing.assert_array_equal(greedy_seq2seq(params, -1), greedy_by_recomputation("seq2seq", params, SRC,
                                                                                       MAX_LEN, -1))
    got = greedy_seq2seq(params, S2S_EOS)
    np.testing.assert_array_equal(got, greedy_by_recomputation("seq2seq", params, SRC, MAX_LEN, S2S_EOS))
    steps = eos_steps(got, S2S_EOS)
    assert 0 < steps.min() < MAX_LEN == steps.max()  # one row stops after >= 1 step, another never


def test_greedy_lm_equals_recomputation_and_pads_after_eos():
    params, _ = model("lm")
    free = greedy_lm(params)
    assert free.shape == (2, 3 + NEW)
    np.testing.assert_array_equal(free[:, :3], PROMPT)
    np.testing.assert_array_equal(free[:, 3:], greedy_by_recomputation("lm", params, PROMPT, NEW, -1))
    got = greedy_lm(params, LM_EOS)
    np.testing.assert_array_equal(got[:, 3:], greedy_by_recomputation("lm", params, PROMPT, NEW, LM_EOS))
    assert 1 <= eos_steps(got[:, 3:], LM_EOS).max() < NEW
    # A one-token prompt skips the prefill.
    one = greedy_lm(params, prompt=PROMPT[:, -1:], n=4)
    np.testing.assert_array_equal(one[:, 1:], greedy_by_recomputation("lm", params, PROMPT[:, -1:], 4, -1))


def test_greedy_batch_norm_model_uses_running_statistics():
    cfg = CFG.replace(norm="batch", positions="learned")
    params, state = model("seq2seq", cfg)
    state = jax.tree_util.tree_map(lambda s: s + 0.3, state)  # non-trivial statistics
    np.testing.assert_array_equal(greedy_seq2seq(params, -1, cfg, state),
                                  greedy_by_recomputation("seq2seq", params, SRC, MAX_LEN, -1, cfg, state))
    with pytest.raises(ValueError, match="state"):
        greedy_seq2seq(params, -1, cfg)


# ------------------------------------------------------------- (c, d) beam


def seq2seq_scores(params, src, seqs, eos, alpha=0.6, cfg=CFG):
    """log P(Y | X) / lp(|Y|) of output rows [B, n] by one teacher-forced pass; |Y| counts
    the tokens up to and including the first EOS (all n without one)."""
    B, n = seqs.shape
    tgt_in = jnp.concatenate([jnp.full((B, 1), BOS), jnp.asarray(seqs[:, :-1])], 1)
    logp = jax.nn.log_softmax(logits_of(seq2seq_apply(params, src, tgt_in, cfg=cfg)), -1)
    token_logp = np.take_along_axis(np.asarray(logp), np.asarray(seqs)[..., None], -1)[..., 0]
    is_eos = np.asarray(seqs) == eos
    length = np.where(is_eos.any(1), is_eos.argmax(1) + 1, n)
    total = (token_logp * (np.arange(n) < length[:, None])).sum(1)
    return total / lp(length, alpha)


def beam_seq2seq(params, eos_id, **kw):
    return beam_search_seq2seq(params, SRC, cfg=CFG, bos_id=BOS, eos_id=eos_id, max_len=MAX_LEN, **kw)


def test_beam_size_one_is_greedy():
    params, _ = model("seq2seq")
    beam, _ = beam_seq2seq(params, S2S_EOS, beam_size=1)
    np.testing.assert_array_equal(beam, greedy_seq2seq(params, S2S_EOS))
    lm_params, _ = model("lm")
    beam, _ = beam_search_lm(lm_params, PROMPT, cfg=CFG, max_new_tokens=NEW, beam_size=1, eos_id=LM_EOS)
    np.testing.assert_array_equal(beam, greedy_lm(lm_params, LM_EOS))


def test_beam_search_scores_at_least_greedy():
    """On random models (3 seeds x 3 sources) the returned score is the length-penalised
    log-likelihood of the returned sequence, and at least the greedy sequence's."""
    eos = 11
    for seed in range(3):
        params, _ = model("seq2seq", CFG, seed)
        greedy = greedy_seq2seq(params, eos)
        beam, score = beam_seq2seq(params, eos)
        np.testing.assert_allclose(score, seq2seq_scores(params, SRC, beam, eos), atol=1e-4)
        assert (np.asarray(score) >= seq2seq_scores(params, SRC, greedy, eos) - 1e-5).all()
        eos_steps(beam, eos)


def test_beam_search_equals_brute_force_on_a_tiny_vocabulary():
    """V = 4, max_len = 3: a beam of V^(max_len-1) = 16 never prunes before the last step,
    so it must return the best of all 4^3 outputs (hypotheses end at their first EOS)."""
    cfg = CFG.replace(vocab_size=4, pad_id=None)
    eos = 3
    src = jnp.array([[1, 2, 3, 2], [2, 2, 1, 0], [3, 0, 1, 2]])
    params = jf.init_seq2seq(jax.random.key(4), cfg)
    every = np.array(list(itertools.product(range(4), repeat=3)), np.int32)  # [64, 3]
    beam, score = beam_search_seq2seq(params, src, cfg=cfg, bos_id=BOS, eos_id=eos, max_len=3,
                                               beam_size=16)
    for b in range(3):
        scores = seq2seq_scores(params, jnp.repeat(src[b:b + 1], 64, 0), every, eos, cfg=cfg)
        np.testing.assert_allclose(float(score[b]), scores.max(), atol=1e-5)
        best = every[scores.argmax()]
        cut = np.flatnonzero(best == eos)[0] + 1 if (best == eos).any() else 3
        np.testing.assert_array_equal(np.asarray(beam[b, :cut]), best[:cut])
        assert (np.asarray(beam[b, cut:]) == eos).all()  # no pad id: EOS fills


def test_beam_search_lm_finds_a_better_continuation_than_greedy():
    params, _ = model("lm")
    greedy = greedy_lm(params)
    beam, score = beam_search_lm(params, PROMPT, cfg=CFG, max_new_tokens=NEW, beam_size=4)

    def score_of(rows):  # no EOS: every continuation has length NEW
        logp = jax.nn.log_softmax(lm_apply(params, jnp.asarray(rows), cfg=CFG)[0], -1)[:, 2:-1]
        return np.take_along_axis(np.asarray(logp), np.asarray(rows)[:, 3:, None], -1).sum((1, 2)) / lp(NEW)

    np.testing.assert_array_equal(beam[:, :3], PROMPT)
    np.testing.assert_allclose(score, score_of(beam), atol=1e-4)
    assert (np.asarray(score) >= score_of(greedy) - 1e-5).all()


# ----------------------------------------------------------------- (e) sampling


def test_sampling_limits_are_greedy():
    params, _ = model("lm")
    greedy, key = greedy_lm(params), jax.random.key(7)
    for kw in (dict(temperature=1e-6), dict(top_k=1), dict(top_p=1e-6)):
        got = generate_lm(params, PROMPT, cfg=CFG, max_new_tokens=NEW, key=key, **kw)
        np.testing.assert_array_equal(got, greedy, err_msg=str(kw))
    s2s, _ = model("seq2seq")
    cold = sample_seq2seq(s2s, SRC, key, cfg=CFG, bos_id=BOS, eos_id=S2S_EOS, max_len=MAX_LEN,
                                   temperature=1e-6)
    np.testing.assert_array_equal(cold, greedy_seq2seq(s2s, S2S_EOS))


def test_sampling_is_reproducible_per_key_and_pads_after_eos():
    params, _ = model("seq2seq")
    sample = functools.partial(sample_seq2seq, params, SRC, cfg=CFG, bos_id=BOS, eos_id=S2S_EOS,
                               max_len=MAX_LEN)
    a, b, c = (np.asarray(sample(jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (eos_steps(np.concatenate([a, c]), S2S_EOS) < MAX_LEN).any()


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 500)

    def drawn(**kw):
        f = jax.jit(jax.vmap(lambda k: jf.decoding.next_token(logits, k, **kw)[0]), compiler_options=OPT0)
        return set(np.asarray(f(keys)).tolist())

    assert drawn() == {0, 1, 2, 3, 4}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert drawn(top_p=0.85) == {0, 1, 2}
    assert drawn(top_k=2, top_p=0.5) == {0}
    assert drawn(temperature=1e-6) == {0}
    assert (jf.decoding.next_token(logits, keys[0], temperature=0.0) == 0).all()


# -------------------------------------------------------------- (g) jit, errors


def test_whole_decode_is_one_compiled_loop():
    """The public decoders trace to one jitted program with one while loop (prefill and
    steps included), and compose with an outer jit."""
    params, _ = model("lm")
    public = functools.partial(jf.decoding.beam_search_lm, cfg=CFG, max_new_tokens=NEW)
    assert str(jax.make_jaxpr(public)(params, PROMPT)).count("while[") == 1
    s2s, _ = model("seq2seq")
    sampler = functools.partial(jf.decoding.sample_seq2seq, cfg=CFG, bos_id=BOS, eos_id=S2S_EOS, max_len=MAX_LEN)
    assert str(jax.make_jaxpr(sampler)(s2s, SRC, jax.random.key(0))).count("while[") == 1
    outer = jax.jit(lambda p, x: public(p, x)[0], compiler_options=OPT0)
    np.testing.assert_array_equal(outer(params, PROMPT), beam_search_lm(params, PROMPT, cfg=CFG,
                                                                         max_new_tokens=NEW)[0])


def test_argument_errors():
    params, _ = model("lm")
    prompt = jnp.array([[3, 9, 4]])
    gen = functools.partial(jf.decoding.generate_lm, params, cfg=CFG, max_new_tokens=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="beam_size"):
        jf.decoding.beam_search_lm(params, prompt, cfg=CFG, max_new_tokens=4, beam_size=0)
    with pytest.raises(ValueError, match="temperature"):
        gen(prompt, temperature=-1.0)
    for p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            gen(prompt, top_p=p)
    with pytest.raises(ValueError, match="top_k"):
        gen(prompt, top_k=0)
    with pytest.raises(ValueError, match=r"prompt must be integer token ids \[B, P\]"):
        gen(prompt.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"prompt must be integer"):
        gen(prompt[0])
    learned = CFG.replace(positions="learned")
    lm_learned = jf.init_lm(jax.random.key(0), learned)
    with pytest.raises(ValueError, match="max_len=16"):
        jf.decoding.generate_lm(lm_learned, prompt, cfg=learned, max_new_tokens=15)
    s2s_learned = jf.init_seq2seq(jax.random.key(0), learned)
    with pytest.raises(ValueError, match="max_len=16"):
        jf.decoding.greedy_decode_seq2seq(s2s_learned, SRC, cfg=learned, bos_id=BOS, eos_id=2, max_len=17)
    with pytest.raises(ValueError, match="max_len=16"):
        jf.decoding.init_lm_cache(lm_learned, learned, 1, 17)


def _loop_instructions(hlo: str):
    """(opcode, element count) of every instruction in the compiled while loops' bodies and
    the computations they call (fusions included)."""
    comps = computations(hlo)
    todo = [b for lines in comps.values() for line in lines for b in re.findall(r"body=%([\w.\-]+)", line)]
    seen = set()
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for line in comps[comp]:
            todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
            m = re.match(r"\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\{[^}]*\} ([\w\-]+)\(", line)
            if m:
                yield m.group(2), int(np.prod([int(d) for d in m.group(1).split(",") if d]))


def test_decode_loop_reads_cache_and_weights_in_place():
    """Per generated token the compiled loop only writes the new cache rows: no transpose, copy,
    concatenation or slice as large as one layer's key cache (a cache stacked on [L] was
    re-stacked, a [B, S, K, H] cache transposed for the per-head products, and stacked weights
    sliced per layer, at every token: decode 1.30 -> 0.45 s on the lm-small benchmark)."""
    cfg = CFG.replace(max_len=64, d_ff=32)
    B, new = 8, 60
    params, _ = model("lm", cfg)
    hlo = jax.jit(functools.partial(jf.decoding.generate_lm, cfg=cfg, max_new_tokens=new)).lower(
        params, jnp.ones((B, 3), jnp.int32)).compile().as_text()
    layer_cache = B * cfg.kv_heads * (3 + new - 1) * (cfg.d_model // cfg.num_heads)
    assert layer_cache > max(x.size for x in jax.tree.leaves(params["decoder"]["layers"])) // cfg.num_layers
    ops = list(_loop_instructions(hlo))
    assert sum(op == "dot" for op, _ in ops) or any(op == "fusion" for op, _ in ops)  # found the loop
    moves = [(op, n) for op, n in ops if op in ("transpose", "copy", "concatenate", "slice") and n >= layer_cache]
    assert not moves, moves

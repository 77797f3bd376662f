"""jformer.equivariant: the SE(3)-Transformer, TFN kernels, EGNN and the N-body predictors.

The point is equivariance of the whole multi-layer model, in float32 and float64, with a
negative control (a plain Transformer) that the same harness flags. Models are small and
each jitted function compiles once per dtype, so the file stays well under a minute.
"""

import dataclasses
import functools

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jformer.equivariant as eq

# Hidden degrees 0..3, three attention layers (the first, then two scanned hidden ones).
# 8 channels: the paper's LayerNorm over channel norms amplifies float32 rounding when a
# degree has only a few channels (4 channels: ~7e-6 relative error; 8: ~2e-6).
BIG = eq.SE3TransformerConfig(degrees_in={0: 2, 1: 2}, degrees_hidden={0: 8, 1: 8, 2: 8, 3: 8},
                              degrees_out={0: 2, 1: 1}, num_layers=3, n_heads=2, radial_hidden=16, n_edge_feats=1)
SMALL = eq.SE3TransformerConfig(degrees_in={0: 2, 1: 2}, degrees_hidden={0: 4, 1: 4}, degrees_out={0: 1, 1: 1},
                                num_layers=2, n_heads=2, radial_hidden=8, n_edge_feats=1)
SMALL_KNN = dataclasses.replace(SMALL, neighbours=2)
EGNN = eq.EGNNConfig(node_in=2, hidden=8, num_layers=2, n_edge_feats=1, velocity=True)
N = 6


@jax.jit
def _big(params, pos, feats, mask, edge):
    return se3_apply(params, BIG, pos, feats, mask, edge)


def se3_apply(params, cfg, pos, feats, mask, edge):
    return eq.se3_transformer(params, cfg, pos, feats, mask, edge, return_hidden=True)


_small = jax.jit(lambda p, x, f, m, e: eq.se3_transformer(p, SMALL, x, f, m, e))
_small_knn = jax.jit(lambda p, x, f, m, e: eq.se3_transformer(p, SMALL_KNN, x, f, m, e))
_egnn = jax.jit(lambda p, x, h, m, e, v: eq.egnn(p, EGNN, x, h, m, e, v))


def graph(key, n=N, dtype=jnp.float32):
    """Random one-graph inputs: pos [n, 3], feats {0: [n, 2, 1], 1: [n, 2, 3]}, edge [n, n, 1]."""
    k = jax.random.split(key, 4)
    pos = jax.random.normal(k[0], (n, 3), dtype)
    feats = {0: jax.random.normal(k[1], (n, 2, 1), dtype), 1: jax.random.normal(k[2], (n, 2, 3), dtype)}
    c = jax.random.normal(k[3], (n,), dtype)
    return pos, feats, (c[:, None] * c[None, :])[..., None]


@functools.lru_cache(maxsize=None)
def params_of(cfg, seed=0):
    """Initialised once per config (SMALL and SMALL_KNN share the structure, so the params)."""
    if isinstance(cfg, eq.EGNNConfig):
        return eq.init_egnn(jax.random.PRNGKey(seed), cfg)
    return eq.init_se3_transformer(jax.random.PRNGKey(seed), dataclasses.replace(cfg, neighbours="full"))


@jax.jit
def _wigners(R):
    # proper R: the parity label of the irrep does not matter
    return {l: e3nn.Irreps(f"{l}e").D_from_matrix(R) for l in range(4)}


def wigner(l, R):
    return _wigners(R)[l]


def rotate(feats, R):
    D = _wigners(R)
    return {l: x @ D[l].T.astype(x.dtype) for l, x in feats.items()}


def rel_err(a, b):
    """||a - b|| / ||b|| (Frobenius)."""
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def max_rel_err(got: dict, want: dict):
    return max(rel_err(got[l], want[l]) for l in want)


def cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ------------------------------------------------------------------ equivariance


def _check_se3_equivariance(dtype, tol):
    params = cast(params_of(BIG), dtype)
    pos, feats, edge = graph(jax.random.PRNGKey(1), dtype=dtype)
    mask = jnp.ones((N,), bool)
    out, hidden = _big(params, pos, feats, mask, edge)
    assert set(hidden) == {0, 1, 2, 3} and hidden[3].shape == (BIG.num_layers, N, 8, 7)
    assert all(float(jnp.abs(x).max()) > 1e-2 for x in (*out.values(), *hidden.values())), "trivially zero"
    for seed in range(3):
        kr, kt = jax.random.split(jax.random.PRNGKey(10 + seed))
        R = e3nn.rand_matrix(kr, (), dtype)
        assert abs(float(jnp.linalg.det(R)) - 1) < 1e-5  # proper rotation
        t = 3 * jax.random.normal(kt, (3,), dtype)
        out_r, hidden_r = _big(params, pos @ R.T + t, rotate(feats, R), mask, edge)
        assert rel_err(out_r[0], out[0]) < tol, "type-0 outputs must be invariant"
        assert rel_err(out_r[1], out[1] @ R.T) < tol, "type-1 outputs must rotate as vectors"
        assert max_rel_err(hidden_r, rotate(hidden, R)) < tol, "hidden degrees 0-3 must rotate by Wigner-D"


def test_se3_transformer_is_equivariant_float32():
    _check_se3_equivariance(jnp.float32, 1e-5)


def test_se3_transformer_is_equivariant_float64():
    with jax.enable_x64(True):
        _check_se3_equivariance(jnp.float64, 1e-10)


def test_se3_transformer_is_permutation_equivariant():
    params = params_of(BIG)
    pos, feats, edge = graph(jax.random.PRNGKey(2))
    mask = jnp.ones((N,), bool)
    perm = jax.random.permutation(jax.random.PRNGKey(3), N)
    out, hidden = _big(params, pos, feats, mask, edge)
    out_p, hidden_p = _big(params, pos[perm], {l: x[perm] for l, x in feats.items()}, mask, edge[perm][:, perm])
    assert max_rel_err(out_p, {l: x[perm] for l, x in out.items()}) < 1e-6
    assert max_rel_err(hidden_p, {l: x[:, perm] for l, x in hidden.items()}) < 1e-6


def test_knn_neighbours_keep_equivariance():
    params = params_of(SMALL_KNN)
    pos, feats, edge = graph(jax.random.PRNGKey(5))
    mask = jnp.ones((N,), bool)
    R = e3nn.rand_matrix(jax.random.PRNGKey(6), ())
    out = _small_knn(params, pos, feats, mask, edge)
    out_r = _small_knn(params, pos @ R.T + 1.0, rotate(feats, R), mask, edge)
    assert rel_err(out_r[0], out[0]) < 1e-5 and rel_err(out_r[1], out[1] @ R.T) < 1e-5


def _egnn_inputs(key, n=N):
    k = jax.random.split(key, 4)
    pos, vel = jax.random.normal(k[0], (n, 3)), jax.random.normal(k[1], (n, 3))
    h, c = jax.random.normal(k[2], (n, 2)), jax.random.normal(k[3], (n,))
    return pos, vel, h, (c[:, None] * c[None, :])[..., None]


def test_egnn_is_e3_and_permutation_equivariant():
    params = params_of(EGNN)
    pos, vel, h, edge = _egnn_inputs(jax.random.PRNGKey(1))
    mask = jnp.ones((N,), bool)
    x, v, hh = _egnn(params, pos, h, mask, edge, vel)
    assert float(jnp.abs(x - pos).max()) > 1e-3, "the layer must move the points"
    # E(3): a rotation composed with a reflection (det -1) and a translation
    R = -e3nn.rand_matrix(jax.random.PRNGKey(2), ())
    t = jnp.array([1.0, -2.0, 0.5])
    x_r, v_r, h_r = _egnn(params, pos @ R.T + t, h, mask, edge, vel @ R.T)
    assert rel_err(x_r, x @ R.T + t) < 1e-5 and rel_err(v_r, v @ R.T) < 1e-5 and rel_err(h_r, hh) < 1e-5
    perm = jax.random.permutation(jax.random.PRNGKey(3), N)
    x_p, v_p, h_p = _egnn(params, pos[perm], h[perm], mask, edge[perm][:, perm], vel[perm])
    assert rel_err(x_p, x[perm]) < 1e-6 and rel_err(v_p, v[perm]) < 1e-6 and rel_err(h_p, hh[perm]) < 1e-6


def _nbody_equivariance_error(name, **overrides):
    init, predict = eq.nbody_model(name, **overrides)
    params = init(jax.random.PRNGKey(0))
    pos, vel, _, _ = _egnn_inputs(jax.random.PRNGKey(7))
    charge = jnp.array([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    mask = jnp.ones((N,), bool)
    predict = jax.jit(predict)
    R = e3nn.rand_matrix(jax.random.PRNGKey(8), ())
    t = jnp.array([0.5, 1.0, -1.5])
    y = predict(params, pos, vel, charge, mask)
    return rel_err(predict(params, pos @ R.T + t, vel @ R.T, charge, mask), y @ R.T + t)


def test_nbody_models_equivariance_and_the_negative_control():
    """The same harness passes the equivariant predictors and flags the plain Transformer."""
    assert _nbody_equivariance_error("se3_transformer", degrees_hidden={0: 4, 1: 4}, radial_hidden=8) < 1e-5
    assert _nbody_equivariance_error("egnn", hidden=8, num_layers=2) < 1e-5
    assert _nbody_equivariance_error("transformer", d_model=16, num_layers=1, d_ff=16) > 1e-2
    assert set(eq.MODELS) == {"se3_transformer", "egnn", "transformer", "linear"}


# ----------------------------------------------------------------------- padding


@pytest.mark.parametrize("fn", ["full", "knn", "egnn"])
def test_padded_nodes_change_nothing(fn):
    n_pad = 3
    garbage = jnp.array([[jnp.nan, 1e30, -jnp.inf]] * n_pad)
    mask = jnp.arange(N + n_pad) < N
    if fn == "egnn":
        params = params_of(EGNN)
        pos, vel, h, edge = _egnn_inputs(jax.random.PRNGKey(1))
        pad = lambda a, fill: jnp.concatenate([a, jnp.broadcast_to(fill, (n_pad,) + a.shape[1:])])  # noqa: E731
        edge_p = jnp.full((N + n_pad, N + n_pad, 1), jnp.nan).at[:N, :N].set(edge)
        ref = _egnn(params, pos, h, jnp.ones((N,), bool), edge, vel)
        got = _egnn(params, pad(pos, garbage), pad(h, jnp.nan), mask, edge_p, pad(vel, 7.0))
        for a, b in zip(got, ref):
            assert rel_err(a[:N], b) < 1e-6 and bool(jnp.isfinite(a).all())
        return
    cfg, run = (SMALL, _small) if fn == "full" else (SMALL_KNN, _small_knn)
    params = params_of(cfg)
    pos, feats, edge = graph(jax.random.PRNGKey(1))
    ref = run(params, pos, feats, jnp.ones((N,), bool), edge)
    feats_p = {l: jnp.concatenate([x, jnp.full((n_pad,) + x.shape[1:], jnp.nan)]) for l, x in feats.items()}
    edge_p = jnp.full((N + n_pad, N + n_pad, 1), jnp.inf).at[:N, :N].set(edge)
    got = run(params, jnp.concatenate([pos, garbage]), feats_p, mask, edge_p)
    for l in ref:
        assert rel_err(got[l][:N], ref[l]) < 1e-6
        assert bool((got[l][N:] == 0).all()), "pad rows come back zero"


# ----------------------------------------------------------------- known values


def test_spherical_harmonics_and_clebsch_gordan_known_values():
    u = jnp.array([0.36, 0.48, -0.8])  # a unit vector
    Y = eq.spherical_harmonics(u, 2)
    np.testing.assert_allclose(Y[0], [1.0], rtol=1e-6)
    # e3nn-jax 0.21, 'component' normalisation: Y_1(u) = √3 u in Cartesian (x, y, z) order
    # (older e3nn used (y, z, x)); so degree-1 features ARE Cartesian vectors, no basis change.
    np.testing.assert_allclose(Y[1], np.sqrt(3.0) * np.asarray(u), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(Y[2] ** 2)), 5.0, rtol=1e-5)
    R = e3nn.rand_matrix(jax.random.PRNGKey(0), ())
    np.testing.assert_allclose(wigner(1, R), R, atol=1e-6)  # D_1(R) = R in this basis
    # CG for 1 x 1 -> 0 is the invariant dot product: I / √3
    np.testing.assert_allclose(e3nn.clebsch_gordan(1, 1, 0)[..., 0], np.eye(3) / np.sqrt(3.0), atol=1e-12)
    # at r = 0 the direction is undefined: Y_0 = 1, every higher degree 0 (no NaN)
    Y0 = eq.spherical_harmonics(jnp.zeros(3), 3)
    assert float(Y0[0][0]) == 1.0 and all(float(jnp.abs(y).max()) == 0.0 for y in Y0[1:])
    # kernel basis: (0 -> 1) is √3 u / √3 = u up to the CG normalisation, and equivariant
    B = eq.basis(u, 1)
    assert B[(0, 1)].shape == (1, 3, 1) and B[(1, 1)].shape == (3, 3, 3)
    np.testing.assert_allclose(B[(0, 1)][0, :, 0] / jnp.linalg.norm(B[(0, 1)]), u, rtol=1e-5)
    BR = eq.basis(R @ u, 1)[(1, 1)]
    np.testing.assert_allclose(BR, jnp.einsum("ab,jbc,dc->jad", R, B[(1, 1)], R), atol=1e-5)


# ----------------------------------------------------------- jit, grad, vmap


def test_grad_is_finite_with_coincident_and_padded_points():
    params = params_of(SMALL)
    pos, feats, edge = graph(jax.random.PRNGKey(1))
    pos = pos.at[1].set(pos[0]).at[N - 1].set(pos[0])  # a coincident pair, and a pad on top of it
    feats = {l: x.at[2].set(0.0) for l, x in feats.items()}  # a zero feature (norm at 0)
    mask = jnp.arange(N) < N - 1

    def loss(p, x):
        out = eq.se3_transformer(p, SMALL, x, feats, mask, edge)
        return sum(jnp.sum(v ** 2) for v in out.values())

    g_p, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, pos)
    leaves = jax.tree_util.tree_leaves(g_p)
    assert all(bool(jnp.isfinite(a).all()) for a in leaves) and bool(jnp.isfinite(g_x).all())
    assert sum(float(jnp.abs(a).sum()) for a in leaves) > 0 and float(jnp.abs(g_x[N - 1]).max()) == 0.0

    e_params = params_of(EGNN)
    _, vel, h, e_edge = _egnn_inputs(jax.random.PRNGKey(3))
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(eq.egnn(p, EGNN, x, h, mask, e_edge, vel)[0] ** 2), argnums=(0, 1)))(
        e_params, pos)
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree_util.tree_leaves(g))


def test_vmap_over_graphs_equals_a_loop():
    params = params_of(SMALL)
    graphs = [graph(jax.random.PRNGKey(i)) for i in range(3)]
    masks = jnp.stack([jnp.arange(N) < n for n in (N, N - 1, N - 3)])
    pos = jnp.stack([g[0] for g in graphs])
    feats = {l: jnp.stack([g[1][l] for g in graphs]) for l in graphs[0][1]}
    edge = jnp.stack([g[2] for g in graphs])
    batched = jax.jit(jax.vmap(lambda x, f, m, e: eq.se3_transformer(params, SMALL, x, f, m, e)))(pos, feats, masks, edge)
    for b, (x, f, e) in enumerate(graphs):
        one = _small(params, x, f, masks[b], e)
        assert max_rel_err({l: v[b] for l, v in batched.items()}, one) < 1e-5


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    params = params_of(SMALL)
    pos, feats, edge = graph(jax.random.PRNGKey(1))
    mask = jnp.ones((N,), bool)
    run = lambda **kw: eq.se3_transformer(params, SMALL, **{"pos": pos, "feats": feats, "mask": mask,  # noqa: E731
                                                           "edge_feats": edge, **kw})
    with pytest.raises(ValueError, match=r"pos must be coordinates \[\.\.\., N, 3\], got shape \(6, 2\)"):
        run(pos=pos[:, :2])
    with pytest.raises(ValueError, match=r"feats\[1\] must be \[\.\.\., N, C, 2l\+1\] = \[\.\.\., N, C, 3\]"):
        run(feats={0: feats[0], 1: feats[1][..., :2]})
    with pytest.raises(ValueError, match=r"feats\[0\] has 5 nodes"):
        run(feats={0: feats[0][:5], 1: feats[1]})
    with pytest.raises(ValueError, match=r"feats has degrees/channels \{0: 2, 1: 2, 2: 1\}, the model expects"):
        run(feats={**feats, 2: jnp.zeros((N, 1, 5))})
    with pytest.raises(ValueError, match=r"mask must be a boolean \[N\] = \[6\] node mask"):
        run(mask=jnp.ones((N + 1,), bool))
    with pytest.raises(ValueError, match=r"mask must be a boolean .* dtype int32"):
        run(mask=jnp.ones((N,), jnp.int32))
    with pytest.raises(ValueError, match=r"edge_feats must be \[N, N, E\] = \[6, 6, 1\]"):
        run(edge_feats=edge[:, :3])
    with pytest.raises(ValueError, match=r"n_heads=3 does not divide the 4 hidden channels"):
        eq.SE3TransformerConfig(degrees_hidden={0: 4}, n_heads=3)
    with pytest.raises(ValueError, match=r"neighbours=6 needs 1 <= k <= N - 1 = 5"):
        eq.se3_transformer(params, dataclasses.replace(SMALL, neighbours=6), pos, feats, mask, edge)
    with pytest.raises(ValueError, match=r"unknown N-body model 'gnn'"):
        eq.nbody_model("gnn")


def test_nbody_train_step_sharded_over_devices_and_ensembled_equals_plain():
    """The N-body SE(3)-Transformer's loss and gradients on a batch of graphs: split over the
    8 CPU devices' data axis (jformer.parallel) equal one device, and two members trained as a
    vmapped ensemble equal the two models computed one by one."""
    from jformer import parallel
    from jformer.equivariant.nbody_models import nbody_model

    init, predict = nbody_model("se3_transformer", degrees_hidden={0: 4, 1: 4}, num_layers=2, radial_hidden=8)
    k = jax.random.split(jax.random.key(7), 4)
    B = 16
    batch = {"pos": jax.random.normal(k[0], (B, 5, 3)), "vel": jax.random.normal(k[1], (B, 5, 3)),
             "charge": jnp.sign(jax.random.normal(k[2], (B, 5))), "mask": jnp.ones((B, 5), bool),
             "target": jax.random.normal(k[3], (B, 5, 3))}

    def loss(params, b):
        pred = jax.vmap(predict, in_axes=(None, 0, 0, 0, 0))(params, b["pos"], b["vel"], b["charge"], b["mask"])
        return jnp.mean((pred - b["target"]) ** 2)

    grad_fn = jax.jit(jax.value_and_grad(loss))
    params = init(jax.random.key(0))
    want = grad_fn(params, batch)
    mesh = parallel.make_mesh("data=8")
    got = grad_fn(params, parallel.shard_batch(batch, mesh))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[1], want[1])

    members = [init(jax.random.key(s)) for s in (0, 1)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *members)
    ens = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(0, None)))(stacked, batch)
    for i, p in enumerate(members):
        one = grad_fn(p, batch)
        np.testing.assert_allclose(ens[0][i], one[0], rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6), ens[1], one[1])

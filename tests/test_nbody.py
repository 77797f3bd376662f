"""The charged N-body simulator and its dataset cache (jformer.data.nbody): numpy only, fast."""

import numpy as np
import pytest

from jformer.data import nbody


@pytest.fixture(scope="module")
def small():
    """16 trajectories of 5 particles, 1,000 steps, with the per-trajectory clip counts."""
    return nbody.simulate(16, 5, seed=3, length=1000, sample_freq=50, return_clip_steps=True)


def test_shapes_and_charges(small):
    loc, vel, charges, clips = small
    assert loc.shape == vel.shape == (16, 19, 5, 3)   # length / freq - 1 frames, as the reference keeps
    assert charges.shape == (16, 5) and clips.shape == (16,)
    assert set(np.unique(charges)) <= {-1.0, 1.0}
    assert np.isfinite(loc).all() and np.isfinite(vel).all()


def test_charges_are_fair_coins():
    _, _, q = nbody.initial_state(4000, 5, seed=0)
    assert abs((q > 0).mean() - 0.5) < 0.02


def test_initial_state_matches_the_description():
    loc, vel, _ = nbody.initial_state(2000, 5, seed=1)
    np.testing.assert_allclose(np.linalg.norm(vel, axis=-1), 0.5, rtol=1e-12)
    assert abs(loc.std() - 1.0) < 0.02 and np.abs(loc).max() <= 5.0


def test_deterministic_by_seed_and_seeds_differ(small):
    again = nbody.simulate(16, 5, seed=3, length=1000, sample_freq=50, return_clip_steps=True)
    for a, b in zip(small, again):
        np.testing.assert_array_equal(a, b)
    other = nbody.simulate(16, 5, seed=4, length=1000, sample_freq=50)
    assert not np.allclose(small[0], other[0])


def test_chunking_does_not_change_the_result():
    loc0, vel0, q = nbody.initial_state(10, 4, seed=5)
    a = nbody.integrate(loc0, vel0, q, n_frames=3, sample_freq=20, chunk=3)
    b = nbody.integrate(loc0, vel0, q, n_frames=3, sample_freq=20, chunk=64)
    np.testing.assert_array_equal(loc0, nbody.initial_state(10, 4, seed=5)[0])   # inputs untouched
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_momentum_conserved_without_clipping(small):
    # Pair forces are antisymmetric, so Σ v is constant; a clipped step clips each particle's
    # *total* force, which for N > 2 need not keep the sum at zero (the reference does the same).
    loc, vel, _, clips = small
    p = vel.sum(axis=2)                                              # [S, T, 3], unit masses
    unclipped = clips == 0
    assert unclipped.any()
    np.testing.assert_allclose(p[unclipped], np.broadcast_to(p[unclipped][:, :1], p[unclipped].shape), atol=1e-10)


def test_momentum_conserved_for_two_particles_even_when_clipped():
    # With two particles F_1 = -F_2 and the clip is odd, so clipping keeps the sum at zero.
    loc0 = np.array([[[0.0, 0, 0], [0.03, 0.01, 0]]])
    vel0 = np.array([[[0.1, 0, 0], [-0.1, 0.05, 0]]])
    q = np.array([[1.0, -1.0]])
    _, vel, clips = nbody.integrate(loc0, vel0, q, n_frames=5, sample_freq=20)
    assert clips[0] > 0
    np.testing.assert_allclose(vel.sum(axis=2), np.broadcast_to(vel0.sum(axis=1), (1, 5, 3)), atol=1e-10)


def test_energy_roughly_conserved_without_clipping(small):
    # Symplectic Euler at dt = 1e-3 keeps energy bounded; close encounters spoil it, so the
    # median over unclipped trajectories is what is checked.
    loc, vel, q, clips = small
    e = nbody.energy(loc, vel, q[:, None])
    drift = np.abs(e - e[:, :1]).max(axis=1) / np.abs(e[:, 0])
    assert np.median(drift[clips == 0]) < 0.05


def test_energy_conserved_for_a_gentle_pair():
    loc0 = np.array([[[0.0, 0, 0], [1.0, 0, 0]]])
    vel0 = np.array([[[0.0, 0.2, 0], [0.0, -0.2, 0]]])
    q = np.array([[1.0, 1.0]])                                     # repelling: no close encounter
    loc, vel, clips = nbody.integrate(loc0, vel0, q, n_frames=10, sample_freq=100)
    e = nbody.energy(loc, vel, q[:, None])
    assert clips[0] == 0 and np.abs(e - e[:, :1]).max() < 2e-3


def test_two_steps_by_hand():
    dt = 1e-3
    loc0 = np.array([[[0.0, 0, 0], [1.0, 0, 0]]])
    q = np.array([[1.0, 1.0]])                                     # like charges repel
    loc, vel, _ = nbody.integrate(loc0, np.zeros_like(loc0), q, n_frames=1, sample_freq=2, dt=dt)
    v0 = -dt * 1.0                                                 # kick: F_0 = q0 q1 (x0 - x1) / r³ = -1
    x0 = dt * v0                                                   # drift
    r = 1.0 - 2 * x0                                               # symmetric: x1 = 1 - x0
    v0 = v0 - dt / r ** 2
    x0 = x0 + dt * v0
    np.testing.assert_allclose(loc[0, 0, :, 0], [x0, 1.0 - x0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(vel[0, 0, :, 0], [v0, -v0], rtol=0, atol=1e-15)
    assert np.all(loc[0, 0, :, 1:] == 0) and np.all(vel[0, 0, :, 1:] == 0)


def test_force_clip_by_hand():
    # Opposite charges 0.05 apart: |F| = 1 / 0.0025 = 400 > F_max = 0.1 / dt = 100.
    loc = np.array([[[0.0, 0, 0], [0.05, 0, 0]]])
    F, clipped = nbody.forces(loc, np.array([[1.0, -1.0]]))
    np.testing.assert_allclose(F[0], [[100.0, 0, 0], [-100.0, 0, 0]])
    assert clipped.tolist() == [True]


@pytest.mark.parametrize("call, name", [
    (lambda: nbody.simulate(0, seed=0), "n_trajectories"),
    (lambda: nbody.simulate(3, -1, seed=0), "n_particles"),
    (lambda: nbody.simulate(3, seed=0, length=150, sample_freq=100), "length"),
    (lambda: nbody.simulate(3, seed=0, sample_freq=0), "sample_freq"),
    (lambda: nbody.simulate(3, seed=0, loc_std=-1.0), "loc_std"),
    (lambda: nbody.simulate(3, seed=0, interaction_strength=float("nan")), "interaction_strength"),
    (lambda: nbody.integrate(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), np.ones((1, 2)), n_frames=0,
                             sample_freq=1), "n_frames"),
    (lambda: nbody.integrate(np.zeros((1, 2, 3)), np.zeros((1, 2, 3)), np.ones((1, 2)), n_frames=1,
                             sample_freq=1, dt=0), "dt"),
    (lambda: nbody.integrate(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), np.ones((1, 2)), n_frames=1,
                             sample_freq=1), "loc"),
    (lambda: nbody.protocol_params("springs"), "protocol"),
    (lambda: nbody.protocol_params("egnn", sizes={"train": 0}), "sizes"),
    (lambda: nbody.protocol_params("egnn", sizes={"dev": 3}), "sizes"),
    (lambda: nbody.protocol_params("egnn", seed=-2), "seed"),
])
def test_bad_arguments_raise(call, name):
    with pytest.raises(ValueError, match=name):
        call()


SIZES = {"train": 4, "valid": 3, "test": 2}


def test_cache_round_trip_and_protocols(tmp_path):
    arrays, params = nbody.load_dataset("egnn", seed=1, sizes=SIZES, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    again, _ = nbody.load_dataset("egnn", seed=1, sizes=SIZES, cache_dir=tmp_path)   # read, not regenerated
    assert sorted(again) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], again[k])
    assert arrays["train_loc"].shape == (4, 49, 5, 3) and arrays["test_charges"].shape == (2, 5)
    ex = nbody.examples(arrays, params, "valid")
    np.testing.assert_array_equal(ex["pos"], arrays["valid_loc"][:, 30])
    np.testing.assert_array_equal(ex["target"], arrays["valid_loc"][:, 40])
    assert ex["mask"].all() and ex["charge"].shape == (3, 5)
    # the paper protocol (reconstructed): 5 frames = 500 steps ahead, relative targets
    parr, pparams = nbody.load_dataset("paper", seed=1, sizes=SIZES, cache_dir=tmp_path)
    ex = nbody.examples(parr, pparams, "train", epoch_seed=0)
    np.testing.assert_allclose(ex["target_rel_pos"], ex["target"] - ex["pos"])
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_damaged_or_mismatched_cache_raises(tmp_path):
    _, params = nbody.load_dataset("egnn", seed=2, sizes=SIZES, cache_dir=tmp_path)
    path = nbody.cache_path(params, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])                       # truncated
    with pytest.raises(ValueError, match="damaged"):
        nbody.load_dataset("egnn", seed=2, sizes=SIZES, cache_dir=tmp_path)
    arrays = nbody.generate_dataset(params)                        # a flipped value, hash left as it was
    nbody.save_dataset(path, params, arrays)
    with np.load(path) as f:
        content = {k: f[k] for k in f.files}
    content["train_loc"] = content["train_loc"].copy()
    content["train_loc"][0, 0, 0, 0] += 1.0
    np.savez(path, **content)
    with pytest.raises(ValueError, match="SHA-256"):
        nbody.load_dataset("egnn", seed=2, sizes=SIZES, cache_dir=tmp_path)
    other = nbody.protocol_params("egnn", seed=3, sizes=SIZES)     # a file under another request's name
    nbody.save_dataset(path, other, nbody.generate_dataset(other))
    with pytest.raises(ValueError, match="parameters"):
        nbody.load_dataset("egnn", seed=2, sizes=SIZES, cache_dir=tmp_path)

"""edm_jax.metrics statistics and reference files against frechet.npz and exact NumPy maths."""

import pickle

import numpy as np
import pytest

from edm_jax.metrics import refs, stats


@pytest.fixture(scope="module")
def fr(fixtures_dir):
    """The frechet.npz reference values (float64)."""
    with np.load(fixtures_dir / "frechet.npz") as f:
        return {k: f[k] for k in f.files}


def _stats(x: np.ndarray, chunks=(None,)) -> tuple[np.ndarray, np.ndarray]:
    acc = stats.FeatureStats(x.shape[1])
    for part in np.array_split(x, len(chunks)) if len(chunks) > 1 else [x]:
        acc.update(part)
    return acc.mu_sigma()


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_mu_sigma_match_fixture(fr, name):
    mu, sigma = _stats(fr[f"feats_{name}"])
    np.testing.assert_allclose(mu, fr[f"mu_{name}"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, fr[f"sigma_{name}"], rtol=0, atol=1e-12)


def test_streaming_equals_one_shot(fr):
    """Uneven chunks (1, 7, ... rows) and merged partial accumulators give np.cov's statistics."""
    x = fr["feats_a"]
    acc, other = stats.FeatureStats(64), stats.FeatureStats(64)
    for lo, hi in [(0, 1), (1, 8), (8, 250)]:
        acc.update(x[lo:hi])
    other.update(x[250:])
    mu, sigma = acc.merge(other).mu_sigma()
    np.testing.assert_allclose(mu, x.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=0, atol=1e-12)
    assert acc.n == 500


@pytest.mark.parametrize(
    "pair,rtol", [("ab", 1e-9), ("ba", 1e-9), ("ac", 1e-6)], ids=["ab", "ba", "ac_singular"]
)
def test_fid_matches_fixture(fr, pair, rtol):
    p, q = pair
    got = stats.frechet_distance(fr[f"mu_{p}"], fr[f"sigma_{p}"], fr[f"mu_{q}"], fr[f"sigma_{q}"])
    np.testing.assert_allclose(got, fr[f"fid_{pair}"], rtol=rtol)


def test_fid_of_a_set_with_itself_is_zero(fr):
    got = stats.frechet_distance(fr["mu_a"], fr["sigma_a"], fr["mu_a"], fr["sigma_a"])
    assert abs(got) < 1e-9 and abs(fr["fid_aa"]) < 1e-9


def test_kid_matches_k_diffusion(fr):
    a, b = fr["feats_a"], fr["feats_b"]
    np.testing.assert_allclose(stats.kid(a, b), fr["kid_kdiff"], rtol=1e-10)
    np.testing.assert_allclose(stats.squared_mmd(a, b), fr["mmd2_full_ab"], rtol=1e-10)
    small = int(fr["kid_kdiff_small_max_size"])
    np.testing.assert_allclose(stats.kid(a, b, max_size=small), fr["kid_kdiff_small"], rtol=1e-10)


def test_kid_partitions_round_half_to_even(fr):
    """The fixture's bounds (62.5 -> 62, 187.5 -> 188): KID of exactly those partitions."""
    a, b = fr["feats_a"], fr["feats_b"]
    ba, bb = fr["kid_kdiff_small_bounds_a"], fr["kid_kdiff_small_bounds_b"]
    parts = len(ba) - 1
    want = np.mean(
        [stats.squared_mmd(a[ba[i] : ba[i + 1]], b[bb[i] : bb[i + 1]]) for i in range(parts)]
    )
    assert 62 in ba and 188 in ba  # the public case hits .5 twice
    np.testing.assert_allclose(stats.kid(a, b, max_size=70), want, rtol=1e-12)


def test_kid_subsets_match_fixture(fr):
    a, b = fr["feats_a"], fr["feats_b"]
    mean, std, values = stats.kid_subsets(a, b, num_subsets=50, subset_size=100, seed=4711)
    np.testing.assert_allclose(values, fr["kid_subset_values"], rtol=1e-10)
    np.testing.assert_allclose(mean, fr["kid_subsets_mean"], rtol=1e-10)
    np.testing.assert_allclose(std, fr["kid_subsets_std"], rtol=1e-10)
    # the indices are default_rng(seed + 1)'s, all of a's subsets first
    rng = np.random.default_rng(4712)
    idx = [rng.choice(500, 100, replace=False) for _ in range(50)]
    np.testing.assert_array_equal(np.stack(idx), fr["kid_subset_idx_a"])


def test_inception_score_streamed_equals_stylegan_formula():
    """Streamed over uneven batches == StyleGAN2-ADA's split-wise formula on all probs."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=[53, 12]) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = probs[i * 53 // 10 : (i + 1) * 53 // 10]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    acc = stats.InceptionScore(53)
    for lo, hi in [(0, 4), (4, 17), (17, 53)]:
        acc.update(logits[lo:hi], lo)
    mean, std = acc.score()
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-12)


def test_fewer_than_two_images_is_a_clear_error():
    acc = stats.FeatureStats(4)
    acc.update(np.ones([1, 4]))
    with pytest.raises(ValueError, match="at least 2 images.*N=1"):
        acc.mu_sigma()
    with pytest.raises(ValueError, match=r"\[B, 4\], got shape \(2, 5\)"):
        acc.update(np.ones([2, 5]))


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
def test_reference_round_trip_bit_exact(tmp_path, fr, suffix):
    ref = {"fid": {"mu": fr["mu_a"], "sigma": fr["sigma_a"]}}
    if suffix == ".pkl":
        ref["fd_dinov2"] = {"mu": fr["mu_b"], "sigma": fr["sigma_b"]}
    else:
        ref["kid"] = {"features": fr["feats_c"].astype(np.float32)}
    path = refs.save_ref(tmp_path / f"ref{suffix}", ref)
    back = refs.load_ref(path)
    assert sorted(back) == sorted(ref)
    for metric, entry in ref.items():
        for key, value in entry.items():
            assert back[metric][key].dtype == value.dtype
            np.testing.assert_array_equal(back[metric][key], value)
    assert [p.name for p in tmp_path.iterdir()] == [f"ref{suffix}"]  # no temp file left


def test_edm_npz_and_edm2_pkl_layouts(tmp_path, fr):
    """edm fid-refs: keys mu, sigma; edm2 dataset-refs: a plain pickled dict of dicts."""
    np.savez(tmp_path / "edm.npz", mu=fr["mu_a"], sigma=fr["sigma_a"])
    assert refs.load_ref(tmp_path / "edm.npz")["fid"]["mu"].shape == (64,)
    edm2 = {
        "fid": {"mu": fr["mu_a"], "sigma": fr["sigma_a"]},
        "fd_dinov2": {"mu": fr["mu_b"], "sigma": fr["sigma_b"]},
    }
    with open(tmp_path / "edm2.pkl", "wb") as f:
        pickle.dump(edm2, f)
    back = refs.load_ref(tmp_path / "edm2.pkl")
    np.testing.assert_array_equal(back["fd_dinov2"]["sigma"], fr["sigma_b"])


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": _Evil()}}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        refs.load_ref(tmp_path / "evil.pkl")
    assert "pwned" not in capsys.readouterr().out


def test_reference_errors(tmp_path, fr):
    with pytest.raises(ValueError, match=r"must end in one of \['.npz', '.pkl'\]"):
        refs.load_ref(tmp_path / "ref.txt")
    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        refs.load_ref(tmp_path / "none.npz")
    ref = {"fid": {"mu": fr["mu_a"], "sigma": fr["sigma_a"]}}
    with pytest.raises(ValueError, match=r"size mu \(64,\).*gives 2048 features"):
        refs.check_ref(ref, "fid", 2048, "ref.npz")
    with pytest.raises(ValueError, match=r"no 'fd_dinov2' statistics.*\['fid'\]"):
        refs.check_ref(ref, "fd_dinov2", 64, "ref.npz")
    with pytest.raises(ValueError, match="no Inception features for KID"):
        refs.check_ref(ref, "kid", 64, "ref.npz")


def test_non_finite_statistics_are_a_clear_error(fr):
    sigma = fr["sigma_a"].copy()
    sigma[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.frechet_distance(fr["mu_a"], sigma, fr["mu_b"], fr["sigma_b"])

"""Candidates, selection, the reconstruct driver and the run metrics, each against an independent reference
written here with plain loops (or sklearn / scipy called directly)."""

import math
import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from recon.candidates import KINDS, class_candidates, class_stream, first_per_group, kmeans_candidates
from recon.dataset_io import Dataset
from recon.metrics import diversity, fold_ids, holdout_scores, proxy_mse
from recon.reconstruct import Params, parse_k, parse_seeds, reconstruct
from recon.scoring import RULES, pairwise_mse
from recon.selection import SelectionError, dedup, farthest_point, loo_proxy, mean_distance, select_class

SHAPE = (3, 4, 4)


# ----------------------------------------------------------------------------------------------- helpers


def mse(a, b) -> float:
    return float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())


def dist_matrix(a, b) -> np.ndarray:
    return np.array([[mse(x, y) for y in b] for x in a])


def rand_images(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def sk_kmeans(x: np.ndarray, k: int, rs: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=1, random_state=rs).fit(x.reshape(len(x), -1))


def small_dataset(per_class: int = 20, classes: int = 10, seed: int = 0) -> Dataset:
    """Class-dependent blobs, labels shuffled (code must not rely on the file being sorted by class)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    means = rng.random((classes, 3, 1, 1))
    imgs = means[labels] + 0.2 * rng.standard_normal((len(labels), *SHAPE))
    return Dataset(np.clip(imgs, 0, 1).astype(np.float32), labels.astype(np.int64))


# --------------------------------------------------------------------------------------- kmeans_candidates


@pytest.mark.parametrize("k,rs", [(1, 0), (3, 5), (6, 11), (40, 2)])
def test_kmeans_centroids_equal_sklearn(k, rs):
    x = rand_images(40, seed=rs)
    out = kmeans_candidates(x, k=k, random_state=rs)
    ref = np.clip(sk_kmeans(x, k, rs).cluster_centers_, 0.0, 1.0)
    cents, member = out["centroid"]
    assert cents.shape == (k, *SHAPE)
    assert cents.dtype == np.float32
    np.testing.assert_allclose(cents.reshape(k, -1), ref, rtol=0, atol=1e-6)
    assert (member == -1).all()
    assert set(out) == set(KINDS)


def test_kmeans_centroids_are_clipped_to_unit_range():
    # data outside [0, 1] so some raw centroids leave the range: the candidates must be clipped
    x = (rand_images(30, seed=3) * 3.0 - 1.0).astype(np.float32)
    raw = sk_kmeans(x, 4, 9).cluster_centers_
    assert raw.min() < 0.0 and raw.max() > 1.0  # the test really exercises the clip
    cents, _ = kmeans_candidates(x, k=4, random_state=9)["centroid"]
    assert cents.min() >= 0.0 and cents.max() <= 1.0
    np.testing.assert_allclose(cents.reshape(4, -1), np.clip(raw, 0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,rs", [(2, 0), (5, 1), (8, 4)])
def test_kmeans_nearest_and_medoid_match_brute_force(k, rs):
    x = rand_images(40, seed=100 + rs)
    flat = x.reshape(len(x), -1).astype(np.float64)
    km = sk_kmeans(x, k, rs)
    labels, centers = km.labels_, km.cluster_centers_.astype(np.float64)
    out = kmeans_candidates(x, k=k, random_state=rs)
    for j in range(k):
        members = [i for i in range(len(x)) if labels[i] == j]
        assert members, "test data should give non-empty clusters"
        # nearest: the member with the smallest distance to its centroid
        to_c = {i: float(((flat[i] - centers[j]) ** 2).sum()) for i in members}
        nearest = min(members, key=lambda i: (to_c[i], i))
        # medoid: the member with the least summed squared distance to the other members
        summed = {i: sum(mse(x[i], x[m]) for m in members if m != i) for i in members}
        medoid = min(members, key=lambda i: (summed[i], i))
        assert out["nearest"][1][j] == nearest, f"cluster {j}"
        assert out["medoid"][1][j] == medoid, f"cluster {j}"


@pytest.mark.parametrize("kind", ["medoid", "nearest"])
def test_kmeans_member_indices_point_at_their_rows(kind):
    x = rand_images(40, seed=7)
    k = 6
    labels = sk_kmeans(x, k, 3).labels_
    imgs, member = kmeans_candidates(x, k=k, random_state=3)[kind]
    assert imgs.shape == (k, *SHAPE) and member.shape == (k,)
    for j in range(k):
        assert 0 <= member[j] < len(x)
        assert labels[member[j]] == j  # the member of cluster j belongs to cluster j
        np.testing.assert_array_equal(imgs[j], x[member[j]])


def test_kmeans_accepts_precomputed_within_distances():
    x = rand_images(25, seed=8)
    a = kmeans_candidates(x, k=4, random_state=1)
    b = kmeans_candidates(x, k=4, random_state=1, d_within=dist_matrix(x, x))
    for kind in KINDS:
        np.testing.assert_array_equal(a[kind][1], b[kind][1])
        np.testing.assert_allclose(a[kind][0], b[kind][0], atol=0)


def test_kmeans_medoid_uses_the_given_within_distances():
    """Under squared distance the medoid coincides with the member nearest the centroid (sum_m |x_i - x_m|^2 =
    n |x_i - mu|^2 + const), so an arbitrary symmetric d_within is what tells the medoid computation apart."""
    x = rand_images(40, seed=9)
    r = np.random.default_rng(10).random((40, 40))
    d = r + r.T
    np.fill_diagonal(d, 0.0)
    labels = sk_kmeans(x, 5, 2).labels_
    out = kmeans_candidates(x, k=5, random_state=2, d_within=d)
    differs = False
    for j in range(5):
        members = [i for i in range(len(x)) if labels[i] == j]
        medoid = min(members, key=lambda i: (sum(d[i, m] for m in members), i))
        assert out["medoid"][1][j] == medoid, f"cluster {j}"
        np.testing.assert_array_equal(out["medoid"][0][j], x[medoid])
        differs |= medoid != out["nearest"][1][j]
    assert differs  # the test data really separates the two kinds


def test_kmeans_k_larger_than_class_raises():
    x = rand_images(5, seed=0)
    with pytest.raises(ValueError, match=r"pipeline\.k"):
        kmeans_candidates(x, k=6, random_state=0)


def test_kmeans_members_with_duplicate_images_belong_to_their_cluster():
    rng = np.random.default_rng(5)
    base = rng.random((3, *SHAPE), dtype=np.float32)
    x = base[rng.integers(0, 3, 10)]  # 10 images, only 3 distinct
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning about distinct clusters
        labels = sk_kmeans(x, 5, 0).labels_
        out = kmeans_candidates(x, k=5, random_state=0)
    present = np.unique(labels)  # empty clusters are dropped, the occupied ones renumbered in order
    assert len(out["centroid"][0]) == len(present)
    for kind in ("nearest", "medoid"):
        member = out[kind][1]
        assert [labels[m] for m in member] == present.tolist(), (kind, labels.tolist(), member.tolist())


# ---------------------------------------------------------------------------------------- first_per_group


def ref_first_per_group(groups, cost, n_groups):
    out = []
    for g in range(n_groups):
        members = [i for i in range(len(groups)) if groups[i] == g]
        out.append(min(members, key=lambda i: (cost[i], i)))  # lowest cost, ties -> lowest index
    return out


@pytest.mark.parametrize("seed", range(5))
def test_first_per_group_matches_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    n_groups = 6
    groups = rng.permutation(np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, 50)]))
    cost = rng.integers(0, 3, len(groups)).astype(np.float64)  # many ties on purpose
    got = first_per_group(groups, cost, n_groups)
    assert got.tolist() == ref_first_per_group(groups, cost, n_groups)
    # deterministic: same answer on a repeat call and with a float32 cost
    assert first_per_group(groups, cost, n_groups).tolist() == got.tolist()
    assert first_per_group(groups, cost.astype(np.float32), n_groups).tolist() == got.tolist()


def test_first_per_group_all_tied_takes_lowest_index():
    groups = np.array([1, 0, 1, 0, 2, 2, 1])
    cost = np.zeros(7)
    assert first_per_group(groups, cost, 3).tolist() == [1, 0, 4]


def test_first_per_group_unique_costs():
    groups = np.array([0, 1, 0, 1, 2, 0])
    cost = np.array([5.0, 2.0, 1.0, 3.0, 9.0, 4.0])
    assert first_per_group(groups, cost, 3).tolist() == [2, 1, 4]


# ---------------------------------------------------------------------------------------- class_candidates


def test_class_candidates_provenance_and_count():
    x = rand_images(30, seed=11)
    ks, seeds, cls, gs = (2, 4), (0, 5), 3, 7
    cand = class_candidates(x, cls=cls, ks=ks, seeds=seeds, global_seed=gs)
    assert len(cand) == sum(3 * k for k in ks for _ in seeds)
    assert cand.images.shape == (len(cand), *SHAPE) and cand.images.dtype == np.float32
    for f in ("cls", "seed", "k", "kind", "member"):
        assert len(getattr(cand, f)) == len(cand)
    assert (cand.cls == cls).all()
    for k in ks:
        for s in seeds:
            ref = kmeans_candidates(x, k=k, random_state=class_stream(gs, s, cls))
            for kind in KINDS:
                rows = np.flatnonzero((cand.k == k) & (cand.seed == s) & (cand.kind == kind))
                assert len(rows) == k
                np.testing.assert_array_equal(cand.images[rows], ref[kind][0])
                np.testing.assert_array_equal(cand.member[rows], ref[kind][1])
                for r in rows:
                    assert cand.provenance(int(r)) == {"class": cls, "seed": s, "k": k, "kind": kind}
    for i in range(len(cand)):
        if cand.kind[i] == "centroid":
            assert cand.member[i] == -1
        else:
            np.testing.assert_array_equal(cand.images[i], x[cand.member[i]])


def test_class_streams_differ_by_class_seed_and_global_seed():
    streams = {(g, s, c): class_stream(g, s, c) for g in (0, 1) for s in range(4) for c in range(10)}
    assert len(set(streams.values())) == len(streams)
    for s in range(4):
        assert class_stream(0, s, 1) != class_stream(0, s, 2)
    assert class_stream(3, 2, 1) == class_stream(3, 2, 1)
    assert all(isinstance(v, int) and v >= 0 for v in streams.values())


def test_class_candidates_use_the_class_stream():
    """The class id changes the k-means stream: cls=1 and cls=2 on the same data are the runs of their streams."""
    x = rand_images(40, seed=12)
    for cls in (1, 2):
        cand = class_candidates(x, cls=cls, ks=(5,), seeds=(0,))
        ref = sk_kmeans(x, 5, class_stream(0, 0, cls)).cluster_centers_
        cents = cand.images[cand.kind == "centroid"].reshape(5, -1)
        np.testing.assert_allclose(cents, np.clip(ref, 0, 1), atol=1e-6)


def test_class_candidates_deterministic():
    x = rand_images(30, seed=13)
    a = class_candidates(x, cls=4, ks=(3, 5), seeds=(0, 1, 2), global_seed=2)
    b = class_candidates(x, cls=4, ks=(3, 5), seeds=(0, 1, 2), global_seed=2)
    for f in ("images", "cls", "seed", "k", "kind", "member"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_candidates_take_and_concat_keep_rows_aligned():
    x = rand_images(20, seed=14)
    cand = class_candidates(x, cls=0, ks=(3,), seeds=(0, 1))
    idx = np.array([5, 0, 17, 9])
    sub = cand.take(idx)
    assert len(sub) == 4
    for j, i in enumerate(idx):
        assert sub.provenance(j) == cand.provenance(int(i))
        np.testing.assert_array_equal(sub.images[j], cand.images[i])
        assert sub.member[j] == cand.member[i]
    both = type(cand).concat([sub, cand.take(np.array([1]))])
    assert len(both) == 5 and both.provenance(4) == cand.provenance(1)


# ------------------------------------------------------------------------------------ loo_proxy / mean_dist


def test_loo_proxy_matches_loop():
    rng = np.random.default_rng(20)
    cls_imgs = rand_images(15, seed=21)
    member = np.array([7, 2, 11, 0, 14, -1, -1, -1, -1])
    images = np.concatenate([cls_imgs[member[:5]], rng.random((4, *SHAPE), dtype=np.float32)])
    got = loo_proxy(images, cls_imgs, member)
    for i in range(len(images)):
        if member[i] >= 0:
            ref = np.mean([mse(images[i], cls_imgs[j]) for j in range(15) if j != member[i]])
        else:
            ref = np.mean([mse(images[i], cls_imgs[j]) for j in range(15)])
        assert got[i] == pytest.approx(ref, rel=1e-9, abs=1e-12), i


def test_loo_proxy_excludes_the_members_own_row_not_a_neighbour():
    cls_imgs = np.stack([np.full(SHAPE, v, dtype=np.float32) for v in (0.0, 0.5, 1.0)])
    got = loo_proxy(cls_imgs[[1]], cls_imgs, np.array([1]))
    assert got[0] == pytest.approx(0.25)  # (0.25 + 0.25) / 2
    got_c = loo_proxy(cls_imgs[[1]], cls_imgs, np.array([-1]))
    assert got_c[0] == pytest.approx(0.5 / 3)


def test_mean_distance_matches_loop():
    cls_imgs = rand_images(12, seed=22)
    images = rand_images(5, seed=23)
    mu = cls_imgs.astype(np.float64).mean(axis=0)
    got = mean_distance(images, cls_imgs)
    for i in range(5):
        assert got[i] == pytest.approx(mse(images[i], mu), rel=1e-6)  # the mean is taken in float32


# ------------------------------------------------------------------------------------------------- dedup


def test_dedup_nonpositive_threshold_returns_order_unchanged():
    d = dist_matrix(rand_images(8, seed=30), rand_images(8, seed=30))
    order = np.array([3, 1, 7, 0, 2, 6, 5, 4])
    for t in (0.0, -1.0):
        np.testing.assert_array_equal(dedup(order, d, t), order)


@pytest.mark.parametrize("seed", range(4))
def test_dedup_properties(seed):
    x = rand_images(30, seed=31 + seed)
    d = dist_matrix(x, x)
    order = np.random.default_rng(seed).permutation(30)
    thr = float(np.median(d[np.triu_indices(30, 1)]))
    kept = dedup(order, d, thr).tolist()
    assert 1 < len(kept) < 30  # the threshold really drops something
    assert kept[0] == order[0]  # the first in priority order is always kept
    pos = {int(i): p for p, i in enumerate(order)}
    assert [pos[i] for i in kept] == sorted(pos[i] for i in kept)  # priority order preserved
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            assert d[kept[a], kept[b]] >= thr
    for i in order:  # dropped only if close to an item kept before it
        if int(i) not in kept:
            assert any(d[i, j] < thr for j in kept if pos[j] < pos[int(i)])
    # and it is exactly the greedy walk
    ref: list[int] = []
    for i in order:
        if all(d[i, j] >= thr for j in ref):
            ref.append(int(i))
    assert kept == ref


def test_dedup_drops_exact_duplicates():
    x = rand_images(4, seed=35)
    x = np.concatenate([x, x[[2, 0]]])  # rows 4, 5 duplicate rows 2, 0
    d = dist_matrix(x, x)
    assert dedup(np.array([5, 4, 3, 2, 1, 0]), d, 1e-6).tolist() == [5, 4, 3, 1]


# ----------------------------------------------------------------------------------------- farthest_point


def min_gain(i, ref, d, bonus=None):
    g = min(d[i, j] for j in ref)
    return g * (1.0 + bonus[i]) if bonus is not None else g


@pytest.mark.parametrize("seed", range(3))
def test_farthest_point_each_pick_maximises_min_distance(seed):
    x = rand_images(25, seed=40 + seed)
    d = dist_matrix(x, x)
    pool = np.random.default_rng(seed).permutation(25)[:18]
    picked = farthest_point(pool, d, 7)
    assert len(picked) == 7 and len(set(picked)) == 7
    assert picked[0] == pool[0]  # no start: begins at pool[0]
    assert set(picked) <= set(pool.tolist())
    for t in range(1, 7):
        rest = [int(i) for i in pool if int(i) not in picked[:t]]
        best = max(min_gain(i, picked[:t], d) for i in rest)
        assert min_gain(picked[t], picked[:t], d) == pytest.approx(best, rel=1e-12)


def test_farthest_point_respects_start():
    x = rand_images(20, seed=45)
    d = dist_matrix(x, x)
    pool = np.arange(20)
    start = [4, 11]
    picked = farthest_point(pool, d, 5, start=start)
    assert len(picked) == 5
    assert not set(picked) & set(start)  # never re-picks the start
    for t in range(5):
        ref = start + picked[:t]
        rest = [i for i in range(20) if i not in ref]
        best = max(min_gain(i, ref, d) for i in rest)
        assert min_gain(picked[t], ref, d) == pytest.approx(best, rel=1e-12)


def test_farthest_point_bounds():
    d = dist_matrix(rand_images(6, seed=46), rand_images(6, seed=46))
    assert farthest_point(np.arange(6), d, 0) == []
    assert sorted(farthest_point(np.arange(6), d, 10)) == list(range(6))  # n > pool: everything, once
    assert sorted(farthest_point(np.arange(6), d, 10, start=[0, 1])) == [2, 3, 4, 5]
    assert farthest_point(np.array([], dtype=int), d, 3) == []


def test_farthest_point_bonus_multiplies_gain():
    # 1-D positions 0, 10, 9: from start 0 the gains are 10 (item 1) and 9 (item 2)
    pos = np.array([0.0, 10.0, 9.0])
    d = np.abs(pos[:, None] - pos[None, :])
    assert farthest_point(np.arange(3), d, 1, start=[0]) == [1]
    # x (1 + 0.2): 9 * 1.2 = 10.8 > 10 -> item 2; an additive bonus (9.2 < 10) would still pick item 1
    assert farthest_point(np.arange(3), d, 1, start=[0], bonus=np.array([0.0, 0.0, 0.2])) == [2]
    # 9 * 1.1 = 9.9 < 10: still item 1
    assert farthest_point(np.arange(3), d, 1, start=[0], bonus=np.array([0.0, 0.0, 0.1])) == [1]


# ------------------------------------------------------------------------------------------- select_class


@pytest.fixture(scope="module")
def class_pool():
    x = rand_images(40, seed=50)
    cand = class_candidates(x, cls=0, ks=(4, 6), seeds=(0, 1, 2))
    return x, cand


def sel(cand, x, **kw):
    kw.setdefault("dedup_threshold", 0.0)
    kw.setdefault("ranking", "class_mean")
    return select_class(cand.images, cand.kind, cand.member, x, **kw)


def ref_mean_scores(images, x):
    mu = x.astype(np.float64).mean(axis=0)
    return np.array([mse(im, mu) for im in images])


@pytest.mark.parametrize("medoid_kind", ["nearest", "medoid"])
def test_select_ratio_half_quota(class_pool, medoid_kind):
    x, cand = class_pool
    idx = sel(cand, x, per_class=4, medoid_ratio=0.5, medoid_kind=medoid_kind)
    assert len(idx) == 4 and len(set(idx.tolist())) == 4
    kinds = cand.kind[idx].tolist()
    assert kinds == ["centroid", "centroid", medoid_kind, medoid_kind]
    # each quota is filled with the candidates of that kind nearest the class mean
    s = ref_mean_scores(cand.images, x)
    for kind, chosen in (("centroid", idx[:2]), (medoid_kind, idx[2:])):
        of_kind = np.flatnonzero(cand.kind == kind)
        np.testing.assert_allclose(np.sort(s[chosen]), np.sort(s[of_kind])[:2], rtol=1e-9)


@pytest.mark.parametrize("ratio,expect", [(0.0, "c"), (1.0, "m")])  # medoid_ratio = share of medoids
@pytest.mark.parametrize("medoid_kind", ["nearest", "medoid"])
def test_select_ratio_extremes(class_pool, ratio, expect, medoid_kind):
    x, cand = class_pool
    idx = sel(cand, x, per_class=5, medoid_ratio=ratio, medoid_kind=medoid_kind)
    assert len(idx) == 5
    want = "centroid" if expect == "c" else medoid_kind
    assert (cand.kind[idx] == want).all()


@pytest.mark.parametrize("ratio,per_class,n_m", [(0.6, 10, 6), (0.8, 10, 8), (0.25, 8, 2), (0.5, 6, 3)])
def test_select_ratio_counts(class_pool, ratio, per_class, n_m):
    x, cand = class_pool
    idx = sel(cand, x, per_class=per_class, medoid_ratio=ratio)
    assert (cand.kind[idx] == "nearest").sum() == n_m
    assert (cand.kind[idx] == "centroid").sum() == per_class - n_m


def test_select_short_centroid_pool_is_filled_with_medoids():
    x = rand_images(20, seed=51)
    images = np.concatenate([rand_images(2, seed=52), x[:6]])
    kinds = np.array(["centroid"] * 2 + ["nearest"] * 6, dtype=object)
    member = np.array([-1, -1, 0, 1, 2, 3, 4, 5])
    # ratio 0 asks for 4 centroids; only 2 exist, so 2 medoids (the 2 nearest the mean) fill the rest
    idx = select_class(images, kinds, member, x, per_class=4, medoid_ratio=0.0, dedup_threshold=0.0,
                       ranking="class_mean")
    assert len(idx) == 4
    assert sorted(idx[:2].tolist()) == [0, 1]
    s = ref_mean_scores(images, x)
    np.testing.assert_allclose(s[idx[2:]], np.sort(s[2:])[:2], rtol=1e-6)
    # and the other way round: ratio 1 with only 2 medoids
    kinds2 = np.array(["nearest"] * 2 + ["centroid"] * 6, dtype=object)
    member2 = np.array([0, 1, -1, -1, -1, -1, -1, -1])
    images2 = np.concatenate([x[:2], rand_images(6, seed=53)])
    idx2 = select_class(images2, kinds2, member2, x, per_class=4, medoid_ratio=1.0, dedup_threshold=0.0,
                        ranking="class_mean")
    assert sorted(idx2[2:].tolist()) == [0, 1] and (kinds2[idx2[:2]] == "centroid").all()


def test_select_free_blend_class_mean_is_nearest_the_mean(class_pool):
    x, cand = class_pool
    per_class = 6
    images = cand.images.copy()
    kinds = cand.kind.copy()
    # plant a 'medoid' exactly at the class mean: excluded by medoid_kind='nearest', so it must not be chosen
    planted = int(np.flatnonzero(kinds == "medoid")[0])
    images[planted] = x.mean(axis=0)
    idx = select_class(images, kinds, cand.member, x, per_class=per_class, medoid_ratio=None,
                       dedup_threshold=0.0, ranking="class_mean")
    assert planted not in idx.tolist()
    s = ref_mean_scores(images, x)
    eligible = np.flatnonzero((kinds == "centroid") | (kinds == "nearest"))
    assert set(idx.tolist()) <= set(eligible.tolist())
    np.testing.assert_allclose(s[idx], np.sort(s[eligible])[:per_class], rtol=1e-9)  # best first, in order
    # with medoid_kind='medoid' the planted candidate is the best there is
    idx_m = select_class(images, kinds, cand.member, x, per_class=per_class, medoid_ratio=None,
                         dedup_threshold=0.0, ranking="class_mean", medoid_kind="medoid")
    assert idx_m[0] == planted


def test_select_free_blend_proxy_ranking(class_pool):
    x, cand = class_pool
    idx = sel(cand, x, per_class=5, medoid_ratio=None, ranking="proxy")
    eligible = np.flatnonzero((cand.kind == "centroid") | (cand.kind == "nearest"))
    ref = np.array([
        np.mean([mse(cand.images[i], x[j]) for j in range(len(x)) if j != cand.member[i]]) for i in range(len(cand))
    ])
    np.testing.assert_allclose(ref[idx], np.sort(ref[eligible])[:5], rtol=1e-9)


def test_select_free_blend_farthest(class_pool):
    x, cand = class_pool
    thr = 1e-4  # drop exact repeats so the max-min gains are non-zero
    idx = sel(cand, x, per_class=5, medoid_ratio=None, ranking="farthest", dedup_threshold=thr).tolist()
    assert len(idx) == 5 and len(set(idx)) == 5
    # reference pool: eligible kinds ranked by distance to the class mean, then a greedy dedup walk
    s = ref_mean_scores(cand.images, x)
    d = dist_matrix(cand.images, cand.images)
    eligible = [i for i in range(len(cand)) if cand.kind[i] in ("centroid", "nearest")]
    pool: list[int] = []
    for i in sorted(eligible, key=lambda i: (s[i], i)):
        if all(d[i, j] >= thr for j in pool):
            pool.append(i)
    assert set(idx) <= set(pool)
    assert s[idx[0]] == pytest.approx(s[pool[0]], rel=1e-9)  # starts from the one nearest the mean
    for t in range(1, 5):
        best = max(min_gain(i, idx[:t], d) for i in pool if i not in idx[:t])
        assert min_gain(idx[t], idx[:t], d) == pytest.approx(best, rel=1e-6)


def test_select_farthest_with_ratio_picks_centroids_then_medoids(class_pool):
    x, cand = class_pool
    idx = sel(cand, x, per_class=6, medoid_ratio=0.5, ranking="farthest", dedup_threshold=1e-4)
    assert cand.kind[idx].tolist() == ["centroid"] * 3 + ["nearest"] * 3
    d = pairwise_mse(cand.images[idx], cand.images[idx])
    assert d[np.triu_indices(6, 1)].min() >= 1e-4


def test_select_dedup_threshold_is_respected(class_pool):
    x, cand = class_pool
    d_all = dist_matrix(cand.images, cand.images)
    thr = float(np.quantile(d_all[np.triu_indices(len(cand), 1)], 0.2))
    idx = sel(cand, x, per_class=4, medoid_ratio=None, dedup_threshold=thr)
    for a in range(4):
        for b in range(a + 1, 4):
            assert d_all[idx[a], idx[b]] >= thr


def test_select_too_few_after_dedup_raises(class_pool):
    x, cand = class_pool
    with pytest.raises(SelectionError, match=r"dedup_threshold"):
        sel(cand, x, per_class=4, medoid_ratio=None, dedup_threshold=10.0)


def test_select_invalid_ranking_raises(class_pool):
    x, cand = class_pool
    with pytest.raises(SelectionError, match=r"pipeline\.ranking"):
        sel(cand, x, per_class=4, medoid_ratio=None, ranking="random")


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_select_invalid_ratio_raises(class_pool, ratio):
    x, cand = class_pool
    with pytest.raises(SelectionError, match=r"medoid_ratio"):
        sel(cand, x, per_class=4, medoid_ratio=ratio)


def test_selection_error_is_a_value_error():
    assert issubclass(SelectionError, ValueError)


# ---------------------------------------------------------------------------------- parse_seeds / parse_k


def test_parse_seeds_valid():
    assert parse_seeds(1) == (0,)
    assert parse_seeds(4) == (0, 1, 2, 3)
    assert parse_seeds([5, 2, 9]) == (5, 2, 9)
    assert parse_seeds((0,)) == (0,)


@pytest.mark.parametrize("bad", [0, -3, [], (), True, False])
def test_parse_seeds_rejects(bad):
    with pytest.raises(ValueError, match=r"pipeline\.seeds"):
        parse_seeds(bad)


def test_parse_seeds_rejects_negative_seed_in_list():
    with pytest.raises(ValueError, match=r"pipeline\.seeds"):
        parse_seeds([3, -1])


def test_parse_k_valid():
    assert parse_k(10) == (10,)
    assert parse_k([8, 10, 12, 15]) == (8, 10, 12, 15)
    assert parse_k((1,)) == (1,)


@pytest.mark.parametrize("bad", [0, -2, [], (), [4, 0], [3, -1], False])
def test_parse_k_rejects(bad):
    with pytest.raises(ValueError, match=r"pipeline\.k"):
        parse_k(bad)


def test_parse_k_rejects_true():
    with pytest.raises(ValueError, match=r"pipeline\.k"):
        parse_k(True)


# ------------------------------------------------------------------------------------------- reconstruct


@pytest.fixture(scope="module")
def small_rec():
    aux = small_dataset()
    p = Params(k=(4,), seeds=(0, 1), per_class=3)
    return aux, p, reconstruct(aux, p, progress=False)


def test_reconstruct_shapes_and_labels(small_rec):
    aux, p, rec = small_rec
    assert rec.images.shape == (30, *SHAPE) and rec.images.dtype == np.float32
    assert rec.labels.dtype == np.int64
    np.testing.assert_array_equal(rec.labels, rec.chosen.cls)
    assert np.bincount(rec.labels, minlength=10).tolist() == [3] * 10
    assert sorted(rec.pool) == list(range(10))
    assert all(len(rec.pool[c]) == 3 * 4 * 2 for c in range(10))
    assert set(rec.chosen.kind.tolist()) <= {"centroid", "nearest"}  # default medoid_kind


def test_reconstruct_images_come_from_their_class(small_rec):
    aux, p, rec = small_rec
    for i in range(len(rec.images)):
        c = int(rec.labels[i])
        prov = rec.chosen.provenance(i)
        assert prov["class"] == c and prov["k"] == 4 and prov["seed"] in (0, 1)
        xc = aux.of_class(c)
        if prov["kind"] == "centroid":
            ref = sk_kmeans(xc, 4, class_stream(0, prov["seed"], c)).cluster_centers_
            dist = [mse(rec.images[i].ravel(), np.clip(r, 0, 1)) for r in ref]
            assert min(dist) < 1e-12, (i, prov)
        else:
            m = int(rec.chosen.member[i])
            np.testing.assert_array_equal(rec.images[i], xc[m])
            assert any(np.array_equal(rec.images[i], y) for y in aux.images[aux.labels == c])


def test_reconstruct_changing_one_class_leaves_others_alone(small_rec):
    aux, p, rec = small_rec
    imgs = aux.images.copy()
    imgs[aux.labels == 7] = np.random.default_rng(99).random(((aux.labels == 7).sum(), *SHAPE), dtype=np.float32)
    rec2 = reconstruct(Dataset(imgs, aux.labels), p, progress=False)
    other = rec.labels != 7
    np.testing.assert_array_equal(rec2.images[other], rec.images[other])
    assert not np.array_equal(rec2.images[rec.labels == 7], rec.images[rec.labels == 7])


def test_reconstruct_selection_error_names_the_class():
    aux = small_dataset()
    with pytest.raises(SelectionError, match=r"class 0:.*dedup_threshold"):
        reconstruct(aux, Params(k=(4,), seeds=(0,), per_class=3, dedup_threshold=10.0), progress=False)


def test_reconstruct_k_larger_than_class_raises():
    aux = small_dataset(per_class=5)
    with pytest.raises(ValueError, match=r"pipeline\.k"):
        reconstruct(aux, Params(k=(6,), seeds=(0,), per_class=3), progress=False)


# ----------------------------------------------------------------------------------------------- metrics


def test_proxy_mse_matches_loop():
    aux = small_dataset(per_class=8, seed=3)
    rng = np.random.default_rng(4)
    images = rng.random((30, *SHAPE), dtype=np.float32)
    labels = np.repeat(np.arange(10), 3)
    got = proxy_mse(images, labels, aux)
    assert set(got) == {"proxy_mse"} | {f"proxy_mse_c{c}" for c in range(10)}
    per = []
    for c in range(10):
        t = [aux.images[j] for j in range(len(aux)) if aux.labels[j] == c]
        per.append(np.mean([min(mse(s, y) for y in t) for s, lab in zip(images, labels) if lab == c]))
        assert got[f"proxy_mse_c{c}"] == pytest.approx(per[-1], rel=1e-9)
    assert got["proxy_mse"] == pytest.approx(np.mean(per), rel=1e-9)


def test_proxy_mse_member_scores_zero():
    aux = small_dataset(per_class=6, seed=5)
    images = np.stack([aux.of_class(c)[0] for c in range(10)])
    got = proxy_mse(images, np.arange(10), aux)
    assert got["proxy_mse"] == pytest.approx(0.0, abs=1e-9)


def test_diversity_matches_loop():
    rng = np.random.default_rng(6)
    images = rng.random((40, *SHAPE), dtype=np.float32)
    labels = rng.permutation(np.repeat(np.arange(10), 4))
    got = diversity(images, labels)
    means, mins = [], []
    for c in range(10):
        x = [images[i] for i in range(40) if labels[i] == c]
        pairs = [mse(x[a], x[b]) for a in range(len(x)) for b in range(a + 1, len(x))]
        means.append(np.mean(pairs))
        mins.append(min(pairs))
        assert got[f"diversity_mean_pairwise_mse_c{c}"] == pytest.approx(means[-1], rel=1e-9)
        assert got[f"diversity_min_pairwise_mse_c{c}"] == pytest.approx(mins[-1], rel=1e-9)
    assert got["diversity_mean_pairwise_mse"] == pytest.approx(np.mean(means), rel=1e-9)
    assert got["diversity_min_pairwise_mse"] == pytest.approx(np.mean(mins), rel=1e-9)


def test_diversity_single_image_per_class_is_zero():
    images = rand_images(10, seed=7)
    got = diversity(images, np.arange(10))
    assert got["diversity_mean_pairwise_mse"] == 0.0 and got["diversity_min_pairwise_mse"] == 0.0


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_fold_ids_stratified_and_deterministic(folds):
    rng = np.random.default_rng(8)
    labels = rng.permutation(np.repeat(np.arange(4), [7, 10, 13, 20]))
    ids = fold_ids(labels, folds, seed=3)
    assert ids.shape == labels.shape and ids.min() >= 0 and ids.max() < folds
    for c in range(4):
        counts = [int(((labels == c) & (ids == f)).sum()) for f in range(folds)]
        assert sum(counts) == (labels == c).sum()
        assert max(counts) - min(counts) <= 1, (c, counts)
    np.testing.assert_array_equal(fold_ids(labels, folds, seed=3), ids)
    assert not np.array_equal(fold_ids(labels, folds, seed=4), ids)


@pytest.fixture(scope="module")
def holdout_setup():
    aux = small_dataset(per_class=20, seed=9)
    p = Params(k=(3,), seeds=(0,), per_class=3)
    return aux, p, holdout_scores(aux, builder(p), per_class=3, folds=2, seed=0)


def builder(p):
    def build(d):
        rec = reconstruct(d, p, progress=False)
        return rec.images, rec.labels

    return build


def test_holdout_scores_keys_and_values(holdout_setup):
    aux, p, got = holdout_setup
    want = {f"holdout_{r}" for r in RULES} | {f"holdout_{r}_c{c}" for r in RULES for c in range(10)}
    assert set(got) == want
    assert set(RULES) == {"nearest", "matching", "matching_train", "coverage"}
    for key, v in got.items():
        assert math.isfinite(v) and v >= 0, key
    for r in RULES:
        assert got[f"holdout_{r}"] == pytest.approx(np.mean([got[f"holdout_{r}_c{c}"] for c in range(10)]))
        # one-to-one matchings can only cost more than each image's nearest held-out image
        for c in range(10):
            assert got[f"holdout_matching_c{c}"] >= got[f"holdout_nearest_c{c}"] - 1e-12
            assert got[f"holdout_matching_train_c{c}"] >= got[f"holdout_nearest_c{c}"] - 1e-12


def test_holdout_scores_deterministic(holdout_setup):
    aux, p, got = holdout_setup
    assert holdout_scores(aux, builder(p), per_class=3, folds=2, seed=0) == got


def test_holdout_nearest_and_matching_train_match_manual_cross_fit(holdout_setup):
    aux, p, got = holdout_setup
    ids = fold_ids(aux.labels, 2, 0)
    nearest = np.zeros((2, 10))
    matching_train = np.zeros((2, 10))
    for f in range(2):
        train = Dataset(aux.images[ids != f], aux.labels[ids != f])
        held = Dataset(aux.images[ids == f], aux.labels[ids == f])
        rec = reconstruct(train, p, progress=False)
        for c in range(10):
            s, t = rec.images[rec.labels == c], held.of_class(c)
            d = dist_matrix(s, t)
            nearest[f, c] = np.mean([min(row) for row in d])
            r, col = linear_sum_assignment(d)
            matching_train[f, c] = d[r, col].mean()
    for c in range(10):
        assert got[f"holdout_nearest_c{c}"] == pytest.approx(nearest[:, c].mean(), rel=1e-6)
        assert got[f"holdout_matching_train_c{c}"] == pytest.approx(matching_train[:, c].mean(), rel=1e-6)

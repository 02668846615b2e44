"""The label-set kNN graph against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from retdmctl.knn import build_graph, knn_search, read_graph, write_graph


def _brute(label_sets: np.ndarray, k: int):
    out = []
    for i, u in enumerate(label_sets):
        d = ((label_sets - u) ** 2).sum(axis=1)
        cand = [j for j in range(len(label_sets)) if j != i]
        cand.sort(key=lambda j: (d[j], j))  # ties by index
        out.append(cand[:k])
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
def test_graph_matches_brute_force_with_deterministic_ties(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random((300, 9)) < 0.3).astype(np.uint8)
    train = np.sort(rng.choice(300, 240, replace=False))
    g = build_graph(labels, train, k=10)
    # U is the sorted set of distinct training label vectors
    assert np.array_equal(g.label_sets, np.unique(labels[train], axis=0))
    assert np.array_equal(g.neighbors, _brute(g.label_sets.astype(int), 10))
    d = np.sqrt(((g.label_sets[:, None, :].astype(int) - g.label_sets[g.neighbors].astype(int)) ** 2).sum(-1))
    assert np.allclose(g.distances, d)
    # never a neighbour identical to the label set itself
    assert not (g.neighbors == np.arange(len(g.label_sets))[:, None]).any()


def test_set_members_are_exactly_the_training_images_with_that_label_set():
    rng = np.random.default_rng(5)
    labels = (rng.random((100, 4)) < 0.4).astype(np.uint8)
    train = np.arange(0, 100, 2)
    g = build_graph(labels, train, k=3)
    for s in range(len(g.label_sets)):
        members = g.set_members[g.set_ptr[s] : g.set_ptr[s + 1]]
        want = [i for i in train if np.array_equal(labels[i], g.label_sets[s])]
        assert list(members) == want
        assert (g.image_set[members] == s).all()
    assert (g.image_set[1::2] == -1).all()  # not training rows


def test_k_is_capped_by_the_number_of_other_label_sets():
    labels = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.uint8)
    g = build_graph(labels, np.arange(4), k=10)
    assert g.k == 2
    # U = [01, 10, 11]: 11 is nearer (1) than the other single label (sqrt 2)
    assert g.neighbors.tolist() == [[2, 1], [2, 0], [0, 1]]


def test_queries_outside_the_base_and_round_trip(tmp_path):
    base = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=np.uint8)
    nbrs, dist = knn_search(base, np.array([[0, 1, 1], [1, 0, 0]]), k=2)
    assert nbrs.tolist() == [[0, 2], [0, 2]]  # the identical row 1 is excluded for the first query
    assert np.allclose(dist, [[1, 1], [np.sqrt(2), np.sqrt(2)]])
    g = build_graph(np.array([[1, 0], [0, 1], [1, 1]], dtype=np.uint8), np.arange(3), k=1)
    write_graph(tmp_path / "knn.h5", g, {"knn": {"k": 1}})
    back = read_graph(tmp_path / "knn.h5")
    assert np.array_equal(back.neighbors, g.neighbors) and np.array_equal(back.set_members, g.set_members)


def test_fewer_than_two_label_sets_is_an_error():
    with pytest.raises(ValueError, match="fewer than 2 distinct label sets"):
        build_graph(np.ones((5, 3), dtype=np.uint8), np.arange(5), k=2)


# --- approximate indexes ---------------------------------------------------------------

from retdmctl import knn as knn_mod  # noqa: E402
from retdmctl.knn import pack_bits, resolve_index, search  # noqa: E402


def _sparse_label_sets(n_draw: int, num_labels: int, seed: int) -> np.ndarray:
    """Distinct sparse label sets with a Zipf-like label frequency (as bench/knn.py)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_labels + 1)
    p /= p.sum()
    x = np.zeros((n_draw, num_labels), dtype=np.uint8)
    for i in range(n_draw):
        x[i, rng.choice(num_labels, rng.integers(2, 7), replace=False, p=p)] = 1
    return np.unique(x, axis=0)


def _tie_aware_recall(sets: np.ndarray, nbrs: np.ndarray, k: int) -> float:
    x = sets.astype(np.int64)
    sq = x.sum(1)
    d = sq[:, None] + sq[None, :] - 2 * (x @ x.T)  # squared distances of 0/1 vectors
    np.fill_diagonal(d, 10**9)
    kth = np.sort(d, axis=1)[:, k - 1]
    got = np.take_along_axis(d, nbrs, 1)
    return float((got <= kth[:, None]).mean())


def test_packed_bits_hamming_is_the_squared_distance():
    rng = np.random.default_rng(0)
    x = (rng.random((50, 83)) < 0.2).astype(np.uint8)
    codes = pack_bits(x)
    assert codes.shape == (50, 16)  # 83 bits -> 11 bytes -> padded to 16
    ham = np.unpackbits(codes[:, None, :] ^ codes[None, :, :], axis=-1).sum(-1)
    assert np.array_equal(ham, ((x[:, None, :].astype(int) - x[None, :, :]) ** 2).sum(-1))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_graphs_are_valid_reproducible_and_near_exact(kind):
    sets = _sparse_label_sets(2000, 40, seed=1)
    labels = np.repeat(sets, 2, axis=0)  # two images per label set
    train = np.arange(len(labels))
    g = build_graph(labels, train, k=10, index=kind)
    again = build_graph(labels, train, k=10, index=kind)
    assert np.array_equal(g.neighbors, again.neighbors)  # seeded, thread-independent
    assert g.index["kind"] == kind and g.index["requested"] == kind
    n = len(g.label_sets)
    assert not (g.neighbors == np.arange(n)[:, None]).any()
    assert all(len(set(row)) == 10 for row in g.neighbors.tolist())
    # neighbours sorted by (distance, index); distances exact for the returned sets
    x = g.label_sets.astype(int)
    d2 = ((x[:, None, :] - x[g.neighbors]) ** 2).sum(-1)
    assert np.allclose(g.distances, np.sqrt(d2))
    assert (np.diff(d2, axis=1) >= 0).all()
    same = np.diff(d2, axis=1) == 0
    assert (np.diff(g.neighbors, axis=1)[same] > 0).all()
    assert _tie_aware_recall(g.label_sets, g.neighbors, 10) >= 0.95


def test_auto_is_exact_below_the_threshold_and_ivf_beyond(monkeypatch):
    assert resolve_index("auto", knn_mod.AUTO_EXACT_MAX - 1) == "exact"
    assert resolve_index("auto", knn_mod.AUTO_EXACT_MAX) == "ivf"
    with pytest.raises(ValueError, match="knn.index"):
        resolve_index("annoy", 10)
    rng = np.random.default_rng(2)
    labels = (rng.random((400, 12)) < 0.3).astype(np.uint8)
    train = np.arange(400)
    exact = build_graph(labels, train, k=5, index="exact")
    auto = build_graph(labels, train, k=5, index="auto")
    assert auto.index == {"requested": "auto", "kind": "exact"}
    assert np.array_equal(exact.neighbors, auto.neighbors) and np.array_equal(exact.distances, auto.distances)
    monkeypatch.setattr(knn_mod, "AUTO_EXACT_MAX", 10)
    assert build_graph(labels, train, k=5, index="auto").index["kind"] == "ivf"


def test_index_is_recorded_in_knn_h5(tmp_path):
    sets = _sparse_label_sets(1500, 30, seed=3)
    g = build_graph(sets, np.arange(len(sets)), k=5, index="ivf")
    write_graph(tmp_path / "knn.h5", g, {"knn": {"k": 5, "index": "ivf"}})
    back = read_graph(tmp_path / "knn.h5")
    assert back.index == g.index and {"nlist", "nprobe", "window", "seed"} <= set(back.index)
    assert np.array_equal(back.neighbors, g.neighbors)


def test_approximate_search_of_outside_queries():
    sets = _sparse_label_sets(2000, 30, seed=4)
    queries = sets[::7]
    exact_n, exact_d, _ = search(sets, queries, 5, "exact")
    for kind in ("ivf", "hnsw"):
        nbrs, dist, info = search(sets, queries, 5, kind)
        assert info["kind"] == kind
        # the k-th distance never beats exact; almost always equals it
        assert (dist[:, -1] >= exact_d[:, -1] - 1e-6).all()
        assert np.mean(np.isclose(dist[:, -1], exact_d[:, -1])) > 0.95


def test_ivf_graph_does_not_depend_on_the_thread_count():
    import faiss
    import torch

    sets = _sparse_label_sets(1500, 30, seed=6)
    train = np.arange(len(sets))
    threads = (faiss.omp_get_max_threads(), torch.get_num_threads())
    try:
        faiss.omp_set_num_threads(1)
        torch.set_num_threads(1)
        one = build_graph(sets, train, k=8, index="ivf")
    finally:
        faiss.omp_set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    many = build_graph(sets, train, k=8, index="ivf")
    assert np.array_equal(one.neighbors, many.neighbors)

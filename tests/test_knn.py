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

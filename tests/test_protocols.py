"""Missing-label protocols: fractions, determinism, training rows only."""

from __future__ import annotations

import numpy as np
import pytest

from retdmctl.data.protocols import (
    PROTOCOLS,
    apply_protocol,
    hide_entries,
    keep_positives,
    single_positive,
)
from retdmctl.errors import ConfigError


def _labels(n=200, l=12, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, l)) < 0.3).astype(np.uint8)
    labels[0] = 0  # a training row with no positive
    labels[1] = 0
    labels[1, 4] = 1  # a training row with exactly one positive
    return labels


ROWS = np.arange(0, 150)
OTHER = np.arange(150, 200)


def _check_pu(obs, labels):
    """keep/single: training rows hold only 1 (a true positive) or -1; others untouched."""
    assert obs.dtype == np.int8 and obs.shape == labels.shape
    tr = obs[ROWS]
    assert set(np.unique(tr)) <= {-1, 1}
    assert np.all(labels[ROWS][tr == 1] == 1)
    np.testing.assert_array_equal(obs[OTHER], labels[OTHER])


@pytest.mark.parametrize("p", [0.75, 0.4])
def test_keep_positives_fraction_per_image(p):
    labels = _labels()
    obs = keep_positives(labels, ROWS, p, seed=3)
    _check_pu(obs, labels)
    k = labels[ROWS].sum(axis=1)
    kept = (obs[ROWS] == 1).sum(axis=1)
    want = np.where(k > 0, np.maximum(1, np.round(p * k)), 0)
    np.testing.assert_array_equal(kept, want)
    assert kept[1] == 1  # the single positive survives (round(0.4) = 0 -> at least one)
    assert np.all(obs[0] == -1)  # no positive: everything unknown


def test_single_positive():
    labels = _labels()
    obs = single_positive(labels, ROWS, seed=1)
    _check_pu(obs, labels)
    kept = (obs[ROWS] == 1).sum(axis=1)
    np.testing.assert_array_equal(kept, (labels[ROWS].sum(axis=1) > 0).astype(int))
    assert obs[1, 4] == 1


def test_single_positive_is_uniform():
    labels = np.zeros((3000, 4), dtype=np.uint8)
    labels[:, :3] = 1
    obs = single_positive(labels, np.arange(3000), seed=0)
    freq = (obs == 1).mean(axis=0)
    np.testing.assert_allclose(freq[:3], 1 / 3, atol=0.04)
    assert freq[3] == 0


def test_hide_entries_fraction():
    labels = _labels()
    obs = hide_entries(labels, ROWS, 0.3, seed=2)
    tr = obs[ROWS]
    hidden = tr == -1
    assert hidden.sum() == round(0.3 * ROWS.size * labels.shape[1])
    np.testing.assert_array_equal(tr[~hidden], labels[ROWS][~hidden])
    # positives and negatives alike
    pos = labels[ROWS] == 1
    assert 0.2 < hidden[pos].mean() < 0.4 and 0.2 < hidden[~pos].mean() < 0.4
    np.testing.assert_array_equal(obs[OTHER], labels[OTHER])


@pytest.mark.parametrize("name,p", [("keep", 0.5), ("single", 0.0), ("hide", 0.5)])
def test_deterministic_for_a_seed_and_different_across_seeds(name, p):
    labels = _labels()
    a = apply_protocol(labels, ROWS, name, p, seed=7)
    b = apply_protocol(labels, ROWS, name, p, seed=7)
    c = apply_protocol(labels, ROWS, name, p, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the order rows are given in does not matter
    np.testing.assert_array_equal(a, apply_protocol(labels, ROWS[::-1], name, p, seed=7))


def test_full_and_dispatch():
    labels = _labels()
    full = apply_protocol(labels, ROWS, "full", 0.0, seed=0)
    assert full.dtype == np.int8
    np.testing.assert_array_equal(full, labels)
    np.testing.assert_array_equal(apply_protocol(labels, ROWS, "keep", 0.4, 5),
                                  keep_positives(labels, ROWS, 0.4, 5))
    assert PROTOCOLS == ("full", "keep", "single", "hide")
    with pytest.raises(ConfigError, match="known: full, keep, single, hide"):
        apply_protocol(labels, ROWS, "drop", 0.5, 0)
    with pytest.raises(ConfigError):
        keep_positives(labels, ROWS, 1.5, 0)
    with pytest.raises(ConfigError):
        hide_entries(labels, ROWS, -0.1, 0)
    with pytest.raises(ConfigError):
        keep_positives(labels, np.array([500]), 0.5, 0)


def test_input_not_modified():
    labels = _labels()
    before = labels.copy()
    keep_positives(labels, ROWS, 0.5, 0)
    hide_entries(labels, ROWS, 0.5, 0)
    np.testing.assert_array_equal(labels, before)

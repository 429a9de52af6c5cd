import math

import numpy as np
import pytest
import torch
from torch import nn

from protectors.core import lock
from protectors.core.kinds.neuron_mask import Password, apply_password, rank_neurons, select_neurons
from protectors.edgepro import lock_step


def test_selection_count_pool_and_every_index_eligible():
    ranking = np.arange(100)[::-1].copy()  # neuron 99 ranks first
    seen = set()
    for s in range(200):
        chosen = select_neurons(ranking, gamma=0.1, pool=0.3, rng=np.random.default_rng(s))
        assert len(chosen) == 10 == len(set(chosen))
        assert set(chosen) <= set(ranking[:30].tolist())
        seen |= set(chosen)
    assert seen == set(ranking[:30].tolist())
    # index 0 can be chosen when it ranks high (the public code's bug: it never could)
    assert 0 in set().union(*(select_neurons(np.arange(10), 0.1, 0.3, np.random.default_rng(s)) for s in range(50)))
    assert select_neurons(np.arange(6), 0.1, 0.3, np.random.default_rng(0)) in ([0], [1])  # LeNet conv1: 1 of 6


def test_selection_prefers_higher_ranks():
    ranking = np.arange(100)
    counts = np.zeros(100)
    for s in range(500):
        counts[select_neurons(ranking, 0.1, 0.3, np.random.default_rng(s))] += 1
    assert counts[:10].sum() > counts[20:30].sum()


def test_ranking_is_mean_over_all_positions():
    conv = nn.Sequential(nn.Identity())
    x = torch.zeros(4, 3, 5, 5)
    x[:, 2] = 1.0  # channel 2 is active everywhere
    x[:, 0, 0, 4] = 3.0  # channel 0 fires off the diagonal only: a diagonal-only sum would rank it last
    x[:, 1, 0, 1] = 0.5
    r = rank_neurons(conv, ["0"], x)["0"]
    assert r.tolist() == [2, 0, 1]


def test_password_mask_and_keyspace():
    pw = Password({"a": [1, 3]}, {"a": 5}, lock_value=0.0, scale=2.0)
    assert pw.mask("a").tolist() == [2.0, 0.0, 2.0, 0.0, 2.0]
    assert pw.keyspace_bits() == pytest.approx(math.log2(10))
    assert Password.from_bytes(pw.to_bytes(), "x") == pw


def test_lock_step_masks_only_locked_samples_and_randomizes_released_labels():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    sites = lock.install(model, ["1"])
    pw = Password({"1": [2]}, {"1": 6})
    seen = {}
    orig = sites["1"].forward

    def spy(x):
        seen["mask"] = sites["1"].batch_mask.clone()
        return orig(x)

    sites["1"].forward = spy
    step = lock_step(sites, pw, 3, 0.5, torch.Generator().manual_seed(0))
    loss = step(model, torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    assert loss.requires_grad
    m = seen["mask"]
    locked = m[:, 2] == 0
    assert locked.sum() == 4  # exactly half of the batch
    assert torch.all(m[locked][:, [0, 1, 3, 4, 5]] == 1) and torch.all(m[~locked] == 1)
    assert sites["1"].batch_mask is None  # cleared after the step


def test_inference_mask_is_in_place_and_lock_removal_restores_keys():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    keys = list(model.state_dict())
    apply_password(model, Password({"1": [0, 5]}, {"1": 6}))
    with torch.no_grad():
        h = model[1](torch.ones(2, 4) @ torch.ones(4, 6) + 1)
    assert torch.all(h[:, [0, 5]] == 0) and torch.all(h[:, 1:5] > 0)
    lock.remove(model)
    assert list(model.state_dict()) == keys

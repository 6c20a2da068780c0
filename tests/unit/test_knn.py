"""Weighted k-NN on synthetic features: separable clusters, weighting, k beyond the bank."""

from __future__ import annotations

import math

import torch

from pipeline.eval.knn import knn_counts


def _clusters(n_per: int, classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_separable_clusters_are_classified_perfectly():
    bank, bank_labels = _clusters(20, 5, 16, 0.1, seed=0)
    queries, query_labels = _clusters(8, 5, 16, 0.1, seed=0)  # same centres, fresh noise
    queries = queries + 0.01 * torch.randn_like(queries)
    counts = knn_counts(bank, bank_labels, queries, query_labels, [1, 10], 0.07, 5, chunk=7)
    assert counts == {1: (40, 40), 10: (40, 40)}


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # One query along x; neighbours: one of class 0 right on it, two of class 1 further off.
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    # weight(class 0) = e^(1/T); weight(class 1) = 2 e^(0.6/T): class 1 wins iff T > 0.4/ln 2.
    t_switch = 0.4 / math.log(2)
    low = knn_counts(bank, labels, query, torch.tensor([0]), [3], t_switch * 0.9, 2)
    high = knn_counts(bank, labels, query, torch.tensor([0]), [3], t_switch * 1.1, 2)
    assert low[3] == (1, 1) and high[3] == (0, 1)
    # With k = 1 only the nearest votes, whatever the temperature.
    assert knn_counts(bank, labels, query, torch.tensor([0]), [1], 10.0, 2)[1] == (1, 1)


def test_features_are_l2_normalised_and_k_is_capped_by_the_bank():
    bank = torch.tensor([[10.0, 0.0], [0.0, 0.1]])  # norms must not matter: cosine similarity
    labels = torch.tensor([0, 1])
    queries = torch.tensor([[0.0, 5.0], [3.0, 0.1]])
    counts = knn_counts(bank, labels, queries, torch.tensor([1, 0]), [1, 200], 0.07, 2)
    assert counts[1] == (2, 2)
    assert counts[200] == (2, 2)  # k = 200 > 2 bank entries: the whole bank, weighted


def test_top5_counts_any_of_the_five_best_classes():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(60, 8, generator=g)
    labels = torch.arange(10).repeat(6)
    queries = torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 10, (30,), generator=g)
    counts = knn_counts(bank, labels, queries, targets, [20], 0.07, 10)
    top1, top5 = counts[20]
    assert 0 <= top1 <= top5 <= 30
    # Brute force: the same votes computed densely.
    sim = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank).T
    s, i = sim.topk(20, dim=1)
    votes = torch.zeros(30, 10).scatter_add_(1, labels[i], (s / 0.07).exp())
    top = votes.topk(5, dim=1).indices
    assert top1 == int((top[:, 0] == targets).sum())
    assert top5 == int((top == targets[:, None]).any(1).sum())

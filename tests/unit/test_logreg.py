"""The logistic-regression probe: separable data, and agreement with scikit-learn's solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config_schema import LogregConfig
from pipeline.eval.features import FeatureSet
from pipeline.eval.logreg import fit_logreg, logreg_probe, standardize


def _features(x: torch.Tensor, y: torch.Tensor) -> FeatureSet:
    n = len(y)
    return FeatureSet(ids=torch.arange(n), labels=y, pooled=x, avg=x[:, :0])


def _random_task(n: int, d: int, classes: int, noise: float, seed: int):
    """Labels from a random linear map of Gaussian features, plus label noise through the
    logits: not separable, so the regularisation strength matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + noise * torch.randn(n, classes, generator=g)).argmax(1)
    return x * torch.rand(d, generator=g) * 5 + 3, y  # uneven scales: standardisation matters


def test_separable_set_is_classified_perfectly() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 6
    y = torch.arange(4).repeat_interleave(60)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    test_y = torch.arange(4).repeat_interleave(20)
    test_x = centres[test_y] + torch.randn(len(test_y), 16, generator=g)
    cfg = LogregConfig(cs=[0.1, 1.0, 10.0], max_iter=100)
    out = logreg_probe(_features(x, y), _features(test_x, test_y), cfg, seed=0)
    assert out["logreg_top1"] == 100.0
    assert set(out["logreg_heldout"]) == {"0.1", "1", "10"}


def test_matches_scikit_learn_at_the_chosen_c() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _random_task(900, 40, 5, noise=3.0, seed=1)
    train_x, train_y, test_x, test_y = x[:600], y[:600], x[600:], y[600:]
    cfg = LogregConfig(cs=[1e-3, 1e-2, 0.1, 1.0, 10.0], max_iter=300)
    out = logreg_probe(_features(train_x, train_y), _features(test_x, test_y), cfg, seed=0)
    c = out["logreg_c"]
    assert c not in (
        cfg.cs[0],
        cfg.cs[-1],
    )  # the noise makes regularisation matter: not the weakest
    xs, xt = standardize(train_x.double(), test_x.double())
    ref = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(xs.numpy(), train_y.numpy())
    ref_top1 = 100.0 * float(np.mean(ref.predict(xt.numpy()) == test_y.numpy()))
    assert abs(out["logreg_top1"] - ref_top1) <= 1.0, (out, ref_top1)


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_same_solution_as_scikit_learn(c: float) -> None:
    """The objective is scikit-learn's divided by C N: the weights agree, not just accuracy."""
    from sklearn.linear_model import LogisticRegression

    x, y = _random_task(300, 10, 3, noise=1.0, seed=2)
    (xs,) = standardize(x.double())
    model = fit_logreg(xs, y, c, 3, tol=1e-10)
    ref = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(xs.numpy(), y.numpy())
    # Softmax weights are defined up to a shift shared by all classes: compare centred ones.
    ours = model.weight.detach() - model.weight.detach().mean(0)
    theirs = torch.from_numpy(ref.coef_) - torch.from_numpy(ref.coef_).mean(0)
    assert torch.allclose(ours, theirs, atol=1e-3 * theirs.abs().max())


def test_constant_dimension_keeps_scale() -> None:
    train = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    test = torch.tensor([[2.0, 0.5]])
    _, out = standardize(train, test)
    assert torch.allclose(out, torch.tensor([[0.0, 0.5]]))

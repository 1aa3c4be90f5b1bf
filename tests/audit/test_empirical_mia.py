"""Tests for membership-inference score sources: loss scores and LiRA."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from privfl.audit.mia import lira_scores, logit_scaled_confidence, loss_scores
from privfl.audit.one_run import one_run_epsilon_lower_bound
from privfl.errors import ConfigError


def _overfit_task(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, d = 400, 60
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    y = ((x @ w) / np.sqrt(d) + rng.normal(size=n) > 0).astype(np.int64)
    included = rng.random(n) < 0.5
    return x, y, included


def _factory() -> LogisticRegression:
    return LogisticRegression(C=100.0, max_iter=500)


def test_loss_and_logit_scores_known_values() -> None:
    probs = np.array([[0.9, 0.1], [0.5, 0.5]])
    labels = np.array([0, 1])
    assert loss_scores(probs, labels) == pytest.approx(np.log([0.9, 0.5]))
    assert logit_scaled_confidence(probs, labels) == pytest.approx([np.log(9.0), 0.0])
    assert np.isfinite(logit_scaled_confidence(np.array([[1.0, 0.0]]), np.array([0]))).all()


def test_lira_beats_loss_attack_on_overfit_logistic_regression() -> None:
    lira_auc, loss_auc = [], []
    for seed in range(3):
        x, y, included = _overfit_task(seed)
        target = _factory().fit(x[included], y[included])
        probs = target.predict_proba(x)
        lira = lira_scores(
            logit_scaled_confidence(probs, y),
            features=x,
            labels=y,
            candidate_indices=np.arange(len(y)),
            model_factory=_factory,
            num_shadow_models=16,
            seed=seed,
        )
        assert lira.scores.shape == (len(y),)
        assert np.mean(lira.mean_in > lira.mean_out) > 0.6  # measured 0.69-0.79: IN shadows fit better
        lira_auc.append(roc_auc_score(included, lira.scores))
        loss_auc.append(roc_auc_score(included, loss_scores(probs, y)))
    assert np.mean(lira_auc) > 0.6
    assert np.mean(lira_auc) > np.mean(loss_auc) + 0.03


def test_lira_scores_feed_a_one_run_audit() -> None:
    # A non-private, overfit model: the candidates are one-run canaries, so the one-run bound
    # applies (the many-trial bound would need independent retrainings).
    x, y, included = _overfit_task(7)
    target = _factory().fit(x[included], y[included])
    lira = lira_scores(
        logit_scaled_confidence(target.predict_proba(x), y),
        features=x,
        labels=y,
        candidate_indices=np.arange(len(y)),
        model_factory=_factory,
        num_shadow_models=16,
    )
    bound = one_run_epsilon_lower_bound(lira.scores, included, delta=1e-5)
    assert bound.epsilon > 0.0


def test_lira_validation() -> None:
    x, y, _ = _overfit_task(0)
    with pytest.raises(ConfigError) as info:
        lira_scores(np.zeros(3), features=x, labels=y, candidate_indices=[0, 1, 2], model_factory=_factory, num_shadow_models=3)
    assert info.value.field == "num_shadow_models"
    with pytest.raises(ConfigError) as info:
        lira_scores(np.zeros(2), features=x, labels=y, candidate_indices=[0, 1, 2], model_factory=_factory)
    assert info.value.field == "target_confidences"
    with pytest.raises(ConfigError) as info:
        loss_scores(np.ones((2, 2)) / 2, np.array([0, 5]))
    assert info.value.field == "labels"

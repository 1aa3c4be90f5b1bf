"""Membership-inference score sources for empirical audits: loss scores and LiRA with shadow models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy import special

from privfl.errors import ConfigError

__all__ = [
    "Classifier",
    "LiraScores",
    "lira_scores",
    "logit_scaled_confidence",
    "loss_scores",
    "torch_loss_scores",
]

# Probabilities are clipped this far from 0 and 1 so a perfectly confident model gives a large
# but finite score instead of inf.
_PROB_FLOOR = 1e-12


class Classifier(Protocol):
    """The scikit-learn classifier surface the shadow models need."""

    def fit(self, features: NDArray[np.float64], labels: NDArray[np.int64]) -> object: ...

    def predict_proba(self, features: NDArray[np.float64]) -> NDArray[np.float64]: ...


def _probabilities_and_labels(probabilities: ArrayLike, labels: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Validate an (n, classes) probability matrix and n integer labels."""
    probs = np.asarray(probabilities, dtype=np.float64)
    labs = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ConfigError("probabilities", f"array of shape {probs.shape}", "must be a non-empty (n, classes) matrix")
    if labs.shape != (probs.shape[0],):
        raise ConfigError("labels", f"array of shape {labs.shape}", f"must have shape ({probs.shape[0]},)")
    if not np.all(np.isfinite(probs)):
        raise ConfigError("probabilities", "non-finite values", "must be finite")
    if labs.size and (labs.min() < 0 or labs.max() >= probs.shape[1]):
        raise ConfigError("labels", f"range [{labs.min()}, {labs.max()}]", f"must index one of {probs.shape[1]} classes")
    return probs, labs.astype(np.int64)


def loss_scores(probabilities: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """Loss-based membership score (Yeom et al. 2018): the negative cross-entropy of the true label.

    Training lowers the loss of members, so a larger score means "more likely IN".

    Args:
        probabilities: Predicted class probabilities, shape (n, classes).
        labels: True labels, shape (n,).

    Returns:
        ``log p(label | x)`` per example.

    Raises:
        ConfigError: On mismatched shapes, non-finite values or labels out of range.
    """
    probs, labs = _probabilities_and_labels(probabilities, labels)
    picked = probs[np.arange(labs.size), labs]
    return np.log(np.clip(picked, _PROB_FLOOR, 1.0))


def torch_loss_scores(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> NDArray[np.float64]:
    """Negative per-example cross-entropy of a torch classifier returning logits.

    Args:
        model: Maps a (n, ...) batch to (n, classes) logits.
        features: Inputs.
        labels: Integer labels.

    Returns:
        The scores as a float64 array, larger meaning "more likely IN".
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(features)
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    finally:
        model.train(was_training)
    return -losses.detach().cpu().double().numpy()


def logit_scaled_confidence(probabilities: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """``log(p_y / (1 - p_y))``: the confidence LiRA models as Gaussian (Carlini et al. 2022).

    The logit makes the heavy-tailed confidences near 1 approximately normal across shadow models.

    Args:
        probabilities: Predicted class probabilities, shape (n, classes).
        labels: True labels, shape (n,).

    Returns:
        The logit-scaled confidence per example.

    Raises:
        ConfigError: On mismatched shapes, non-finite values or labels out of range.
    """
    probs, labs = _probabilities_and_labels(probabilities, labels)
    picked = np.clip(probs[np.arange(labs.size), labs], _PROB_FLOOR, 1.0 - _PROB_FLOOR)
    return special.logit(picked)


@dataclass(frozen=True, kw_only=True, slots=True)
class LiraScores:
    """LiRA likelihood-ratio scores with the Gaussians they came from.

    Attributes:
        scores: ``log N(c; mean_in, std_in) - log N(c; mean_out, std_out)`` per candidate,
            larger meaning "more likely IN".
        mean_in: Mean IN confidence per candidate over shadow models.
        mean_out: Mean OUT confidence per candidate.
        std_in: Standard deviation used for IN (global if ``fixed_variance``).
        std_out: Standard deviation used for OUT.
        num_shadow_models: Shadow models trained; each candidate was IN for exactly half.
    """

    scores: NDArray[np.float64]
    mean_in: NDArray[np.float64]
    mean_out: NDArray[np.float64]
    std_in: NDArray[np.float64]
    std_out: NDArray[np.float64]
    num_shadow_models: int


def lira_scores(
    target_confidences: ArrayLike,
    *,
    features: ArrayLike,
    labels: ArrayLike,
    candidate_indices: ArrayLike,
    model_factory: Callable[[], Classifier],
    num_shadow_models: int = 16,
    fixed_variance: bool = True,
    seed: int = 0,
) -> LiraScores:
    """Online LiRA (Carlini et al. 2022) for small models that train in well under a second.

    Every pool example is placed in exactly half of the shadow training sets (a random half per
    example), each shadow model is trained on its set, and its logit-scaled confidence on each
    candidate is recorded as an IN or OUT observation. Gaussians fitted to the IN and OUT
    observations of a candidate give the likelihood ratio of the target model's confidence.
    With few shadow models, ``fixed_variance`` (one pooled standard deviation per side) is
    markedly more stable, as Carlini et al. report.

    Threat model: the attacker knows the training pool and the training recipe (it can retrain
    the model), and sees the target model's predicted probabilities on the candidates.

    Args:
        target_confidences: Logit-scaled confidences of the target model on the candidates
            (see :func:`logit_scaled_confidence`), shape (len(candidate_indices),).
        features: Pool the shadow training sets are drawn from, shape (n, d).
        labels: Pool labels, shape (n,).
        candidate_indices: Indices into the pool of the examples to score.
        model_factory: Returns a fresh unfitted classifier with ``fit`` and ``predict_proba``.
        num_shadow_models: An even number of shadow models, at least 2.
        fixed_variance: Pool the standard deviations over candidates.
        seed: Seed of the random halves.

    Returns:
        The scores and fitted Gaussian parameters.

    Raises:
        ConfigError: On bad shapes, indices, or an odd/too small number of shadow models.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    idx = np.asarray(candidate_indices, dtype=np.int64)
    target = np.asarray(target_confidences, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError("features", f"array of shape {x.shape}", "must be a non-empty (n, d) matrix")
    if y.shape != (x.shape[0],):
        raise ConfigError("labels", f"array of shape {y.shape}", f"must have shape ({x.shape[0]},)")
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= x.shape[0]:
        raise ConfigError("candidate_indices", f"{idx.size} indices", f"must be a non-empty 1-D index into {x.shape[0]} rows")
    if target.shape != idx.shape or not np.all(np.isfinite(target)):
        raise ConfigError("target_confidences", f"array of shape {target.shape}", f"must be finite with shape {idx.shape}")
    if num_shadow_models < 2 or num_shadow_models % 2:
        raise ConfigError("num_shadow_models", num_shadow_models, "must be an even number of at least 2")

    rng = np.random.default_rng(seed)
    n = x.shape[0]
    # keep[s, j]: whether shadow s trains on pool example j; exactly half the shadows per example.
    ranks = np.argsort(rng.random((num_shadow_models, n)), axis=0)
    keep = ranks < num_shadow_models // 2
    confidences = np.empty((num_shadow_models, idx.size))
    for s in range(num_shadow_models):
        model = model_factory()
        model.fit(x[keep[s]], y[keep[s]])
        confidences[s] = logit_scaled_confidence(model.predict_proba(x[idx]), y[idx])
    member = keep[:, idx]
    half = num_shadow_models // 2
    conf_in = confidences.T[member.T].reshape(idx.size, half)
    conf_out = confidences.T[~member.T].reshape(idx.size, half)
    mean_in, mean_out = conf_in.mean(axis=1), conf_out.mean(axis=1)
    if fixed_variance:
        std_in = np.full(idx.size, conf_in.std() if half == 1 else (conf_in - mean_in[:, None]).std())
        std_out = np.full(idx.size, conf_out.std() if half == 1 else (conf_out - mean_out[:, None]).std())
    else:
        std_in, std_out = conf_in.std(axis=1), conf_out.std(axis=1)
    # A floor keeps a candidate whose shadows all agree from producing an infinite ratio.
    std_in = np.maximum(std_in, 1e-3)
    std_out = np.maximum(std_out, 1e-3)
    log_in = -0.5 * ((target - mean_in) / std_in) ** 2 - np.log(std_in)
    log_out = -0.5 * ((target - mean_out) / std_out) ** 2 - np.log(std_out)
    return LiraScores(
        scores=log_in - log_out,
        mean_in=mean_in,
        mean_out=mean_out,
        std_in=std_in,
        std_out=std_out,
        num_shadow_models=num_shadow_models,
    )

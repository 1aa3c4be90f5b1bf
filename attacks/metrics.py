"""Reconstruction quality metrics (MSE, PSNR, SSIM, label accuracy), batch matching and the chance baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

from privfl import _validate
from privfl.errors import ConfigError

__all__ = [
    "Assignment",
    "best_match",
    "chance_baseline",
    "chance_psnr",
    "label_accuracy",
    "max_abs_error",
    "mse",
    "pairwise_psnr",
    "psnr",
    "ssim",
]


def _batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x).detach().double().cpu()
    y = torch.as_tensor(y).detach().double().cpu()
    if x.shape != y.shape:
        raise ConfigError("reconstructed", tuple(x.shape), f"must have the target's shape {tuple(y.shape)}")
    if x.ndim == 1 or x.ndim == 3:
        # A single row (d,) or a single image (C, H, W): make it a batch of one.
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    return x, y


def _psnr_from_mse(per_sample_mse: torch.Tensor, data_range: float) -> torch.Tensor:
    # An exact match has infinite PSNR; cap it at 100 dB so averages stay finite and comparable.
    return (10.0 * torch.log10(data_range**2 / per_sample_mse.clamp_min(1e-10 * data_range**2))).clamp_max(100.0)


def mse(reconstructed: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error over all samples and features.

    Args:
        reconstructed: ``(n, *input_shape)`` or one input.
        target: Same shape.

    Returns:
        The MSE.
    """
    x, y = _batch(reconstructed, target)
    return float(((x - y) ** 2).mean())


def max_abs_error(reconstructed: torch.Tensor, target: torch.Tensor) -> float:
    """Largest absolute difference of any feature (the exactness check for analytic attacks)."""
    x, y = _batch(reconstructed, target)
    return float((x - y).abs().max())


def psnr(reconstructed: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, averaged over samples.

    Per-sample PSNR is averaged (as in Geiping et al. 2020), so one good reconstruction in a batch cannot hide
    the others. Values are capped at 100 dB.

    Args:
        reconstructed: ``(n, *input_shape)`` or one input.
        target: Same shape.
        data_range: Peak-to-peak range of the data (1.0 for images scaled to [0, 1]).

    Returns:
        Mean PSNR in dB.

    Raises:
        ConfigError: If the shapes differ or ``data_range`` is not positive.
    """
    _validate.positive("data_range", data_range, allow_numpy=True)
    x, y = _batch(reconstructed, target)
    per_sample = ((x - y) ** 2).flatten(1).mean(dim=1)
    return float(_psnr_from_mse(per_sample, data_range).mean())


def pairwise_psnr(reconstructed: torch.Tensor, targets: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of every reconstruction against every target.

    Args:
        reconstructed: ``(n, *input_shape)``.
        targets: ``(m, *input_shape)``.
        data_range: Peak-to-peak range of the data.

    Returns:
        ``(n, m)`` tensor of PSNR values in dB.
    """
    x = torch.as_tensor(reconstructed).detach().double().cpu().flatten(1)
    y = torch.as_tensor(targets).detach().double().cpu().flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ConfigError("reconstructed", tuple(reconstructed.shape), "feature count differs from targets")
    sq = ((x[:, None, :] - y[None, :, :]) ** 2).mean(dim=2)
    return _psnr_from_mse(sq, data_range)


def ssim(reconstructed: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Structural similarity (scikit-image's ``structural_similarity``), averaged over images.

    Args:
        reconstructed: ``(n, C, H, W)`` or ``(C, H, W)``.
        target: Same shape.
        data_range: Peak-to-peak range of the data.

    Returns:
        Mean SSIM in [-1, 1].

    Raises:
        ConfigError: If the inputs are not images at least 3 pixels on a side.
    """
    x, y = _batch(reconstructed, target)
    if x.ndim != 4 or min(x.shape[-2:]) < 3:
        raise ConfigError("reconstructed", tuple(x.shape), "SSIM needs images shaped (n, C, H, W) with H, W >= 3")
    side = min(x.shape[-2:])
    win_size = min(7, side if side % 2 == 1 else side - 1)  # must be odd and fit inside the image
    values = [
        structural_similarity(
            a.numpy(), b.numpy(), data_range=data_range, channel_axis=0, win_size=win_size
        )
        for a, b in zip(x, y, strict=True)
    ]
    return float(np.mean(values))


def label_accuracy(predicted: torch.Tensor, target: torch.Tensor, *, ordered: bool = True) -> float:
    """Fraction of labels recovered.

    Args:
        predicted: Integer labels ``(n,)``.
        target: Integer labels ``(n,)``.
        ordered: Compare position by position. With ``False`` compare as multisets (label counts), the right
            reading for a batch, whose order the attacker cannot observe.

    Returns:
        Accuracy in [0, 1].
    """
    p = torch.as_tensor(predicted).long().flatten().cpu()
    t = torch.as_tensor(target).long().flatten().cpu()
    if p.shape != t.shape:
        raise ConfigError("predicted", tuple(p.shape), f"must have the target's shape {tuple(t.shape)}")
    if ordered:
        return float((p == t).double().mean())
    size = int(max(p.max(), t.max()).item()) + 1
    pc = torch.bincount(p.clamp_min(0), minlength=size)
    tc = torch.bincount(t, minlength=size)
    return float(torch.minimum(pc, tc).sum() / t.numel())


@dataclass(frozen=True, kw_only=True, slots=True)
class Assignment:
    """A one-to-one matching of reconstructions to targets that maximizes total PSNR.

    Attributes:
        reconstruction_index: Indices into the reconstructions.
        target_index: Indices into the targets, paired position by position.
        psnr: PSNR in dB of each matched pair.
    """

    reconstruction_index: torch.Tensor
    target_index: torch.Tensor
    psnr: torch.Tensor


def best_match(reconstructed: torch.Tensor, targets: torch.Tensor, *, data_range: float = 1.0) -> Assignment:
    """Pairs reconstructions with targets (Hungarian algorithm, scipy's ``linear_sum_assignment``).

    The order of inputs in a batch or an aggregate is not observable, so batch results are scored on the
    best one-to-one matching. With fewer reconstructions than targets each reconstruction gets the target
    it resembles most (subject to one-to-one).

    Args:
        reconstructed: ``(n, *input_shape)``.
        targets: ``(m, *input_shape)``.
        data_range: Peak-to-peak range of the data.

    Returns:
        The matching, ``min(n, m)`` pairs.
    """
    table = pairwise_psnr(reconstructed, targets, data_range=data_range)
    rows, cols = linear_sum_assignment(table.numpy(), maximize=True)
    r, c = torch.as_tensor(rows), torch.as_tensor(cols)
    return Assignment(reconstruction_index=r, target_index=c, psnr=table[r, c])


def chance_baseline(dataset_inputs: torch.Tensor) -> torch.Tensor:
    """The guess of an attacker who learned nothing from the update: the dataset's mean input.

    Args:
        dataset_inputs: ``(N, *input_shape)`` inputs from the data distribution (e.g. a public split).

    Returns:
        The mean input, shape ``input_shape``.
    """
    return torch.as_tensor(dataset_inputs).detach().double().mean(dim=0)


def chance_psnr(targets: torch.Tensor, baseline: torch.Tensor, *, data_range: float = 1.0) -> float:
    """PSNR of the chance baseline against the targets: what any reconstruction must beat to mean anything.

    Args:
        targets: ``(n, *input_shape)``.
        baseline: The chance guess, shape ``input_shape`` (see ``chance_baseline``).
        data_range: Peak-to-peak range of the data.

    Returns:
        Mean PSNR of the baseline against each target, in dB.
    """
    t = torch.as_tensor(targets).detach().double()
    guess = torch.as_tensor(baseline).detach().double().expand_as(t)
    return psnr(guess, t, data_range=data_range)

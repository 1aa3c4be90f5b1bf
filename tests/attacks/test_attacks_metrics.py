"""Metrics: known values for PSNR/MSE/SSIM, multiset label accuracy, best matching, chance baseline."""

from __future__ import annotations

import math

import pytest
import torch

from privfl.attacks.metrics import (
    best_match,
    chance_baseline,
    chance_psnr,
    label_accuracy,
    max_abs_error,
    mse,
    pairwise_psnr,
    psnr,
    ssim,
)
from privfl.errors import ConfigError


def test_psnr_known_value() -> None:
    target = torch.zeros(2, 1, 8, 8)
    reconstructed = torch.full((2, 1, 8, 8), 0.1)  # MSE 0.01 -> 20 dB at range 1
    assert mse(reconstructed, target) == pytest.approx(0.01)
    assert psnr(reconstructed, target) == pytest.approx(20.0)
    assert psnr(reconstructed, target, data_range=2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    assert max_abs_error(reconstructed, target) == pytest.approx(0.1)


def test_psnr_averages_per_sample_and_caps_exact_match() -> None:
    target = torch.zeros(2, 4)
    reconstructed = torch.stack([torch.zeros(4), torch.full((4,), 0.1)])
    assert psnr(reconstructed, target) == pytest.approx((100.0 + 20.0) / 2)


def test_psnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ConfigError):
        psnr(torch.zeros(1, 4), torch.zeros(1, 5))


def test_ssim_identity_and_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((3, 1, 8, 8), generator=gen)
    assert ssim(image, image) == pytest.approx(1.0)
    noisy = (image + 0.5 * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    assert ssim(noisy, image) < 0.8
    with pytest.raises(ConfigError):
        ssim(torch.zeros(2, 30), torch.zeros(2, 30))


def test_label_accuracy_ordered_and_multiset() -> None:
    truth = torch.tensor([3, 1, 1, 7])
    assert label_accuracy(torch.tensor([1, 1, 3, 7]), truth) == pytest.approx(0.5)
    assert label_accuracy(torch.tensor([1, 1, 3, 7]), truth, ordered=False) == pytest.approx(1.0)
    assert label_accuracy(torch.tensor([1, 1, 1, 7]), truth, ordered=False) == pytest.approx(0.75)


def test_best_match_recovers_a_permutation() -> None:
    gen = torch.Generator().manual_seed(1)
    targets = torch.rand((5, 1, 8, 8), generator=gen)
    order = torch.tensor([3, 0, 4, 1, 2])
    match = best_match(targets[order] + 0.01, targets)
    assert torch.equal(order[match.reconstruction_index], match.target_index)
    assert float(match.psnr.min()) == pytest.approx(40.0, abs=1e-4)
    assert pairwise_psnr(targets[:1], targets).shape == (1, 5)


def test_chance_baseline_is_dataset_mean() -> None:
    data = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    baseline = chance_baseline(data)
    assert torch.allclose(baseline, torch.full((1, 8, 8), 0.5, dtype=torch.float64))
    assert chance_psnr(data, baseline) == pytest.approx(10 * math.log10(1 / 0.25))

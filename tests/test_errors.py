"""Ill-defined input is refused with a ValueError subclass that names the problem."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import plstar

DEFAULT_DTYPE = torch.float64


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


@pytest.mark.parametrize("where", ["x", "y", "parameter"])
def test_non_finite_numbers_are_refused(where: str) -> None:
    model, x, y = small(), torch.randn(5, 3), torch.randn(5, 1)
    if where == "x":
        x[2, 1] = math.nan
    elif where == "y":
        y[0, 0] = math.inf
    else:
        with torch.no_grad():
            model[0].weight[0, 0] = math.nan
    with pytest.raises(plstar.DataError, match="non-finite"):
        plstar.analyze(model, x, y)


def test_outputs_that_do_not_match_targets_are_refused() -> None:
    with pytest.raises(plstar.DataError, match="k=1"):
        plstar.pl_ratio(small(), torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(plstar.DataError, match="5 samples"):
        plstar.pl_ratio(small(), torch.randn(5, 3), torch.randn(4, 1))


@pytest.mark.parametrize(
    "layer", [nn.Dropout(0.5), nn.BatchNorm1d(4)], ids=["dropout", "batchnorm"]
)
def test_train_mode_dropout_and_batchnorm_are_refused_with_eval_hint(layer: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 1)).double()
    with pytest.raises(plstar.IllDefinedModelError, match=r"model\.eval\(\)"):
        plstar.tangent_kernel(model, torch.randn(5, 3))
    model.eval()
    assert plstar.tangent_kernel(model, torch.randn(5, 3)).shape == (5, 5)


def test_batchnorm_without_running_stats_is_refused_even_in_eval() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).double()
    with pytest.raises(plstar.IllDefinedModelError, match="batch statistics"):
        plstar.tangent_kernel(model.eval(), torch.randn(5, 3))


def test_model_without_trainable_parameters_is_refused() -> None:
    model = small().requires_grad_(False)
    with pytest.raises(plstar.IllDefinedModelError, match="no trainable"):
        plstar.tangent_kernel(model, torch.randn(5, 3))


def test_empty_data_is_refused() -> None:
    with pytest.raises(plstar.DataError, match="empty"):
        plstar.tangent_kernel(small(), torch.randn(0, 3))


def test_model_that_cannot_run_on_x_is_refused_with_its_shape() -> None:
    with pytest.raises(plstar.PlstarInputError, match=r"\(5, 7\)"):
        plstar.tangent_kernel(small(), torch.randn(5, 7))


def test_every_refusal_is_a_value_error() -> None:
    for error in (plstar.PlstarInputError, plstar.DataError, plstar.IllDefinedModelError):
        assert issubclass(error, ValueError)


def test_finite_values_whose_sum_overflows_are_accepted_and_a_single_nan_is_counted() -> None:
    from plstar.functional import check_finite

    huge = torch.full((4,), 3e38, dtype=torch.float32)  # each finite, the float32 sum is not
    check_finite("x", huge)
    huge[2] = math.nan
    with pytest.raises(plstar.DataError, match="1 non-finite"):
        check_finite("x", huge)
    mixed = torch.tensor([math.inf, -math.inf, 1.0])  # the sum is NaN, two entries are bad
    with pytest.raises(plstar.DataError, match="2 non-finite"):
        check_finite("x", mixed)


def test_check_data_accepts_token_ids_and_masks_and_refuses_in_one_line() -> None:
    from plstar.functional import check_data

    for accepted in (torch.randint(0, 5, (4, 3)), torch.ones(4, 3, dtype=torch.bool)):
        assert check_data("x", accepted) is accepted
    for refused, words in (
        (torch.ones(4, 3).numpy(), "torch.as_tensor"),
        (torch.ones(4, 3).to_sparse(), "to_dense"),
        (torch.tensor(2.0), "0-d"),
    ):
        with pytest.raises(plstar.DataError, match=words) as caught:
            check_data("x2", refused)
        assert str(caught.value).startswith("x2 ") and "\n" not in str(caught.value)


def test_instance_norm_updating_running_statistics_is_refused_and_buffers_kept() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (1, 4)),
                          nn.InstanceNorm1d(1, track_running_stats=True), nn.Flatten()).double()  # fmt: skip
    before = model[2].running_mean.clone()
    with pytest.raises(plstar.IllDefinedModelError, match=r"model\.eval\(\)"):
        plstar.tangent_kernel(model, torch.randn(5, 3))
    assert torch.equal(model[2].running_mean, before)
    assert plstar.tangent_kernel(model.eval(), torch.randn(5, 3)).shape == (20, 20)

"""``output=``: models that return a ModelOutput, a dict or a tuple, measured as their F.

Every entry point takes ``output=`` (None: a tensor itself, else ``logits``, else the first
tensor); each must give what it gives on a hand-written wrapper module that returns F, in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from architectures import Selected, build
from conftest import dense_kernel
from torch import Tensor, nn

import plstar

DEFAULT_DTYPE = torch.float64


class Returns(nn.Module):
    """A small MLP that returns its logits inside another structure, as libraries do."""

    def __init__(self, shape: str, k: int = 2) -> None:
        super().__init__()
        self.shape = shape
        self.body = nn.Sequential(nn.Linear(3, 6), nn.Tanh())
        self.head = nn.Linear(6, k)

    def forward(self, x: Tensor) -> Any:
        hidden = self.body(x)
        logits = self.head(hidden)
        if self.shape == "dict":
            return {"hidden": hidden, "logits": logits}
        if self.shape == "dict without logits":
            return {"scores": logits, "hidden": hidden}
        if self.shape == "tuple":
            return (logits, hidden)
        return [hidden, logits]  # a list whose F is not first: needs output=


def problem(shape: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    return Returns(shape).double().eval(), torch.randn(5, 3), torch.randn(5, 2)


PICKS: dict[str, Callable[[Any], Tensor] | None] = {
    "dict": None,  # default: logits
    "dict without logits": None,  # default: the first tensor
    "tuple": None,  # default: the first tensor
    "list": lambda out: out[1],
}
# What every user used to write by hand: a module that returns F and nothing else.
WRAPPED: dict[str, Callable[[Any], Tensor]] = {
    "dict": lambda out: out["logits"],
    "dict without logits": lambda out: out["scores"],
    "tuple": lambda out: out[0],
    "list": lambda out: out[1],
}


def wrapper(model: nn.Module, shape: str) -> nn.Module:
    return Selected(model, WRAPPED[shape])


@pytest.mark.parametrize("shape", sorted(PICKS))
@pytest.mark.parametrize("implementation", ["structured", "jacobian", "ntvp"])
def test_kernel_of_a_structured_output_equals_the_wrappers(shape: str, implementation: str) -> None:
    model, x, _ = problem(shape)
    found = plstar.tangent_kernel(model, x, implementation=implementation, output=PICKS[shape])
    assert torch.allclose(found, dense_kernel(wrapper(model, shape), x), rtol=1e-12, atol=1e-13)


# Each entry point on the list-returning model with output=, and on the wrapper without: the
# same numbers (Lanczos from the same seed sees the same operator).
ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "loss_gradient": lambda m, x, y, **kw: plstar.loss_gradient(m, x, y, **kw)[1],
    "pl_ratio": lambda m, x, y, **kw: plstar.pl_ratio(m, x, y, **kw),
    "loss_sharpness": lambda m, x, y, **kw: plstar.loss_sharpness(m, x, y, tol=1e-10, **kw).value,
    "model_hessian_norm": lambda m, x, y, **kw: (
        plstar.model_hessian_norm(m, x, tol=1e-10, max_iter=80, **kw).value
    ),
    "kernel_operator": lambda m, x, y, **kw: (
        plstar.kernel_operator(m, x, **kw) @ torch.arange(10.0)
    ),
    "analyze": lambda m, x, y, **kw: torch.tensor(
        [
            (a := plstar.analyze(m, x, y, hessian_time_share=None, **kw)).mu,
            a.beta.value,
            a.hessian_norm.value,
            a.pl_ratio,
        ]
    ),
    "Monitor": lambda m, x, y, **kw: torch.tensor(
        [(r := plstar.Monitor(m, x, y, every=1, **kw).history[0]).lambda_min, r.sharpness]
    ),
    "train": lambda m, x, y, **kw: torch.tensor(plstar.train(m, x, y, steps=3, **kw).losses),
    "certify": lambda m, x, y, **kw: torch.tensor(
        [
            (
                c := plstar.certify(m, x, y, samples=1, shells=(0.5,), hessian_outputs=2, **kw)
            ).lambda0,
            c.radius,
            c.hessian_norm,
        ]
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_measures_the_selected_output(entry: str) -> None:
    model, x, y = problem("list")
    chosen = ENTRY_POINTS[entry](model, x, y, output=PICKS["list"])
    model, x, y = problem("list")  # the same weights again: train and certify move them
    reference = ENTRY_POINTS[entry](wrapper(model, "list"), x, y)
    assert torch.allclose(torch.as_tensor(chosen), torch.as_tensor(reference), rtol=1e-9)


def test_a_selector_returning_no_tensor_is_refused_in_one_line() -> None:
    model, x, _ = problem("dict")
    with pytest.raises(plstar.PlstarInputError, match=r"output= must give F as a tensor") as no:
        plstar.tangent_kernel(model, x, output=lambda out: out.keys())
    with pytest.raises(plstar.PlstarInputError, match=r"output= could not pick F.*KeyError") as bad:
        plstar.tangent_kernel(model, x, output=lambda out: out["missing"])
    for refused in (no, bad):
        assert "\n" not in str(refused.value)


def test_output_must_be_callable_or_none() -> None:
    model, x, y = problem("dict")
    for wrong in ("logits", 3, ["logits"]):
        with pytest.raises(plstar.PlstarInputError, match="output must be None"):
            plstar.analyze(model, x, y, output=wrong)


def test_the_data_check_is_remembered_per_selection_not_per_model() -> None:
    """Two selections of one model are two F's: k comes from the one asked for each time."""
    model, x, _ = problem("dict")
    both = plstar.tangent_kernel(model, x, output=lambda out: torch.cat(list(out.values()), 1))
    assert both.shape == (5 * 8, 5 * 8)
    assert plstar.tangent_kernel(model, x).shape == (5 * 2, 5 * 2)


def test_a_monitor_for_another_output_is_refused_by_train() -> None:
    model, x, y = problem("dict")
    monitor = plstar.Monitor(model, x, y, output=lambda out: out["logits"])
    with pytest.raises(plstar.PlstarInputError, match="another output="):
        plstar.train(model, x, y, steps=1, monitor=monitor)


@pytest.mark.parametrize(("name", "implementation"), [
    ("hf-bert", "auto"), ("hf-bert", "ntvp"), ("hf-gpt2", "auto"), ("hf-gpt2", "jacobian"),
])  # fmt: skip
def test_hugging_face_models_need_no_wrapper(name: str, implementation: str) -> None:
    """A raw BertForSequenceClassification (default: its logits) and GPT2LMHeadModel (output=
    the last position's logits) give the hand-written wrapper's kernel to 1e-10."""
    pytest.importorskip("transformers")
    model, x, output = build(name, torch.float64)
    found = plstar.tangent_kernel(model, x, implementation=implementation, output=output)
    oracle = dense_kernel(Selected(model, output), x)
    assert float((found - oracle).abs().max()) <= 1e-10 * float(oracle.abs().max())


def test_distributed_kernel_and_analyze_take_the_same_output(tmp_path) -> None:
    """plstar.distributed on one gloo rank (in this process): output= reaches every rank's F."""
    import torch.distributed as dist

    from plstar import distributed

    model, x, y = problem("list")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        kernel = distributed.tangent_kernel(model, x, output=PICKS["list"]).gather()
        found = distributed.analyze(model, x, y, output=PICKS["list"], hessian_time_share=None)
    finally:
        dist.destroy_process_group()
    oracle = dense_kernel(wrapper(model, "list"), x)
    assert torch.allclose(kernel, oracle, rtol=1e-12, atol=1e-13)
    alone = plstar.analyze(wrapper(model, "list"), x, y, hessian_time_share=None)
    assert found.mu == pytest.approx(alone.mu, rel=1e-9)
    assert found.beta.value == pytest.approx(alone.beta.value, rel=1e-9)

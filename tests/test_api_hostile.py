"""Hostile calls to the public API: every wrong argument is a PlstarInputError, never a crash.

Property-based (hypothesis): for each checked argument of each public function, values drawn from
a wide pool of wrong things — strings, NaN and infinities, negative and huge integers, bools,
lists, numpy scalars and arrays, tensors, the wrong dtypes, uncallable callbacks — that the
argument's contract calls invalid must raise PlstarInputError (a ValueError) naming the problem,
never TypeError or AttributeError from deep inside. Then the wrong numbers of issue 10, each
against an exact oracle: a vanishing warm start must not give β = 0, a complex matrix is refused,
an interpolating start is called a global minimum, a monitor of other targets is refused.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse
from torch import nn

import plstar
from plstar import theory
from plstar.functional import make_functional
from plstar.lanczos import lanczos

DEFAULT_DTYPE = torch.float64
N, K = 4, 2


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, K)).double()
    return model, torch.randn(N, 3), torch.randn(N, K)


# --------------------------------------------------------------------------- what is valid
def _real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _integer(x: object, low: int, high: float = math.inf) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and low <= int(x) < high


def count(low: int = 1) -> Callable[[object], bool]:
    return lambda x: _integer(x, low)


def optional(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda x: x is None or valid(x)


def positive(x: object) -> bool:
    return _real(x) and float(x) > 0  # type: ignore[arg-type]


def non_negative(x: object) -> bool:
    return _real(x) and float(x) >= 0  # type: ignore[arg-type]


def unit_interval(x: object) -> bool:
    return _real(x) and 0 < float(x) < 1  # type: ignore[arg-type]


def roundoff(x: object) -> bool:
    return x is None or (_real(x) and 0 <= float(x) < 1)  # type: ignore[arg-type]


def seed(x: object) -> bool:
    return _integer(x, 0, 2**63)


def dtype(x: object) -> bool:
    return isinstance(x, torch.dtype) and x in (torch.float32, torch.float64)


def one_of(*names: str) -> Callable[[object], bool]:
    return lambda x: isinstance(x, str) and x in names


def callback(x: object) -> bool:
    return x is None or callable(x)


def learning_rate(x: object) -> bool:
    return (isinstance(x, str) and x == "theory") or positive(x)


def shells(x: object) -> bool:
    return (
        isinstance(x, list | tuple)
        and len(x) > 0
        and all(_real(s) and 0 < float(s) <= 1 for s in x)
    )


def output_choice(x: object) -> bool:
    if x is None or _integer(x, 1):
        return True
    if isinstance(x, list) and x and all(_integer(i, 0, N * K) for i in x):
        return True
    if isinstance(x, torch.Tensor | np.ndarray):  # explicit output indices
        indices = torch.as_tensor(x)
        integral = not (indices.is_floating_point() or indices.is_complex())
        return (
            integral
            and indices.dtype != torch.bool
            and indices.numel() > 0
            and (0 <= int(indices.min()) and int(indices.max()) < N * K)
        )
    return False


def parameter_vector(m: int) -> Callable[[object], bool]:
    return lambda x: x is None or (isinstance(x, torch.Tensor) and x.numel() == m)


# --------------------------------------------------------------------------- what is wrong
JUNK = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["theory", "auto", "float64", "2GiB", "1e3", "", "nan"]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-3, 10), st.floats(-1, 2)), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
    st.sampled_from(
        [np.float64(0.5), np.int64(-2), np.arange(3), 1j, 0.5 + 0j, object(), float("nan"), -0.0]
    ),
    st.sampled_from([torch.tensor(3), torch.tensor(0.5), torch.zeros(2), torch.zeros(2, 2)]),
    st.sampled_from([torch.int64, torch.float16, torch.bfloat16, torch.complex128, torch.bool]),
    st.sampled_from([2**64, np.int64(2**62)]),
)


def _model_call(name: str) -> Callable[..., Any]:
    """The public call under test, on the tiny problem, with one keyword varied."""
    model, x, y = problem()
    plan = {"n2": N, "implementation": "auto", "dtype": torch.float64, "memory_budget": 2**26}
    calls: dict[str, Callable[..., Any]] = {
        "tangent_kernel": lambda **kw: plstar.tangent_kernel(model, x, **kw),
        "kernel_operator": lambda **kw: plstar.kernel_operator(model, x, **kw),
        "loss_gradient": lambda **kw: plstar.loss_gradient(model, x, y, **kw),
        "pl_ratio": lambda **kw: plstar.pl_ratio(model, x, y, **kw),
        "loss_sharpness": lambda **kw: plstar.loss_sharpness(model, x, y, **{"max_iter": 3} | kw),
        "model_hessian_norm": lambda **kw: plstar.model_hessian_norm(model, x, **kw),
        "analyze": lambda **kw: plstar.analyze(model, x, y, **{"hessian_outputs": 1} | kw),
        "certify": lambda **kw: plstar.certify(
            model, x, y, **{"samples": 0, "shells": (1.0,), "hessian_outputs": 1} | kw
        ),
        "train_gd": lambda **kw: plstar.train(model, x, y, **{"steps": 1} | kw),
        "train_sgd": lambda **kw: plstar.train(model, x, y, **{"method": "sgd", "steps": 1} | kw),
        "Monitor": lambda **kw: plstar.Monitor(model, x, y, **kw),
        "plan_kernel": lambda **kw: plstar.plan_kernel(make_functional(model, x), x, **plan | kw),
        "spectrum": lambda **kw: plstar.spectrum(torch.eye(3) * 2.0, **kw),
        "lanczos": lambda **kw: lanczos(
            lambda v: 2.0 * v, **{"dim": 3, "batch": 1, "max_iter": 3} | kw
        ),
        "infinite_width_ntk": lambda **kw: plstar.infinite_width_ntk(
            x, **{"depth": 2, "activation": "relu"} | kw
        ),
    }
    return calls[name]


M = make_functional(*problem()[:2]).m
# every entry point that takes output=, a callable or None
SELECTING = (
    "tangent_kernel kernel_operator loss_gradient pl_ratio loss_sharpness model_hessian_norm "
    "analyze certify train_gd Monitor"
).split()
CONTRACTS: list[tuple[str, str, Callable[[object], bool]]] = [
    ("tangent_kernel", "implementation", one_of("auto", "structured", "jacobian", "ntvp")),
    ("tangent_kernel", "dtype", dtype),
    ("tangent_kernel", "memory_budget", optional(count())),
    ("tangent_kernel", "progress", callback),
    ("kernel_operator", "implementation", one_of("auto", "structured", "ntvp")),
    ("kernel_operator", "dtype", dtype),
    ("kernel_operator", "memory_budget", optional(count())),
    ("loss_gradient", "memory_budget", optional(count())),
    ("pl_ratio", "memory_budget", optional(count())),
    ("loss_sharpness", "v0", parameter_vector(M)),
    ("loss_sharpness", "tol", unit_interval),
    ("loss_sharpness", "seed", seed),
    ("loss_sharpness", "memory_budget", optional(count())),
    ("model_hessian_norm", "outputs", output_choice),
    ("model_hessian_norm", "tol", unit_interval),
    ("model_hessian_norm", "max_iter", count()),
    ("model_hessian_norm", "seed", seed),
    ("analyze", "implementation", one_of("auto", "structured", "jacobian", "ntvp")),
    ("analyze", "dtype", dtype),
    ("analyze", "target_loss", optional(non_negative)),
    ("analyze", "seed", seed),
    ("analyze", "memory_budget", optional(count())),
    ("analyze", "progress", callback),
    ("certify", "radius", optional(non_negative)),
    ("certify", "mu", optional(positive)),
    ("certify", "samples", count(0)),
    ("certify", "shells", shells),
    ("certify", "hessian_outputs", optional(count())),
    ("train_gd", "method", one_of("gd", "sgd")),
    ("train_gd", "steps", count()),
    ("train_gd", "lr", learning_rate),
    ("train_gd", "eps", optional(positive)),
    ("train_gd", "recheck_every", optional(count())),
    ("train_gd", "seed", seed),
    ("train_gd", "memory_budget", optional(count())),
    ("train_gd", "progress", callback),
    ("train_gd", "monitor", lambda v: v is None),
    ("train_sgd", "batch_size", optional(lambda v: _integer(v, 1, N + 1))),
    ("train_sgd", "hessian_outputs", optional(count())),
    ("Monitor", "every", count()),
    ("Monitor", "kernel_samples", count()),
    ("Monitor", "sharpness_iterations", count()),
    ("Monitor", "mu", optional(non_negative)),
    ("Monitor", "beta", optional(non_negative)),
    ("Monitor", "seed", seed),
    ("Monitor", "on_record", callback),
    ("plan_kernel", "implementation", one_of("auto", "structured", "jacobian", "ntvp")),
    ("plan_kernel", "dtype", dtype),
    ("plan_kernel", "memory_budget", count()),
    ("plan_kernel", "n2", count()),
    ("spectrum", "which", one_of("both", "min", "max")),
    ("spectrum", "method", one_of("auto", "dense", "lanczos")),
    ("spectrum", "input_precision", roundoff),
    ("spectrum", "tol", unit_interval),
    ("spectrum", "max_iter", count()),
    ("spectrum", "seed", seed),
    ("lanczos", "dim", count()),
    ("lanczos", "batch", count()),
    ("lanczos", "max_iter", count()),
    ("lanczos", "tol", unit_interval),
    ("lanczos", "seed", seed),
    ("lanczos", "converge", one_of("both", "max")),
    ("lanczos", "v0", lambda v: v is None or (isinstance(v, torch.Tensor) and v.numel() == 3)),
    ("infinite_width_ntk", "depth", count()),
    ("infinite_width_ntk", "activation", one_of("relu", "erf", "identity")),
    ("infinite_width_ntk", "outputs", count()),
    ("infinite_width_ntk", "dtype", dtype),
    ("model_hessian_norm", "time_budget", optional(positive)),
    ("analyze", "hessian_time_share", optional(positive)),
    *[(name, "output", callback) for name in SELECTING],
]
# Each predicate is the argument's whole contract: only values it calls invalid are drawn, so no
# valid but costly value (a million steps, a 10⁹-dimensional basis) is ever run.


@pytest.mark.parametrize(
    ("function", "argument", "valid"), CONTRACTS, ids=[f"{f}-{a}" for f, a, _ in CONTRACTS]
)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(data=st.data())
def test_a_wrong_argument_is_refused_with_a_plstar_input_error(
    function: str, argument: str, valid: Callable[[object], bool], data: st.DataObject
) -> None:
    value = data.draw(JUNK.filter(lambda v: not valid(v)), label=argument)
    call = _model_call(function)
    with pytest.raises(plstar.PlstarInputError) as refused:
        call(**{argument: value})
    message = str(refused.value)
    assert "\n" not in message and message.strip()


def _baseline(parameter: inspect.Parameter, hints: dict[str, Any]) -> Any:
    if parameter.default is not inspect.Parameter.empty:
        return parameter.default
    return 2 if hints.get(parameter.name) is int else 0.5


THEORY = [
    (name, parameter)
    for name in theory.__all__
    for parameter in inspect.signature(getattr(theory, name)).parameters
]


@pytest.mark.parametrize(("name", "parameter"), THEORY, ids=[f"{n}-{p}" for n, p in THEORY])
@settings(max_examples=15, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=4),
        st.sampled_from([None, [1.0], {"a": 1}, 1j, np.arange(2), torch.tensor([1.0, 2.0])]),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    )
)
def test_every_theory_formula_refuses_what_is_not_a_finite_number(
    name: str, parameter: str, value: object
) -> None:
    function = getattr(theory, name)
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    arguments = {p.name: _baseline(p, hints) for p in signature.parameters.values()}
    default = signature.parameters[parameter].default
    if value is None and default is None:
        return  # None is that argument's documented "not given"
    arguments[parameter] = value
    positional = [arguments.pop(p.name) for p in signature.parameters.values()
                  if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]  # fmt: skip
    with pytest.raises(plstar.PlstarInputError):
        function(*positional, **arguments)


# --------------------------------------------------------------------------- wrong numbers
class SquareOfLinear(nn.Module):
    """f(w; x) = (w·x)²: at w = 0, DF = 0 but H_L = Σ r_j H_{F_j} = 2 Σ_j r_j x_j x_jᵀ ≠ 0."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.w) ** 2).unsqueeze(1)


def test_a_vanishing_gauss_newton_warm_start_does_not_give_beta_zero() -> None:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    y = -torch.ones(6, 1)
    model = SquareOfLinear(3)
    exact = float(torch.linalg.eigvalsh(2 * x.T @ x).max())  # residual r = 0 − (−1) = 1
    found = plstar.loss_sharpness(model, x, y, v0=torch.zeros(3))
    assert found.value == pytest.approx(exact, rel=1e-10)
    analysis = plstar.analyze(model, x, y)
    assert analysis.beta.value == pytest.approx(exact, rel=1e-10)
    assert math.isfinite(analysis.gd_step)


def test_lanczos_restarts_when_the_start_vector_spans_an_invariant_subspace() -> None:
    diagonal = torch.tensor([0.0, 0.0, 5.0, 1.0, 3.0])
    operator = lambda v: v * diagonal  # noqa: E731
    start = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # A·start = 0: the space {start} is invariant
    found = lanczos(operator, 5, v0=start, tol=1e-12)
    assert float(found.theta_max[0]) == pytest.approx(5.0, rel=1e-12)
    assert float(found.theta_min[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(found.residual_max[0]) <= 1e-10


def test_lanczos_from_a_random_start_stops_at_the_breakdown_of_a_low_rank_operator() -> None:
    g = torch.Generator().manual_seed(0)
    factor = torch.randn(40, 3, generator=g)
    matrix = factor @ factor.T  # rank 3: a random start spans range + one null direction
    found = lanczos(lambda v: v @ matrix, 40, max_iter=40, tol=1e-12)
    assert found.iterations <= 5
    assert float(found.theta_max[0]) == pytest.approx(
        float(torch.linalg.eigvalsh(matrix)[-1]), rel=1e-10
    )


def test_spectrum_refuses_complex_and_empty_matrices_and_reads_numpy_and_scipy() -> None:
    hermitian = torch.tensor([[2.0, 1j], [-1j, 2.0]], dtype=torch.complex128)
    with pytest.raises(plstar.PlstarInputError, match="real"):
        plstar.spectrum(hermitian)
    with pytest.raises(plstar.PlstarInputError, match="empty"):
        plstar.spectrum(torch.zeros(0, 0))
    with pytest.raises(plstar.PlstarInputError, match="square"):
        plstar.spectrum(torch.zeros(2, 3))
    with pytest.raises(plstar.PlstarInputError, match="NaN"):
        plstar.spectrum(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]), method="lanczos")
    a = torch.randn(7, 7, generator=torch.Generator().manual_seed(0))
    a = a @ a.T
    exact = torch.linalg.eigvalsh(a)
    for form in (a.numpy(), sparse.csr_matrix(a.numpy())):
        found = plstar.spectrum(form)
        assert found.lambda_max == pytest.approx(float(exact[-1]), rel=1e-10)
        assert abs(found.lambda_min - float(exact[0])) <= found.lambda_min_error


def test_an_integer_or_string_accumulation_dtype_is_refused() -> None:
    model, x, _ = problem()
    with pytest.raises(plstar.PlstarInputError, match=r"torch\.float64"):
        plstar.tangent_kernel(model, x, dtype=torch.int64)
    with pytest.raises(plstar.PlstarInputError, match=r"write torch\.float64"):
        plstar.tangent_kernel(model, x, dtype="float64")  # type: ignore[arg-type]


def test_training_on_targets_other_than_the_monitors_is_refused() -> None:
    model, x, y = problem()
    monitor = plstar.Monitor(model, x, y, every=1, kernel_samples=N)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(plstar.PlstarInputError, match="another y"):
        plstar.train(model, x, y + 1.0, steps=2, monitor=monitor)
    with pytest.raises(plstar.PlstarInputError, match="another x"):
        plstar.train(model, x + 1.0, y, steps=2, monitor=monitor)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_an_interpolating_start_is_a_global_minimum_and_training_stops() -> None:
    model, x, _ = problem()
    with torch.no_grad():
        y = model(x)  # L(w₀) = 0 exactly
    analysis = plstar.analyze(model, x, y)
    assert analysis.at_global_minimum and analysis.loss0 == 0.0
    assert analysis.radius == 0.0 and analysis.steps_to_target == 0.0
    assert "global minimum" in analysis.verdict[0]
    assert not any("randomness" in line for line in analysis.verdict)
    # the kernel at the minimum is still measured: λ_min ≤ λ_max of the oracle's K
    K = plstar.tangent_kernel(model, x)
    assert analysis.kernel.lambda_max == pytest.approx(
        float(torch.linalg.eigvalsh(K)[-1]), rel=1e-10
    )
    json.dumps(analysis.to_dict(), allow_nan=False)
    before = [p.detach().clone() for p in model.parameters()]
    result = plstar.train(model, x, y, steps=5)
    assert result.steps == 0 and result.final_loss == 0.0 and "global minimum" in result.verdict[0]
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))


def test_json_reports_lambda_min_zero_for_a_singular_kernel_and_keeps_the_raw_value() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1)).double()  # m = 3 < n·k = 8: K is singular
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    analysis = plstar.analyze(model, x, y)
    assert analysis.kernel.is_singular
    kernel = analysis.to_dict()["kernel"]
    assert kernel["lambda_min"] == 0.0
    assert kernel["lambda_min_raw"] == analysis.kernel.lambda_min
    assert abs(kernel["lambda_min_raw"]) <= kernel["precision_floor"]

"""Hostile models and data, through the public API: each is refused with one line that names the
problem (and the first offending sample where there is one), and the user's model, buffers and
global random state are left as they were.

The model check runs the model over every sample, so what only later samples reveal is caught:
an exception, NaN/Inf, a layout that is not batch first, randomness, batch coupling, a forward
that writes to the module's state.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_model_unchanged import assert_unchanged, snapshot
from torch import Tensor, nn

import plstar

DEFAULT_DTYPE = torch.float64
T = TypeVar("T")


class Custom(nn.Module):
    """A Linear read-out and a user-written forward ``rule(self, x)``."""

    def __init__(self, rule: Callable[[Custom, Tensor], object], d: int = 3, k: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(d, k)
        self.rule = rule

    def forward(self, x: Tensor) -> object:
        return self.rule(self, x)


class CallCounter(nn.Module):
    """Counts its calls in a buffer: a forward that changes the module's state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x)


def _quietly(make: Callable[[], T]) -> T:
    """``make()`` without torch's warnings (beta sparse CSR, zero-element initialisation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return make()


def _data(n: int = 12, d: int = 3) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def _embedding_out_of_range() -> tuple[nn.Module, Tensor]:
    tokens = torch.randint(0, 5, (10, 2), generator=torch.Generator().manual_seed(0))
    tokens[7, 1] = 9  # vocabulary of 5
    return nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 1)), tokens


def _with(sample: int, column: int, value: float, positive: bool = False) -> Tensor:
    x = _data().abs() if positive else _data()
    x[sample, column] = value
    return x


def _instance_norm(track: bool) -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4), nn.Unflatten(1, (2, 2)), nn.InstanceNorm1d(2, track_running_stats=track),
        nn.Flatten(), nn.Linear(4, 1),
    )  # fmt: skip


def _spectral_norm() -> nn.Module:
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4))
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 1)).train()


def _backward_hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    return model


@dataclass(frozen=True)
class Hostile:
    build: Callable[[], tuple[nn.Module, Tensor]]
    error: type[plstar.PlstarInputError]
    message: str  # a regular expression the one-line message must contain


def _custom(rule: Callable[[Custom, Tensor], object], x: Tensor | None = None) -> Callable:
    return lambda: (Custom(rule), _data() if x is None else x)


HOSTILE: dict[str, Hostile] = {
    "embedding index out of range at sample 7": Hostile(
        _embedding_out_of_range, plstar.PlstarInputError, r"sample 7 .*IndexError"
    ),
    "NaN only at sample 4": Hostile(
        _custom(lambda m, x: m.lin(torch.sqrt(x)), _with(4, 0, -1.0, positive=True)),
        plstar.IllDefinedModelError,
        r"NaN or Inf at sample 4",
    ),
    "Inf only at sample 5": Hostile(
        _custom(lambda m, x: m.lin(1 / x), _with(5, 2, 0.0)),
        plstar.IllDefinedModelError,
        r"NaN or Inf at sample 5",
    ),
    "output laid out (1, n·k)": Hostile(
        _custom(lambda m, x: m.lin(x).reshape(1, -1)),
        plstar.PlstarInputError,
        r"batch first.*gave \(1, 16\)",
    ),
    "output with one row too many": Hostile(
        _custom(lambda m, x: torch.cat([m.lin(x), m.lin(x[:1])])),
        plstar.PlstarInputError,
        r"batch first.*sample 0 of x \(1\) gave \(2, 2\)",
    ),
    "output transposed (k, n)": Hostile(
        _custom(lambda m, x: m.lin(x).T), plstar.PlstarInputError, r"batch first"
    ),
    "output size per sample depends on the batch": Hostile(
        _custom(lambda m, x: m.lin(x).repeat(1, x.shape[0])),
        plstar.PlstarInputError,
        r"batch first.*one sample gave 2",
    ),
    "output a tuple without a tensor": Hostile(
        _custom(lambda m, x: ("logits", m.lin(x).tolist())),
        plstar.PlstarInputError,
        r"batch first.*gave tuple",
    ),
    "output integer (argmax)": Hostile(
        _custom(lambda m, x: m.lin(x).argmax(1, keepdim=True)),
        plstar.IllDefinedModelError,
        r"int64, not floating point",
    ),
    "no outputs": Hostile(
        lambda: (_quietly(lambda: nn.Linear(3, 0)), _data()),
        plstar.IllDefinedModelError,
        r"no outputs",
    ),
    "functional dropout": Hostile(
        _custom(lambda m, x: F.dropout(m.lin(x), 0.5, training=True)),
        plstar.IllDefinedModelError,
        r"forward is random",
    ),
    "torch.randn in forward": Hostile(
        _custom(lambda m, x: m.lin(x) + 0.1 * torch.randn(x.shape[0], 2)),
        plstar.IllDefinedModelError,
        r"forward is random",
    ),
    "nn.Dropout in train mode": Hostile(
        lambda: (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)), _data()),
        plstar.IllDefinedModelError,
        r"Dropout\) is in train mode",
    ),
    "batch-mean subtraction": Hostile(
        _custom(lambda m, x: m.lin(x - x.mean(0))),
        plstar.IllDefinedModelError,
        r"batch-coupled: sample 0",
    ),
    "functional batch norm (fails alone)": Hostile(
        _custom(lambda m, x: m.lin(F.batch_norm(x, None, None, training=True))),
        plstar.IllDefinedModelError,
        r"batch-coupled: it runs on samples 0-7 .*not on sample 0",
    ),
    "coupled only in batches above 8": Hostile(
        _custom(lambda m, x: m.lin(x) - (m.lin(x).mean(0) if x.shape[0] > 8 else 0)),
        plstar.IllDefinedModelError,
        r"batch-coupled.*batch of 12",
    ),
    "fails only in a batch": Hostile(
        _custom(lambda m, x: m.lin(x if x.shape[0] < 5 else x[:, :2])),
        plstar.IllDefinedModelError,
        r"batch-coupled: it fails on samples 0-7 .*alone",
    ),
    "BatchNorm in train mode": Hostile(
        lambda: (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), _data()),
        plstar.IllDefinedModelError,
        r"BatchNorm1d\) is in train mode",
    ),
    "InstanceNorm tracking statistics in train mode": Hostile(
        lambda: (_instance_norm(True), _data()),
        plstar.IllDefinedModelError,
        r"InstanceNorm1d\) is in train mode with track_running",
    ),
    "forward counts its calls in a buffer": Hostile(
        lambda: (CallCounter(), _data()),
        plstar.IllDefinedModelError,
        r"changes its buffer calls in place",
    ),
    "spectral norm's power iteration in train mode": Hostile(
        lambda: (_spectral_norm(), _data()),
        plstar.IllDefinedModelError,
        r"changes its buffer 0\.parametrizations\.weight\.0\._u",
    ),
    "x overflows the model's float32 at sample 3": Hostile(
        lambda: (nn.Linear(3, 1).float(), _with(3, 0, 1e300)),
        plstar.DataError,
        r"x\[3\] is too large for the model's dtype torch\.float32",
    ),
    "backward hook on a layer": Hostile(
        lambda: (_backward_hooked(), _data()),
        plstar.IllDefinedModelError,
        r"0 \(Linear\) has a backward hook",
    ),
    "model cannot run on x": Hostile(
        lambda: (nn.Linear(4, 1), _data()),
        plstar.PlstarInputError,
        r"sample 0 of x of shape \(12, 3\).*RuntimeError",
    ),
}

ENTRY_POINTS: dict[str, Callable[[nn.Module, Tensor], object]] = {
    "tangent_kernel": lambda model, x: plstar.tangent_kernel(model, x),
    "analyze": lambda model, x: plstar.analyze(model, x, torch.zeros(x.shape[0], 1)),
    "loss_sharpness": lambda model, x: plstar.loss_sharpness(model, x, torch.zeros(x.shape[0])),
    "kernel_operator": lambda model, x: plstar.kernel_operator(model, x),
}


def _refused(call: Callable[[], object], error: type[Exception], message: str) -> str:
    with pytest.raises(error) as caught:
        call()
    text = str(caught.value)
    assert "\n" not in text, text
    assert re.search(message, text), text
    return text


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_model_is_refused_in_one_line_and_left_unchanged(case: str, entry: str) -> None:
    torch.manual_seed(0)
    hostile = HOSTILE[case]
    model, x = hostile.build()
    model = model.to(next(model.parameters()).dtype)
    before = snapshot(model)
    _refused(lambda: ENTRY_POINTS[entry](model, x), hostile.error, hostile.message)
    assert_unchanged(before, model)


@pytest.mark.parametrize("repaired", ["eval", "no running statistics"])
def test_per_sample_normalisation_is_accepted(repaired: str) -> None:
    """The refusals are about the mode, not the layer: InstanceNorm without running statistics
    normalises each sample alone, and spectral norm in eval mode is a fixed function."""
    torch.manual_seed(0)
    x = _data()
    for model in (
        _instance_norm(True).eval() if repaired == "eval" else _instance_norm(False),
        _spectral_norm().eval(),
    ):
        assert plstar.tangent_kernel(model, x).shape == (12, 12)


def test_round_off_between_batch_sizes_is_not_called_coupling() -> None:
    """A wide float32 layer gives slightly different sums in a batch and alone (other GEMM
    kernels); those differences are round-off, far below the tolerance √ε."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 3)).float()
    x = torch.randn(40, 64)
    assert plstar.tangent_kernel(model, x).shape == (120, 120)


def test_refusal_names_the_sample_when_every_block_is_one_sample() -> None:
    """A memory budget of one byte makes every block one sample: the refusal still names the
    first bad sample."""
    model, x = HOSTILE["NaN only at sample 4"].build()
    _refused(
        lambda: plstar.tangent_kernel(model, x, memory_budget=1),
        plstar.IllDefinedModelError, r"sample 4",
    )  # fmt: skip


def test_a_remembered_check_is_redone_after_the_data_or_the_module_changes() -> None:
    """The data check is remembered per module, but not past an in-place change of x, a new x,
    or a new parameter; non-finite parameter values are refused on every call."""
    torch.manual_seed(0)
    model = Custom(lambda m, x: m.lin(torch.sqrt(x)))
    x = _data().abs()
    plstar.tangent_kernel(model, x)
    x[6, 1] = -1.0
    _refused(lambda: plstar.tangent_kernel(model, x), plstar.IllDefinedModelError, "sample 6")
    x[6, 1] = 1.0
    plstar.tangent_kernel(model, x)
    with torch.no_grad():
        model.lin.weight[0, 0] = math.inf
    _refused(lambda: plstar.tangent_kernel(model, x), plstar.DataError, "non-finite")
    with torch.no_grad():
        model.lin.weight[0, 0] = 1.0
    plstar.tangent_kernel(model, x)
    model.lin.weight = nn.Parameter(torch.full((2, 3), 1e308))  # finite; the outputs overflow
    _refused(
        lambda: plstar.tangent_kernel(model, x), plstar.IllDefinedModelError, r"Inf at sample \d"
    )
    model.lin.weight = nn.Parameter(torch.ones(2, 3))
    y = x.clone()
    y[2, 0] = -4.0
    _refused(lambda: plstar.tangent_kernel(model, y), plstar.IllDefinedModelError, "sample 2")


def test_targets_whose_loss_overflows_the_model_dtype_are_refused() -> None:
    model, x = nn.Linear(3, 2).float(), torch.randn(5, 3)
    _refused(
        lambda: plstar.pl_ratio(model, x, torch.full((5, 2), 1e30)),
        plstar.DataError, r"y is too large for the model's dtype torch\.float32",
    )  # fmt: skip
    assert math.isfinite(plstar.pl_ratio(model, x, torch.full((5, 2), 1e6)))


# ----------------------------------------------------------------------------- data arguments
def _inference_tensor() -> Tensor:
    with torch.inference_mode():
        return torch.ones(4, 3)


def _not_tensors() -> dict[str, object]:
    dense = torch.ones(4, 3)
    return {
        "numpy array": np.ones((4, 3)),
        "list": [[1.0, 2.0, 3.0]] * 4,
        "scipy sparse matrix": scipy.sparse.csr_matrix(np.ones((4, 3))),
        "torch sparse": dense.to_sparse(),
        "torch sparse csr": _quietly(dense.to_sparse_csr),
        "meta tensor": torch.empty(4, 3, device="meta"),
        "complex tensor": dense.to(torch.complex128),
        "0-d tensor": torch.tensor(1.0),
        "inference-mode tensor": _inference_tensor(),
        "empty tensor": torch.ones(0, 3),
        "file name": "x.npy",
    }


@pytest.mark.parametrize("argument", ["x", "x2", "y"])
@pytest.mark.parametrize("kind", sorted(_not_tensors()))
def test_data_that_is_not_a_dense_real_tensor_is_refused_at_the_door(
    argument: str, kind: str
) -> None:
    model, good = nn.Linear(3, 2), torch.randn(4, 3)
    bad = _not_tensors()[kind]
    calls = {
        "x": lambda: plstar.tangent_kernel(model, bad),  # type: ignore[arg-type]
        "x2": lambda: plstar.tangent_kernel(model, good, bad),  # type: ignore[arg-type]
        "y": lambda: plstar.pl_ratio(model, good, bad),  # type: ignore[arg-type]
    }
    before = snapshot(model)
    _refused(calls[argument], plstar.DataError, rf"^{argument} ")
    assert_unchanged(before, model)


_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64]
_arrays = hnp.arrays(
    st.sampled_from(_DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
)
_float_dtypes = st.sampled_from([np.float16, np.float32, np.float64])


def _objects(*shapes: tuple[int, ...]) -> st.SearchStrategy[object]:
    """Anything a user might pass: Python objects, numpy arrays, tensors of any dtype and shape,
    and float tensors of the ``shapes`` that may be valid (with NaN, Inf and huge values)."""
    near = st.sampled_from(shapes).flatmap(lambda shape: hnp.arrays(_float_dtypes, shape))
    return st.one_of(
        st.none(), st.integers(), st.floats(), st.text(max_size=5), st.booleans(),
        st.lists(st.floats(allow_nan=False), max_size=4),
        st.dictionaries(st.text(max_size=2), st.integers()),
        _arrays, _arrays.map(torch.from_numpy), near.map(torch.from_numpy),
    )  # fmt: skip


def _refused_or_valid(call: Callable[[], object]) -> object | None:
    try:
        return call()
    except plstar.PlstarInputError as error:
        assert "\n" not in str(error), str(error)
        return None


@settings(max_examples=60, deadline=None)
@given(x=_objects((1, 3), (4, 3), (5, 1, 3), (4, 2), (3,)))
def test_any_x_gives_a_kernel_or_a_plstar_input_error(x: object) -> None:
    model = nn.Linear(3, 2)
    K = _refused_or_valid(lambda: plstar.tangent_kernel(model, x))  # type: ignore[arg-type]
    if K is not None:  # a valid x: n samples, a symmetric PSD kernel (n·k, n·k)
        assert isinstance(x, Tensor) and K.shape == (2 * x.shape[0], 2 * x.shape[0])
        assert torch.equal(K, K.T) and bool(torch.isfinite(K).all())


@settings(max_examples=60, deadline=None)
@given(y=_objects((5, 2), (5, 1, 2), (10,), (5,), (4, 2), (5, 2, 2)))
def test_any_y_gives_a_ratio_or_a_plstar_input_error(y: object) -> None:
    model, x = nn.Linear(3, 2), torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    rho = _refused_or_valid(lambda: plstar.pl_ratio(model, x, y))  # type: ignore[arg-type]
    if rho is not None:
        assert isinstance(y, Tensor) and y.numel() == 10 and math.isfinite(float(rho))  # type: ignore[arg-type]

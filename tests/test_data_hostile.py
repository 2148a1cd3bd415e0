"""Hostile data files: whatever a .npz, .csv or .pt holds, ``load_file`` returns a Dataset that
satisfies its invariants or raises PlstarInputError (DataError) with a one-line message; never any
other exception, and never torch's advice to load with ``weights_only=False``.

Property-based over arbitrary contents (shapes including 0-d and empty, integer, boolean, complex,
float16, text and object dtypes, NaN/Inf, mismatched lengths, random bytes), plus named cases for
tensors a .pt file can hold but a data set cannot be (sparse, meta, quantized, nested...).
"""

from __future__ import annotations

import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from plstar.data import Dataset, load_file
from plstar.errors import DataError, PlstarInputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float64)
SCALINGS = ("none", "sphere", "standardize")

NUMPY_DTYPES = st.sampled_from([
    np.bool_, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float32,
    np.float64, np.dtype(">f8"), np.complex64, np.dtype("<U3"), np.dtype("S2"),
])  # fmt: skip
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
ARRAYS = hnp.arrays(NUMPY_DTYPES, SHAPES)
OBJECTS = st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), max_size=4).map(
    lambda items: np.array([*items, None], dtype=object)
)


NUMERIC = [np.int8, np.int64, np.uint8, np.float16, np.float32, np.float64, np.dtype(">f8")]


@st.composite
def paired(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) close to a data set: mostly n matching rows of numbers, sometimes off by one, NaN,
    huge or with no columns, so that both loading and refusing are exercised."""
    n = draw(st.integers(1, 5))
    x_shape = draw(st.sampled_from([(n,), (n, 3), (n, 2, 2), (n, 0)]))
    y_rows = draw(st.sampled_from([n, n, n, n + 1]))
    y_shape = draw(st.sampled_from([(y_rows,), (y_rows, 2)]))
    arrays = []
    for shape in (x_shape, y_shape):
        dtype = np.dtype(draw(st.sampled_from(NUMERIC)))
        finite = draw(st.integers(0, 4)) > 0
        elements = hnp.from_dtype(dtype, allow_nan=not finite, allow_infinity=not finite)
        arrays.append(draw(hnp.arrays(dtype, shape, elements=elements)))
    return arrays[0], arrays[1]


def check_invariants(dataset: Dataset, dtype: torch.dtype) -> None:
    """What every caller of load_file relies on."""
    x, y = dataset.x, dataset.y
    assert x.shape[0] == y.shape[0] >= 1
    assert y.ndim == 2 and y.shape[1] >= 1 and y.dtype == dtype
    assert bool(torch.isfinite(y).all())
    assert dataset.d >= 1 and dataset.n == x.shape[0] and dataset.k == y.shape[1]
    if x.is_floating_point():
        assert x.dtype == dtype and bool(torch.isfinite(x).all())
    else:
        assert x.dtype == torch.int64


def load_or_refuse(path: Path, **options) -> Dataset | None:
    """load_file's result, None for a refusal (checked to be one line without unpickling advice).
    Any other exception propagates and fails the test."""
    dtype = options.setdefault("dtype", torch.float64)
    try:
        dataset = load_file(path, **options)
    except PlstarInputError as error:
        text = str(error)
        assert text and "\n" not in text and "weights_only" not in text, text
        event("refused")
        return None
    check_invariants(dataset, dtype)
    event("loaded")
    return dataset


def in_folder(write: Callable[[Path], None], suffix: str, **options) -> Dataset | None:
    """Write a file with ``write`` into a fresh folder (one per example) and load it."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch/numpy notes about odd dtypes are not under test
        path = Path(folder) / f"data{suffix}"
        write(path)
        return load_or_refuse(path, **options)


OPTIONS = st.fixed_dictionaries(
    {"dtype": st.sampled_from(DTYPES), "scaling": st.sampled_from(SCALINGS)}
)


@SETTINGS
@given(
    xy=st.one_of(
        paired(), paired(), st.tuples(st.one_of(ARRAYS, OBJECTS), st.one_of(ARRAYS, OBJECTS))
    ),
    keys=st.sampled_from([("x", "y"), ("x", "y"), ("x",), ("y", "z"), ("x", "y", "extra")]),
    options=OPTIONS,
)  # fmt: skip
def test_npz_with_any_arrays_loads_or_is_refused(xy, keys, options) -> None:
    x, y = xy
    arrays = dict(zip(("x", "y", "extra"), (x, y, x), strict=True))
    arrays["z"] = y
    in_folder(lambda p: np.savez(p, **{k: arrays[k] for k in keys}), ".npz", **options)


def _as_torch(array: np.ndarray) -> torch.Tensor | object:
    """A tensor of the array where torch has its dtype, else its nested list (not a tensor)."""
    try:
        return torch.from_numpy(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("=")))
    except (TypeError, ValueError, RuntimeError):
        return array.tolist()


def _odd_tensor(kind: str, rows: int) -> torch.Tensor:
    base = torch.randn(max(rows, 1), 3, generator=torch.Generator().manual_seed(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated: still in old files
        return _ODD[kind](base, rows)


_ODD: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "sparse": lambda base, rows: base.to_sparse(),
    "meta": lambda base, rows: torch.empty(rows, 3, device="meta"),
    "quantized": lambda base, rows: torch.quantize_per_tensor(base, 0.1, 0, torch.qint8),
    "transposed": lambda base, rows: base.T,
    "expanded": lambda base, rows: base[:1].expand(rows, 3),
    "bfloat16": lambda base, rows: base.to(torch.bfloat16),
    "float8": lambda base, rows: base.to(torch.float8_e4m3fn),
    "uint16": lambda base, rows: (base.abs() * 10).to(torch.uint16),
    "requires_grad": lambda base, rows: base.clone().requires_grad_(),
    "parameter": lambda base, rows: torch.nn.Parameter(base.clone()),
    "complex": lambda base, rows: base.to(torch.complex64),
    "bool": lambda base, rows: base > 0,
}


PT_VALUES = st.one_of(
    ARRAYS.map(_as_torch),
    st.tuples(st.sampled_from(sorted(_ODD)), st.integers(0, 5)).map(lambda a: _odd_tensor(*a)),
    st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.none()),
)


@SETTINGS
@given(
    xy=st.one_of(paired().map(lambda a: (_as_torch(a[0]), _as_torch(a[1]))),
                 st.tuples(PT_VALUES, PT_VALUES)),
    container=st.sampled_from(["dict", "dict", "list", "tensor"]),
    options=OPTIONS,
)  # fmt: skip
def test_pt_with_any_contents_loads_or_is_refused(xy, container, options) -> None:
    x, y = xy
    content = {"dict": {"x": x, "y": y}, "list": [x, y], "tensor": x}[container]
    in_folder(lambda p: torch.save(content, p), ".pt", **options)


CELLS = st.one_of(
    st.integers(-5, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "inf", "-inf", "1e400", "abc", " 3 ", "0x10", "1_0", "\x00"]),
)
NUMBERS = st.one_of(st.integers(-5, 5).map(str), st.floats(-1e3, 1e3).map(repr))
RAGGED = st.lists(st.lists(CELLS, min_size=0, max_size=4), min_size=0, max_size=5)


@st.composite
def table(draw: st.DrawFn) -> list[list[str]]:
    """Rectangular rows of numbers under an optional header, now and then one hostile cell."""
    width, height = draw(st.integers(1, 4)), draw(st.integers(0, 5))
    rows = [[draw(NUMBERS) for _ in range(width)] for _ in range(height)]
    if rows and draw(st.booleans()):
        rows[draw(st.integers(0, height - 1))][draw(st.integers(0, width - 1))] = draw(CELLS)
    header = draw(st.sampled_from([[], [["abc"] + [f"c{i}" for i in range(1, width)]]]))
    return header + rows


@SETTINGS
@given(rows=st.one_of(table(), table(), RAGGED), target=st.sampled_from([None, None, "abc", "1"]),
       options=OPTIONS)  # fmt: skip
def test_csv_with_any_cells_loads_or_is_refused(rows, target, options) -> None:
    text = "\n".join(",".join(row) for row in rows)
    in_folder(lambda p: p.write_text(text), ".csv", target=target, **options)


@SETTINGS
@given(text=st.text(max_size=60), options=OPTIONS)
def test_csv_with_any_text_loads_or_is_refused(text, options) -> None:
    in_folder(lambda p: p.write_text(text, encoding="utf-8"), ".csv", **options)


@SETTINGS
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".npz", ".pt", ".csv"]))
def test_random_bytes_are_refused_or_loaded_in_every_format(content, suffix) -> None:
    in_folder(lambda p: p.write_bytes(content), suffix)


# --- named .pt and .npz refusals: one line, the reason, never weights_only=False ----------------


class Pickled:
    """A class torch's weights_only loader refuses to instantiate."""


# (contents, words of the refusal); built on use, as building some warns
PT_REFUSALS: dict[str, tuple[Callable[[], object], str]] = {
    "sparse": (lambda: {"x": torch.eye(3).to_sparse(), "y": torch.zeros(3)}, "sparse tensor"),
    "meta": (lambda: {"x": torch.empty(3, 2, device="meta"), "y": torch.zeros(3)}, "meta tensor"),
    "complex": (lambda: {"x": torch.ones(3, 2, dtype=torch.complex64), "y": torch.zeros(3)},
                "torch.complex64"),
    "bool": (lambda: {"x": torch.ones(3, 2, dtype=torch.bool), "y": torch.zeros(3)}, "torch.bool"),
    "nested": (lambda: {"x": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
                        "y": torch.zeros(2)}, "nested tensor"),
    "numpy inside": (lambda: {"x": np.ones((3, 2)), "y": np.zeros(3)}, "objects other than tensors"),
    "pickled class": (lambda: {"x": Pickled(), "y": torch.zeros(3)}, "objects other than tensors"),
    "not a dict": (lambda: [torch.ones(3, 2), torch.zeros(3)], "expected a dict"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PT_REFUSALS))
def test_pt_refusals_are_one_line_and_never_suggest_unpickling(tmp_path: Path, case: str) -> None:
    make, reason = PT_REFUSALS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(make(), tmp_path / "d.pt")
    with pytest.raises(DataError) as caught:
        load_file(tmp_path / "d.pt")
    text = str(caught.value)
    assert reason in text and "d.pt" in text
    assert "\n" not in text and "weights_only" not in text


def test_quantized_tensor_is_refused_and_loading_prints_no_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.quantize_per_tensor(torch.ones(3, 2), 0.1, 0, torch.qint8)
        torch.save({"x": x, "y": torch.zeros(3)}, tmp_path / "q.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's TypedStorage note must not reach the user
        with pytest.raises(DataError, match=r"quantized .*dequantize"):
            load_file(tmp_path / "q.pt")


def test_a_plain_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Exploit(str(marker)))
    (tmp_path / "d.pt").write_bytes(payload)
    with pytest.raises(DataError, match="pickled code is refused"):
        load_file(tmp_path / "d.pt")
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_strided_and_low_precision_tensors_load_exactly(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(4, 3)
    torch.save({"x": base.T.contiguous().T, "y": base[:, :1].expand(4, 2).to(torch.bfloat16)},
               tmp_path / "d.pt")  # fmt: skip
    ds = load_file(tmp_path / "d.pt", dtype=torch.float64)
    assert torch.equal(ds.x, base.double()) and ds.x.is_contiguous()
    assert torch.equal(ds.y, base[:, :1].expand(4, 2).double())


@pytest.mark.parametrize(
    "arrays, reason",
    [
        ({"x": np.array(["a", "b"]), "y": np.zeros(2)}, "text"),
        ({"x": np.array([1, None], dtype=object), "y": np.zeros(2)}, "Python objects"),
        ({"x": np.float64(3.0), "y": np.zeros(1)}, "must be (n, d)"),
        ({"x": np.ones((2, 0)), "y": np.zeros(2)}, "at least one feature"),
        ({"x": np.ones((2, 2)), "y": np.zeros((2, 0))}, "at least one feature"),
        ({"x": np.ones((2, 2)), "y": np.full(2, 1e39)}, "overflows"),
        ({"x": np.array([2**64 - 1, 1], dtype=np.uint64), "y": np.zeros(2)}, "beyond int64"),
    ],
)
def test_npz_refusals_name_the_problem(tmp_path: Path, arrays: dict, reason: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=re.escape(reason)) as caught:
        load_file(tmp_path / "d.npz", dtype=torch.float32)
    assert "\n" not in str(caught.value)


def test_big_endian_and_float16_arrays_load_exactly(tmp_path: Path) -> None:
    x = np.arange(6, dtype=">f8").reshape(3, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(3, dtype=np.float16))
    ds = load_file(tmp_path / "d.npz", dtype=torch.float64)
    assert ds.x.tolist() == x.tolist() and ds.y.flatten().tolist() == [0.0, 1.0, 2.0]

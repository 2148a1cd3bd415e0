from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plstar.data import Dataset, load_digits, load_file, scale_inputs
from plstar.errors import DataError, PlstarInputError


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- scale_inputs ---------------------------------------------------------------------------


def test_sphere_scaling_centres_features_and_sets_row_norms_to_sqrt_d() -> None:
    x = torch.rand(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 3.0
    out = scale_inputs(x, "sphere")
    # Row rescaling moves the column means; the centring is checked before it, through directions.
    centred = x - x.mean(dim=0)
    torch.testing.assert_close(
        out / out.norm(dim=1, keepdim=True), centred / centred.norm(dim=1, keepdim=True)
    )
    torch.testing.assert_close(
        out.norm(dim=1), torch.full((50,), math.sqrt(7), dtype=torch.float64)
    )
    assert out.dtype == x.dtype and out.shape == x.shape


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12), d=st.integers(1, 9), offset=st.floats(-1e3, 1e3), seed=st.integers(0, 99)
)
def test_sphere_scaling_row_norms_hold_for_any_offset(
    n: int, d: int, offset: float, seed: int
) -> None:
    x = (
        torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        + offset
    )
    norms = scale_inputs(x, "sphere").norm(dim=1)
    torch.testing.assert_close(norms, torch.full((n,), math.sqrt(d), dtype=torch.float64))


def test_sphere_scaling_refuses_row_equal_to_feature_mean() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [2.0, 3.0]])  # last row is the mean
    with pytest.raises(DataError, match=r"row\(s\) \[2\].*zero after centring"):
        scale_inputs(x, "sphere")


def test_standardize_gives_zero_mean_unit_std_and_only_centres_constant_features() -> None:
    x = torch.tensor([[1.0, 5.0, 0.1], [2.0, 5.0, 0.1], [6.0, 5.0, 0.1]], dtype=torch.float64)
    out = scale_inputs(x, "standardize")
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(3, dtype=torch.float64))
    assert out[:, 0].std(unbiased=False).item() == pytest.approx(1.0)
    # A constant column must stay (near) zero, not be blown up by dividing rounding noise.
    assert out[:, 1:].abs().max().item() < 1e-12


def test_none_scaling_returns_input_unchanged() -> None:
    x = torch.randn(4, 3)
    assert torch.equal(scale_inputs(x, "none"), x)


def test_unknown_scaling_is_refused_listing_choices() -> None:
    with pytest.raises(PlstarInputError, match="sphere, standardize, none"):
        scale_inputs(torch.randn(3, 2), "unit")  # type: ignore[arg-type]


def test_scaling_integer_inputs_is_refused() -> None:
    with pytest.raises(PlstarInputError, match="scaling='none'"):
        scale_inputs(torch.arange(6).reshape(3, 2), "sphere")


# --- digits ---------------------------------------------------------------------------------


def test_digits_parity_targets_are_plus_minus_one() -> None:
    from sklearn.datasets import load_digits as sk

    ds = load_digits()
    labels = sk().target
    assert ds.x.shape == (1797, 64) and ds.y.shape == (1797, 1)
    expected = torch.tensor(np.where(labels % 2 == 0, 1.0, -1.0), dtype=torch.float32)
    assert torch.equal(ds.y[:, 0], expected)
    assert (ds.n, ds.k, ds.d, ds.name, ds.scaling) == (1797, 1, 64, "digits", "sphere")


def test_digits_default_scaling_is_sphere_and_described() -> None:
    ds = load_digits(100, dtype=torch.float64)
    torch.testing.assert_close(ds.x.norm(dim=1), torch.full((100,), 8.0, dtype=torch.float64))
    assert "n=100 of 1797" in ds.description and "rows scaled to norm sqrt(64)" in ds.description
    assert "±1 parity (k=1)" in ds.description


def test_one_hot_targets_are_centred() -> None:
    ds = load_digits(200, outputs=10, dtype=torch.float64)
    assert ds.y.shape == (200, 10)
    torch.testing.assert_close(ds.y.sum(dim=1), torch.zeros(200, dtype=torch.float64))
    assert ds.y.unique().tolist() == pytest.approx([-0.1, 0.9])
    assert torch.equal((ds.y > 0).sum(dim=1), torch.ones(200, dtype=torch.int64))


def test_same_seed_same_subset_and_different_seed_different_subset() -> None:
    a, b = load_digits(64, seed=3), load_digits(64, seed=3)
    c = load_digits(64, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)


def test_digits_subset_is_the_seeded_permutation_of_raw_images() -> None:
    from sklearn.datasets import load_digits as sk

    ds = load_digits(30, seed=7, scaling="none", dtype=torch.float64)
    chosen = np.random.default_rng(7).permutation(1797)[:30]
    assert torch.equal(ds.x, torch.tensor(sk().data[chosen]))


@pytest.mark.parametrize("n", [0, 1798, -5])
def test_digits_size_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(PlstarInputError, match=r"1\.\.1797"):
        load_digits(n)


def test_digits_outputs_other_than_1_or_10_are_refused() -> None:
    with pytest.raises(PlstarInputError, match=r"1 .* or 10"):
        load_digits(10, outputs=3)


# --- files ----------------------------------------------------------------------------------


def test_npz_roundtrip(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).normal(size=(6, 3)), np.arange(6.0)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_file(tmp_path / "d.npz", dtype=torch.float64)
    assert torch.equal(ds.x, torch.tensor(x)) and torch.equal(ds.y, torch.tensor(y).reshape(6, 1))
    assert (ds.name, ds.scaling, ds.n, ds.d, ds.k) == ("d.npz", "none", 6, 3, 1)


def test_pt_roundtrip_with_scaling(tmp_path: Path) -> None:
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    ds = load_file(tmp_path / "d.pt", scaling="sphere", dtype=torch.float64)
    torch.testing.assert_close(ds.x, scale_inputs(x, "sphere"))
    assert torch.equal(ds.y, y) and "rows scaled to norm sqrt(4)" in ds.description


def test_csv_without_header_uses_last_column_as_target(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "1,2,3\n4,5,6\n")
    ds = load_file(path)
    assert ds.x.tolist() == [[1.0, 2.0], [4.0, 5.0]] and ds.y.tolist() == [[3.0], [6.0]]


def test_csv_with_header_and_named_target(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "a,label,b\n1,10,2\n3,30,4\n")
    ds = load_file(path, target="label")
    assert ds.x.tolist() == [[1.0, 2.0], [3.0, 4.0]] and ds.y.tolist() == [[10.0], [30.0]]


def test_csv_unknown_target_lists_available_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no column 'c'.*\['a', 'b'\]"):
        load_file(path, target="c")


def test_csv_named_target_without_header_is_refused(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "1,2\n3,4\n")
    with pytest.raises(DataError, match="no header row"):
        load_file(path, target="y")


def test_csv_non_numeric_cell_is_refused_naming_row(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "a,b,y\n1,2,3\n4,oops,6\n")
    with pytest.raises(DataError, match=r"row 3, column 2 \('b'\): 'oops' is not a number"):
        load_file(path)


def test_csv_ragged_row_is_refused(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "1,2,3\n4,5\n")
    with pytest.raises(DataError, match="row 2: 2 fields, expected 3"):
        load_file(path)


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".pt"])
def test_nan_in_file_is_refused(tmp_path: Path, suffix: str) -> None:
    x, y = np.ones((3, 2)), np.array([1.0, np.nan, 0.0])
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, x=x, y=y)
    elif suffix == ".pt":
        torch.save({"x": torch.tensor(x), "y": torch.tensor(y)}, path)
    else:
        np.savetxt(path, np.column_stack([x, y]), delimiter=",")
    with pytest.raises(DataError, match=r"y contains NaN or Inf .*sample 1"):
        load_file(path)


def test_inf_in_inputs_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.array([[1.0], [np.inf]]), y=np.zeros(2))
    with pytest.raises(DataError, match="x contains NaN or Inf"):
        load_file(tmp_path / "d.npz")


def test_integer_inputs_kept_for_embeddings(tmp_path: Path) -> None:
    tokens = torch.randint(0, 50, (5, 7))
    torch.save({"x": tokens, "y": torch.zeros(5)}, tmp_path / "tok.pt")
    ds = load_file(tmp_path / "tok.pt", dtype=torch.float64)
    assert ds.x.dtype == torch.int64 and torch.equal(ds.x, tokens)
    assert ds.y.dtype == torch.float64 and "token ids" in ds.description
    with pytest.raises(PlstarInputError, match="scaling='none'"):
        load_file(tmp_path / "tok.pt", scaling="sphere")


def test_missing_and_unsupported_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_file(tmp_path / "absent.npz")
    (tmp_path / "d.txt").write_text("1,2\n")
    with pytest.raises(DataError, match=r"'\.txt'.*\.npz, \.pt, \.csv"):
        load_file(tmp_path / "d.txt")


def test_malformed_files_are_refused_with_the_underlying_reason(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"cannot read bad\.npz as \.npz"):
        load_file(tmp_path / "bad.npz")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"bad\.pt is not a file written by torch\.save"):
        load_file(tmp_path / "bad.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(DataError, match="expected a dict"):
        load_file(tmp_path / "list.pt")


def test_missing_arrays_are_refused_listing_what_was_found(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", inputs=np.ones((2, 2)), y=np.ones(2))
    with pytest.raises(DataError, match=r"missing array\(s\) \['x'\]; found .*inputs"):
        load_file(tmp_path / "d.npz")
    torch.save({"x": torch.ones(2, 2)}, tmp_path / "d.pt")
    with pytest.raises(DataError, match=r"\['y'\] are missing"):
        load_file(tmp_path / "d.pt")


def test_empty_and_mismatched_data_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "empty.npz", x=np.ones((0, 2)), y=np.ones(0))
    with pytest.raises(DataError, match="n = 0"):
        load_file(tmp_path / "empty.npz")
    np.savez(tmp_path / "mismatch.npz", x=np.ones((3, 2)), y=np.ones(2))
    with pytest.raises(DataError, match="x has 3 rows but y has 2"):
        load_file(tmp_path / "mismatch.npz")


def test_dataset_requires_two_dimensional_targets() -> None:
    with pytest.raises(DataError, match="2-D"):
        Dataset(x=torch.ones(3, 2), y=torch.ones(3), name="t", scaling="none", description="")

"""embedwatch.rowsums: the C loops of ``_rowsums.c`` and the numpy versions, against float64 references."""

from __future__ import annotations

import contextlib
import itertools
import math
import platform
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from embedwatch import rowsums
from embedwatch.window import Bucket, Summary

# "c": the C loops as the extension picked them for this CPU (AVX2 where it has it); "c-baseline":
# the loops of the build's baseline instruction set, which every other CPU runs.
PATHS = ["c", "c-baseline", "numpy"]


@contextlib.contextmanager
def _on(path: str) -> Iterator[None]:
    """The C loops ("c", "c-baseline") or the numpy versions ("numpy") for the block (a context
    manager, not a fixture: hypothesis runs a test's examples within one fixture)."""
    saved = rowsums._rowsums
    isa = saved.isa() if saved is not None else None
    if path == "numpy":
        rowsums._rowsums = None
    elif path == "c-baseline" and saved is not None:
        saved.use_isa("baseline")
    try:
        yield
    finally:
        rowsums._rowsums = saved
        if saved is not None:
            saved.use_isa(isa)


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


def test_the_extension_is_built_here() -> None:
    # Without it every "c" case below would run the numpy versions and prove nothing about the C.
    assert rowsums._rowsums is not None
    # And where the CPU has AVX2 the extension takes those loops, so "c" and "c-baseline" differ.
    assert rowsums._rowsums.isa() == ("avx2" if platform.machine() == "x86_64" and _cpu_has_avx2() else "baseline")


def test_use_isa_refuses_what_it_does_not_have() -> None:
    c_ext = rowsums._rowsums
    assert c_ext is not None
    with pytest.raises(ValueError, match="no 'avx512' loops"):
        c_ext.use_isa("avx512")
    with _on("c-baseline"):
        assert c_ext.isa() == "baseline"


def _rows(draw: st.DrawFn, max_rows: int = 600) -> np.ndarray:
    n = draw(st.integers(0, max_rows))
    d = draw(st.integers(1, 40))  # across blocks of 8 and 16 columns and their remainders
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
    values = hnp.arrays(np.float32, (n, d), elements=st.floats(-1, 1, width=32))
    return draw(values) * np.float32(scale)


@st.composite
def rows(draw: st.DrawFn) -> np.ndarray:
    return _rows(draw)


@st.composite
def rows_and_segment(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    x = _rows(draw, max_rows=60)
    e = draw(st.integers(1, 7))
    return x[: x.shape[0] - x.shape[0] % e], e


def _in_order(x: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows (and their squares) added to ``start`` one at a time, in order, in float64."""
    s, q = start.copy(), start.copy()
    for r in x.astype(np.float64):
        s = s + r
        q = q + r * r
    return s, q


def _assert_sum(path: str, got: np.ndarray, want: np.ndarray, terms: np.ndarray) -> None:
    """``got`` is ``want`` (the terms added in order) to the bit from the C loops; from numpy, whose
    reductions add in an order of their own, within twice the error bound of a sum of ``terms``."""
    if path != "numpy":
        assert np.array_equal(got, want)
    else:
        bound = 2 * terms.shape[0] * np.finfo(np.float64).eps * np.abs(terms).sum(axis=0)
        assert (np.abs(got - want) <= bound).all()


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(x=rows(), seed=st.integers(0, 2**32 - 1))
def test_add_rows_adds_each_row_in_order(path: str, x: np.ndarray, seed: int) -> None:
    with _on(path):
        start = np.random.default_rng(seed).normal(size=x.shape[1])
        sums, squares = start.copy(), start.copy()
        rowsums.add_rows(x, sums, squares)
        want_s, want_q = _in_order(x, start)
        x64 = x.astype(np.float64)
        _assert_sum(path, sums, want_s, np.vstack([start, x64]))
        _assert_sum(path, squares, want_q, np.vstack([start, x64 * x64]))
        only = start.copy()
        rowsums.add_rows(x, only)
        assert np.array_equal(only, sums)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(x=rows())
def test_column_sums_are_numpys_sum_over_the_rows_to_the_bit(path: str, x: np.ndarray) -> None:
    with _on(path):
        got = rowsums.column_sums(x)
    assert got.dtype == np.float64
    _assert_sum(path, got, _in_order(x, np.zeros(x.shape[1]))[0], x.astype(np.float64))
    # The windows' random-feature sums (256 columns by default, at least 16) were numpy's, which adds
    # the rows in order when they have two or more columns; a single column it sums pairwise.
    if x.shape[1] >= 2:
        assert np.array_equal(got, x.sum(axis=0, dtype=np.float64))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(xe=rows_and_segment())
def test_segment_sums_are_each_segment_added_in_order(path: str, xe: tuple[np.ndarray, int]) -> None:
    with _on(path):
        x, e = xe
        out = rowsums.segment_sums(x, e)
        assert out.shape == (x.shape[0] // e, x.shape[1])
        # Into rows of a caller's array (the scan's segment 0 is the row before them): nothing else written.
        buf = np.full((out.shape[0] + 1, x.shape[1]), 7.0)
        assert rowsums.segment_sums(x, e, out=buf[1:]) is not None
        assert (buf[0] == 7.0).all() and np.array_equal(buf[1:], out)
        for k in range(out.shape[0]):
            seg = x[k * e : (k + 1) * e]
            _assert_sum(path, out[k], _in_order(seg, np.zeros(x.shape[1]))[0], seg.astype(np.float64))


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(x=rows(), seed=st.integers(0, 2**32 - 1))
def test_dots_and_squares_against_exactly_rounded_sums(path: str, x: np.ndarray, seed: int) -> None:
    with _on(path):
        c = np.random.default_rng(seed).normal(size=x.shape[1])
        dots, squares = rowsums.dots_and_squares(x, c)
        x64 = x.astype(np.float64)
        for i, r in enumerate(x64):
            # Error bound of a float64 sum of d products in any order: d ulps of the sum of |terms|.
            bound = 2 * x.shape[1] * np.finfo(np.float64).eps
            terms = r * c
            assert abs(dots[i] - math.fsum(terms.tolist())) <= bound * np.abs(terms).sum()
            assert abs(squares[i] - math.fsum((r * r).tolist())) <= bound * (r * r).sum()
            if path != "numpy":  # the C loops' own order, to the bit, whichever instruction set
                assert dots[i] == _in_c_order(terms.tolist())
                assert squares[i] == _in_c_order((r * r).tolist())


def _in_c_order(terms: list[float]) -> float:
    """The C loops' sum of a row's terms: term j into partial sum j mod 8 (over whole blocks of 8),
    the 8 combined as ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)), then the rest in order."""
    m = len(terms) - len(terms) % 8
    p = [0.0] * 8
    for j in range(m):
        p[j % 8] += terms[j]
    total = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
    for t in terms[m:]:
        total += t
    return total


@pytest.mark.skipif(rowsums._rowsums is None or rowsums._rowsums.isa() != "avx2", reason="no AVX2 loops here")
@settings(max_examples=150, deadline=None)
@given(x=rows(), seed=st.integers(0, 2**32 - 1), e=st.integers(1, 7))
def test_the_avx2_and_baseline_loops_give_the_same_bits(x: np.ndarray, seed: int, e: int) -> None:
    rng = np.random.default_rng(seed)
    c, start = rng.normal(size=x.shape[1]), rng.normal(size=x.shape[1])
    got = {}
    for path in ("c", "c-baseline"):
        with _on(path):
            s, q = start.copy(), start.copy()
            rowsums.add_rows(x, s, q)
            segments = rowsums.segment_sums(x[: x.shape[0] - x.shape[0] % e], e)
            got[path] = (*rowsums.dots_and_squares(x, c), s, q, segments)
    for a, b in zip(got["c"], got["c-baseline"], strict=True):
        assert np.array_equal(a, b)


def test_the_c_and_numpy_dots_agree_on_real_sized_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(700, 384)).astype(np.float32)
    c = rng.normal(size=384)
    c_dots, c_sq = rowsums.dots_and_squares(x, c)
    monkeypatch.setattr(rowsums, "_rowsums", None)
    n_dots, n_sq = rowsums.dots_and_squares(x, c)
    np.testing.assert_allclose(c_dots, n_dots, rtol=0, atol=1e-12 * np.abs(x.astype(np.float64) @ np.abs(c)).max())
    np.testing.assert_allclose(c_sq, n_sq, rtol=1e-14)


def test_other_dtypes_and_strided_rows_take_the_numpy_versions() -> None:
    rng = np.random.default_rng(3)
    x64 = rng.normal(size=(40, 12))
    wide = rng.normal(size=(40, 24)).astype(np.float32)[:, ::2]  # float32, not C-contiguous
    c = rng.normal(size=12)
    for x in (x64, wide):
        dots, squares = rowsums.dots_and_squares(x, c)
        np.testing.assert_allclose(dots, np.asarray(x, np.float64) @ c, rtol=1e-12)
        np.testing.assert_allclose(squares, (np.asarray(x, np.float64) ** 2).sum(axis=1), rtol=1e-12)
        s = np.zeros(12)
        rowsums.add_rows(x, s)
        np.testing.assert_allclose(s, np.asarray(x, np.float64).sum(axis=0), rtol=1e-12)
        want = np.asarray(x[4:8], np.float64).sum(axis=0)
        np.testing.assert_allclose(rowsums.segment_sums(x, 4)[1], want, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_segment_sums_refuses_a_partial_segment(path: str) -> None:
    with _on(path), pytest.raises(ValueError, match="whole number of segments"):
        rowsums.segment_sums(np.zeros((7, 3), np.float32), 2)


@st.composite
def row_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    r = draw(st.integers(1, 30))
    w = draw(st.integers(1, 21))
    d = draw(st.integers(0, w))
    p = draw(st.integers(0, 40))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
    rows = draw(hnp.arrays(np.float64, (r, w), elements=st.floats(-1e3, 1e3))) * scale
    a = draw(hnp.arrays(np.int64, p, elements=st.integers(0, r - 1)))
    b = draw(hnp.arrays(np.int64, p, elements=st.integers(0, r - 1)))
    inv = draw(hnp.arrays(np.float64, p, elements=st.floats(1e-4, 1.0)))
    center = draw(hnp.arrays(np.float64, d, elements=st.floats(-1e3, 1e3))) * scale
    return rows, a, b, inv, center


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(case=row_pairs())
def test_pair_distances_against_exactly_rounded_sums(
    path: str, case: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
) -> None:
    with _on(path):
        rows, a, b, inv, center = case
        got = rowsums.pair_distances(rows, a, b, inv, center)
        d = center.shape[0]
        assert got.shape == a.shape
        for i in range(a.shape[0]):
            # Each term as both versions form it (difference, times the scale, minus the center),
            # then an exactly rounded sum: only the order of the additions may differ.
            z = (rows[a[i], :d] - rows[b[i], :d]) * inv[i] - center
            terms = z * z
            bound = 2 * max(d, 1) * np.finfo(np.float64).eps * terms.sum()
            assert abs(got[i] - math.fsum(terms.tolist())) <= bound


_SPECIAL = st.sampled_from([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -3.4e38, 3.4e38])


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(x=rows(), data=st.data())
def test_row_peaks_are_each_rows_largest_magnitude_or_nan(path: str, x: np.ndarray, data: st.DataObject) -> None:
    # Some rows get NaNs, infinities, signed zeros, subnormals and float32's extremes at drawn places.
    for _ in range(data.draw(st.integers(0, 6))):
        if x.size:
            i = data.draw(st.integers(0, x.shape[0] - 1))
            j = data.draw(st.integers(0, x.shape[1] - 1))
            x[i, j] = data.draw(_SPECIAL)
    with _on(path):
        got = rowsums.row_peaks(x)
    assert got.dtype == np.float32 and got.shape == (x.shape[0],)
    for r, p in zip(x.tolist(), got.tolist(), strict=True):
        if any(math.isnan(v) for v in r):
            assert math.isnan(p)
        else:
            assert p == max(abs(v) for v in r)


def test_the_c_loops_refuse_buffers_that_do_not_fit_and_write_nothing() -> None:
    c_ext = rowsums._rowsums
    assert c_ext is not None
    x = np.ones((4, 3), np.float32)
    sums = np.full(3, 5.0)
    with pytest.raises(ValueError, match="columns"):
        c_ext.add_rows(x, np.zeros(4), None)
    with pytest.raises(ValueError, match="columns"):
        c_ext.add_rows(x, sums, np.zeros(2))
    assert sums.tolist() == [5.0, 5.0, 5.0]
    with pytest.raises(TypeError, match="format 'f'"):
        c_ext.add_rows(x.astype(np.float64), sums, None)
    with pytest.raises(TypeError, match="2-d"):
        c_ext.add_rows(np.ones(3, np.float32), sums, None)
    with pytest.raises(ValueError, match="not C-contiguous"):
        c_ext.add_rows(x[:, ::2], sums, None)
    frozen = np.zeros(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        c_ext.add_rows(x, frozen, None)
    with pytest.raises(ValueError, match="rows"):
        c_ext.dots_and_squares(x, np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="columns"):
        c_ext.dots_and_squares(x, np.zeros(2), np.zeros(4), np.zeros(4))
    out = np.full((3, 3), 9.0)
    with pytest.raises(ValueError, match="divide"):
        c_ext.segment_sums(x, out)
    assert (out == 9.0).all()
    with pytest.raises(ValueError, match="divide"):
        c_ext.segment_sums(x, np.zeros((0, 3)))
    c_ext.segment_sums(np.zeros((0, 3), np.float32), np.zeros((0, 3)))  # no rows, no segments: nothing to do
    rows = np.arange(12.0).reshape(4, 3)
    dist = np.full(2, 9.0)
    with pytest.raises(IndexError, match="out of range"):
        c_ext.pair_distances(rows, np.array([0, 4]), np.array([1, 2]), np.ones(2), np.zeros(3), dist)
    with pytest.raises(IndexError, match="out of range"):
        c_ext.pair_distances(rows, np.array([0, 1]), np.array([-1, 2]), np.ones(2), np.zeros(3), dist)
    with pytest.raises(ValueError, match="one length"):
        c_ext.pair_distances(rows, np.array([0, 1]), np.array([1]), np.ones(2), np.zeros(3), dist)
    with pytest.raises(ValueError, match="at most"):
        c_ext.pair_distances(rows, np.array([0, 1]), np.array([1, 2]), np.ones(2), np.zeros(4), dist)
    with pytest.raises(TypeError, match="int64"):
        c_ext.pair_distances(rows, np.array([0, 1], np.int32), np.array([1, 2]), np.ones(2), np.zeros(3), dist)
    assert dist.tolist() == [9.0, 9.0]
    peaks = np.full(3, 9.0, np.float32)
    with pytest.raises(ValueError, match="rows"):
        c_ext.row_peaks(x, peaks)
    with pytest.raises(TypeError, match="format 'f'"):
        c_ext.row_peaks(x, np.zeros(4))
    assert peaks.tolist() == [9.0, 9.0, 9.0]


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(1, 99), max_size=6, unique=True), seed=st.integers(0, 2**32 - 1))
def test_a_buckets_sums_do_not_depend_on_how_its_events_were_split(cuts: list[int], seed: int) -> None:
    with _on("c"):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(100, 16)).astype(np.float32)
        ts = np.arange(100.0)
        whole = Bucket(16, 4, 4, 8, 100, np.random.default_rng(0))
        parts = Bucket(16, 4, 4, 8, 100, np.random.default_rng(0))
        summary = _summary(100)
        whole.add(x, summary, ts, 0)
        bounds = [0, *sorted(cuts), 100]
        for a, b in itertools.pairwise(bounds):
            parts.add(x[a:b], summary.slice(a, b), ts[a:b], a)
        # The C loop adds each row into the running sums in turn, whatever the batches were.
        assert np.array_equal(whole.sum, parts.sum) and np.array_equal(whole.sumsq, parts.sumsq)


def _summary(n: int) -> Summary:
    z = np.zeros(n)
    return Summary(z, z, np.zeros(n, np.int64), np.zeros(n, np.int64))

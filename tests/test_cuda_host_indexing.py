"""The kernels' index arithmetic, compiled for the host: every element once, every packed
access aligned and inside its row.

row_apply (head / 128-bit packs / tail, tiles of UNROLL packs, REVERSE), fill_range and
Group<G> come from fx_common.cuh unchanged (tests/cuda_host/row_apply_harness.cpp). A
checking uint4 (tests/cuda_host/checked_words.h) sees the address of every 16-byte word
the packed loads read and the packed stores write, so each is checked against the row
span the call may touch and the 16-byte grid. The visitor checks that every position is
visited once and receives the value stored at it; the outputs are checked element by
element, and every byte outside the visited spans must be unchanged. Buffers are laid
out as CuPy's (256-byte aligned base, optional element offset) and vec_ok is computed by
the backend's own ``vec_ok``, so the host decision and the kernel arithmetic are tested
together, on every row phase of odd C (50257 float32 rows start on 4 phases).
"""

import ctypes

import numpy as np
import pytest

from fastxent.backends.cuda import _plans
from tests.support import BF16, FakeDeviceArray, build_host_library

ERROR_NAMES = ["packed", "misaligned", "outside", "visit_range", "visit_count", "x", "y", "out", "untouched"]


@pytest.fixture(scope="module")
def row_apply_lib(tmp_path_factory):
    lib = build_host_library(tmp_path_factory, "row_apply_harness.cpp")
    vp, lp = ctypes.c_void_p, ctypes.c_long
    lib.check_row_apply.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, vp, vp, vp, vp, vp, lp, lp, lp, lp, lp,
                                    ctypes.c_int, ctypes.c_int, vp]
    lib.check_fill.argtypes = [ctypes.c_int, vp, vp, lp, lp, lp, lp, lp, ctypes.c_int, vp]
    lib.check_group.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, lp, vp]
    lib.check_group.restype = ctypes.c_long
    return lib


ARENA_ALIGN = 256  # CuPy's allocations


class Arena:
    """One host buffer holding several (R, C) arrays, each at a 256-byte aligned base plus
    an element offset, as CuPy views of fresh allocations are laid out."""

    def __init__(self, specs, rng):
        # specs: [(dtype, shape, element offset)]
        sizes = [ARENA_ALIGN * (-(-(np.dtype(d).itemsize * (int(np.prod(s)) + off) + 64) // ARENA_ALIGN))
                 for d, s, off in specs]
        self.raw = np.empty(sum(sizes) + ARENA_ALIGN, np.uint8)
        base = (-self.raw.ctypes.data) % ARENA_ALIGN
        self.buffer = self.raw[base:base + sum(sizes)]
        self.buffer[:] = rng.integers(0, 256, self.buffer.size, dtype=np.uint8)  # garbage, as cupy.empty
        self.arrays, start = [], 0
        for (dtype, shape, off), size in zip(specs, sizes):
            dtype = np.dtype(dtype)
            count = int(np.prod(shape))
            view = self.buffer[start + off * dtype.itemsize:start + (off + count) * dtype.itemsize].view(dtype)
            self.arrays.append(view.reshape(shape).view(FakeDeviceArray))
            start += size

    @property
    def lo(self):
        return self.buffer.ctypes.data

    @property
    def nbytes(self):
        return self.buffer.size


def _distinct(shape, dtype, rng):
    """Finite, mostly distinct values (bfloat16 as raw bits of moderate exponents)."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        bits = rng.integers(0x3C00, 0x4800, int(np.prod(shape)), dtype=np.uint16)
        return bits.view(BF16).reshape(shape)
    return (rng.standard_normal(shape) * 100).astype(dtype)


TCODES = {"float32": 0, "float64": 1, "bfloat16": 2}
ROW_CLASSES = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129, 257, 1023, 1025, 4099, 50257]


def _check_errors(err, what, packed_expected):
    errors = dict(zip(ERROR_NAMES, (int(e) for e in err)))
    bad = {k: v for k, v in errors.items() if k != "packed" and v}
    assert not bad, f"{what}: {bad}"
    if packed_expected:
        assert errors["packed"] > 0, f"{what}: no 128-bit access although vec_ok and the row is long"
    return errors


@pytest.mark.parametrize("tname", list(TCODES))
def test_row_apply_visits_every_element_once_with_aligned_packs(row_apply_lib, tname):
    dtype = np.dtype(BF16 if tname == "bfloat16" else tname)
    acc = np.dtype(np.float64 if tname == "float64" else np.float32)
    vec = _plans.vector_width(dtype)
    rng = np.random.default_rng(TCODES[tname])
    ycodes = {0: None, 1: dtype} if acc == dtype else {0: None, 1: dtype, 2: acc}
    checked = 0
    for num_classes in ROW_CLASSES:
        rows = 9 if num_classes < 5000 else 3   # odd C: every row phase modulo the pack
        shape = (rows, num_classes)
        ranges = [(0, num_classes)]
        if num_classes > 600:   # chunks as the split path cuts them (c0 a multiple of the aligned chunk)
            chunk = 256
            ranges += [(c0, min(c0 + chunk, num_classes)) for c0 in range(0, num_classes, chunk)][:3]
            ranges += [(num_classes // chunk * chunk, num_classes)]
        if num_classes > 2:     # any [c0, c1): heads and tails at both ends
            ranges += [(1, num_classes - 1), (num_classes // 3, 2 * num_classes // 3 + 1)]
        for x_off in sorted({0, 1, vec - 1}):
            for other_off in sorted({x_off, (x_off + 1) % vec}):
                for ycode, ytype in ycodes.items():
                    for mode in (0, 1, 2, 3):
                        for inplace in ((False, True) if mode == 1 else (False,)):
                            if inplace and other_off != x_off:
                                continue
                            specs = [(dtype, shape, x_off), (ytype or dtype, shape, other_off),
                                     (acc if mode == 2 else dtype, shape, other_off), (dtype, shape, other_off)]
                            arena = Arena(specs, rng)
                            x, y, o1, o2 = arena.arrays
                            x[...] = _distinct(shape, dtype, rng)
                            if ytype is not None:
                                y[...] = _distinct(shape, ytype, rng)
                            if inplace:
                                o1 = x
                            streams = [x] + ([y] if ytype is not None else []) + \
                                      ([o1] if mode in (1, 2) else []) + ([o2] if mode == 2 else [])
                            vec_ok = _plans.vec_ok(vec, *streams)
                            assert vec_ok == int(other_off == x_off or (len(streams) == 1))
                            for width in (1, 5, 8, 32, 256):
                                if num_classes > 5000 and width in (5, 8):
                                    continue
                                for c0, c1 in ranges:
                                    err = np.zeros(len(ERROR_NAMES), np.int64)
                                    row_apply_lib.check_row_apply(
                                        TCODES[tname], ycode, mode, x.data.ptr,
                                        y.data.ptr if ytype is not None else None, o1.data.ptr, o2.data.ptr,
                                        arena.lo, arena.nbytes, rows, num_classes, c0, c1, width, vec_ok,
                                        err.ctypes.data_as(ctypes.c_void_p))
                                    what = (f"{tname} C={num_classes} x_off={x_off} other_off={other_off} "
                                            f"y={ycode} mode={mode} inplace={inplace} width={width} [{c0}, {c1})")
                                    _check_errors(err, what, vec_ok and c1 - c0 >= 4 * vec)
                                    checked += 1
    assert checked > 1000


@pytest.mark.parametrize("tname", list(TCODES))
def test_fill_range_writes_exactly_its_span(row_apply_lib, tname):
    dtype = np.dtype(BF16 if tname == "bfloat16" else tname)
    rng = np.random.default_rng(7)
    for num_classes in ROW_CLASSES:
        shape = (9 if num_classes < 5000 else 3, num_classes)
        for off in range(_plans.vector_width(dtype)):
            arena = Arena([(dtype, shape, off)], rng)
            out = arena.arrays[0]
            spans = [(0, num_classes)] + ([(256, min(512, num_classes))] if num_classes > 600 else [])
            spans += [(1, num_classes - 1), (num_classes // 3, 2 * num_classes // 3 + 1)] if num_classes > 2 else []
            for width in (1, 8, 32, 256):
                for c0, c1 in spans:
                    err = np.zeros(len(ERROR_NAMES), np.int64)
                    row_apply_lib.check_fill(TCODES[tname], out.data.ptr, arena.lo, arena.nbytes, shape[0],
                                             num_classes, c0, c1, width, err.ctypes.data_as(ctypes.c_void_p))
                    _check_errors(err, f"fill_range {tname} C={num_classes} off={off} width={width} [{c0}, {c1})",
                                  c1 - c0 >= 4 * _plans.vector_width(dtype))


def test_groups_lanes_masks_and_grid_stride_rows(row_apply_lib):
    """Group<G>: lane, first row, row stride and the shuffle mask of every thread (only the
    lanes of its own row, so a group smaller than a warp never waits on another group);
    the grid-stride loop gives each row to exactly one group, whether the grid covers the
    rows or not (row_plan caps the grid at MAX_GRID)."""
    for group in (4, 8, 16, 32):
        for block in (32, 64, 256):
            for grid, rows in ((1, 1), (3, 7), (4, 1000), (5, 5 * block // group), (2, 12345)):
                visits = np.zeros(rows, np.int64)
                bad = row_apply_lib.check_group(group, block, grid, rows, visits.ctypes.data_as(ctypes.c_void_p))
                assert bad == 0, f"G={group} block={block} grid={grid}: {bad} bad lanes/rows/masks"
                assert (visits == 1).all(), f"G={group} block={block} grid={grid} N={rows}: rows visited {visits}"

"""Every hot Numba kernel compiles to gather-free vector code on AVX2 and on AVX-512.

Each ISA is one subprocess (``python -m tests.codegen``, see its docstring) with a
fresh ``NUMBA_CACHE_DIR``, ``NUMBA_CPU_NAME`` set and ``NUMBA_CPU_FEATURES``
empty: the kernels are compiled for that CPU and their assembly read, nothing is
executed, so the AVX-512 code is checked on an AVX2 machine too. ``haswell`` is
the AVX2 target; ``znver4`` the AVX-512 one (512-bit vectors preferred, where the
gathers showed: Intel's ``skylake-avx512``/``icelake-server`` tuning prefers
256-bit vectors, so ``znver4`` is the stricter check).

Cost: about 40 signatures compiled per ISA, 1-2 min of CPU each on a 2-core
machine (measured numbers in the issue 12 report); both ISAs run at once.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

ISAS = {"avx2": "haswell", "avx512": "znver4"}

#: The one libm call allowed: ``row_lse``'s ``math.log`` of the row sum, once per row.
_PER_ROW_LIBM = {"logf", "log"}
_USES_ROW_LSE = ("sparse_kernel", "soft_kernel", "lse_kernel", "log_softmax_kernel")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """``{isa: {kernel signature: report}}``, the subprocesses run side by side."""
    running = {}
    for isa, cpu in ISAS.items():
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="",
                   NUMBA_CACHE_DIR=str(tmp_path_factory.mktemp(f"numba-cache-{isa}")))
        running[isa] = subprocess.Popen([sys.executable, "-m", "tests.codegen"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for isa, process in running.items():
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, f"{isa} compilation failed:\n{err[-4000:]}"
        results[isa] = json.loads(out)
    return results


@pytest.mark.parametrize("isa", list(ISAS))
def test_no_gathers(reports, isa):
    found = {kernel: r["gathers"] for kernel, r in reports[isa].items() if r["gather_count"]}
    assert not found, f"{isa} ({ISAS[isa]}): gathers/scatters in {found}"


@pytest.mark.parametrize("isa", list(ISAS))
def test_hot_loops_vectorise(reports, isa):
    assert len(reports[isa]) >= 19, f"only {len(reports[isa])} kernel signatures compiled"
    unvectorised = {kernel: r["scalar_loops"] for kernel, r in reports[isa].items()
                    if r["scalar_loops"] or not r["vector_loops"]}
    assert not unvectorised, f"{isa} ({ISAS[isa]}): scalar-only arithmetic loops in {unvectorised}"
    widths = {r["widest"] for r in reports[isa].values()}
    assert ("zmm" in widths) == (isa == "avx512"), f"{isa}: vector registers {widths}"


@pytest.mark.parametrize("isa", list(ISAS))
def test_no_libm_per_element(reports, isa):
    calls = {kernel: r["libm"] for kernel, r in reports[isa].items()
             if set(r["libm"]) - (_PER_ROW_LIBM if kernel.startswith(_USES_ROW_LSE) else set())}
    assert not calls, f"{isa}: libm calls in {calls}"

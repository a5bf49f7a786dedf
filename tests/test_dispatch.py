"""The dispatcher: backend choice, its precedence, and a quiet, fast import."""

import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx
from fastxent import reference as ref
from tests.support import assert_close, make_class_ids, make_logits

LOGITS = make_logits((3, 7), np.float32)
LABELS = make_class_ids((3,), 7)


def test_available_backends_lists_the_host_backends():
    names = fx.available_backends()
    assert names[:2] == ["numba", "numpy"]
    assert set(names) <= {"numba", "numpy", "cupy"}


def _which_backend(monkeypatch, **kwargs):
    """Record which backend module ran (the numpy backend calls the reference directly)."""
    calls = []
    from fastxent import _dispatch

    real = _dispatch.backend_module

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(_dispatch, "backend_module", spy)
    fx.logsumexp(LOGITS, **kwargs)
    return calls[0] if calls else "numpy"


def test_default_is_numba_for_host_arrays(monkeypatch):
    monkeypatch.delenv("FASTXENT_BACKEND", raising=False)
    assert _which_backend(monkeypatch) == "numba"


def test_precedence_argument_then_context_then_environment(monkeypatch):
    monkeypatch.setenv("FASTXENT_BACKEND", "numpy")
    assert _which_backend(monkeypatch) == "numpy"
    with fx.use_backend("numba"):
        assert _which_backend(monkeypatch) == "numba"
        with fx.use_backend("numpy"):
            assert _which_backend(monkeypatch) == "numpy"
        assert _which_backend(monkeypatch) == "numba"
        assert _which_backend(monkeypatch, backend="numpy") == "numpy"
    monkeypatch.setenv("FASTXENT_BACKEND", "numba")   # read at each call
    assert _which_backend(monkeypatch) == "numba"


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("FASTXENT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTXENT_BACKEND='gpu' is not a fastxent backend"):
        fx.logsumexp(LOGITS)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend='jax' is not a fastxent backend"):
        with fx.use_backend("jax"):
            pass


def test_every_backend_gives_the_reference_result():
    expected = ref.sparse_softmax_cross_entropy(LOGITS, LABELS)
    for name in ("numba", "numpy"):
        assert_close(fx.sparse_softmax_cross_entropy(LOGITS, LABELS, backend=name), expected,
                     np.float32, what=name)


def test_lists_and_cpu_tensors_are_accepted():
    loss = fx.sparse_softmax_cross_entropy(LOGITS.tolist(), LABELS.tolist())
    assert loss.dtype == np.float64  # a list of Python floats is float64
    assert_close(loss, ref.sparse_softmax_cross_entropy(LOGITS.astype(np.float64), LABELS), np.float64)


def test_import_compiles_nothing_and_imports_no_heavy_module():
    """``import fastxent`` stays fast (0.5 s budget, measured in bench/bench_import.py)
    because it imports neither Numba (0.22 s alone here) nor any GPU/framework module."""
    code = (
        "import sys\n"
        "import fastxent\n"
        "heavy = [m for m in ('numba', 'llvmlite', 'cupy', 'torch', 'jax', 'tensorflow', 'keras',"
        " 'ml_dtypes') if m in sys.modules]\n"
        "print(','.join(heavy) or 'none')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none", f"import fastxent imported {out.stdout.strip()}"

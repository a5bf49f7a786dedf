"""Shared test support: the tolerance table, the verbose comparison, input makers.

One tolerance table keyed by dtype (CuPy's ``numpy_cupy_allclose`` habit): the
backends are compared with ``fastxent.reference`` (float64, cast to the output
dtype) through ``assert_close``, which prints the mismatch count, the first
indices and the NaN/inf disagreements (Liger-Kernel's ``assert_verbose_allclose``).
"""

import pathlib
import re
import shutil
import subprocess
import types

import ml_dtypes
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels"
CUDA_HOST_DIR = ROOT / "tests" / "cuda_host"

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64))
DTYPE_IDS = [d.name for d in FLOAT_DTYPES]

#: (rtol, atol) per score dtype, for float32/float64 accumulators ("value": losses,
#: lse, anything accumulated) and for outputs stored in the score dtype ("stored":
#: gradients, softmax, log_softmax, hvp). 16-bit outputs are rounded twice (ours,
#: the reference's cast): one or two units in their last place.
TOLERANCE = {
    "float64": {"value": (1e-9, 1e-9), "stored": (1e-9, 1e-12)},
    "float32": {"value": (2e-5, 2e-5), "stored": (1e-4, 2e-6)},
    "float16": {"value": (2e-5, 2e-5), "stored": (2e-3, 2e-6)},
    "bfloat16": {"value": (2e-5, 2e-5), "stored": (1.6e-2, 2e-6)},
}


def tolerance(dtype, kind="value"):
    return TOLERANCE[np.dtype(dtype).name][kind]


def assert_close(actual, expected, dtype=np.float64, kind="value", what="", tol=None):
    """allclose in float64 with NaN == NaN and equal infinities; verbose on failure."""
    rtol, atol = tol if tol is not None else tolerance(dtype, kind)
    actual_host = np.asarray(actual)
    expected_host = np.asarray(expected)
    assert actual_host.shape == expected_host.shape, (
        f"{what}: shape {actual_host.shape} != expected {expected_host.shape}")
    a = actual_host.astype(np.float64)
    e = expected_host.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) | (a == e)
    if not ok.all():
        bad = np.argwhere(~ok)
        lines = [
            f"{what}: {len(bad)} of {ok.size} elements differ (rtol={rtol}, atol={atol}); "
            f"NaN disagreements: {np.count_nonzero(np.isnan(a) != np.isnan(e))}, "
            f"inf disagreements: {np.count_nonzero(np.isinf(a) != np.isinf(e))}"
        ]
        for index in bad[:8]:
            index = tuple(int(k) for k in index)
            lines.append(f"  at {index}: got {a[index]!r}, expected {e[index]!r}")
        pytest.fail("\n".join(lines))


def assert_same_dtype(actual, expected, what=""):
    assert np.asarray(actual).dtype == np.asarray(expected).dtype, (
        f"{what}: dtype {np.asarray(actual).dtype} != expected {np.asarray(expected).dtype}")


def make_logits(shape, dtype, seed=0, scale=3.0, spiky=True):
    """Random scores; ``spiky`` adds a few large values per row so softmax is not flat
    (llm.c: "otherwise all probabilities will be basically zero")."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * scale
    if spiky and x.size:
        mask = rng.random(shape) < 0.02
        x = np.where(mask, x * 8, x)
    return x.astype(dtype)


def make_class_ids(shape, num_classes, seed=1, ignore_index=None, ignore_fraction=0.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=shape).astype(np.int64)
    if ignore_index is not None and ignore_fraction and labels.size:
        labels = np.where(rng.random(shape) < ignore_fraction, ignore_index, labels)
    return labels


def make_distribution(shape, axis=-1, seed=2, dtype=np.float32, sparsity=0.3):
    """Soft labels: non-negative, some exact zeros, rows summing to 1."""
    rng = np.random.default_rng(seed)
    y = rng.random(shape)
    y = np.where(rng.random(shape) < sparsity, 0.0, y)
    total = y.sum(axis=axis, keepdims=True)
    y = np.divide(y, total, out=np.zeros_like(y), where=total > 0)
    return y.astype(dtype)


#: The sparse softmax options every backend's equivalence suite runs (one table).
SPARSE_OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": -100},
    "weights": {"class_weight": "random"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 4.0},
    "all": {"ignore_index": -100, "class_weight": "random", "label_smoothing": 0.2,
            "z_loss": 1e-4, "softcap": 6.0},
}


def sparse_options(name, num_classes):
    """The keyword arguments of option set ``name`` (random class weights made concrete)."""
    options = dict(SPARSE_OPTIONS[name])
    if options.get("class_weight") == "random":
        options["class_weight"] = np.random.default_rng(5).uniform(0.2, 2.0, num_classes)
    return options


def compare(got, expected, dtype, what, scale=1.0, grad_scale=None):
    """A backend's ``(loss, grad)`` (or loss alone) against the reference's: the loss with
    the "value" tolerance, the gradient with the "stored" one, dtypes equal. ``scale``
    multiplies the absolute tolerances (an lse of 1e4 carries an absolute error of ~1e-3
    in float32); ``grad_scale``, when given, those of the gradient."""
    pairs = [("loss", got[0], expected[0], "value", scale),
             ("grad", got[1], expected[1], "stored", scale if grad_scale is None else grad_scale)] if isinstance(
        expected, tuple) else [("", got, expected, "value", scale)]
    for name, actual, wanted, kind, factor in pairs:
        assert_same_dtype(actual, wanted, f"{what} {name}")
        rtol, atol = tolerance(dtype, kind)
        assert_close(actual, wanted, dtype, kind, f"{what} {name}", tol=(rtol, atol * np.asarray(factor)))


def compare_score(got, expected, dtype, what, scale=1.0):
    """A backend's :class:`fastxent.Score` against the reference's, field by field."""
    assert type(got) is type(expected), f"{what}: {type(got).__name__} is not {type(expected).__name__}"
    for field in ("loss", "lse", "target_logprob", "entropy"):
        actual, wanted = np.asarray(getattr(got, field)), np.asarray(getattr(expected, field))
        assert_same_dtype(actual, wanted, f"{what} {field}")
        rtol, atol = tolerance(dtype, "value")
        assert_close(actual, wanted, dtype, "value", f"{what} {field}", tol=(rtol, atol * np.asarray(scale)))
    for field in ("argmax", "correct"):
        actual, wanted = np.asarray(getattr(got, field)), np.asarray(getattr(expected, field))
        assert_same_dtype(actual, wanted, f"{what} {field}")
        np.testing.assert_array_equal(actual, wanted, err_msg=f"{what} {field}")


# ----------------------------------------------------------------------------
# CUDA sources on a machine without a GPU
# ----------------------------------------------------------------------------

_KERNEL_DEF = re.compile(
    r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\(([^)]*)\)",
    re.S)


def kernel_signatures():
    """kernel -> (file, template parameter names, [(C++ type, name), ...]) parsed from kernels/*.cu."""
    signatures = {}
    for path in sorted(KERNEL_DIR.glob("*.cu")):
        for template, name, params in _KERNEL_DEF.findall(path.read_text()):
            names = [t.split()[-1] for t in template.split(",")]
            parsed = []
            for param in params.split(","):
                param = " ".join(param.split())
                ctype, pname = param.rsplit(" ", 1)
                while pname.startswith("*"):
                    ctype, pname = ctype + "*", pname[1:]
                parsed.append((ctype.replace(" *", "*"), pname))
            signatures[name] = (path.name, names, parsed)
    return signatures


class FakeDeviceArray(np.ndarray):
    """numpy memory that looks like a CuPy array to fastxent (device 0)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.data.ptr, False), "version": 3}

    def get(self):
        return np.array(self)


def build_host_library(tmp_path_factory, source):
    """Compile ``tests/cuda_host/<source>`` (which includes kernels/ headers) as a shared
    library with the kernels' -D options, loaded with ctypes; skips without a C++ compiler."""
    import ctypes

    from fastxent.backends.cuda import _build

    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip(f"no C++ compiler: the host build of {source} needs g++ or clang++")
    work = tmp_path_factory.mktemp(pathlib.Path(source).stem)
    library = work / f"lib{pathlib.Path(source).stem}.so"
    defines = [option for option in _build.compile_options() if option.startswith("-D")]
    command = [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-I", str(CUDA_HOST_DIR), "-I", str(KERNEL_DIR),
               *defines, "-o", str(library), str(CUDA_HOST_DIR / source)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return ctypes.CDLL(str(library))

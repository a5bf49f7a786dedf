"""Where the data lives and which backend runs: decided here, at call time.

Order of precedence: the ``backend=`` argument, then the innermost
``use_backend(...)`` block, then the ``FASTXENT_BACKEND`` environment variable
(read at each call), then the data's location: host arrays run on ``numba``,
CUDA arrays (CuPy, or anything with ``__cuda_array_interface__`` or a CUDA
``__dlpack__``) on ``cupy``. A backend that cannot run where the data lives is
a ``ValueError``; it never copies the data across devices behind your back.
"""

import contextlib
import contextvars
import importlib

import numpy as np

from . import _config

HOST_BACKENDS = ("numba", "numpy")
DEVICE_BACKENDS = ("cupy",)
KNOWN_BACKENDS = HOST_BACKENDS + DEVICE_BACKENDS

_BACKEND_MODULES = {
    "numba": "fastxent.backends.numba",
    "cupy": "fastxent.backends.cuda",
}

_context_backend = contextvars.ContextVar("fastxent_backend", default=None)


def check_backend_name(name, source="backend"):
    """Return ``name`` if it is a known backend, else raise ``ValueError``."""
    if not isinstance(name, str) or name not in KNOWN_BACKENDS:
        raise ValueError(
            f"{source}={name!r} is not a fastxent backend; expected one of {list(KNOWN_BACKENDS)}"
        )
    return name


@contextlib.contextmanager
def use_backend(name):
    """Run the enclosed calls on backend ``name`` (thread- and task-local).

    Examples
    --------
    >>> import numpy as np, fastxent as fx
    >>> with fx.use_backend("numpy"):
    ...     float(fx.logsumexp(np.zeros(4)))
    1.3862943611198906
    """
    check_backend_name(name)
    token = _context_backend.set(name)
    try:
        yield name
    finally:
        _context_backend.reset(token)


def _cupy_device_count():
    try:
        import cupy
    except Exception:  # noqa: BLE001 -- any import failure means "not available"
        return 0
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 -- no driver or no device
        return 0


def available_backends():
    """Names of the backends that can run here, e.g. ``["numba", "numpy"]``.

    ``"cupy"`` is listed when CuPy imports and sees at least one CUDA device.
    """
    names = list(HOST_BACKENDS)
    if _cupy_device_count() > 0:
        names.append("cupy")
    return names


def is_cuda_array(obj):
    """True for an array that lives on a CUDA device (CuPy, or CAI/DLPack on CUDA).

    The DLPack device is asked first: it is cheap and never raises, whereas torch's
    ``__cuda_array_interface__`` raises RuntimeError for a tensor that requires grad
    (and older torch a KeyError for bfloat16), which ``hasattr`` would let through.
    """
    device = getattr(obj, "__dlpack_device__", None)
    if device is not None and not isinstance(obj, np.ndarray):
        try:
            device_type = int(device()[0])
        except Exception:  # noqa: BLE001 -- not a usable DLPack producer; try CAI below
            device_type = None
        if device_type is not None:
            # DLPack device types: 2 = kDLCUDA, 3 = kDLCUDAHost (pinned host), 13 = kDLCUDAManaged.
            return device_type in (2, 13)
    try:
        getattr(obj, "__cuda_array_interface__")
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 -- the interface exists but cannot describe this array
        return True
    return True


def as_device_array(obj):
    """A CuPy view of a CUDA array object, without a host copy.

    Objects with ``__dlpack__`` (torch, JAX) go through ``cupy.from_dlpack``, which
    orders the producer's pending work before CuPy's current stream; others through
    ``__cuda_array_interface__``. bfloat16 lives on the device as a CuPy array of dtype
    ``ml_dtypes.bfloat16`` (CuPy >= 14 with ml_dtypes): where CuPy's DLPack import
    refuses bfloat16, the tensor's storage is viewed as int16 and then as bfloat16,
    still without a copy. Without that support a bfloat16 tensor is a TypeError.
    """
    import cupy

    if isinstance(obj, cupy.ndarray):
        return obj

    def is_bfloat16(array):
        return str(getattr(array, "dtype", "")).rsplit(".", 1)[-1] == "bfloat16"

    def bfloat16_view(array, reason):
        try:
            import ml_dtypes

            if type(array).__module__.split(".")[0] == "torch":
                import torch

                raw = array.view(torch.int16)
            else:
                raw = array.view(np.int16)
            return cupy.from_dlpack(raw).view(ml_dtypes.bfloat16)
        except Exception as exc:  # noqa: BLE001 -- report both failures
            raise TypeError(
                f"a bfloat16 CUDA array needs CuPy >= 14 with ml_dtypes installed (CuPy "
                f"{cupy.__version__}: {reason}; viewing its storage as int16: {exc})"
            ) from None

    if hasattr(obj, "__dlpack__"):
        try:
            return cupy.from_dlpack(obj)
        except Exception as exc:  # noqa: BLE001 -- bfloat16 gets a second route below
            if not is_bfloat16(obj):
                raise
            return bfloat16_view(obj, exc)
    return cupy.asarray(obj)


def resolve(backend, on_device):
    """The backend name to run, given the ``backend=`` argument and where the data lives."""
    if backend is not None:
        name, source = check_backend_name(backend), "backend"
    elif _context_backend.get() is not None:
        name, source = _context_backend.get(), "use_backend"
    elif _config.env_backend() is not None:
        name, source = check_backend_name(_config.env_backend(), _config.BACKEND_ENV), _config.BACKEND_ENV
    else:
        return "cupy" if on_device else "numba"
    if on_device and name not in DEVICE_BACKENDS:
        raise ValueError(
            f"{source}={name!r} runs on host (numpy) arrays, but the arrays live on a CUDA "
            "device; use backend='cupy' or copy them to the host first"
        )
    if not on_device and name not in HOST_BACKENDS:
        raise ValueError(
            f"{source}={name!r} runs on CUDA arrays, but the arrays are host (numpy) arrays; "
            "move them to the device (cupy.asarray) or use backend='numba'"
        )
    return name


def array_module(on_device):
    """The array module of the data: CuPy for CUDA arrays, else numpy."""
    if on_device:
        import cupy

        return cupy
    return np


def backend_module(name):
    """The kernel module of backend ``name`` (imported on first use)."""
    return importlib.import_module(_BACKEND_MODULES[name])

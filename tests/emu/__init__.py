"""The emulated CUDA device of the test suite (see README.md here).

``tests/test_cupy.py`` runs on a real GPU through CuPy where there is one, else on this
emulator: the unchanged kernel sources of ``kernels/`` compiled by g++ against
``simt.h``, run by ``simt.cpp`` (fibers as CUDA threads, checked barriers, shuffles and
memory accesses), behind a CuPy stand-in (``fake_cupy``).
"""

import contextlib

from . import device, fake_cupy


def real_device_reason():
    """None when CuPy is installed and sees a CUDA device, else why not."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 -- any import failure means no CuPy here
        return f"CuPy is not installed ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 -- no driver, or a driver too old for this CuPy
        return f"CuPy sees no usable CUDA driver ({type(exc).__name__}: {exc})"
    return None if count > 0 else "CuPy sees no CUDA device"


def unavailable_reason():
    """None when the emulator can build kernels here (it needs g++ on Linux), else why not."""
    if device.compiler() is None:
        return "no C++ compiler (g++) to build the kernels for the emulated device"
    return None


@contextlib.contextmanager
def emulated_cupy():
    """``import cupy`` gives the stand-in inside the block; the CUDA backend's caches
    (compiled modules, device attributes) are emptied on the way in and out, so nothing
    compiled for one device is used on the other."""
    from fastxent.backends.cuda import _build, _plans

    def clear():
        _build._module.cache_clear()
        _plans.device_info.cache_clear()

    clear()
    try:
        with fake_cupy.installed() as module:
            yield module
    finally:
        clear()

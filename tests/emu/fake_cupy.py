"""A CuPy stand-in on the emulated device: what fastxent's CUDA backend, ``losses.py``
and ``tests/test_cupy.py`` call, and no more.

Device arrays are numpy memory (the emulator runs kernels on the host) in a numpy
subclass that looks like a CuPy array: ``__cuda_array_interface__`` and
``__dlpack_device__`` say CUDA device 0, ``.get()`` copies to the host, ``.data.ptr``,
``.device.id``. Fresh allocations are 256-byte aligned, as CuPy's are. Operations return
device arrays (a scalar result is a 0-d device array, as in CuPy); mixing in a host numpy
array raises ``TypeError``, as CuPy does. ``RawModule(code=..., options=...,
name_expressions=...)`` collects kernels; the first launch builds every collected one
at once with g++ (tests/emu/device.py), so a test module's ``precompile()`` costs one
parallel, disk-cached build. Launches run synchronously: streams and devices are
bookkeeping only.

The emulated device: an H200's per-SM limits (2048 threads, 228 KiB of shared memory)
with 16 SMs (an H200 has 132) and 2 MiB of L2 (50 MiB), so that few rows already take
the split-row path (fewer rows than SMs) and small grids fill the device.
"""

import contextlib
import sys
import types

import numpy as np

from . import device

__version__ = "emulated (tests/emu)"

SMS = 16
ATTRIBUTES = {  # cudaDeviceAttr value: (name, emulated value)
    16: ("cudaDevAttrMultiProcessorCount", SMS),
    38: ("cudaDevAttrL2CacheSize", 2 * 2**20),
    39: ("cudaDevAttrMaxThreadsPerMultiProcessor", 2048),
    81: ("cudaDevAttrMaxSharedMemoryPerMultiprocessor", 233472),
    97: ("cudaDevAttrMaxSharedMemoryPerBlockOptin", 232448),
    111: ("cudaDevAttrReservedSharedMemoryPerBlock", 1024),
}
MEMORY_BYTES = 16 * 2**30
DEFAULT_SHARED_BYTES = 48 * 2**10  # dynamic shared memory a launch may use without opting in


class CUDAError(RuntimeError):
    """What CuPy's CUDADriverError / CUDARuntimeError would report."""


# ----------------------------------------------------------------------------
# Arrays
# ----------------------------------------------------------------------------

class ndarray(np.ndarray):  # noqa: N801 -- CuPy's name
    """An array on emulated device 0 (numpy memory)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    @property
    def device(self):
        return Device(0)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "descr": self.dtype.descr,
                "data": (self.data.ptr, not self.flags.writeable), "strides": None if self.flags.c_contiguous
                else self.strides, "version": 3}

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def get(self, stream=None):
        """A host copy."""
        return np.array(self.view(np.ndarray), copy=True)

    def __getitem__(self, index):
        return _device(super().__getitem__(index))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        for value in inputs + out:
            _refuse_host(value, ufunc.__name__)
        inputs = tuple(_host_view(v) for v in inputs)
        if out:
            kwargs["out"] = tuple(_host_view(v) for v in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return tuple(_device(r) for r in result) if isinstance(result, tuple) else _device(result)

    def __float__(self):
        return float(self.view(np.ndarray))

    def __int__(self):
        return int(self.view(np.ndarray))

    def __bool__(self):
        return bool(self.view(np.ndarray))

    def __index__(self):
        return int(self)


def _refuse_host(value, what):
    if isinstance(value, np.ndarray) and not isinstance(value, ndarray):
        raise TypeError(f"Unsupported type {type(value)}: a host array in {what} on the device (CuPy refuses it)")


def _host_view(value):
    return value.view(np.ndarray) if isinstance(value, ndarray) else value


def _device(value):
    """Device view of an ndarray result; a 0-d device array for a scalar (CuPy's habit)."""
    if isinstance(value, ndarray):
        return value
    if isinstance(value, np.ndarray):
        return value.view(ndarray)
    if isinstance(value, np.generic):
        return _copy_in(np.asarray(value))
    return value


def _allocate(shape, dtype):
    """A fresh device array: 256-byte aligned, as CuPy's allocations."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 256, dtype=np.uint8)
    offset = -raw.__array_interface__["data"][0] % 256
    return raw[offset:offset + nbytes].view(dtype).reshape(shape).view(ndarray)


def _copy_in(host, dtype=None):
    host = np.asarray(host, dtype=dtype)
    array = _allocate(host.shape, host.dtype)
    array.view(np.ndarray)[...] = host
    return array


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _copy_in(a, dtype)


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray) and not copy:
        return asarray(a, dtype)
    return _copy_in(_host_view(a), dtype)


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a.flags.c_contiguous and a.ndim >= 1 and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _copy_in(np.ascontiguousarray(_host_view(a), dtype=dtype))


def empty(shape, dtype=float, order="C"):
    return _allocate(shape, dtype)


def zeros(shape, dtype=float, order="C"):
    out = _allocate(shape, dtype)
    out.view(np.ndarray)[...] = 0
    return out


def empty_like(a, dtype=None, order="K", shape=None):
    return empty(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def zeros_like(a, dtype=None, order="K", shape=None):
    return zeros(a.shape if shape is None else shape, a.dtype if dtype is None else dtype)


def from_dlpack(obj):
    raise TypeError("the emulated device imports no DLPack capsule: its arrays live on the host")


def __getattr__(name):
    """Other numpy functions on device arrays, returning device arrays; dtypes as they are."""
    if name.startswith("__"):
        raise AttributeError(name)
    attribute = getattr(np, name)
    if not callable(attribute) or isinstance(attribute, type):
        return attribute

    def on_device(*args, **kwargs):
        for value in list(args) + list(kwargs.values()):
            _refuse_host(value, name)
        result = attribute(*[_host_view(a) for a in args], **{k: _host_view(v) for k, v in kwargs.items()})
        return tuple(_device(r) for r in result) if isinstance(result, tuple) else _device(result)

    on_device.__name__ = name
    return on_device


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------

_unbuilt = []  # RawModules whose kernels the next launch builds


class RawModule:
    """Collects (code, options, name_expressions); built by the first launch of any kernel."""

    def __init__(self, code=None, path=None, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            raise NotImplementedError("the emulated device builds RawModule(code=...) only")
        self.code, self.options, self.name_expressions = code, tuple(options), tuple(name_expressions or ())
        self.kernels = None
        _unbuilt.append(self)

    def get_function(self, name):
        if name not in self.name_expressions:
            raise CUDAError(f"{name!r} is not among this module's name_expressions {self.name_expressions}")
        return Function(self, name)


def build_all(workers=2, batch=24):
    """Builds every collected module: one g++ job per source and batch of expressions."""
    modules, _unbuilt[:] = list(_unbuilt), []
    groups = {}
    for module in modules:
        groups.setdefault((module.code, module.options), set()).update(module.name_expressions)
    jobs = []
    for (code, options), expressions in groups.items():
        expressions = sorted(expressions)
        jobs += [(code, options, expressions[i:i + batch]) for i in range(0, len(expressions), batch)]
    kernels = {}
    for (code, options, _), built in zip(jobs, device.build(jobs, workers)):
        kernels.update({(code, options, name): kernel for name, kernel in built.items()})
    for module in modules:
        module.kernels = {name: kernels[module.code, module.options, name] for name in module.name_expressions}


class Function:
    """A kernel of a RawModule: ``kernel(grid, block, args, shared_mem=0)`` as CuPy's."""

    def __init__(self, module, name):
        self.module, self.name = module, name
        self._max_dynamic_shared = 0

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        if not 0 <= int(value) <= ATTRIBUTES[97][1]:
            raise CUDAError(f"CUDA_ERROR_INVALID_VALUE: max_dynamic_shared_size_bytes = {value} is above the "
                            f"device's opt-in limit {ATTRIBUTES[97][1]}")
        self._max_dynamic_shared = int(value)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        if shared_mem > max(DEFAULT_SHARED_BYTES, self._max_dynamic_shared):
            raise CUDAError(f"CUDA_ERROR_INVALID_VALUE: {self.name} launched with {shared_mem} bytes of dynamic "
                            f"shared memory, above 48 KiB and max_dynamic_shared_size_bytes = "
                            f"{self._max_dynamic_shared}")
        for k, arg in enumerate(args):
            if arg is None:
                raise TypeError(f"{self.name} argument #{k} is None, which CuPy passes as 0xffffffff, not NULL "
                                "(cupy#9046): pass np.uint64(0)")
            _refuse_host(arg, f"argument #{k} of {self.name}")
        if self.module.kernels is None:
            build_all()
        self.module.kernels[self.name].launch(grid, block, args)


# ----------------------------------------------------------------------------
# cupy.cuda
# ----------------------------------------------------------------------------

class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise CUDAError(f"cudaErrorInvalidDevice: the emulated machine has device 0 only, not {device}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return self.id

    def use(self):
        return self

    def synchronize(self):
        pass


class Stream:
    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


def _device_get_attribute(attribute, device_id):
    Device(device_id)
    if attribute not in ATTRIBUTES:
        raise CUDAError(f"the emulated device has no value for cudaDeviceAttr {attribute}")
    return ATTRIBUTES[attribute][1]


runtime = types.ModuleType("cupy.cuda.runtime")
runtime.getDeviceCount = lambda: 1
runtime.deviceGetAttribute = _device_get_attribute
runtime.memGetInfo = lambda: (MEMORY_BYTES, MEMORY_BYTES)
runtime.CUDARuntimeError = CUDAError
for _value, (_name, _) in ATTRIBUTES.items():
    setattr(runtime, _name, _value)

cuda = types.ModuleType("cupy.cuda")
cuda.Device, cuda.Stream, cuda.runtime = Device, Stream, runtime
cuda.get_current_stream = lambda device=None: Stream()

#: This module as it is installed in sys.modules["cupy"].
module = sys.modules[__name__]


@contextlib.contextmanager
def installed():
    """``import cupy`` gives this module (and ``cupy.cuda``, ``cupy.cuda.runtime``) inside the block."""
    saved = {name: m for name, m in sys.modules.items() if name == "cupy" or name.startswith("cupy.")}
    for name in saved:
        del sys.modules[name]
    sys.modules.update({"cupy": module, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime})
    try:
        yield module
    finally:
        for name in ("cupy", "cupy.cuda", "cupy.cuda.runtime"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)

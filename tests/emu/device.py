"""The emulated device: builds kernel sources with g++ against ``simt.h`` and launches them.

``build(jobs)`` turns (source, options, name expressions) into host libraries, one per
(source, options, batch of expressions), in parallel g++ processes, cached on disk in
``$FASTXENT_EMU_CACHE`` (default ``~/.cache/fastxent-emu``) under a hash of everything
that goes into the library (translation unit, ``simt.h``, flags, compiler version).
``Kernel.launch`` type-checks the arguments against the C++ parameters, stages the
arrays in fresh memory with red zones around them (so an out-of-bounds access lands in
memory the runtime knows is nobody's), runs the grid in ``simt.cpp`` and copies the
arrays back. A failed launch raises :class:`KernelFault` with the kernel, block, thread
and what happened, and the seed that reproduces the schedule
(``FASTXENT_EMU_SEED=<seed>``).
"""

import ctypes
import hashlib
import os
import pathlib
import random
import re
import shutil
import subprocess
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "simt.h"
RUNTIME = HERE / "simt.cpp"

#: Kernel objects: -O1 (-O0 runs 4x slower, -O2 compiles 1.6x slower for no faster run);
#: every load and store calls the runtime's checks (g++'s thread-sanitizer
#: instrumentation, which tells reads from writes and leaves non-escaping locals alone;
#: its runtime library is not linked: simt.cpp is the runtime); no strict aliasing, since
#: kernels read T rows through uint4 words, which NVCC allows; hidden symbols, not
#: GNU-unique, so each library has its own statics; stack probes, so a fiber stack
#: overflow hits its guard page instead of skipping it.
KERNEL_FLAGS = (
    "-O1", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-fno-strict-aliasing", "-w",
    "-fstack-clash-protection", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
)
RUNTIME_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-fcf-protection=none")

#: The inline PTX statements of kernels/ and the emulated instruction each becomes:
#: (PTX text, output constraint, input constraint) -> function in simt.h.
PTX = {
    ("cvt.f32.f16 %0, %1;", "f", "h"): "fx_emu::ptx_cvt_f32_f16",
    ("cvt.rn.f16.f32 %0, %1;", "h", "f"): "fx_emu::ptx_cvt_rn_f16_f32",
}
_ASM = re.compile(r'\basm\s*(?:volatile\s*)?\(\s*"([^"]*)"\s*:\s*"=(\w)"\s*\(([^()]*)\)\s*:\s*"(\w)"\s*\(([^()]*)\)\s*\)')
_ANY_ASM = re.compile(r"\basm\s*(?:volatile\s*)?\(")

#: Seed of every launch's block order and thread schedule (printed in each failure).
SEED = int(os.environ.get("FASTXENT_EMU_SEED") or random.SystemRandom().randrange(2**32))

#: Red zone on each side of a staged array: its own size, at least this (an off-by-one
#: row lands in it even for a whole row of overshoot).
MIN_RED_ZONE = 4096


class BuildError(RuntimeError):
    """g++ failed on a kernel source, or the source holds something the emulator refuses."""


class KernelFault(RuntimeError):
    """A launch failed on the emulated device (out-of-bounds access, race, deadlock, ...)."""


def compiler():
    """The C++ compiler (``$CXX`` or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def cache_dir():
    path = pathlib.Path(os.environ.get("FASTXENT_EMU_CACHE") or pathlib.Path.home() / ".cache" / "fastxent-emu")
    path.mkdir(parents=True, exist_ok=True)
    return path


def rewrite_asm(source):
    """``source`` with each known inline-PTX statement replaced by its emulated instruction."""
    def replace(match):
        ptx, out_constraint, out, in_constraint, operand = match.groups()
        function = PTX.get((ptx, out_constraint, in_constraint))
        if function is None:
            raise BuildError(f"inline PTX the emulator does not know: {match.group(0)!r}; add it to "
                             "tests/emu/device.py PTX and simt.h")
        return f"{function}({out.strip()}, {operand.strip()})"

    rewritten = _ASM.sub(replace, source)
    leftover = _ANY_ASM.search(rewritten)
    if leftover:
        line = rewritten[:leftover.start()].count("\n") + 1
        raise BuildError(f"inline asm at line {line} has a form the emulator cannot rewrite: "
                         f"{rewritten[leftover.start():leftover.start() + 120]!r}")
    return rewritten


def _std_flags(options):
    """The -std flag of the NVRTC options; other options have no host meaning and are refused."""
    flags = []
    for option in options:
        if option.startswith("-std=") or option.startswith("--std="):
            flags.append("-std=" + option.split("=", 1)[1])
        elif option.startswith("-D"):
            flags.append(option)
        else:
            raise BuildError(f"NVRTC option {option!r} has no meaning on the emulated device")
    return tuple(flags) or ("-std=c++17",)


def _translation_unit(source, expressions):
    entries = "".join(f"FX_EMU_ENTRY({i}, {expression})\n" for i, expression in enumerate(expressions))
    return (f'#include "{HEADER}"\n#line 1 "kernel source"\n{rewrite_asm(source)}\n'
            f'#line 1 "emulator entries"\n{entries}')


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:24]


_COMPILER_VERSION = {}


def _compiler_version():
    cxx = compiler()
    if cxx not in _COMPILER_VERSION:
        _COMPILER_VERSION[cxx] = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return _COMPILER_VERSION[cxx]


def _run(command, what):
    """Runs a compiler command to the end; a failure is a BuildError with its output."""
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode:
        raise BuildError(f"{what} failed:\n{result.stdout[-6000:]}")


def _temporary(output):
    """A name beside ``output`` for writing it, renamed when complete (xdist workers share
    the cache)."""
    return output.with_name(f".{output.name}.{os.getpid()}.tmp")


_runtime = None


def runtime():
    """The runtime library (simt.cpp), built once per content, loaded with global symbols
    so kernel libraries bind their intrinsics and memory checks to it."""
    global _runtime
    if _runtime is None:
        if compiler() is None:
            raise BuildError("the emulated device needs a C++ compiler (g++)")
        text = RUNTIME.read_text() + HEADER.read_text()
        output = cache_dir() / f"simt-{_digest(text, *RUNTIME_FLAGS, _compiler_version())}.so"
        if not output.exists():
            _run([compiler(), *RUNTIME_FLAGS, f"-I{HERE}", str(RUNTIME), "-ldl", "-o", str(_temporary(output))],
                 "building the emulator runtime (tests/emu/simt.cpp)")
            os.replace(_temporary(output), output)
        _runtime = ctypes.CDLL(str(output), mode=ctypes.RTLD_GLOBAL)
        _runtime.fx_emu_launch.argtypes = [ctypes.POINTER(_Launch)]
        _runtime.fx_emu_launch.restype = ctypes.c_int
    return _runtime


def build(jobs, workers=2):
    """Compile ``jobs`` -- (source, options, expressions) -- and return, per job, a dict
    expression -> :class:`Kernel`. Libraries found in the cache are loaded as they are;
    the rest compile ``workers`` at a time (each to an object, then linked alone: linking
    with -fsanitize=thread would pull in libtsan, whose place simt.cpp takes)."""
    runtime()
    header = HEADER.read_text()
    plans = []
    for source, options, expressions in jobs:
        expressions = list(dict.fromkeys(expressions))
        flags = (*_std_flags(options), *KERNEL_FLAGS)
        unit = _translation_unit(source, expressions)
        output = cache_dir() / f"kernels-{_digest(unit, header, *flags, _compiler_version())}.so"
        plans.append((source, expressions, flags, unit, output))
    pending = [plan for plan in plans if not plan[4].exists()]
    running = []
    with tempfile.TemporaryDirectory(prefix="fastxent-emu-") as work:
        try:
            while pending or running:
                while pending and len(running) < workers:
                    _, expressions, flags, unit, output = pending.pop(0)
                    path = pathlib.Path(work) / f"{output.stem}.cpp"
                    path.write_text(unit)
                    process = subprocess.Popen([compiler(), *flags, "-c", str(path), "-o", f"{path}.o"],
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                    running.append((process, path, output, expressions))
                process, path, output, expressions = running.pop(0)
                log = process.communicate()[0]
                what = f"g++ on {', '.join(expressions[:3])}{' ...' if len(expressions) > 3 else ''}"
                if process.returncode:
                    raise BuildError(f"{what} failed:\n{log[-6000:]}")
                _run([compiler(), "-shared", f"{path}.o", "-o", str(_temporary(output))], f"linking {what}")
                os.replace(_temporary(output), output)
        finally:
            for process, *_ in running:
                process.kill()
                process.wait()
    results = []
    for source, expressions, _, _, output in plans:
        library = ctypes.CDLL(str(output))
        results.append({expression: Kernel(library, i, expression, source) for i, expression in enumerate(expressions)})
    return results


# ----------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------

class _KernelInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("nparams", ctypes.c_int), ("sizes", ctypes.POINTER(ctypes.c_int)),
                ("kinds", ctypes.c_char_p), ("thunk", ctypes.c_void_p), ("bss_lo", ctypes.c_void_p),
                ("bss_hi", ctypes.c_void_p)]


class _Extent(ctypes.Structure):
    _fields_ = [("lo", ctypes.c_uint64), ("hi", ctypes.c_uint64), ("arg", ctypes.c_int32), ("writable", ctypes.c_int32)]


class _Heap(ctypes.Structure):
    _fields_ = [("lo", ctypes.c_uint64), ("hi", ctypes.c_uint64)]


class _Launch(ctypes.Structure):
    _fields_ = [("kernel", ctypes.POINTER(_KernelInfo)), ("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3),
                ("seed", ctypes.c_uint64), ("args", ctypes.POINTER(ctypes.c_void_p)), ("nextents", ctypes.c_int32),
                ("nheaps", ctypes.c_int32), ("extents", ctypes.POINTER(_Extent)), ("heaps", ctypes.POINTER(_Heap)),
                ("error", ctypes.c_char_p), ("error_size", ctypes.c_int32)]


_KERNEL_DEF = r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s+)?{name}\s*\("


def parameter_names(source, kernel):
    """The parameter names of ``__global__ void kernel(...)`` in ``source`` (for messages)."""
    match = re.search(_KERNEL_DEF.format(name=re.escape(kernel)), source)
    if match is None:
        return None
    depth, start, names = 0, match.end(), []
    for i in range(match.end(), len(source)):
        char = source[i]
        if char in "(<":
            depth += 1
        elif char in ")>" and depth:
            depth -= 1
        elif char == ")" or (char == "," and depth == 0):
            names.append(re.findall(r"\w+", source[start:i])[-1])
            start = i + 1
            if char == ")":
                return names
    return None


def _dim3(value):
    dims = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    if not 1 <= len(dims) <= 3:
        raise TypeError(f"a grid or block has 1 to 3 dimensions, got {value!r}")
    return dims + (1,) * (3 - len(dims))


def _describe(array):
    return f"{array.dtype.name}{list(array.shape)}"


class Kernel:
    """One compiled instantiation: ``launch(grid, block, args)`` as ``cudaLaunchKernel``."""

    def __init__(self, library, index, expression, source):
        entry = getattr(library, f"fx_emu_kernel_{index}")
        entry.restype = ctypes.POINTER(_KernelInfo)
        self._library = library  # keeps the code loaded
        self._info = entry()
        info = self._info.contents
        self.name = expression
        self.params = [(info.sizes[k], chr(info.kinds[k])) for k in range(info.nparams)]
        kernel = expression.split("<")[0].split("::")[-1]
        names = parameter_names(source, kernel)
        self.param_names = names if names and len(names) == len(self.params) else [f"#{k}" for k in
                                                                                    range(len(self.params))]

    def _value(self, k, arg):
        """ctypes storage of scalar argument ``k``, checked against its C++ parameter."""
        size, kind = self.params[k]
        where = f"{self.name} argument #{k} ({self.param_names[k]})"
        if kind == "p":
            if isinstance(arg, np.uint64) and int(arg) == 0:
                return ctypes.c_uint64(0)
            raise TypeError(f"{where} is a pointer: pass a device array or np.uint64(0) (NULL), got {arg!r}")
        if arg is None or not isinstance(arg, (np.integer, np.floating, np.bool_)):
            raise TypeError(f"{where} takes a {size}-byte {'float' if kind == 'f' else 'integer'}: pass a numpy "
                            f"scalar of that size (CuPy copies its bytes), got {type(arg).__name__} {arg!r}")
        value = np.asarray(arg)
        if value.dtype.itemsize != size or (value.dtype.kind == "f") != (kind == "f"):
            raise TypeError(f"{where} takes a {size}-byte {'float' if kind == 'f' else 'integer'}, "
                            f"got {value.dtype.name}")
        return ctypes.create_string_buffer(value.tobytes(), size)

    def launch(self, grid, block, args, seed=None):
        grid, block = _dim3(grid), _dim3(block)
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = [None] * len(args)
        arrays = {}
        for k, arg in enumerate(args):
            if isinstance(arg, np.ndarray):
                if self.params[k][1] != "p":
                    raise TypeError(f"{self.name} argument #{k} ({self.param_names[k]}) is not a pointer, "
                                    f"got an array")
                if not arg.flags.c_contiguous:
                    raise TypeError(f"{self.name} argument #{k} ({self.param_names[k]}) is not C-contiguous: "
                                    "the kernel would read it as if it were")
                arrays[k] = arg
            else:
                values[k] = self._value(k, arg)
        staged = _Staging(arrays)
        pointers = {k: ctypes.c_uint64(address) for k, address in staged.addresses.items()}
        slots = [pointers[k] if k in pointers else values[k] for k in range(len(args))]
        argv = (ctypes.c_void_p * max(1, len(args)))(*[ctypes.addressof(slot) for slot in slots])
        error = ctypes.create_string_buffer(4096)
        launch = _Launch(self._info, (ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*block),
                         SEED if seed is None else seed, argv, len(staged.extents), len(staged.heaps),
                         (_Extent * max(1, len(staged.extents)))(*staged.extents),
                         (_Heap * max(1, len(staged.heaps)))(*staged.heaps), ctypes.cast(error, ctypes.c_char_p),
                         len(error))
        if runtime().fx_emu_launch(ctypes.byref(launch)):
            message = error.value.decode(errors="replace")
            message = re.sub(r"argument #(\d+)", lambda m: self._name_arg(int(m.group(1)), arrays), message)
            raise KernelFault(f"emulated CUDA launch failed: {message} [grid {grid}, block {block}; seed "
                              f"{SEED if seed is None else seed}: FASTXENT_EMU_SEED={SEED if seed is None else seed} "
                              "replays this schedule]")
        staged.copy_back()

    def _name_arg(self, k, arrays):
        array = arrays.get(k)
        return f"argument #{k} `{self.param_names[k]}`" + (f" ({_describe(array)})" if array is not None else "")


class _Staging:
    """Copies of the launch's arrays in fresh buffers with red zones: overlapping arrays
    (an inplace gradient over its logits) share one copy, so aliasing is kept, and each
    copy keeps the address modulo 256 of the original (the kernels' 16-byte alignment
    decisions were taken on the originals)."""

    def __init__(self, arrays):
        spans = sorted((a.__array_interface__["data"][0], a.__array_interface__["data"][0] + a.nbytes, k)
                       for k, a in arrays.items())
        clusters = []
        for lo, hi, k in spans:
            if clusters and lo < clusters[-1][1]:
                clusters[-1][1] = max(clusters[-1][1], hi)
                clusters[-1][2].append(k)
            else:
                clusters.append([lo, hi, [k]])
        self.addresses, self.extents, self.heaps, self._buffers, self._back = {}, [], [], [], []
        for lo, hi, members in clusters:
            size = hi - lo
            red = max(MIN_RED_ZONE, -(-size // 256) * 256)
            buffer = np.full(size + 2 * red + 512, 0xA5, dtype=np.uint8)
            base = buffer.__array_interface__["data"][0]
            start = -(-(base + red) // 256) * 256 + lo % 256
            ctypes.memmove(start, lo, size)
            self._buffers.append(buffer)
            self.heaps.append(_Heap(base, base + buffer.size))
            for k in members:
                array = arrays[k]
                address = start + (array.__array_interface__["data"][0] - lo)
                self.addresses[k] = address
                self.extents.append(_Extent(address, address + array.nbytes, k, int(array.flags.writeable)))
                if array.flags.writeable:
                    self._back.append((array.__array_interface__["data"][0], address, array.nbytes))

    def copy_back(self):
        for original, staged, size in self._back:
            ctypes.memmove(original, staged, size)

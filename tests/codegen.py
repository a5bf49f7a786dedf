"""What the Numba kernels compile to on a chosen x86 target, without running them.

Run as ``python -m tests.codegen`` in a process whose environment names the
target (``NUMBA_CPU_NAME=znver4``, ``NUMBA_CPU_FEATURES=`` empty so the named
CPU's own features apply, a fresh ``NUMBA_CACHE_DIR``): it replaces every kernel
of ``fastxent.backends.numba`` by a recorder, makes the public calls of
:data:`CALLS` on tiny arrays -- the backend prepares its arguments and "launches"
into the recorder, so nothing is executed -- then compiles each recorded
signature with ``dispatcher.compile(sig)`` and prints, as JSON, what
:func:`report` finds in its assembly. ``tests/test_codegen.py`` runs it once per
ISA; the AVX-512 code can be read on an AVX2 machine and the other way round.

What is looked for (docs/design.md, "The Numba backend"):

* gathers and scatters (``vgather*``, ``vpgather*``, ``vscatter*``, ``vpscatter*``):
  a gather loads one element at a time; on a Zen 4 the chunked forward compiled with
  117 gathers over 25 kernels ran 3.4x slower than the same source built for AVX2;
* innermost loops doing floating-point arithmetic only on scalars: LLVM follows a
  vectorised loop with a scalar remainder loop (often unrolled) doing the same
  operations, so a scalar loop is accepted when a vectorised loop of the same
  function, not already claimed by another scalar loop, does the same kinds of
  arithmetic (a quarter of them may be missing: LLVM picks other instructions for
  some vector operations); one without such a twin is a loop LLVM did not vectorise;
* libm calls (``expf``, ``logf``...): a scalar call per element that also stops
  vectorisation; the row kernels may call ``log`` once per row.
"""

import collections
import json
import re
import sys
import warnings

_FUNCTION = re.compile(r"^([A-Za-z_][\w.$]*):")
_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_JUMP = re.compile(r"^\s+j[a-z]+\s+(\.LBB\d+_\d+)\s*$")
_FP_OP = re.compile(r"^\s+v?(f?n?m?(?:add|sub|mul|div|madd|msub)|sqrt|rcp|rsqrt)\d*(ss|sd|ps|pd)\b")
# Compares, max/min and blends are one kind, "select": LLVM turns `a if a > b else b`
# into vmaxss in a scalar loop and into vcmpps + vblendvps in a vector one.
_SELECT_OP = re.compile(r"^\s+v(?:max|min|cmp\w*|blendv?m?)(ss|sd|ps|pd)\b")
#: The operations a fused multiply-add kind stands for (``vfnmadd``: c - a b).
_FUSED = {"fmadd": ("mul", "add"), "fmsub": ("mul", "sub"), "fnmadd": ("mul", "sub"), "fnmsub": ("mul", "sub")}
_WIDE = re.compile(r"%[yz]mm")
_INT_VECTOR_OP = re.compile(r"^\s+vp(?:add|sub|mul|max|min|and|or|xor|sll|srl|sra|cmp)\w*\s.*%[xyz]mm")
_GATHER = re.compile(r"^\s+(v(?:p)?(?:gather|scatter)\w*)", re.M)
_LIBM_CALL = re.compile(
    r"(?:call\w*\s+|\$)(exp|expf|exp2|exp2f|expm1|expm1f|log|logf|log1p|log1pf|log2|log2f|"
    r"tanh|tanhf|pow|powf)(?:@PLT)?\b")


def _loop_spans(lines):
    """``(first, last)`` line of every loop: a jump back to a label of the same function."""
    spans = []
    labels = {}
    for number, line in enumerate(lines):
        if _FUNCTION.match(line):
            labels = {}
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = number
            continue
        jump = _JUMP.match(line)
        if jump and jump.group(1) in labels:
            spans.append((labels[jump.group(1)], number))
    # A loop with two back edges (two latches, or a rotated loop) shows as two
    # spans that overlap without nesting: one loop, their union.
    merged = True
    while merged:
        merged = False
        for a, (first, last) in enumerate(spans):
            for b, (other_first, other_last) in enumerate(spans[a + 1:], a + 1):
                overlap = first < other_first <= last < other_last or other_first < first <= other_last < last
                if overlap:
                    spans[a] = (min(first, other_first), max(last, other_last))
                    del spans[b]
                    merged = True
                    break
            if merged:
                break
    return spans


def innermost_loops(asm):
    """The innermost loops of ``asm``: dicts of their line span and their
    floating-point operation counts by kind, ``scalar`` (ss/sd) and ``packed``
    (ps/pd; integer vector operations counted as kind ``int``)."""
    lines = asm.splitlines()
    spans = _loop_spans(lines)
    loops = []
    for first, last in spans:
        if any(first <= a and b <= last and (a, b) != (first, last) for a, b in spans):
            continue
        scalar, packed = collections.Counter(), collections.Counter()
        for line in lines[first:last + 1]:
            op = _FP_OP.match(line)
            select = _SELECT_OP.match(line)
            if op:
                (scalar if op.group(2) in ("ss", "sd") else packed)[op.group(1)] += 1
            elif select and select.group(1) in ("ss", "sd"):
                scalar["select"] += 1
            elif select and _WIDE.search(line):   # a packed blend on xmm may be scalar code
                packed["select"] += 1
            elif _INT_VECTOR_OP.match(line):
                packed["int"] += 1
        loops.append({"lines": (first, last), "scalar": scalar, "packed": packed})
    return loops


def scalar_loops(asm):
    """Innermost loops with scalar floating-point arithmetic and no vectorised twin
    (module docstring): loops LLVM did not vectorise. A list of ``{kind: count}``."""
    loops = innermost_loops(asm)
    vector = [loop for loop in loops if loop["packed"]]
    # A fused multiply-add also does the multiply and the add/sub it fuses: a remainder loop
    # is not always contracted like its vector body (sparse_short_kernel's gradient loop:
    # vmulss + vsubss beside vfmsub...ps).
    covered = [set(v["packed"]).union(*(_FUSED.get(kind, ()) for kind in v["packed"])) for v in vector]
    claimed = set()
    missed = []
    # Largest first, each claiming the smallest vectorised loop that fits.
    for loop in sorted(loops, key=lambda item: -sum(item["scalar"].values())):
        if loop["packed"] or not loop["scalar"]:
            continue
        kinds = set(loop["scalar"])
        fits = sorted((sum(v["packed"].values()), k) for k, v in enumerate(vector)
                      if k not in claimed and len(kinds - covered[k]) <= len(kinds) // 4)
        if fits:
            claimed.add(fits[0][1])
        else:
            missed.append(dict(loop["scalar"]))
    return missed


def report(asm):
    """What ``asm`` holds: gathers/scatters, unvectorised arithmetic loops, libm calls,
    the number of vectorised loops and the widest vector register used."""
    loops = innermost_loops(asm)
    widest = next((width for width in ("zmm", "ymm", "xmm") if f"%{width}" in asm), None)
    return {
        "gathers": sorted(set(_GATHER.findall(asm))),
        "gather_count": len(_GATHER.findall(asm)),
        "scalar_loops": scalar_loops(asm),
        "vector_loops": sum(1 for loop in loops if loop["packed"]),
        "libm": sorted(set(_LIBM_CALL.findall(asm))),
        "widest": widest,
    }


# ----------------------------------------------------------------------------
# The subprocess: record the kernels' signatures through the public API, compile, inspect
# ----------------------------------------------------------------------------

def _calls(fx, np, bfloat16):
    """The public calls whose kernels are compiled: every kernel in float32, forward
    and fused where both exist (the fused variant carries the forward's row loops
    too), with the options that add loops (label smoothing's class-weight loops,
    a per-class pos_weight), bfloat16 for the 16-bit load/store paths, and the
    reduced and in-place variants."""
    rows, count = 4, 3000
    x = np.zeros((rows, count), np.float32)
    z = np.zeros((rows, count), np.float32)
    ids = np.zeros(rows, np.int64)
    short = np.zeros((rows, 10), np.float32)
    short_ids = np.zeros(rows, np.int64)
    half = x.astype(bfloat16)
    return [
        lambda: fx.sparse_softmax_cross_entropy(x, ids),
        lambda: fx.sparse_softmax_cross_entropy(x, ids, label_smoothing=0.1, return_grad=True),
        lambda: fx.sparse_softmax_cross_entropy(half, ids, return_grad=True),
        lambda: fx.sparse_softmax_cross_entropy(short, short_ids),
        lambda: fx.sparse_softmax_cross_entropy(short, short_ids, return_grad=True),
        lambda: fx.softmax_cross_entropy(x, z, return_grad=True),
        lambda: fx.logsumexp(x),
        lambda: fx.log_softmax(x),
        lambda: fx.score(x, ids),
        lambda: fx.softmax_cross_entropy_hvp(x, z),
        lambda: fx.sigmoid_cross_entropy(x, z, pos_weight=np.ones(count)),
        lambda: fx.sigmoid_cross_entropy(x, z, return_grad=True),
        lambda: fx.sigmoid_cross_entropy(x, z, reduction="mean", return_grad=True),
        lambda: fx.sigmoid_cross_entropy(x.copy(), z, reduction="mean", return_grad=True, inplace=True),
        lambda: fx.sparse_softmax_cross_entropy(x.copy(), ids, reduction="mean", return_grad=True, inplace=True),
        lambda: fx.sigmoid_cross_entropy_hessian_diag(x, z),
        lambda: fx.binary_cross_entropy(x, z, return_grad=True),
        lambda: fx.categorical_cross_entropy(x, z, return_grad=True),
        lambda: fx.sparse_categorical_cross_entropy(x, ids, return_grad=True),
    ]


def _record_signatures():
    """``{kernel name: (dispatcher, [signature, ...])}`` of every kernel the calls reach."""
    import ml_dtypes
    import numpy as np
    from numba import typeof

    import fastxent as fx
    from fastxent.backends.numba import _elementwise, _moments, _probs, _softmax

    recorded = collections.defaultdict(list)
    dispatchers = {}

    def recorder(name):
        def record(*args):
            signature = tuple(typeof(arg) for arg in args)
            if signature not in recorded[name]:
                recorded[name].append(signature)
        return record

    for module in (_elementwise, _moments, _probs, _softmax):
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(value, "compile"):
                dispatchers[name] = value
                setattr(module, name, recorder(name))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")   # outputs are never written: reductions see garbage
        for call in _calls(fx, np, ml_dtypes.bfloat16):
            call()
    return {name: (dispatchers[name], signatures) for name, signatures in recorded.items()}


def main():
    results = {}
    for name, (dispatcher, signatures) in sorted(_record_signatures().items()):
        for signature in signatures:
            dispatcher.compile(signature)
            key = f"{name}({', '.join(str(arg) for arg in signature)})"
            results[key] = report(dispatcher.inspect_asm(signature))
    json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
    main()

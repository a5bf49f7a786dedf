"""CPU benchmarks: fastxent beside its yardstick and its peers, grouped ``op|shape|dtype``.

Run for real (nothing else running on the machine)::

    python -m pytest bench/bench_cpu.py --benchmark-enable --benchmark-only \
        --benchmark-json bench/results/cpu.json
    python bench/render.py bench/results/cpu.json > bench/results/cpu.md

In the normal test run benchmarks are disabled (``--benchmark-disable`` in
pyproject.toml): each case then runs once, on a shape scaled down to a few
MB, as a smoke test that the peers and fastxent agree.

The data (spiky synthetic logits), the peers and the agreement check (the
float64 reference, tolerances by dtype) are those of ``fastxent bench``
(``fastxent.cli.bench``).

Every entry of a group is measured in the same process, one after the other,
so the ratios are meaningful on a shared machine even when absolute times drift.
"""

import numpy as np
import pytest

from fastxent.cli.bench import agreement, cases, peers

SHAPES = {
    "sparse_fwd": [(4096, 32000), (65536, 1000), (1_000_000, 10)],
    "sparse_fwd_bwd": [(4096, 32000), (65536, 1000), (1_000_000, 10)],
    "sigmoid_fwd": [(4096, 32000), (1_000_000, 10)],
    "sigmoid_fwd_bwd": [(4096, 32000), (1_000_000, 10)],
    "score": [(4096, 32000)],
}
CASES = [(op, shape) for op, shapes in SHAPES.items() for shape in shapes]
CASE_IDS = [f"{op}-{n}x{c}" for op, (n, c) in CASES]

#: Entries measured beside fastxent: the one-read yardstick, the float64
#: reference (fastxent's numpy backend) and the peers of ``fastxent.cli.bench.peers``.
ENTRIES = ["fastxent", "read", "reference", "numpy", "torch"]

_DATA = {}


def _smoke_shape(shape):
    rows, count = shape
    return (min(rows, max(1, 200_000 // count)), count)


def _data(op, shape):
    """``(logits, labels, reference)``: ``fastxent bench``'s synthetic data, one case at a time."""
    key = (op, shape)
    if key not in _DATA:
        _DATA.clear()  # one case's arrays at a time: 4096x32000 float32 is 524 MB
        logits = cases.synthetic_logits(shape, np.float32)
        labels = cases.make_labels(op, shape)
        _DATA[key] = (logits, labels, agreement.Reference(logits, labels))
    return _DATA[key]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("op, shape", CASES, ids=CASE_IDS)
def bench_cpu(benchmark, op, shape, entry):
    if benchmark.disabled:
        shape = _smoke_shape(shape)
    benchmark.group = f"{op}|{shape[0]}x{shape[1]}|float32"
    logits, labels, ref = _data(op, shape)
    if entry == "fastxent":
        call = peers.fastxent_call(op, logits, labels)
    elif entry == "reference":
        if not benchmark.disabled and logits.size > 50_000_000:
            pytest.skip("the float64 reference needs 8 bytes/element; measured on the smaller shapes")
        call = peers.fastxent_call(op, logits, labels, backend="numpy")
    elif entry == "read":
        call = peers.read_yardstick(logits)
    else:
        if entry not in peers.installed_peers(op):
            pytest.skip(f"{entry} has no {op} here (not installed or no such peer)")
        call = peers.peer_call(op, entry, logits, labels)
    result = benchmark(call)
    if entry != "read":
        problem = agreement.check(op, result, ref)
        assert problem is None, f"{entry} disagrees with the reference on {op}: {problem}"

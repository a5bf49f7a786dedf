"""fastxent.dask on a real cluster: a ``distributed.LocalCluster`` of 2 worker processes,
started once for this module and shut down by it, against the float64 reference.

Both layouts (rows in chunks with the class axis whole; the class axis in several
chunks, split at odd offsets, a one-class block, a block of only ``-inf`` classes),
uneven chunks, every sparse option, 16-bit scores, ignored rows, reductions and
``grad_output``, ``score`` and the building blocks, a class axis that is not last,
bad labels named by their position in the whole array, and a worker killed in the
middle of a computation (Dask recomputes what it held; the result is still right).
The threaded scheduler (no cluster) runs the GIL-free kernels on several blocks at
once. Times: the cluster starts in ~3 s; the module runs in ~30 s on 2 cores.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'fastxent[dask]')")
distributed = pytest.importorskip("distributed", reason="distributed is not installed (pip install 'fastxent[dask]')")

import dask  # noqa: E402

import fastxent.dask as fxd  # noqa: E402
from fastxent import reference as ref  # noqa: E402
from tests.support import (  # noqa: E402
    BF16,
    assert_close,
    compare,
    compare_score,
    make_class_ids,
    make_distribution,
    make_logits,
    sparse_options,
)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       memory_limit="2GB", silence_logs=40)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _run(client, *arrays):
    return client.gather(client.compute(list(arrays)))


#: (name, row chunks, class chunks) of a (10, 423) array: rows only (uneven), classes at
#: odd offsets with a one-class block, both.
LAYOUTS = [("rows", (3, 5, 2), (423,)), ("classes", (10,), (1, 129, 200, 93)), ("both", (4, 6), (211, 212))]
LAYOUT_IDS = [name for name, _, _ in LAYOUTS]


def _masked(x, labels):
    """Row 0 with classes [1, 130) masked (the second block of "classes" is all -inf), its
    label outside them; row 1 ignored and holding NaN; row 2 with a -inf score elsewhere."""
    x = x.copy()
    x[0, 1:130] = -np.inf
    labels[0] = 300
    x[1, 40] = np.nan
    labels[1] = -100
    x[2, 7] = -np.inf
    return x, labels


# ----------------------------------------------------------------------------
# Sparse softmax cross-entropy: both layouts, options, dtypes, reductions
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,rows,classes", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("option,dtype", [("plain", np.float32), ("all", np.float32), ("all", BF16),
                                          ("ignore", np.float64)], ids=["plain-f32", "all-f32", "all-bf16", "ignore-f64"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sparse_matches_reference(client, name, rows, classes, option, dtype, reduction):
    options = sparse_options(option, 423)
    x = make_logits((10, 423), dtype, seed=1)
    labels = make_class_ids(10, 423, seed=2, ignore_index=options.get("ignore_index"), ignore_fraction=0.2)
    if "ignore_index" in options:
        x, labels = _masked(x, labels)
    logits = da.from_array(x, chunks=(rows, classes))
    loss, grad = fxd.sparse_softmax_cross_entropy(logits, da.from_array(labels, chunks=3), **options,
                                                  reduction=reduction, return_grad=True)
    assert grad.chunks == logits.chunks
    got = _run(client, loss, grad)
    want = ref.sparse_softmax_cross_entropy(x, labels, **options, reduction=reduction, return_grad=True)
    compare(tuple(got), want, dtype, f"{name} {option}")


def test_per_row_grad_output_and_class_axis_not_last(client):
    x = make_logits((4, 50, 3), np.float32, seed=3)                    # class axis 1
    labels = make_class_ids((4, 3), 50, seed=4)
    weights = np.random.default_rng(5).uniform(0.5, 2.0, (4, 3))
    logits = da.from_array(x, chunks=(2, (17, 33), 3))
    loss, grad = fxd.sparse_softmax_cross_entropy(logits, labels, axis=1, z_loss=1e-3, return_grad=True,
                                                  grad_output=da.from_array(weights, chunks=(1, 3)))
    got = _run(client, loss, grad)
    want = ref.sparse_softmax_cross_entropy(x, labels, axis=1, z_loss=1e-3, return_grad=True, grad_output=weights)
    compare(tuple(got), want, np.float32, "axis=1 per-row grad_output")


@pytest.mark.parametrize("classes", [(6,), (2, 4)], ids=["rows", "classes"])
def test_mean_over_nothing_is_zero_with_zero_gradient(client, classes):
    x = make_logits((5, 6), np.float32)
    logits = da.from_array(x, chunks=(2, classes))
    loss, grad = fxd.sparse_softmax_cross_entropy(logits, np.full(5, -100), ignore_index=-100, reduction="mean",
                                                  return_grad=True)
    got_loss, got_grad = _run(client, loss, grad)
    assert got_loss.shape == () and got_loss.dtype == np.float32 and got_loss == 0
    assert not got_grad.any()


@pytest.mark.parametrize("classes", [(423,), (100, 323)], ids=["rows", "classes"])
def test_bad_label_names_its_position_in_the_whole_array(client, classes):
    labels = make_class_ids(10, 423)
    labels[7] = 423
    logits = da.from_array(make_logits((10, 423), np.float32), chunks=(4, classes))
    loss, grad = fxd.sparse_softmax_cross_entropy(logits, da.from_array(labels, chunks=4), return_grad=True)
    for array in (loss, grad):
        with pytest.raises(ValueError, match=r"labels\[7\] = 423 is outside \[0, 423\)"):
            _run(client, array)


def test_arguments_are_checked_when_the_graph_is_built():
    logits = da.zeros((4, 6), chunks=2)
    with pytest.raises(TypeError, match="labels must be integer class ids"):
        fxd.sparse_softmax_cross_entropy(logits, da.zeros(4))
    with pytest.raises(ValueError, match=r"labels has shape \(5,\), expected \(4,\)"):
        fxd.sparse_softmax_cross_entropy(logits, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="label_smoothing=2.0"):
        fxd.sparse_softmax_cross_entropy(logits, np.zeros(4, dtype=int), label_smoothing=2)
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64"):
        fxd.score(da.zeros((4, 6), dtype=int, chunks=2), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="softmax_cross_entropy needs the class axis"):
        fxd.softmax_cross_entropy(logits, da.zeros((4, 6), chunks=2))


# ----------------------------------------------------------------------------
# score and the building blocks
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,rows,classes", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_score_and_building_blocks_match_reference(client, name, rows, classes, dtype):
    x = make_logits((10, 423), dtype, seed=6)
    labels = make_class_ids(10, 423, seed=7)
    x, labels = _masked(x, labels)
    x[3] = -np.inf                       # all -inf: logsumexp -inf, NaN elsewhere
    x[4, 300] = np.inf                   # +inf and no NaN: logsumexp +inf
    x[5, [2, 250]] = 99.0                # a tie across blocks: argmax the first
    logits = da.from_array(x, chunks=(rows, classes))
    fields = fxd.score(logits, labels, ignore_index=-100)
    building = (fxd.logsumexp(logits), fxd.log_softmax(logits), fxd.softmax(logits))
    got = _run(client, *fields, *building)
    compare_score(type(fields)(*got[:6]), ref.score(x, labels, ignore_index=-100), dtype, f"{name} score")
    compare(got[6], ref.logsumexp(x), dtype, f"{name} logsumexp")
    for value, want, what in ((got[7], ref.log_softmax(x), "log_softmax"), (got[8], ref.softmax(x), "softmax")):
        assert_close(value, want, dtype, "stored", f"{name} {what}")


# ----------------------------------------------------------------------------
# Soft labels and the sigmoid family (blocks of rows; elementwise: any chunks)
# ----------------------------------------------------------------------------

def test_soft_labels_and_sigmoid_match_reference(client):
    x = make_logits((9, 40), np.float32, seed=8)
    soft = make_distribution((9, 40), seed=9)
    binary = (np.random.default_rng(10).random((9, 40)) < 0.3).astype(np.float32)
    pos_weight = np.random.default_rng(11).uniform(0.5, 3.0, 40)
    logits = da.from_array(x, chunks=(4, 40))
    soft_loss, soft_grad = fxd.softmax_cross_entropy(logits, soft, label_smoothing=0.1, reduction="sum",
                                                     return_grad=True)
    sig_loss, sig_grad = fxd.sigmoid_cross_entropy(da.from_array(x, chunks=(4, (15, 25))), binary,
                                                   pos_weight=pos_weight, reduction="mean", return_grad=True)
    got = _run(client, soft_loss, soft_grad, sig_loss, sig_grad)
    compare(tuple(got[:2]), ref.softmax_cross_entropy(x, soft, label_smoothing=0.1, reduction="sum",
                                                      return_grad=True), np.float32, "soft")
    compare(tuple(got[2:]), ref.sigmoid_cross_entropy(x, binary, pos_weight=pos_weight, reduction="mean",
                                                      return_grad=True), np.float32, "sigmoid")


# ----------------------------------------------------------------------------
# Schedulers and the import
# ----------------------------------------------------------------------------

def test_threaded_scheduler_runs_the_gil_free_kernels_concurrently():
    """Two threads launch the (parallel, nogil) kernels on different blocks at once:
    the results are the reference's, under the threading layer Numba chose."""
    from fastxent.backends.numba import _partials, _softmax

    for dispatcher in (_partials.partials_kernel, _partials.block_grad_kernel, _softmax.sparse_kernel):
        assert dispatcher.targetoptions.get("nogil") is True, dispatcher
    x = make_logits((64, 300), np.float32, seed=12)
    labels = make_class_ids(64, 300, seed=13)
    with dask.config.set(scheduler="threads", num_workers=2):
        for classes in ((300,), (150, 150)):
            got = dask.compute(*fxd.sparse_softmax_cross_entropy(da.from_array(x, chunks=(8, classes)), labels,
                                                                 return_grad=True))
            compare(tuple(got), ref.sparse_softmax_cross_entropy(x, labels, return_grad=True), np.float32,
                    f"threads {classes}")


def test_import_fastxent_does_not_import_dask():
    code = "import sys, fastxent; assert 'dask' not in sys.modules, sorted(m for m in sys.modules if 'dask' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------
# A worker killed mid-computation (last: the cluster restarts the worker)
# ----------------------------------------------------------------------------

def test_worker_killed_mid_computation_is_recomputed(client):
    x = make_logits((64, 300), np.float32, seed=14)
    labels = make_class_ids(64, 300, seed=15)

    def slow_copy(block):
        time.sleep(0.15)     # 24 blocks over 2 workers: ~2 s, time to kill one on the way
        return block.copy()

    logits = da.from_array(x, chunks=(8, (100, 101, 99))).map_blocks(slow_copy, dtype=x.dtype)
    loss, grad = fxd.sparse_softmax_cross_entropy(logits, labels, reduction="sum", return_grad=True)
    futures = client.compute([loss, grad])
    deadline = time.monotonic() + 30
    while not any(client.has_what().values()) and time.monotonic() < deadline:
        time.sleep(0.05)     # some blocks done and held by the workers
    pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    assert not all(f.done() for f in futures), "the computation ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    got = client.gather(futures)
    compare(tuple(got), ref.sparse_softmax_cross_entropy(x, labels, reduction="sum", return_grad=True),
            np.float32, "after a worker was killed")
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()

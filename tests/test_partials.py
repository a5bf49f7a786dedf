"""A row split along the class axis, without Dask: the backends' block functions
(``softmax_partials``, ``softmax_block_grad``) and the merge of ``fastxent/_partials.py``
against the float64 reference.

Two layers: the partial statistics of each block against the reference's
(``reference.softmax_partials``), field by field; and a row split into blocks at odd
offsets, each block's partials merged and finished, against the reference of the whole
row (loss and gradient with every sparse option, ``score``, ``logsumexp``,
``log_softmax``). Blocks holding only ``-inf`` classes, ignored rows, labels outside a
block, NaN and ``+inf`` rows, large magnitudes; blocks wider than a Numba chunk.
"""

import numpy as np
import pytest

from fastxent import _blocks, _partials
from fastxent import reference as ref
from fastxent._dtypes import accumulation_dtype
from fastxent.backends import numba as nb
from tests.support import (
    DTYPE_IDS,
    FLOAT_DTYPES,
    SPARSE_OPTIONS,
    assert_close,
    compare,
    compare_score,
    make_class_ids,
    make_logits,
    sparse_options,
    tolerance,
)

#: (rows, classes, block starts): odd offsets, a one-class block, a block wider than
#: a Numba chunk (2048 classes) and one starting mid-chunk.
SPLITS = [(7, 423, (0, 1, 130, 311)), (3, 5000, (0, 2049, 4999)), (4, 2, (0, 1))]
SPLIT_IDS = ["423_odd", "5000_wide", "2_single"]


def _adversarial(x, labels):
    """Rows of the cases the merge must keep: a block of only -inf classes (row 0, classes
    [1, 130)), the target in a masked-free block but a -inf elsewhere (row 1), an ignored row
    holding NaN (row 2), large magnitudes (row 3)."""
    x = x.copy()
    count = x.shape[1]
    if x.shape[0] > 3 and count > 130:
        x[0, 1:130] = -np.inf
        labels[0] = 200
        x[1, 5] = -np.inf
        x[2, 17] = np.nan
        labels[2] = -100
        x[3] = x[3] + np.float32(1e4).astype(x.dtype)
    return x, labels


def _blocks_of(x, starts):
    bounds = list(starts) + [x.shape[1]]
    return [(a, x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _merged(x, labels, starts, kind, backend, **options):
    records = [_blocks.partials(block, labels, offset, kind=kind, backend=backend, **options)
               for offset, block in _blocks_of(x, starts)]
    return _partials.merge(np.concatenate(records, axis=1))


# ----------------------------------------------------------------------------
# The partial statistics of a block
# ----------------------------------------------------------------------------

#: The partial statistics asked for: (name, with class weights and a softcap, moments).
PARTIAL_KINDS = ["plain", "smoothing_softcap", "moments"]


def check_block_partials(partials, dtype, rows, count, starts, kind):
    """A backend's ``softmax_partials`` (``partials``: host arrays in, a Partials of host arrays
    out) on every block of a split row against the reference's, field by field."""
    x = make_logits((rows, count), dtype, seed=3)
    labels = make_class_ids(rows, count, seed=4, ignore_index=-100, ignore_fraction=0.2)
    x, labels = _adversarial(x, labels)
    weights = np.random.default_rng(5).uniform(0.0, 2.0, count) if kind == "smoothing_softcap" else None
    softcap = 6.0 if kind == "smoothing_softcap" else None
    rtol, atol = tolerance(dtype, "value")
    for offset, block in _blocks_of(x, starts):
        args = (labels, offset, -100, weights, softcap, kind == "moments")
        got = partials(np.ascontiguousarray(block), *args)
        want = ref.softmax_partials(block, *args)
        what = f"block at {offset}"
        magnitude = np.maximum(1.0, np.abs(np.nan_to_num(want.peak.astype(np.float64), posinf=0, neginf=0)))
        # A block holding NaN has a NaN total; its peak is whatever the backend met first.
        every, finite = np.ones(rows, dtype=bool), ~np.isnan(want.total)
        checks = [("total", every), ("target", every), ("peak", finite)]
        if kind == "moments":
            checks += [("spread", every), ("best_value", every)]
            np.testing.assert_array_equal(got.best, want.best, err_msg=f"{what} best")
        else:
            assert got.spread is None and got.best is None and got.best_value is None
        for field, rows_checked in checks:
            assert_close(getattr(got, field)[rows_checked], getattr(want, field)[rows_checked], dtype,
                         what=f"{what} {field}", tol=(rtol, atol * magnitude[rows_checked]))
        if weights is not None:
            # Anchors are each backend's choice: compare the gaps moved to one anchor.
            w = np.sum(weights[offset:offset + block.shape[1]])
            moved = got.gap.astype(np.float64) + w * (want.anchor.astype(np.float64) - got.anchor)
            assert_close(moved, want.gap, dtype, what=f"{what} gap",
                         tol=(1e-4 if dtype != np.float64 else 1e-9, 1e-3 * w * magnitude))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,count,starts", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("kind", PARTIAL_KINDS)
def test_block_partials_match_reference(dtype, rows, count, starts, kind):
    check_block_partials(nb.softmax_partials, dtype, rows, count, starts, kind)


def test_labels_outside_the_block_and_ignored_give_no_target():
    x = make_logits((4, 10), np.float32)
    labels = np.array([3, 15, -100, 9])   # classes [5, 15): before, after, ignored, inside
    got = nb.softmax_partials(x, labels, 5, -100, None, None, False)
    np.testing.assert_array_equal(got.target, np.array([0.0, 0.0, 0.0, x[3, 4]], dtype=np.float32))


def test_merge_is_associative():
    """Any tree of merges gives the same statistics: merged all at once, or pairwise."""
    x = make_logits((6, 423), np.float64, seed=8)
    labels = make_class_ids(6, 423)
    records = [_blocks.partials(block, labels, offset, kind="score", backend="numba")
               for offset, block in _blocks_of(x, (0, 1, 130, 200, 311))]
    flat = _partials.merge(np.concatenate(records, axis=1))
    left = _partials.merge(np.concatenate(records[:2], axis=1))[:, None]
    right = _partials.merge(np.concatenate(records[2:], axis=1))[:, None]
    tree = _partials.merge(np.concatenate([left, right], axis=1))
    np.testing.assert_allclose(tree, flat, rtol=1e-14, atol=1e-12)


# ----------------------------------------------------------------------------
# A split row against the reference of the whole row
# ----------------------------------------------------------------------------

#: Every dtype with no option and with all of them; float32 with each option alone
#: (each compiled variant of the Numba kernels costs seconds in a fresh cache).
SPARSE_CASES = [(dtype, option) for dtype in FLOAT_DTYPES for option in ("plain", "all")] + [
    (np.dtype(np.float32), option) for option in SPARSE_OPTIONS if option not in ("plain", "all")]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype,option", SPARSE_CASES, ids=[f"{d.name}-{o}" for d, o in SPARSE_CASES])
@pytest.mark.parametrize("rows,count,starts", SPLITS, ids=SPLIT_IDS)
def test_split_sparse_matches_reference(backend, dtype, rows, count, starts, option):
    options = sparse_options(option, count)
    x = make_logits((rows, count), dtype, seed=11)
    labels = make_class_ids(rows, count, seed=12, ignore_index=options.get("ignore_index"), ignore_fraction=0.3)
    if "ignore_index" in options:
        x, labels = _adversarial(x, labels)
    scale = np.random.default_rng(13).uniform(0.5, 2.0, rows)
    split = {k: options.get(k, d) for k, d in
             (("ignore_index", None), ("class_weight", None), ("label_smoothing", 0.0), ("softcap", None))}
    merged = _merged(x, labels, starts, "sparse", backend, **split)
    finish = dict(ignore_index=split["ignore_index"], class_weight=split["class_weight"],
                  label_smoothing=split["label_smoothing"], z_loss=options.get("z_loss", 0.0), num_classes=count)
    loss = _partials.sparse_loss(merged, labels, loss_dtype=accumulation_dtype(dtype), **finish)
    grad = np.concatenate([_blocks.sparse_grad(block, labels, merged, scale, offset, softcap=split["softcap"],
                                               backend=backend, **finish)
                           for offset, block in _blocks_of(x, starts)], axis=1)
    want = ref.sparse_softmax_cross_entropy(x, labels, **options, return_grad=True, grad_output=scale)
    compare((loss, grad), want, dtype, f"{backend} {option}", scale=np.abs(x[:, :1].astype(np.float64)).clip(1))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,count,starts", SPLITS, ids=SPLIT_IDS)
def test_split_score_and_building_blocks_match_reference(backend, dtype, rows, count, starts):
    x = make_logits((rows, count), dtype, seed=21)
    labels = make_class_ids(rows, count, seed=22, ignore_index=-100, ignore_fraction=0.3)
    x, labels = _adversarial(x, labels)
    if rows > 4:
        x[4, :] = -np.inf                      # an all -inf row: lse -inf (torch), NaN elsewhere
        x[5, 3] = np.inf                       # +inf and no NaN: lse +inf
        x[6, 250] = x[6, 251] = x[6].max()     # a tie across the block boundary at 130? no: within a block
    tolerance_scale = np.abs(np.nan_to_num(x[:, :1].astype(np.float64), posinf=1, neginf=1)).clip(1)[:, 0]
    merged = _merged(x, labels, starts, "score", backend, ignore_index=-100)
    got = _partials.score(merged, labels, -100, accumulation_dtype(dtype))
    compare_score(got, ref.score(x, labels, ignore_index=-100), dtype, f"{backend} score", scale=tolerance_scale)
    merged = _merged(x, None, starts, "lse", backend)
    compare(_partials.logsumexp(merged, accumulation_dtype(dtype)), ref.logsumexp(x), dtype,
            f"{backend} logsumexp", scale=tolerance_scale)
    shift, log_sum = _partials.normaliser(merged)
    probs = _partials.log_probs(x, shift, log_sum, x.dtype)
    rtol, atol = tolerance(dtype, "stored")
    assert_close(probs, ref.log_softmax(x), dtype, "stored", f"{backend} log_softmax",
                 tol=(rtol, atol * tolerance_scale[:, None]))


def test_argmax_takes_the_first_block_holding_the_max():
    x = np.zeros((3, 9), dtype=np.float32)
    x[0, [2, 7]] = 5.0          # a tie across blocks: the first
    x[1, 8] = np.nan            # NaN wins, as np.argmax
    x[1, 1] = 9.0
    x[2] = -np.inf              # all -inf: 0
    labels = np.array([2, 8, 0])
    merged = _merged(x, labels, (0, 4, 6), "score", "numba")
    got = _partials.score(merged, labels, None, np.float32)
    np.testing.assert_array_equal(got.argmax, np.argmax(x, axis=1))
    np.testing.assert_array_equal(got.correct, [True, True, True])

"""A row split along the class axis: its blocks' partial statistics, their merge, and what
the merged statistics give (loss, lse, ``score``, the gradient's row coefficients). Written once.

A block of classes ``[offset, offset + Cb)`` of each row reduces to a
:class:`fastxent.backends.Partials` (the backends' ``softmax_partials``): the block's max ``m``, ``s = sum exp(t - m)``,
the target score when the row's label lies in the block, the label-smoothing sum
and, for ``score``, the entropy term and the argmax. Blocks merge with the
log-sum-exp combine (the online softmax of Milakov & Gimelshein 2018, block by
block): moving a block's sums from its max ``m_k`` to the merged max ``M`` scales
them by ``exp(m_k - M)`` (exactly 1 when ``m_k == M``, so two ``-inf`` maxima do not
make NaN), and the entropy term ``u`` becomes ``exp(d) (u + s d)``, ``d = m_k - M``.

For the tree reduction of ``fastxent.dask`` the partials of a block are packed as one
float64 record per row (:data:`RECORD`, :func:`pack`); :func:`merge` combines records
stacked along an axis, associatively and in block order (the argmax keeps the first
block holding the row max), so any tree of merges gives the same statistics. float64
keeps a float32 block's sums exactly and an argmax below 2**53 exactly.

Every function takes numpy or CuPy arrays (``xp``, the arrays' module) and runs on
the records of a batch of rows, never on a block of classes; the formulas match
``fastxent/reference.py`` (the losses' and ``score``'s rules for non-finite rows,
the xy convention) and the backends' row kernels.
"""

import numpy as np

from . import _dispatch, _dtypes
from ._score import Score
from .backends import Partials


#: Columns of a packed record: the :class:`Partials` fields, then ``weight`` (the sum of
#: the block's class weights, which moves ``gap`` to another anchor) and ``nan`` (1 where
#: the block's row holds a NaN: ``logsumexp`` tells NaN from ``+inf`` with it).
RECORD = Partials._fields + ("weight", "nan")
_COLUMN = {name: k for k, name in enumerate(RECORD)}


def array_module(array):
    """numpy, or CuPy for a CUDA array (``fastxent._dispatch`` decides where data lives)."""
    return _dispatch.array_module(_dispatch.is_cuda_array(array))


def column(records, name):
    """Column ``name`` of packed records ``(..., F)``."""
    return records[..., _COLUMN[name]]


def pack(partials, weight, nan=None):
    """Packed float64 records ``(N, F)`` of a block's :class:`Partials` (a None field: 0);
    ``weight`` is the block's class-weight sum (a number), ``nan`` the rows holding a NaN
    (None: none)."""
    xp = array_module(partials.peak)
    records = xp.zeros((partials.peak.shape[0], len(RECORD)), dtype=np.float64)
    for name, value in zip(Partials._fields, partials):
        if value is not None:
            records[:, _COLUMN[name]] = value
    records[:, _COLUMN["weight"]] = weight
    if nan is not None:
        records[:, _COLUMN["nan"]] = nan
    return records


def anchor_of(peak, xp):
    """The merged records' anchor: the row max where finite, else 0."""
    return xp.where(xp.isfinite(peak), peak, 0.0)


@np.errstate(all="ignore")
def merge(records, axis=-2):
    """Merge records stacked along ``axis`` (block order) into one record per row: ``(..., F)``.

    ``peak`` the largest (NaN if any), ``total`` and the entropy term ``spread`` moved to
    it, ``target`` and ``weight`` summed (one block holds the label), ``gap`` moved to
    the merged anchor (:func:`anchor_of`) and summed, ``best`` of the first block whose
    ``best_value`` is the largest (NaN first, as ``np.argmax``), ``nan`` any.
    """
    xp = array_module(records)
    records = xp.moveaxis(records, axis, -2)
    col = {name: records[..., k] for k, name in enumerate(RECORD)}
    peak = col["peak"].max(axis=-1)
    top = peak[..., None]
    same = col["peak"] == top
    delta = col["peak"] - top
    factor = xp.where(same, 1.0, xp.exp(delta))
    total = col["total"] * factor
    spread = xp.where(same, col["spread"],
                      xp.where(col["total"] == 0, 0.0, factor * (col["spread"] + col["total"] * delta)))
    anchor = anchor_of(peak, xp)
    gap = col["gap"] + col["weight"] * (anchor[..., None] - col["anchor"])
    winner = xp.argmax(col["best_value"], axis=-1)[..., None]
    out = xp.empty(records.shape[:-2] + (len(RECORD),), dtype=np.float64)
    out[..., _COLUMN["peak"]] = peak
    out[..., _COLUMN["total"]] = total.sum(axis=-1)
    out[..., _COLUMN["target"]] = col["target"].sum(axis=-1)
    out[..., _COLUMN["anchor"]] = anchor
    out[..., _COLUMN["gap"]] = gap.sum(axis=-1)
    out[..., _COLUMN["spread"]] = spread.sum(axis=-1)
    out[..., _COLUMN["best"]] = xp.take_along_axis(col["best"], winner, axis=-1)[..., 0]
    out[..., _COLUMN["weight"]] = col["weight"].sum(axis=-1)
    out[..., _COLUMN["best_value"]] = xp.take_along_axis(col["best_value"], winner, axis=-1)[..., 0]
    out[..., _COLUMN["nan"]] = col["nan"].max(axis=-1)
    return out


# ----------------------------------------------------------------------------
# What merged records give
# ----------------------------------------------------------------------------

@np.errstate(all="ignore")
def normaliser(merged):
    """``(shift, log_sum)`` of each row, ``lse = shift + log_sum`` (the row rule: NaN
    ``log_sum`` for a row holding NaN or ``+inf`` or entirely ``-inf``)."""
    xp = array_module(merged)
    total = column(merged, "total")
    return column(merged, "peak"), xp.where(total > 0, xp.log(xp.where(total > 0, total, 1.0)), np.nan)


@np.errstate(all="ignore")
def logsumexp(merged, dtype):
    """torch's and scipy's ``logsumexp``: ``-inf`` for an all ``-inf`` row, NaN for a row
    holding NaN, ``+inf`` for one holding ``+inf`` and no NaN; in ``dtype``."""
    xp = array_module(merged)
    shift, total = column(merged, "peak"), column(merged, "total")
    lse = shift + xp.log(total)
    lse = xp.where(xp.isnan(total), xp.where(column(merged, "nan") > 0, np.nan, np.inf), lse)
    return lse.astype(dtype)


@np.errstate(all="ignore")
def log_probs(block, shift, log_sum, dtype, exponentiate=False):
    """``(x - shift) - log_sum`` of a block of classes (in this order: exact for large scores;
    ``shift``/``log_sum`` per row, broadcast over the block's last axis), or its exp
    when ``exponentiate``; in ``dtype``."""
    xp = array_module(block)
    acc = _dtypes.accumulation_dtype(block.dtype)
    values = (block.astype(acc) - shift[..., None].astype(acc)) - log_sum[..., None].astype(acc)
    return (xp.exp(values) if exponentiate else values).astype(dtype)


def _class_terms(labels, ignore_index, class_weight, xp):
    """``(kept, w_y)``: rows not ignored, and the weight of each row's class (1 when unweighted)."""
    kept = xp.ones(labels.shape, dtype=bool) if ignore_index is None else labels != ignore_index
    if class_weight is None:
        return kept, xp.ones(labels.shape, dtype=np.float64)
    weights = xp.asarray(class_weight, dtype=np.float64)
    return kept, weights[xp.clip(labels, 0, weights.shape[0] - 1)]


def _xy(weight, value, xp):
    """``weight * value`` with 0 where ``weight == 0`` (the reference's xy convention)."""
    return xp.where(weight != 0, weight * value, 0.0)


@np.errstate(all="ignore")
def sparse_loss(merged, labels, ignore_index, class_weight, label_smoothing, z_loss, num_classes, loss_dtype):
    """The sparse softmax cross-entropy of each row from its merged record, in ``loss_dtype``::

        l = (1-e) w_y (lse - t_y) + (e/C) (W log_s + W (m - anchor) + gap) + z_loss lse**2

    (``sum_c w_c (lse - t_c)`` written relative to the merged anchor); 0 for an
    ignored row, NaN where ``lse`` is NaN (the reference's row rule).
    """
    xp = array_module(merged)
    kept, target_weight = _class_terms(labels, ignore_index, class_weight, xp)
    shift, log_sum = normaliser(merged)
    lse = shift + log_sum
    keep = 1.0 - label_smoothing
    loss = _xy(keep * target_weight, (shift - column(merged, "target")) + log_sum, xp)
    if label_smoothing != 0:
        weight_total = float(num_classes) if class_weight is None else float(np.sum(class_weight))
        offset = weight_total * ((shift - column(merged, "anchor")) + log_sum) + column(merged, "gap")
        loss = loss + (label_smoothing / num_classes) * offset
    if z_loss != 0:  # off adds exactly 0: lse**2 overflows float32 from |lse| = 1.8e19
        loss = loss + z_loss * lse * lse
    loss = xp.where(xp.isnan(lse), np.nan, loss)
    return xp.where(kept, loss, 0.0).astype(loss_dtype)


@np.errstate(all="ignore")
def sparse_grad_coefficients(merged, labels, ignore_index, class_weight, label_smoothing, z_loss,
                             num_classes, scale):
    """``(p_coef, target_coef, weight_coef)`` of the backends' ``softmax_block_grad``: the
    sparse gradient ``g ((T + 2 z_loss lse) p_c - (1-e) w_y [c == y] - (e/C) w_c)`` with
    ``T = (1-e) w_y + (e/C) W`` and ``g`` = ``scale`` (a number or one per row).
    ``weight_coef`` is None without label smoothing."""
    xp = array_module(merged)
    _, target_weight = _class_terms(labels, ignore_index, class_weight, xp)
    shift, log_sum = normaliser(merged)
    keep = 1.0 - label_smoothing
    share = label_smoothing / num_classes
    weight_total = float(num_classes) if class_weight is None else float(np.sum(class_weight))
    p_coef = keep * target_weight + share * weight_total
    if z_loss != 0:
        p_coef = p_coef + 2.0 * z_loss * (shift + log_sum)
    scale = xp.asarray(scale, dtype=np.float64)
    weight_coef = None
    if label_smoothing != 0:
        weight_coef = xp.ascontiguousarray(xp.broadcast_to(scale * share, labels.shape))
    return (xp.ascontiguousarray(scale * p_coef), xp.ascontiguousarray(scale * keep * target_weight),
            weight_coef)


@np.errstate(all="ignore")
def score(merged, labels, ignore_index, dtype):
    """The scoring bundle (``fastxent.score``) of each row from its merged record: float
    fields in ``dtype``. ``entropy = log s - u / s``; an ignored row has loss 0,
    target_logprob NaN and correct False."""
    xp = array_module(merged)
    kept, _ = _class_terms(labels, ignore_index, None, xp)
    shift, log_sum = normaliser(merged)
    nll = (shift - column(merged, "target")) + log_sum
    argmax = column(merged, "best").astype(np.int64)
    return Score(
        loss=xp.where(kept, nll, 0.0).astype(dtype),
        lse=(shift + log_sum).astype(dtype),
        target_logprob=xp.where(kept, -nll, np.nan).astype(dtype),
        entropy=(log_sum - column(merged, "spread") / column(merged, "total")).astype(dtype),
        argmax=argmax,
        correct=kept & (argmax == labels),
    )

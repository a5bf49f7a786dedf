"""The CUDA block functions of a split row (``softmax_partials``, ``softmax_block_grad``) and
``fastxent.dask`` on CuPy chunks, against the float64 reference.

The same splits and adversarial rows as tests/test_partials.py (odd offsets, a one-class
block, blocks wider than a block-per-row's 1024 threads, blocks of only ``-inf``
classes, ignored rows, labels outside a block), on every launch path the row plan
picks for the block's width; then the Dask layer with CuPy chunks under the threaded
scheduler, both layouts.

Where CuPy sees no GPU, the module runs on the emulated device of ``tests/emu`` (the
kernels compiled for the host, every memory access checked); without a GPU and
without g++, it skips with the reason.
"""

import contextlib

import numpy as np
import pytest

from tests import emu

#: No GPU here: CuPy is the stand-in of tests/emu and the kernels run on the emulated device.
EMULATED = emu.real_device_reason() is not None
if EMULATED and emu.unavailable_reason() is not None:
    pytest.skip(f"{emu.real_device_reason()}, and no emulated device either: {emu.unavailable_reason()}",
                allow_module_level=True)
cupy = emu.fake_cupy.module if EMULATED else pytest.importorskip("cupy")

import dask  # noqa: E402
import dask.array as da  # noqa: E402

import fastxent.dask as fxd  # noqa: E402
from fastxent import _blocks, _partials  # noqa: E402
from fastxent import reference as ref  # noqa: E402
from fastxent.backends import cuda  # noqa: E402
from fastxent.backends.cuda import _build  # noqa: E402
from fastxent._dtypes import accumulation_dtype  # noqa: E402
from tests.support import (  # noqa: E402
    BF16,
    DTYPE_IDS,
    FLOAT_DTYPES,
    compare,
    compare_score,
    make_class_ids,
    make_logits,
    sparse_options,
)
from tests.test_partials import (  # noqa: E402
    PARTIAL_KINDS,
    SPLIT_IDS,
    SPLITS,
    _adversarial,
    _blocks_of,
    check_block_partials,
)

pytestmark = pytest.mark.emulated if EMULATED else pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def device():
    """The emulated device stands in for CuPy while this module runs (nothing to do on a GPU)."""
    with emu.emulated_cupy() if EMULATED else contextlib.nullcontext():
        _build.precompile([e for f, e in _build.instantiations() if f == "partials_rows.cu"])
        if EMULATED:
            cupy.build_all()
        yield


def _host(value):
    """A host copy (a dask result gathered from emulated blocks is already one: dask's final
    concatenation makes numpy arrays of the stand-in's numpy-subclass blocks)."""
    return None if value is None else value.get() if hasattr(value, "get") else np.asarray(value)


def _device_dtypes():
    """The score dtypes this CuPy can hold (bfloat16 needs CuPy >= 14 with ml_dtypes)."""
    try:
        cupy.asarray(np.zeros(4, dtype=BF16)).view(np.uint16)
        return FLOAT_DTYPES, DTYPE_IDS
    except Exception:  # noqa: BLE001
        return ([d for d in FLOAT_DTYPES if d != BF16], [n for n in DTYPE_IDS if n != "bfloat16"])


DEVICE_DTYPES, DEVICE_DTYPE_IDS = _device_dtypes()


def _device_partials(block, labels, *args):
    """The CUDA backend's ``softmax_partials`` on host arrays (copied over and back)."""
    got = cuda.softmax_partials(cupy.asarray(block), cupy.asarray(labels), *args)
    return type(got)(*(None if value is None else _host(value) for value in got))


@pytest.mark.parametrize("dtype", DEVICE_DTYPES, ids=DEVICE_DTYPE_IDS)
@pytest.mark.parametrize("rows,count,starts", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("kind", PARTIAL_KINDS)
def test_cuda_block_partials_match_reference(dtype, rows, count, starts, kind):
    check_block_partials(_device_partials, dtype, rows, count, starts, kind)


@pytest.mark.parametrize("dtype", DEVICE_DTYPES, ids=DEVICE_DTYPE_IDS)
@pytest.mark.parametrize("rows,count,starts", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_cuda_split_sparse_matches_reference(dtype, rows, count, starts, option):
    options = sparse_options(option, count)
    x = make_logits((rows, count), dtype, seed=11)
    labels = make_class_ids(rows, count, seed=12, ignore_index=options.get("ignore_index"), ignore_fraction=0.3)
    if "ignore_index" in options:
        x, labels = _adversarial(x, labels)
    device_labels = cupy.asarray(labels)
    split = {k: options.get(k) for k in ("ignore_index", "class_weight", "softcap")}
    smoothing = options.get("label_smoothing", 0.0)
    records = [_blocks.partials(cupy.asarray(block), device_labels, offset, kind="sparse", backend="cupy",
                                label_smoothing=smoothing, **split) for offset, block in _blocks_of(x, starts)]
    merged = _partials.merge(cupy.concatenate(records, axis=1))
    finish = dict(ignore_index=split["ignore_index"], class_weight=split["class_weight"],
                  label_smoothing=smoothing, z_loss=options.get("z_loss", 0.0), num_classes=count)
    loss = _partials.sparse_loss(merged, device_labels, loss_dtype=accumulation_dtype(dtype), **finish)
    grad = cupy.concatenate([_blocks.sparse_grad(cupy.asarray(block), device_labels, merged, 0.5, offset,
                                                 softcap=split["softcap"], backend="cupy", **finish)
                             for offset, block in _blocks_of(x, starts)], axis=1)
    want = ref.sparse_softmax_cross_entropy(x, labels, **options, return_grad=True, grad_output=0.5)
    compare((_host(loss), _host(grad)), want, dtype, f"cupy {option}",
            scale=np.abs(x[:, :1].astype(np.float64)).clip(1))


@pytest.mark.parametrize("classes", [(423,), (1, 129, 200, 93)], ids=["rows", "classes"])
def test_dask_on_cupy_chunks_matches_reference(classes):
    options = sparse_options("all", 423)
    x = make_logits((10, 423), np.float32, seed=21)
    labels = make_class_ids(10, 423, seed=22, ignore_index=-100, ignore_fraction=0.2)
    # asarray=False: the blocks stay device arrays (the emulated ones are numpy subclasses).
    logits = da.from_array(cupy.asarray(x), chunks=(4, classes), asarray=False)
    device_labels = da.from_array(cupy.asarray(labels), chunks=4, asarray=False)
    # The emulated device builds kernels at their first launch, one build at a time: one thread there.
    with dask.config.set(scheduler="sync" if EMULATED else "threads"):
        loss, grad = dask.compute(*fxd.sparse_softmax_cross_entropy(logits, device_labels, **options,
                                                                    reduction="mean", return_grad=True))
        fields = dask.compute(*fxd.score(logits, device_labels, ignore_index=-100))
        lse = fxd.logsumexp(logits).compute()
    if not EMULATED:
        assert isinstance(grad, cupy.ndarray)
    compare((_host(loss), _host(grad)), ref.sparse_softmax_cross_entropy(x, labels, **options, reduction="mean",
                                                                       return_grad=True), np.float32, "dask cupy")
    compare_score(type(ref.score(x, labels))(*map(_host, fields)), ref.score(x, labels, ignore_index=-100),
                  np.float32, "dask cupy score")
    compare(_host(lse), ref.logsumexp(x), np.float32, "dask cupy logsumexp")

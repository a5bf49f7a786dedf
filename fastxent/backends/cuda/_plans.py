"""Launch plans of the CUDA backend: who owns a row, block and grid sizes, alignment.

Pure functions of the shapes, the device's attributes and the tunables of
``fastxent/_config.py`` (read at each call, so tests can patch them down and send
small inputs down every path); nothing here launches or imports CuPy at import time.
"""

import functools
from typing import NamedTuple

import numpy as np

from ... import _config

class DeviceInfo(NamedTuple):
    """The device attributes the plans use."""

    sms: int
    l2_bytes: int
    max_threads_per_sm: int
    smem_per_sm: int
    smem_per_block_optin: int
    smem_reserved_per_block: int


@functools.lru_cache(maxsize=None)
def device_info(device_id):
    """The attributes the launch plans use, read once per device."""
    from cupy.cuda import runtime

    def get(attr):
        return int(runtime.deviceGetAttribute(attr, device_id))

    return DeviceInfo(
        sms=get(runtime.cudaDevAttrMultiProcessorCount),
        l2_bytes=get(runtime.cudaDevAttrL2CacheSize),
        max_threads_per_sm=get(runtime.cudaDevAttrMaxThreadsPerMultiProcessor),
        smem_per_sm=get(runtime.cudaDevAttrMaxSharedMemoryPerMultiprocessor),
        smem_per_block_optin=get(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin),
        smem_reserved_per_block=get(runtime.cudaDevAttrReservedSharedMemoryPerBlock),
    )


class RowPlan(NamedTuple):
    """Launch of a row kernel."""

    group: int      # threads per row: 8, 32, or 0 for a block per row
    grid: int
    threads: int
    smem: int       # dynamic shared memory requested only to cap residency (fused kernels)


def _pow2_at_least(n):
    return 1 << max(0, int(n) - 1).bit_length()


def row_plan(n_rows, n_classes, row_bytes, info, fused):
    """Threads per row, block and grid for a row kernel.

    ``row_bytes``: bytes of one row re-read by the gradient pass (scores, plus soft
    labels); used only when ``fused``, to cap the blocks per SM so the rows in flight
    fit ``_config.CUDA_FUSED_L2_FRACTION`` of the L2.
    """
    if n_classes <= _config.CUDA_WARP_MAX_CLASSES:
        group = 8 if n_classes <= _config.CUDA_GROUP8_MAX_CLASSES else 32
        rows_per_block = _config.CUDA_GROUP_BLOCK_THREADS // group
        grid = min(-(-n_rows // rows_per_block), _config.CUDA_MAX_GRID)
        return RowPlan(group, max(grid, 1), _config.CUDA_GROUP_BLOCK_THREADS, 0)
    threads = _pow2_at_least(-(-n_classes // _config.CUDA_ROW_ELEMENTS_PER_THREAD))
    threads = min(max(threads, _config.CUDA_ROW_BLOCK_MIN_THREADS), _config.CUDA_ROW_BLOCK_MAX_THREADS)
    smem = _residency_smem(threads, row_bytes, info) if fused else 0
    return RowPlan(0, max(min(n_rows, _config.CUDA_MAX_GRID), 1), threads, smem)


def _residency_smem(threads, row_bytes, info):
    """Dynamic shared memory per block that allows k blocks per SM but not k + 1, with k
    the most blocks whose rows fit the L2 budget; 0 when no cap is needed or none helps."""
    budget = _config.CUDA_FUSED_L2_FRACTION * info.l2_bytes
    by_threads = info.max_threads_per_sm // threads
    k = int(budget // (info.sms * max(row_bytes, 1)))
    if k < 1 or k >= by_threads:
        return 0
    smem = info.smem_per_sm // (k + 1) - info.smem_reserved_per_block + 1
    if k * (smem + info.smem_reserved_per_block) > info.smem_per_sm:
        return 0
    return min(smem, info.smem_per_block_optin)


class SplitPlan(NamedTuple):
    """The split-row path: ``splits`` chunks of ``chunk`` classes per row."""

    splits: int
    chunk: int


def split_plan(n_rows, n_classes, info):
    """Chunks per row for the split-row path, or None when one block per row fills the GPU."""
    if n_classes < _config.CUDA_SPLIT_MIN_CLASSES or n_rows >= info.sms or n_rows > 65535:
        return None
    splits = min(-(-_config.CUDA_SPLIT_BLOCKS_PER_SM * info.sms // n_rows),
                 -(-n_classes // _config.CUDA_SPLIT_MIN_CHUNK))
    if splits < 2:
        return None
    chunk = -(-n_classes // splits)
    chunk = -(-chunk // _config.CUDA_SPLIT_CHUNK_ALIGN) * _config.CUDA_SPLIT_CHUNK_ALIGN
    return SplitPlan(-(-n_classes // chunk), chunk)


def elementwise_grid(n, vec, info):
    """Blocks of an elementwise launch over ``n`` elements read ``vec`` at a time (grid-stride beyond)."""
    blocks = -(-n // (_config.CUDA_ELEMENTWISE_BLOCK_THREADS * vec))
    return max(1, min(blocks, info.sms * _config.CUDA_ELEMENTWISE_BLOCKS_PER_SM))


def vector_width(dtype):
    """Elements of ``dtype`` in one 128-bit pack."""
    return 16 // np.dtype(dtype).itemsize


def vec_ok(vec, *arrays):
    """1 when the arrays' first elements share their element offset modulo ``vec``.

    The kernels align their 128-bit packs on the scores' address; the other streams
    (labels, outputs) of the same row then line up too. Fresh CuPy allocations are
    256-byte aligned; an odd view of the input may not be, and gets scalar loads.
    """
    offsets = set()
    for array in arrays:
        if array is None:
            continue
        ptr, size = array.data.ptr, array.dtype.itemsize
        if ptr % size:
            return 0
        offsets.add((ptr // size) % vec)
    return int(len(offsets) <= 1)



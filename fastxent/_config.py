"""Tunables in one place: block sizes, thresholds and switches that tests may patch.

Backends read these at call time (``_config.NAME``), except the Numba chunk and
row-block sizes, which are frozen into the compiled kernels. The CUDA launch
bounds (``CUDA_GROUP_BLOCK_THREADS``, ``CUDA_ROW_BLOCK_MAX_THREADS``,
``CUDA_ELEMENTWISE_BLOCK_THREADS``) reach the kernels as ``-D`` compile options
(``fastxent/backends/cuda/_build.py``), so the host and the device cannot disagree.
"""

import os

#: Environment variable naming the default backend ("numba", "numpy", "cupy").
BACKEND_ENV = "FASTXENT_BACKEND"

# ----------------------------------------------------------------------------
# Numba (CPU)
# ----------------------------------------------------------------------------

#: Classes per chunk in the Numba softmax kernels. A chunk of 2048 float32
#: scores (8 KiB) stays in L1 between its max pass and its exp pass, so a row
#: is read from memory once; the running (max, sum) is merged per chunk.
#: Also the elements per block of the elementwise kernels.
NUMBA_CHUNK = 2048

#: Scores per prange task of the Numba fused row kernels (a task is as many rows
#: as make about this many, at least one): each task allocates one scratch row
#: for the kept exponentials, so a malloc per row of 1000 classes is not paid.
NUMBA_TASK_CLASSES = 16384

#: Rows per block in the Numba kernels for short rows (C below this): one
#: prange iteration handles a block of rows so per-iteration overhead and the
#: scalar remainder of a 10-wide row are amortised.
NUMBA_SHORT_ROW = 64
NUMBA_ROW_BLOCK = 256

# ----------------------------------------------------------------------------
# Linear + cross-entropy (fastxent.linear)
# ----------------------------------------------------------------------------

#: Default ``memory=`` budget of the logits blocks: this fraction of the machine's
#: physical memory (of the device's free memory for CUDA arrays), clipped to
#: [LINEAR_MEMORY_MIN, LINEAR_MEMORY_MAX]. 512 MiB holds 4096 float32 rows of 32000
#: classes or 1046 of 128256; below ~512 rows per block the two-core machines' BLAS
#: loses speed (bench/bench_linear.py --blocks).
LINEAR_MEMORY_FRACTION = 1 / 32
LINEAR_MEMORY_MIN = 64 << 20
LINEAR_MEMORY_MAX = 1 << 30

#: Rows of ``grad_weight`` per product when the BLAS cannot accumulate in place (no
#: SciPy, or CUDA arrays): ``grad_weight[s] += G[:, s].T @ hidden`` goes through a
#: scratch of this many rows (counted in the budget).
LINEAR_ACCUMULATE_ROWS = 2048

# ----------------------------------------------------------------------------
# CUDA (CuPy)
# ----------------------------------------------------------------------------

#: Threads per block of the group kernels (several rows per block); their launch bound.
CUDA_GROUP_BLOCK_THREADS = 256

#: C up to this: 8 threads per row (1,000,000 x 10 runs 32 rows per 256-thread block
#: instead of a million blocks whose threads are mostly idle).
CUDA_GROUP8_MAX_CLASSES = 64

#: C up to this: a warp per row (32 lanes x 4 floats read 512 contiguous bytes per
#: step); above it a block per row.
CUDA_WARP_MAX_CLASSES = 1024

#: Block-per-row sizing: about this many classes per thread, the block rounded up to a
#: power of two within [CUDA_ROW_BLOCK_MIN_THREADS, CUDA_ROW_BLOCK_MAX_THREADS]; the
#: maximum is also the launch bound of the block-per-row and split-row kernels.
CUDA_ROW_ELEMENTS_PER_THREAD = 16
CUDA_ROW_BLOCK_MIN_THREADS = 128
CUDA_ROW_BLOCK_MAX_THREADS = 1024

#: Fused forward+backward: the rows in flight (resident blocks x row bytes) should fit
#: this fraction of the L2, so the gradient pass re-reads the row from L2, not DRAM.
#: When more blocks would be resident, dynamic shared memory is requested to cap the
#: blocks per SM (H200: 2 x 132 blocks x 256.5 KB bfloat16 rows of 128256 classes =
#: 67.7 MB > 50 MB of L2; 1 x 132 = 33.9 MB fits).
CUDA_FUSED_L2_FRACTION = 0.75

#: Split-row path of the sparse softmax cross-entropy: used when there are fewer rows
#: than SMs and C is at least CUDA_SPLIT_MIN_CLASSES; aims at CUDA_SPLIT_BLOCKS_PER_SM
#: blocks per SM, with chunks of at least CUDA_SPLIT_MIN_CHUNK classes rounded up to
#: CUDA_SPLIT_CHUNK_ALIGN (4 x 262144 on 132 SMs: 64 chunks of 4096 classes, 256 blocks).
CUDA_SPLIT_MIN_CLASSES = 16384
CUDA_SPLIT_BLOCKS_PER_SM = 2
CUDA_SPLIT_MIN_CHUNK = 4096
CUDA_SPLIT_CHUNK_ALIGN = 256
CUDA_SPLIT_BLOCK_THREADS = 256

#: Elementwise kernels: threads per block (their launch bound), at most this many
#: blocks per SM (grid-stride loops cover the rest).
CUDA_ELEMENTWISE_BLOCK_THREADS = 256
CUDA_ELEMENTWISE_BLOCKS_PER_SM = 8

#: Largest grid.x of a row kernel (CUDA's limit); rows beyond it are covered by the
#: kernels' grid-stride loops (tests patch it down to exercise them).
CUDA_MAX_GRID = 2**31 - 1

#: Read the device's bad-label flag after each sparse kernel (a synchronisation).
CUDA_CHECK_LABELS = True

#: Environment variable that skips that read when set to 1/true/yes (read at each call).
CUDA_SKIP_LABEL_CHECK_ENV = "FASTXENT_CUDA_SKIP_LABEL_CHECK"


def env_backend():
    """The backend named by ``FASTXENT_BACKEND`` right now (read at each call)."""
    value = os.environ.get(BACKEND_ENV, "").strip()
    return value or None


def cuda_label_check_enabled():
    """True unless ``CUDA_CHECK_LABELS`` is False or ``FASTXENT_CUDA_SKIP_LABEL_CHECK`` is set."""
    skip = os.environ.get(CUDA_SKIP_LABEL_CHECK_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return CUDA_CHECK_LABELS and not skip


def physical_memory():
    """The machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def linear_memory(available):
    """The default budget of ``fastxent.linear`` given ``available`` bytes (None: unknown)."""
    if available is None:
        return LINEAR_MEMORY_MIN
    return int(min(LINEAR_MEMORY_MAX, max(LINEAR_MEMORY_MIN, available * LINEAR_MEMORY_FRACTION)))

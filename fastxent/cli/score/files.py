"""The files of ``fastxent score``: memory maps read a chunk at a time, the output written.

:class:`Pages` drops the pages of each chunk from the process once it is used
(``madvise(MADV_DONTNEED)``: the data stays in the page cache, dirty output
pages are written back by the kernel as usual), so the resident memory stays
near the ``--memory`` budget whatever the size of the files. :class:`Output`
writes the result to temporary files beside ``OUT`` (``.OUT.*.tmp``) and
renames them onto ``OUT`` at the end; any failure or interruption removes
them, so no half-written result is ever left under ``OUT``'s name.
"""

import mmap
import os
import tempfile
import zipfile

import numpy as np


class Pages:
    """Drops the pages of a memory-mapped array from this process as it is consumed.

    ``np.memmap`` maps the file from ``offset`` rounded down to the allocation
    granularity, so array byte ``j`` sits at ``offset % granularity + j`` in
    the mapping; ``release_rows(rows)`` drops every whole page before the
    first byte of row ``rows`` of the first axis. For a read-only map the pages
    stay in the page cache; for an output (shared, writable) map the kernel
    moves their dirty state to the page cache and writes them back as usual.
    A no-op for an array that is not memory-mapped, and where ``madvise`` is
    missing (not Linux/macOS); an input that releases its own pages (``.npy``
    shards, :class:`.inputs.Shards`) is asked to.
    """

    def __init__(self, array, sequential=False):
        self.own = getattr(array, "release_rows", None)
        self.map = getattr(array, "_mmap", None)
        if self.map is None or not hasattr(self.map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            self.map = None
            return
        self.start = int(getattr(array, "offset", 0)) % mmap.ALLOCATIONGRANULARITY
        self.row_bytes = array.strides[0] if array.ndim else 0
        self.released = 0
        if sequential and hasattr(mmap, "MADV_SEQUENTIAL"):
            try:
                self.map.madvise(mmap.MADV_SEQUENTIAL)
            except OSError:
                pass

    def release_rows(self, rows):
        """Drop the pages of the first ``rows`` rows of the first axis."""
        if self.own is not None:
            self.own(rows)
            return
        if self.map is None:
            return
        end = (self.start + rows * self.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released:
            self.map.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


class Output:
    """Per-field temporary ``.npy`` files beside ``path``, renamed (or zipped) onto it at the end."""

    def __init__(self, path, kind, fields):
        self.path = path
        self.kind = kind
        self.fields = fields
        self.folder = os.path.dirname(os.path.abspath(path))
        self.base = os.path.basename(path)
        self.temps = []
        self.arrays = {}
        self.pages = {}

    def _temp(self, suffix):
        handle, name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.base}.", suffix=suffix)
        os.close(handle)
        self.temps.append(name)
        return name

    def open(self, shapes_dtypes):
        for name, (shape, dtype) in shapes_dtypes.items():
            array = np.lib.format.open_memmap(self._temp(f".{name}.tmp"), mode="w+", dtype=dtype, shape=shape)
            self.arrays[name] = array
            self.pages[name] = Pages(array)

    def write_scalars(self, values):
        for name, value in values.items():
            temp = self._temp(f".{name}.tmp")
            with open(temp, "wb") as handle:
                np.lib.format.write_array(handle, np.asarray(value, dtype=np.float64))

    def commit(self):
        """Flush, close and move the result onto ``path`` (one rename: all or nothing)."""
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()
        self.pages.clear()
        field_files = list(self.temps)
        if self.kind == "npy":
            final = field_files[0]
        else:
            final = self._temp(".npz.tmp")
            # np.savez's layout: a zip of NAME.npy members, stored uncompressed;
            # ZipFile.write streams each file, so memory stays bounded here too.
            with zipfile.ZipFile(final, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, temp in zip(self.fields, field_files):
                    archive.write(temp, arcname=f"{name}.npy")
        os.replace(final, self.path)
        self.temps.remove(final)
        self.discard()  # the per-field files zipped into the .npz

    def discard(self):
        self.arrays.clear()
        self.pages.clear()
        for name in self.temps:
            try:
                os.unlink(name)
            except OSError:
                pass
        self.temps.clear()

"""The profile store: last-token attention to every visual token, in HDF5, crash-safe.

The normative format is ``docs/store.md``; this package is its reference writer and reader. A finished
store is ONE plain HDF5 file (``profile.h5``) meant to be read with plain h5py too: variable-length UTF-8
strings, int32/int64 tables and one ``(T, L)`` float32 attention matrix whose rows are the visual tokens
of all samples, stacked sample after sample, plus optional signal datasets (``/tokens/<name>``,
``/samples/<name>``, ``/static/<name>``).

Crash safety. HDF5 is not crash-safe: a process killed while HDF5 updates metadata in place can leave a
file no library opens. So no file is ever modified in place. While a run is going, every committed batch
of samples (by default every single sample) is written to a small, complete store file of its own, a
*segment*, in the folder ``profile.h5.parts/``: written to a temporary file, fsync'ed, then atomically
renamed (:mod:`posbias.atomic`, as every file posbias writes).
A killed run therefore leaves the last good ``profile.h5`` (if any) plus whole segments;
:class:`ProfileStore` reads the union as one store. Closing the writer *compacts*: it writes base and
segments into a temporary file next to ``profile.h5``, fsyncs, renames it over ``profile.h5`` and deletes the segments. The
base records a ``generation`` counter and segments carry the generation they were written against, so a
kill between the rename and the deletion cannot count a sample twice (segments of an older generation are
ignored and deleted by the next writer).

Modules: :mod:`.format` (schema constants, the datasets of one sample, attribute encoding, paths, tile
validation), :mod:`.reader` (:class:`ProfileStore`), :mod:`.compact` (the file builder and compaction),
:mod:`.writer` (:class:`ProfileStoreWriter`), :mod:`.merge` (:func:`merge_stores`, :func:`add_sample_data`).
Every reader of a store in posbias goes through :class:`ProfileStore`, so the segments of an
interrupted run are seen everywhere.
"""

from __future__ import annotations

from posbias.profiler.store.format import (
    PARTS_SUFFIX,
    READABLE_VERSIONS,
    REQUIRED_ATTRS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    parts_dir,
    remove_store,
    resolve_store_path,
    store_exists,
)
from posbias.profiler.store.merge import add_sample_data, merge_stores, write_utr_loss
from posbias.profiler.store.reader import ProfileStore
from posbias.profiler.store.writer import ProfileStoreWriter

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "REQUIRED_ATTRS",
    "PARTS_SUFFIX",
    "ProfileStoreWriter",
    "ProfileStore",
    "parts_dir",
    "store_exists",
    "resolve_store_path",
    "merge_stores",
    "remove_store",
    "add_sample_data",
    "write_utr_loss",
]

"""Process-wide memory settings: glibc's heap for repeated large allocations (training steps,
prediction calls), and prompt collection of the reference cycles a streaming loop leaves."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def keep_freed_heap() -> None:
    """Let glibc keep freed heap memory for the next step or model call instead of handing it back.

    A training step (or a batch of prediction) frees its activations and allocates as much again
    in the next one. With glibc's default, a large free block at the top of the heap goes back
    to the system and is faulted in again (zero-filled) next time, a measurable share of each
    step on CPU (benchmarks/README.md). Peak memory does not change. Blocks above 32 MiB stay separate mappings, as glibc's adaptive
    default ends up doing. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # setting either turns glibc's adaptive thresholds off
    mallopt(m_trim_threshold, 1 << 30)


def release_freed_heap() -> None:
    """Hand the heap memory glibc kept after frees back to the system (``malloc_trim``).

    A one-off streaming pass (e.g. the value scan of a backed file's validation) leaves freed
    blocks that glibc keeps; the next steps reuse little of it, so without this the process
    stays that much larger for the rest of its run. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


@contextmanager
def cycles_collected_promptly() -> Iterator[None]:
    """Within this block, ``gc.collect()`` walks only the objects made inside it.

    An AnnData holds reference cycles (its aligned mappings point back at it), so a streaming
    loop's pieces are freed only when Python's cyclic collector runs, which its thresholds
    (counts of objects, not bytes) delay by many pieces: the process grows with the number of
    pieces. A loop calls ``gc.collect()`` after each piece; the objects that existed before the
    block (modules, the caller's data) are set aside (``gc.freeze``) so that each call is cheap.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

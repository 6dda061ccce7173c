"""Freed CPU memory kept in the process's heap between training steps (glibc's malloc).

ZeRO allocates its gradient bucket and gradient partition afresh at every step. On CPU, glibc serves
blocks over 32 MB with mmap and returns them to the OS when they are freed, so each step page-faults
a few times the model's fp32 size back in: for SmolLM2-135M that was 40% of a DeepSpeed step
(benchmarks/train_step.py). GPU memory has a caching allocator; this is its host-side counterpart.

Two things can defeat it, and both are checked rather than assumed:

- a C library that ignores the setting (not glibc, or another malloc preloaded): ``enable`` probes
  that a large block freed and allocated again comes back without page faults;
- an allocation pattern whose freed blocks are never the right size to be reused, so the heap grows
  at every step (seen with same-size aligned blocks, each followed by a small long-lived one):
  ``after_step`` watches the program break and, when it has risen at every one of the last
  ``patience`` steps, puts glibc's defaults back and returns the free heap to the OS.
"""

from __future__ import annotations

import ctypes
import resource

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULT_TRIM_THRESHOLD, _GLIBC_DEFAULT_MMAP_MAX = 128 * 1024, 65536
PAGE = resource.getpagesize()


class RetainedHeap:
    """The setting in force in this process; ``None`` from ``enable`` where it would have no effect."""

    def __init__(self, libc: ctypes.CDLL, patience: int):
        self._libc = libc
        self.patience = patience
        self._break = self.program_break()
        self._rises = 0

    @classmethod
    def enable(cls, patience: int = 5, probe_bytes: int = 128 << 20) -> RetainedHeap | None:
        """Serve large blocks from the heap and never trim it. ``probe_bytes`` is above glibc's largest
        mmap threshold (32 MB) and its per-thread heap (64 MB)."""
        libc = _libc()
        if libc is None:
            return None
        # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is "never trim" (a
        # ZeRO bucket of 5e8 fp32 elements is 2 GB, at the largest int).
        if all([libc.mallopt(_M_MMAP_MAX, 0), libc.mallopt(_M_TRIM_THRESHOLD, -1)]) and \
                page_faults_reallocating(probe_bytes, libc) < probe_bytes // PAGE // 100:
            return cls(libc, patience)
        _restore_defaults(libc)
        return None

    def program_break(self) -> int:
        return self._libc.sbrk(0)

    def after_step(self) -> bool:
        """True when it has just given up: the heap grew at each of the last ``patience`` steps, so
        freed blocks are not being reused. glibc's defaults are back and the free heap is returned."""
        now = self.program_break()
        self._rises = self._rises + 1 if now > self._break else 0
        self._break = now
        if self._rises < self.patience:
            return False
        self.release()
        return True

    def release(self) -> None:
        _restore_defaults(self._libc)
        self._libc.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        functions = libc.mallopt, libc.malloc_trim, libc.sbrk, libc.malloc, libc.free
    except (OSError, AttributeError):
        return None
    mallopt, malloc_trim, sbrk, malloc, free = functions
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    sbrk.argtypes, sbrk.restype = [ctypes.c_ssize_t], ctypes.c_size_t
    malloc.argtypes, malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    return libc


def _restore_defaults(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM_THRESHOLD)


def page_faults_reallocating(nbytes: int, libc: ctypes.CDLL | None = None) -> int:
    """Page faults this process takes to write a block of ``nbytes`` allocated just after one of the
    same size was written and freed: ~nbytes/4096 where freed memory goes back to the OS, ~0 where
    it is kept."""
    libc = libc or _libc()

    def write_and_free() -> None:
        block = libc.malloc(nbytes)
        if not block:
            raise MemoryError(f"could not allocate {nbytes} bytes")
        ctypes.memset(block, 1, nbytes)
        libc.free(block)

    write_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    write_and_free()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

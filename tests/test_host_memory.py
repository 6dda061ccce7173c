"""Freed CPU memory kept in the heap between training steps: checked in child processes, since the
allocator settings are process-wide. Each runs with an 8 MB stack limit and with the hard limit
(unlimited on most machines), which lay the process's memory out differently."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from llark.host_memory import RetainedHeap

REPO = Path(__file__).resolve().parents[1]
STACK_LIMITS = {"8MB-stack": 8 << 20, "hard-limit-stack": resource.getrlimit(resource.RLIMIT_STACK)[1]}

_PRELUDE = """
import ctypes, json, os
from llark.host_memory import RetainedHeap, _libc, page_faults_reallocating
libc = _libc()
def resident_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def written_block(nbytes):
    block = libc.malloc(nbytes)
    ctypes.memset(block, 1, nbytes)
    return block
"""

_RETAINED_REALLOCATION = _PRELUDE + """
default = page_faults_reallocating(256 << 20)  # as a ZeRO gradient bucket
heap = RetainedHeap.enable()
print(json.dumps({"default": default, "enabled": heap is not None, "retained": page_faults_reallocating(256 << 20)}))
"""

_HEAP_GROWING_AT_EVERY_STEP = _PRELUDE + """
heap = RetainedHeap.enable(patience=5)
held, gave_up = [], []
while not any(gave_up) and len(gave_up) < 10:
    held.append(written_block(160 << 20))  # more than the top of the heap the probe left free
    gave_up.append(heap.after_step())
print(json.dumps({"gave_up": gave_up, "after": page_faults_reallocating(256 << 20)}))
"""

_FREE_HEAP_RETURNED = _PRELUDE + """
heap = RetainedHeap.enable()
blocks = [written_block(256 << 20) for _ in range(4)]
for block in blocks[:3]:  # freed, but the fourth, still in use, keeps them off the top of the heap
    libc.free(block)
before = resident_bytes()
heap.release()
print(json.dumps({"returned": before - resident_bytes()}))
"""


def run_child(script: str, stack_limit: int) -> dict:
    def limit_stack():
        resource.setrlimit(resource.RLIMIT_STACK, (stack_limit, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True,
                         preexec_fn=limit_stack)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("stack_limit", STACK_LIMITS.values(), ids=STACK_LIMITS.keys())
def test_a_freed_large_block_comes_back_without_page_faults(stack_limit):
    """With glibc's default a freed 256 MB block is unmapped and its 65,536 pages fault back in."""
    result = run_child(_RETAINED_REALLOCATION, stack_limit)
    assert result["default"] > 60_000
    assert result["enabled"]
    assert result["retained"] < 1_000


@pytest.mark.parametrize("stack_limit", STACK_LIMITS.values(), ids=STACK_LIMITS.keys())
def test_a_heap_growing_at_every_step_goes_back_to_the_defaults(stack_limit):
    result = run_child(_HEAP_GROWING_AT_EVERY_STEP, stack_limit)
    assert result["gave_up"] == [False] * 4 + [True]
    assert result["after"] > 60_000  # large blocks are mmapped and unmapped again


@pytest.mark.parametrize("stack_limit", STACK_LIMITS.values(), ids=STACK_LIMITS.keys())
def test_giving_up_returns_the_free_heap_to_the_os(stack_limit):
    result = run_child(_FREE_HEAP_RETURNED, stack_limit)
    assert result["returned"] > 700 << 20  # the three freed 256 MB blocks


class _ScriptedBreaks(RetainedHeap):
    """The program break read from a list, and no allocator calls."""

    def __init__(self, breaks: list[int], patience: int):
        self._breaks, self.released = iter(breaks), False
        super().__init__(libc=None, patience=patience)

    def program_break(self) -> int:
        return next(self._breaks)

    def release(self) -> None:
        self.released = True


def test_only_a_rise_at_every_one_of_the_last_steps_counts():
    """A heap that grows, settles, and grows again (warm-up, a longer batch) is left alone."""
    heap = _ScriptedBreaks([0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 9], patience=4)
    assert [heap.after_step() for _ in range(11)] == [False] * 10 + [True]
    assert heap.released

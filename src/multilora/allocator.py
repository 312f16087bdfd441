"""Keep freed memory in the process: glibc malloc tuned so large tensors stop page-faulting at every step.

    from multilora.allocator import keep_freed_memory, release_freed_memory
    keep_freed_memory()        # once, at start-up; the `multilora` command does it for every sub-command
    release_freed_memory()     # between jobs of one process (the sweep and demo: after each run, each evaluation)

glibc serves an allocation above its mmap threshold (at most 32 MB) with a fresh mmap and returns it
to the system on free, and trims freed memory at the top of its heap. A training step allocates and
frees the same large tensors again and again (full fine-tuning of SmolLM2-135M: the tied embedding's
49152 x 576 gradient, 113 MB, zero-filled at every step; under bf16 autocast each weight's cast), so
every step touches fresh pages and the kernel faults them in one by one: 149 ms of such a step's
~1 s went to filling that one gradient. With mmap off and trimming above 2 GiB only, freed blocks
are reused: over 8 full fine-tuning steps (and the model's loading) minor page faults fell from
2.13 M to 0.81 M and the peak resident memory rose 2% (3.21 -> 3.28 GB); in two pairs of demo runs
full fine-tuning took 0.82x and 0.79x as long, LoRA and MultiLoRA about the same (README, "How long
the demo takes"); benchmarks/bench_train.py prints the step ratios. What the allocator holds is not
given back to the system until `release_freed_memory()` (glibc's malloc_trim): a process that runs
one job after another (the sweep, the demo) calls it after each, so one job's freed memory does not
stay on top of the next one's peak.

A process-wide switch, so the library never flips it by itself: the `multilora` command calls
`keep_freed_memory()` before its sub-command; code that uses the library can call it once. Set
MULTILORA_KEEP_FREED_MEMORY=0 to leave glibc's defaults (for example next to other programs when
memory is tight). Elsewhere than glibc Linux (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform

ENV = "MULTILORA_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1  # bytes of free memory at the heap's top before glibc gives some back (int max)


def keep_freed_memory() -> bool:
    """Tune glibc malloc so freed memory is reused rather than returned to the system (see the module
    docstring); True if it was applied, False where it does not apply or MULTILORA_KEEP_FREED_MEMORY=0."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; M_MMAP_MAX 0: no allocation gets its own mmap
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Give the memory malloc holds free back to the system (glibc malloc_trim; elsewhere nothing), after
    collecting unreachable Python objects (a finished job's model in a reference cycle) so theirs is too."""
    libc = _glibc()
    if libc is not None:
        gc.collect()
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """glibc's C library on Linux, else None (macOS, musl, ...)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None

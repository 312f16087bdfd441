"""allocator.keep_freed_memory: freed large tensors are reused instead of page-faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from multilora import allocator, cli

GLIBC = allocator._glibc() is not None  # where the tuning applies

# allocate, fill and free a 64 MiB tensor 10 times; print the minor page faults that took (getrusage)
PROBE = """
import json, resource, sys, torch
from multilora.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)  # 64 MiB, freed at once
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _run(script: str, *args: str) -> dict:
    """The JSON that `script` prints last, run in a fresh process (the tuning is process-wide)."""
    env = {**os.environ, allocator.ENV: "1"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="tunes glibc malloc; a no-op elsewhere")
def test_freed_tensors_are_reused_not_faulted_in_again():
    default, kept = _run(PROBE, "default"), _run(PROBE, "keep")
    assert kept["applied"] and not default["applied"]
    pages = (64 << 20) // 4096  # one 64 MiB tensor in 4 KiB pages
    assert default["faults"] >= 5 * pages  # glibc's default: a fresh mmap at (nearly) every allocation
    assert kept["faults"] <= 2 * pages  # kept: the first allocation faults its pages in, the others reuse them


# with freed memory kept, a freed 256 MiB tensor stays resident until release_freed_memory gives it back
RELEASE = """
import json, os, torch
from multilora.allocator import keep_freed_memory, release_freed_memory
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert keep_freed_memory()
base = resident()
x = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)  # 256 MiB
del x
kept = resident()
release_freed_memory()
print(json.dumps({"kept": kept - base, "released": resident() - base}))
"""


@pytest.mark.skipif(not GLIBC, reason="tunes glibc malloc; a no-op elsewhere")
def test_release_gives_kept_memory_back():
    rss = _run(RELEASE)
    mib = 1 << 20
    assert rss["kept"] >= 200 * mib  # freed but kept for reuse
    assert rss["released"] <= 50 * mib  # given back


def test_opt_out_by_environment(monkeypatch):
    for value in ("0", "false", "off"):
        monkeypatch.setenv(allocator.ENV, value)
        assert allocator.keep_freed_memory() is False


def test_every_command_applies_it_first(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("called") or True)
    assert cli.main(["tasks"]) == 0
    assert calls == ["called"]
    assert "alpaca" in capsys.readouterr().out

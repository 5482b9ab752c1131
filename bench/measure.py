"""Peak-memory and timing helpers for the CPU benchmarks.

Peak memory: every case runs in a fresh subprocess; its inputs are allocated without transient
copies, then `extra` = (ru_maxrss after the case) - (resident set size just before it), i.e. the
largest amount of memory the case itself added on top of its inputs. Times are medians of a few
repeats taken after that first (measured) run. Each case runs twice: memory is taken from a run with
a fixed glibc mmap threshold (1 MiB), because otherwise glibc raises the threshold after the first
large free and serves later chunk-sized buffers from a heap it never shrinks, so RSS counts freed
memory as live; time is taken from a run with the default allocator (the fixed threshold makes
every chunk an mmap + page faults, which is not what a user's process does).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn, repeats: int = 3) -> dict:
    """Run fn once for the extra peak memory, then `repeats` times for the median time."""
    before = rss_mb()
    fn()
    extra = peak_mb() - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"extra_mb": extra, "time_s": statistics.median(times)}


def run_case(script: str, *args: str) -> dict:
    """Run `python script --case ...args` in fresh processes (they print one JSON line last):
    {"extra_mb": from the fixed-threshold run, "time_s": from the default-allocator run}."""
    def once(env):
        out = subprocess.run([sys.executable, script, "--case", *args], capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    memory = once({**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    timing = once(dict(os.environ))
    return {"extra_mb": memory["extra_mb"], "time_s": timing["time_s"]}

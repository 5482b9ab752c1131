"""Peak-memory and timing helpers for the CPU benchmarks.

Peak memory (CPU tensors live in ordinary process memory, so torch.cuda's counters do not apply):

  * Each memory case runs in a FRESH subprocess, so nothing another case allocated (or glibc kept
    cached for it) is counted.
  * The case builds its inputs, runs its step once as a warm-up (lazy initialisation: thread pools,
    AdamW state, kernel workspaces), frees what the warm-up left (gradients), then
    `extra = VmHWM - VmRSS`, where VmRSS is read just before the measured call and the high-water
    mark VmHWM is RESET to the current RSS right then, by writing "5" to /proc/self/clear_refs
    (Linux >= 4.0). So `extra` is the largest amount of memory the measured call added on top of
    its inputs, whatever the process peaked at before (building a model, say). Where clear_refs
    cannot be written, ru_maxrss is used instead (then an earlier, higher peak would hide the case's).
  * The subprocess runs with MALLOC_MMAP_THRESHOLD_=1 MiB: glibc then serves every block of 1 MiB
    or more with its own mmap and returns it to the OS on free, so RSS follows the live tensors.
    With the default (dynamic) threshold glibc raises the threshold after the first large free and
    keeps later chunk-sized buffers in a heap it never shrinks, so RSS would count freed memory.
  * Blocks under 1 MiB that are freed may stay counted; that is a few MiB at most. Checked against
    hand counts: naive log_softmax(x / T) of 4 x 1024 x 32768 float32 logits reads 1024 MiB (x / T
    and its log_softmax, 512 MiB each); common.token_logprobs forward + backward reads 520 MiB
    (the 512 MiB gradient of the logits + one 8 MiB chunk buffer).

Time is measured separately, in one process with the default allocator (the fixed mmap threshold
costs page faults a user's process would not pay): the cases run in interleaved rounds after a
warm-up round, so drift on a shared machine hits all of them alike; the median is reported.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MMAP_THRESHOLD = 1 << 20


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak() -> bool:
    """Reset the peak-RSS counter (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def extra_peak(fn, warmup=None, before=None) -> dict:
    """Peak memory `fn()` adds on top of what is live just before it (MB = MiB).

    warmup(): run first (default: fn itself); before(): run after the warm-up, before the baseline
    is read (e.g. optimizer.zero_grad(set_to_none=True)). Also returns the call's time (it ran under
    whatever allocator settings the process has: for information only) and the absolute peak.
    """
    (warmup or fn)()
    if before is not None:
        before()
    gc.collect()
    base = rss_mb()
    exact = reset_peak()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = peak_mb()
    return {"extra_mb": peak - base, "base_mb": base, "peak_mb": peak, "seconds": seconds,
            "hwm_reset": exact, "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def run_memory_case(script: str, *args: str) -> dict:
    """`python script --case ...args` in a fresh process with the fixed mmap threshold; the case
    prints one JSON object as its last line (usually extra_peak's)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run([sys.executable, script, "--case", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved_median(cases: dict, rounds: int = 3, warmup_rounds: int = 1, before=None) -> dict:
    """{name: median seconds of fn()} over `rounds` rounds, each running every case once, after
    `warmup_rounds` untimed rounds. before(name) runs untimed ahead of each call."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup_rounds + rounds):
        for name, fn in cases.items():
            if before is not None:
                before(name)
            gc.collect()
            start = time.perf_counter()
            fn()
            if r >= warmup_rounds:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

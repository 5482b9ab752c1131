"""How the tests run the scripts, and how they compare two runs.

`launch` runs a script as a user would: a fresh interpreter, under torchrun when nproc > 1.
`run_in_process` calls its main() in this process, for tests about argument and input checking,
where only the exit code and the message matter (no interpreter start-up, which costs seconds).
"""

import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# AdamW in its linear regime, for world-size parity. With eps far above sqrt(v) (gradients are clipped to
# norm 1, so every |g| < 1 = eps), the update lr * m / (sqrt(v) + eps) moves by at most lr / eps times a
# change of the gradient. Float32 summation order (1 vs 2 ranks, vector widths, all-reduce order) changes
# gradients by ~1e-7 of their size, so weights differ by ~lr / eps * steps * 1e-7: far below PARITY_TOL.
# With the default eps 1e-8 Adam divides by sqrt(v) instead: a gradient component near zero whose sign
# depends on summation order becomes an update of up to lr, so weights can differ by ~lr between world
# sizes on one machine and not on another. A real parity bug (a micro-batch lost, gradients averaged
# instead of summed) changes the update by ~lr / eps * |g|, thousands of times PARITY_TOL.
PARITY_OPTIMIZER = ["--lr", "1", "--adam-eps", "1"]
PARITY_TOL = 1e-5


def launch(script, *args, nproc: int = 1, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a script (a path relative to the repo root, or absolute) with `nproc` processes."""
    cmd = [sys.executable, str(ROOT / script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script)]
    env = ENV if nproc == 1 else {**ENV, "OMP_NUM_THREADS": "1"}  # one thread per process on 2 cores
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_in_process(script: str, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of script's main(args) through common.run_main, in this process."""
    import common

    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.run_main(lambda: module.main([str(a) for a in args]))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def signal_tree(pid: int, sig) -> None:
    """Send sig to pid and all its descendants (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_after_first_checkpoint(script, args, checkpoint: Path, nproc: int = 1):
    """Start a stage (under torchrun with nproc > 1), SIGKILL every process of it once it has saved a
    checkpoint in the middle of an epoch after the first; return the state it had saved."""
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = ENV if nproc == 1 else {**ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launcher, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = checkpoint / "state.json"

    def saved_state():
        try:
            return json.loads(state_file.read_text())
        except (json.JSONDecodeError, OSError):  # not yet, or mid-rename
            return None

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        state = saved_state()
        if state and (state["epoch"], state["step"]) >= (2, 1) and state["step"] > 0:
            signal_tree(proc.pid, signal.SIGSTOP)  # freeze every process, then read what is really on disk
            state = saved_state()
            if state and state["step"] > 0:
                signal_tree(proc.pid, signal.SIGKILL)
                proc.wait()
                return state
            signal_tree(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    signal_tree(proc.pid, signal.SIGKILL)
    pytest.fail("the run finished or stalled before it could be killed mid-way")


def run_ok(script: str, *args) -> str:
    """run_in_process, which must succeed; its stdout."""
    code, out, err = run_in_process(script, *args)
    assert code == 0, err[-3000:]
    return out


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two saved models' weights (the same keys required)."""
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def records(run: Path, event: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if event is None or r.get("event") == event]


def assert_same_steps(run_a: Path, run_b: Path, epochs=None) -> int:
    """Two runs took the same optimizer steps: the same global batches (the token count of every step), the
    same loss and gradient norm at the first step to float32 summation noise (metrics are written to 6
    decimals), and at later steps to 1e-3: there the weights already differ by PARITY_TOL-sized noise,
    which a few optimizer steps amplify (a real parity bug moves them by tens of percent). Returns the
    number of steps compared."""
    def steps(run):
        return {(r["model"], r["epoch"], r["step"]): r for r in records(run, "step")
                if epochs is None or r["epoch"] in epochs}
    a, b = steps(run_a), steps(run_b)
    assert a.keys() == b.keys() and a
    first = min(a)
    for key in a:
        assert a[key]["tokens"] == b[key]["tokens"], key
        rel = 1e-5 if key == first else 1e-3
        for name in ("loss", "grad_norm"):
            x, y = a[key][name], b[key][name]
            assert abs(x - y) <= 2e-6 + rel * max(abs(x), abs(y)), (key, name, x, y)
    return len(a)

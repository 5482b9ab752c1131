"""Output folders: a finished run is never replaced by accident, one run per folder at a time, and a
student's record of its teachers notices when a teacher folder changes."""

import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
from runs import ENV, ROOT, records, run_in_process

TINY = ["--num-prompts", "4", "--samples-per-prompt", "2", "--max-new-tokens", "32", "--eval-every", "0",
        "--kl-rollouts", "0", "--batch-size", "4", "--micro-batch", "4"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished stage-1 run and the sha256 of its teacher."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code, _, err = run_in_process("erpd_stage1.py", *TINY, "--epochs", "1", "--out", out)
    assert code == 0, err[-2000:]
    return out


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "erpd_stage1.py"), *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {path} appeared"
        time.sleep(0.05)


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(finished, tmp_path):
    teacher = sha256(finished / "teacher" / "model.safetensors")
    code, _, err = run_in_process("erpd_stage1.py", *TINY, "--epochs", "2", "--out", finished)
    assert code == 2 and f"{finished} already holds a run's output" in err
    assert "--resume continues it, --overwrite replaces it" in err
    assert sha256(finished / "teacher" / "model.safetensors") == teacher
    code, _, err = run_in_process("erpd_stage2.py", "--teacher", finished, "--epochs", "1", "--kl-rollouts", "0",
                                  "--eval-every", "0", "--out", tmp_path / "s2")
    assert code == 0, err[-2000:]
    code, _, err = run_in_process("erpd_stage2.py", "--teacher", finished, "--out", tmp_path / "s2")
    assert code == 2 and "already holds a run's output" in err
    (tmp_path / "eval.json").write_text("{}")
    code, _, err = run_in_process("eval_math.py", "--json", tmp_path / "eval.json")
    assert code == 2 and "already holds an evaluation: --overwrite replaces it" in err
    code, _, err = run_in_process("erpd_stage1.py", "--resume", "--overwrite", "--out", tmp_path / "x")
    assert code == 2 and "choose one" in err


def test_overwrite_replaces_only_once_finished_and_an_interrupted_one_leaves_the_old_run(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    teacher, metrics = sha256(out / "teacher" / "model.safetensors"), (out / "metrics.jsonl").read_text()
    # an overwrite killed in the middle of its training: the old run is untouched
    proc = start(*TINY, "--epochs", "50", "--save-every", "1", "--overwrite", "--out", out)
    wait_for(out.with_name(".run.overwrite") / "checkpoint-teacher" / "state.json", proc)
    assert sha256(out / "teacher" / "model.safetensors") == teacher  # readable all along
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sha256(out / "teacher" / "model.safetensors") == teacher and (out / "metrics.jsonl").read_text() == metrics
    # a finished overwrite replaces it whole, and leaves no staging folder
    code, _, err = run_in_process("erpd_stage1.py", *TINY, "--epochs", "2", "--overwrite", "--out", out)
    assert code == 0, err[-2000:]
    assert sha256(out / "teacher" / "model.safetensors") != teacher
    assert records(out, "config")[0]["epochs"] == 2 and not out.with_name(".run.overwrite").exists()
    assert not (out / common.LOCK_FILE).exists()  # released at exit


def test_one_run_per_folder_and_a_dead_runs_lock_does_not_block_resume(tmp_path):
    out = tmp_path / "run"
    proc = start(*TINY, "--epochs", "50", "--save-every", "1", "--out", out)
    wait_for(out / "checkpoint-teacher" / "state.json", proc)
    code, _, err = run_in_process("erpd_stage1.py", *TINY, "--epochs", "50", "--resume", "--out", out)
    assert code == 2 and f"{out} is in use by another run: process {proc.pid} on {socket.gethostname()}" in err
    proc.send_signal(signal.SIGKILL)  # the lock stays behind
    proc.wait()
    assert json.loads((out / common.LOCK_FILE).read_text())["pid"] == proc.pid
    code, _, err = run_in_process("erpd_stage1.py", *TINY, "--epochs", "2", "--resume", "--out", out)
    assert code == 0, err[-2000:]
    assert f"its run (process {proc.pid} on this host) is gone; taking the lock" in err
    assert (out / "teacher" / "model.safetensors").is_file()


def test_a_changed_teacher_folder_is_warned_about_by_eval_and_the_next_stage(finished, tmp_path):
    import shutil

    teacher_dir = tmp_path / "teacher-run"
    shutil.copytree(finished, teacher_dir)
    code, _, err = run_in_process("erpd_stage2.py", "--teacher", teacher_dir, "--epochs", "1", "--kl-rollouts", "0",
                                  "--eval-every", "0", "--out", tmp_path / "s2")
    assert code == 0, err[-2000:]
    student = tmp_path / "s2" / "student"
    record = json.loads((student / "erpd.json").read_text())
    assert record["teachers"] == [{"path": str(teacher_dir.resolve()),
                                   "manifest_sha256": sha256(teacher_dir / "shards" / "manifest.json")}]
    assert [entry["model"] for entry in record["lineage"]] == [str(Path(common.DEFAULT_MODEL).resolve())]
    assert common.check_lineage(str(student)) == []
    code, _, err = run_in_process("erpd_stage1.py", *TINY, "--epochs", "1", "--seed", "3", "--overwrite",
                                  "--out", teacher_dir)  # the teacher folder now holds another run
    assert code == 0, err[-2000:]
    warning = f"teacher folder {teacher_dir.resolve()} no longer holds the shards this model was distilled from"
    code, _, err = run_in_process("eval_math.py", "--model", f"student={student}", "--num-prompts", "2",
                                  "--samples", "1", "--max-new-tokens", "8")
    assert code == 0 and warning in err
    code, _, err = run_in_process("erpd_stage1.py", "--model", student, *TINY, "--epochs", "1",
                                  "--out", tmp_path / "round2")
    assert code == 0 and warning in err
    assert [e["model"] for e in json.loads((tmp_path / "round2" / "teacher" / "erpd.json").read_text())["lineage"]] \
        == [str(Path(common.DEFAULT_MODEL).resolve()), str(student.resolve())]

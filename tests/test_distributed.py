"""World-size parity on CPU with gloo: the same answer with 1, 2 or 4 processes, plain or FSDP, and no
prompt lost.

Parity means: the same global batches, the same loss and gradient norm at every optimizer step (float32
summation noise apart), and weights equal to a tolerance derived from the optimizer (runs.PARITY_OPTIMIZER
says why these runs use AdamW in its linear regime, and why default AdamW would make the weights flaky).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from runs import (
    PARITY_OPTIMIZER, PARITY_TOL, ROOT, assert_same_steps, kill_after_first_checkpoint, launch, max_weight_diff, records,
    run_ok)

BASE = Path(common.DEFAULT_MODEL)
# global batches of 9 rollouts over 2 ranks: rank 0 gets 5 (2 micro-batches of 4), rank 1 gets 4 (1), and the
# last batch of 1 leaves rank 1 nothing, so under FSDP rank 1 must run padding forwards to stay in step
UNEVEN = ["--batch-size", "9", "--micro-batch", "4", "--eval-every", "0", "--kl-rollouts", "8"]
STAGE1 = ["--teacher-loss", "ppo", "--epochs", "2", *UNEVEN, *PARITY_OPTIMIZER]  # a later --epochs overrides
STAGE2 = ["--epochs", "2", *UNEVEN, *PARITY_OPTIMIZER]


@pytest.fixture(scope="module")
def d2(tmp_path_factory):
    """D sampled by 2 processes (7 prompts: the ranks get 4 and 3), teacher trained by 2 processes."""
    out = tmp_path_factory.mktemp("d2")
    launch("erpd_stage1.py", "--num-prompts", 7, "--samples-per-prompt", 4, "--max-new-tokens", 32,
           *STAGE1, "--out", out, nproc=2)
    return out


@pytest.fixture(scope="module")
def plain1(d2, tmp_path_factory):
    """The same teacher trained by 1 process on the same D."""
    out = tmp_path_factory.mktemp("plain1")
    run_ok("erpd_stage1.py", "--rollouts", d2, *STAGE1, "--out", out)
    return out


@pytest.fixture(scope="module")
def student1(plain1, tmp_path_factory):
    """Stage 2 in 1 process on the 1-process teacher's shards."""
    out = tmp_path_factory.mktemp("student1")
    run_ok("erpd_stage2.py", "--teacher", plain1, *STAGE2, "--out", out)
    return out


def same_teacher_logprobs(run_a: Path, run_b: Path) -> None:
    """The shards' log pi_T of every token agree, by teachers equal to PARITY_TOL: a logit sums ~H * 3
    weights times activations of order 1 (H = 128), so PARITY_TOL-sized weight differences move it by up
    to ~1e-3; each run also scores in its own micro-batch layout (other padding, other summation order).
    A row misplaced or scored by another model is off by O(1)."""
    rows_a, rows_b = common.read_teacher_shards(run_a / "shards")[1], common.read_teacher_shards(run_b / "shards")[1]
    assert [r["response_ids"] for r in rows_a] == [r["response_ids"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        torch.testing.assert_close(a["logp_teacher"], b["logp_teacher"], rtol=1e-3, atol=2e-3)


def test_sampling_under_torchrun_gives_every_prompt_exactly_g_times(d2):
    rows = [json.loads(line) for line in (d2 / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 7 * 4
    keys = [(r["prompt_index"], r["sample_index"]) for r in rows]
    assert len(set(keys)) == len(keys)
    prompts = {r["prompt_index"] for r in rows}
    assert len(prompts) == 7 and all(sum(r["prompt_index"] == p for r in rows) == 4 for p in prompts)
    manifest = json.loads((d2 / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and sum(s["rows"] for s in manifest["shards"]) == 28


def test_same_teacher_with_1_or_2_processes(d2, plain1):
    assert assert_same_steps(d2, plain1) == 2 * 4  # 28 rollouts in batches of 9: 4 steps per epoch
    assert max_weight_diff(d2 / "teacher", plain1 / "teacher") <= PARITY_TOL
    assert max_weight_diff(d2 / "teacher", BASE) > 1e-2  # it did train, far beyond the tolerance
    same_teacher_logprobs(d2, plain1)


def test_same_student_with_1_or_2_processes(plain1, student1, tmp_path):
    """Stage 2 on the same shards with 2 processes and with 1 (shards written by 2 ranks are read in
    test_same_teacher_with_1_or_2_processes)."""
    launch("erpd_stage2.py", "--teacher", plain1, *STAGE2, "--out", tmp_path, nproc=2)
    assert_same_steps(tmp_path, student1)
    assert max_weight_diff(tmp_path / "student", student1 / "student") <= PARITY_TOL
    assert max_weight_diff(tmp_path / "student", BASE) > 1e-2


@pytest.mark.slow
def test_fsdp_matches_one_process_with_uneven_work_and_resumes(d2, plain1, student1, tmp_path):
    stage1 = ["--rollouts", d2, *STAGE1]
    # FSDP on 2 processes: one epoch (with activation checkpointing), then --resume from its checkpoint
    launch("erpd_stage1.py", *stage1, "--fsdp", "--gradient-checkpointing", "--epochs", 1, "--out", tmp_path / "fsdp",
           nproc=2)
    launch("erpd_stage1.py", *stage1, "--fsdp", "--epochs", 2, "--resume", "--out", tmp_path / "fsdp", nproc=2)
    teacher = tmp_path / "fsdp" / "teacher"
    assert_same_steps(plain1, tmp_path / "fsdp")
    assert max_weight_diff(plain1 / "teacher", teacher) <= PARITY_TOL  # also: same keys, tied head once
    assert json.loads((teacher / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # the resumed run trained again, so it rewrote its shards: log pi_T is the 2-epoch teacher's
    same_teacher_logprobs(plain1, tmp_path / "fsdp")
    # stage 2 with FSDP on 2 processes == stage 2 on 1 process, same shards
    launch("erpd_stage2.py", "--teacher", plain1, *STAGE2, "--fsdp", "--out", tmp_path / "s2-fsdp", nproc=2)
    assert_same_steps(tmp_path / "s2-fsdp", student1)
    assert max_weight_diff(tmp_path / "s2-fsdp" / "student", student1 / "student") <= PARITY_TOL
    # --fsdp in one process without torchrun (its own process group): the very same student
    launch("erpd_stage2.py", "--teacher", plain1, *STAGE2, "--fsdp", "--out", tmp_path / "s2-fsdp1")
    assert max_weight_diff(tmp_path / "s2-fsdp1" / "student", student1 / "student") == 0.0


@pytest.mark.slow
def test_hsdp_four_processes_match_one(d2, plain1, tmp_path):
    """--fsdp-shard-size 2 on 4 processes: shards over pairs, gradients all-reduced across the 2 pairs
    (HSDP, as on 2 nodes): the same steps as 1 plain process; a shard size that does not divide the
    world is refused."""
    stage1 = ["--rollouts", d2, *STAGE1, "--epochs", 1]
    launch("erpd_stage1.py", *stage1, "--fsdp", "--fsdp-shard-size", 2, "--out", tmp_path / "hsdp", nproc=4)
    assert assert_same_steps(plain1, tmp_path / "hsdp", epochs={1}) == 4
    proc = launch("erpd_stage1.py", *stage1, "--fsdp", "--fsdp-shard-size", 3, "--out", tmp_path / "bad",
                  nproc=2, check=False)
    assert proc.returncode != 0 and "--fsdp-shard-size 3: expected a divisor of the world size 2" in proc.stderr


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_with_every_ranks_stats(d2, tmp_path):
    """SIGKILL in the middle of an epoch, --resume, 2 processes: the same teacher and the same epoch
    metrics as d2's uninterrupted run on the same D (a checkpoint holds the running stat sums of all ranks,
    not rank 0's; checkpoints and diagnostics do not touch the training's numbers)."""
    args = ["--rollouts", d2, *STAGE1, "--save-every", "1"]
    state = kill_after_first_checkpoint("erpd_stage1.py", [*args, "--out", tmp_path], tmp_path / "checkpoint-teacher",
                                        nproc=2)
    assert state["step"] > 0 and state["totals"]["tokens"] > 0
    launch("erpd_stage1.py", *args, "--resume", "--out", tmp_path, nproc=2)
    # the same world size and the same summation order: identical up to the last bit in practice
    assert max_weight_diff(d2 / "teacher", tmp_path / "teacher") <= 1e-6

    def epochs(run):
        return {r["epoch"]: r for r in records(run, "epoch") if r["epoch"] > 0}
    full, cut = epochs(d2), epochs(tmp_path)
    for key in ("loss", "clip_fraction", "mean_abs_log_ratio"):
        assert cut[state["epoch"]][key] == pytest.approx(full[state["epoch"]][key], rel=1e-5, abs=1e-9), key


def test_a_rank_with_no_work_all_epoch(d2, tmp_path):
    """--batch-size 1 on 2 processes: rank 1 never gets a rollout, so it has none of the loss's stats;
    the epoch's sums still meet (keys united over ranks) and the teacher is the 1-process one. On the first
    3 prompts of D (12 rollouts: 12 steps), some of them with mixed rewards."""
    lines = (d2 / "rollouts" / "rollouts.jsonl").read_text().splitlines()[:12]
    meta = {**json.loads((d2 / "rollouts" / "meta.json").read_text()), "num_rows": 12}
    (tmp_path / "d" / "rollouts").mkdir(parents=True)
    (tmp_path / "d" / "rollouts" / "rollouts.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "d" / "rollouts" / "meta.json").write_text(json.dumps(meta))
    assert 0 < sum(json.loads(line)["reward"] for line in lines) < 12
    args = ["--rollouts", tmp_path / "d", "--teacher-loss", "ppo", "--epochs", "1", "--batch-size", "1",
            "--micro-batch", "1", "--eval-every", "0", "--kl-rollouts", "0", *PARITY_OPTIMIZER]
    launch("erpd_stage1.py", *args, "--out", tmp_path / "two", nproc=2)
    run_ok("erpd_stage1.py", *args, "--out", tmp_path / "one")
    assert assert_same_steps(tmp_path / "one", tmp_path / "two") == 12
    assert max_weight_diff(tmp_path / "one" / "teacher", tmp_path / "two" / "teacher") <= PARITY_TOL
    assert [m["epoch"] for m in records(tmp_path / "two", "epoch") if "clip_fraction" in m] == [1]


def test_fsdp_mixed_precision_keeps_ratio_one_at_the_first_step(d2, tmp_path):
    """bf16 compute over float32 shards: log pi_0 (scored with the whole gathered model) and the
    training forward (gathered layer by layer) agree exactly, so with lr 0 every ratio is 1 and the
    exact KL to the frozen (also sharded) pi_0 is 0."""
    launch("erpd_stage1.py", "--rollouts", d2, "--teacher-loss", "ppo", *UNEVEN, "--lr", "0", "--epochs", "1",
           "--fsdp", "--autocast", "bfloat16", "--out", tmp_path, nproc=2)
    last = records(tmp_path, "epoch")[-1]
    assert last["epoch"] == 1 and last["mean_abs_log_ratio"] == 0.0 and last["clip_fraction"] == 0.0
    assert last["kl_to_base"] == 0.0  # the frozen pi_0 is sharded too and computes in the same precision
    assert max_weight_diff(tmp_path / "teacher", BASE) == 0.0


FAILING_WORKER = """
import sys, time
sys.path.insert(0, {root!r})
import common
ctx = common.init_distributed(timeout_minutes=0.05)  # 3 s
if ctx.rank == 1:
    if sys.argv[1] == "raise":
        raise RuntimeError("rank 1 failed on purpose")
    time.sleep(120)  # hung: never reaches the collective
common.all_reduce_sum([1.0], ctx)
"""


@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_a_failing_or_hung_rank_stops_every_rank(failure, tmp_path):
    """A rank that dies stops the others (torchrun tears the group down); one that hangs is caught by
    the process-group timeout (--dist-timeout-minutes): the job ends with an error, long before the
    hung rank's 120 s."""
    worker = tmp_path / "worker.py"
    worker.write_text(FAILING_WORKER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), failure], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90
    assert ("rank 1 failed on purpose" if failure == "raise" else "timed out") in proc.stderr.lower()

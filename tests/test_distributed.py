"""World-size parity on CPU with gloo: the same answer with 1 or 2 processes, and no prompt lost."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
from common import Context, load_model, train_epoch

ROOT = Path(__file__).resolve().parents[1]
CPU = Context(0, 0, 1, torch.device("cpu"))
TRAIN = ["--batch-size", "16", "--micro-batch", "4", "--eval-every", "0", "--kl-rollouts", "8", "--lr", "1e-3"]


def launch(script, nproc, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script)]
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def two_process_stage1(tmp_path_factory):
    """D sampled by 2 processes (7 prompts: the ranks get 4 and 3), teacher trained by 2 processes."""
    out = tmp_path_factory.mktemp("w2")
    launch("erpd_stage1.py", 2, "--num-prompts", "7", "--samples-per-prompt", "4", "--max-new-tokens", "32",
           "--epochs", "2", "--teacher-loss", "ppo", "--out", out, *TRAIN)
    return out


def test_sampling_under_torchrun_gives_every_prompt_exactly_g_times(two_process_stage1):
    rows = [json.loads(line) for line in (two_process_stage1 / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 7 * 4
    keys = [(r["prompt_index"], r["sample_index"]) for r in rows]
    assert len(set(keys)) == len(keys)
    prompts = {r["prompt_index"] for r in rows}
    assert len(prompts) == 7 and all(sum(r["prompt_index"] == p for r in rows) == 4 for p in prompts)
    manifest = json.loads((two_process_stage1 / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and sum(s["rows"] for s in manifest["shards"]) == 28


def test_same_teacher_and_student_with_1_or_2_processes(two_process_stage1, tmp_path):
    # stage 1 on the same fixed rollouts and global batch, 1 process: the same teacher
    launch("erpd_stage1.py", 1, "--rollouts", two_process_stage1, "--epochs", "2", "--teacher-loss", "ppo",
           "--out", tmp_path / "w1", *TRAIN)
    assert max_weight_diff(two_process_stage1 / "teacher", tmp_path / "w1" / "teacher") <= 1e-4
    assert max_weight_diff(two_process_stage1 / "teacher", Path(common.DEFAULT_MODEL)) > 1e-3  # it did train
    # stage 2: 2 processes on shards written by 1, 1 process on shards written by 2: the same student
    stage2 = ["--epochs", "2", *TRAIN]
    launch("erpd_stage2.py", 2, "--teacher", tmp_path / "w1", "--out", tmp_path / "s2a", *stage2)
    launch("erpd_stage2.py", 1, "--teacher", two_process_stage1, "--out", tmp_path / "s2b", *stage2)
    assert max_weight_diff(tmp_path / "s2a" / "student", tmp_path / "s2b" / "student") <= 1e-4
    assert max_weight_diff(tmp_path / "s2a" / "student", Path(common.DEFAULT_MODEL)) > 1e-4


# global batches of 9 rollouts over 2 ranks: rank 0 gets 5 (2 micro-batches of 4), rank 1 gets 4 (1), and the
# last batch of 1 leaves rank 1 nothing, so under FSDP rank 1 must run padding forwards to stay in step
UNEVEN = ["--batch-size", "9", "--micro-batch", "4", "--eval-every", "0", "--kl-rollouts", "8", "--lr", "1e-3"]


def test_fsdp_matches_one_process_with_uneven_work_and_resumes(two_process_stage1, tmp_path):
    stage1 = ["--rollouts", two_process_stage1, "--teacher-loss", "ppo", *UNEVEN]
    launch("erpd_stage1.py", 1, *stage1, "--epochs", "2", "--out", tmp_path / "plain")
    # FSDP on 2 processes: one epoch (with activation checkpointing), then --resume from its checkpoint
    launch("erpd_stage1.py", 2, *stage1, "--fsdp", "--gradient-checkpointing", "--epochs", "1", "--out", tmp_path / "fsdp")
    launch("erpd_stage1.py", 2, *stage1, "--fsdp", "--epochs", "2", "--resume", "--out", tmp_path / "fsdp")
    teacher = tmp_path / "fsdp" / "teacher"
    assert max_weight_diff(tmp_path / "plain" / "teacher", teacher) <= 1e-4  # also: same keys, tied head once
    assert max_weight_diff(tmp_path / "plain" / "teacher", Path(common.DEFAULT_MODEL)) > 1e-3
    assert json.loads((teacher / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # the resumed run trained again, so it rewrote its shards: log pi_T is the 2-epoch teacher's
    plain_rows = common.read_teacher_shards(tmp_path / "plain" / "shards")[1]
    fsdp_rows = common.read_teacher_shards(tmp_path / "fsdp" / "shards")[1]
    assert max((a["logp_teacher"] - b["logp_teacher"]).abs().max().item()
               for a, b in zip(plain_rows, fsdp_rows)) <= 1e-3
    # stage 2 with FSDP on 2 processes == stage 2 on 1 process, same shards
    stage2 = ["--teacher", tmp_path / "plain", "--epochs", "2", *UNEVEN]
    launch("erpd_stage2.py", 2, *stage2, "--fsdp", "--out", tmp_path / "s2-fsdp")
    launch("erpd_stage2.py", 1, *stage2, "--out", tmp_path / "s2-plain")
    assert max_weight_diff(tmp_path / "s2-fsdp" / "student", tmp_path / "s2-plain" / "student") <= 1e-4
    assert max_weight_diff(tmp_path / "s2-fsdp" / "student", Path(common.DEFAULT_MODEL)) > 1e-4
    # --fsdp in one process without torchrun (its own process group): the very same student
    launch("erpd_stage2.py", 1, *stage2, "--fsdp", "--out", tmp_path / "s2-fsdp1")
    assert max_weight_diff(tmp_path / "s2-fsdp1" / "student", tmp_path / "s2-plain" / "student") == 0.0


def test_two_processes_killed_mid_epoch_resume_with_every_ranks_stats(two_process_stage1, tmp_path):
    """SIGKILL in the middle of an epoch, --resume, 2 processes: the same teacher and the same epoch
    metrics as without the kill (a checkpoint holds the running stat sums of all ranks, not rank 0's)."""
    from test_resume_and_errors import kill_after_first_checkpoint

    args = ["--rollouts", two_process_stage1, "--teacher-loss", "ppo", "--epochs", "3", "--save-every", "1",
            "--kl-rollouts", "0", *UNEVEN[:-4], "--lr", "1e-3"]
    launch("erpd_stage1.py", 2, *args, "--out", tmp_path / "full")
    state = kill_after_first_checkpoint("erpd_stage1.py", [*args, "--out", tmp_path / "cut"],
                                        tmp_path / "cut" / "checkpoint-teacher", nproc=2)
    assert state["step"] > 0 and state["totals"]["tokens"] > 0
    launch("erpd_stage1.py", 2, *args, "--resume", "--out", tmp_path / "cut")
    assert max_weight_diff(tmp_path / "full" / "teacher", tmp_path / "cut" / "teacher") <= 1e-6

    def epochs(run):
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["epoch"]: r for r in lines if r.get("event") == "epoch" and r["epoch"] > 0}
    full, cut = epochs("full"), epochs("cut")
    for key in ("loss", "clip_fraction", "mean_abs_log_ratio"):
        assert cut[state["epoch"]][key] == pytest.approx(full[state["epoch"]][key], rel=1e-5, abs=1e-9), key


def test_a_rank_with_no_work_all_epoch(two_process_stage1, tmp_path):
    """--batch-size 1 on 2 processes: rank 1 never gets a rollout, so it has none of the loss's stats;
    the epoch's sums still meet (keys united over ranks) and the teacher is the 1-process one."""
    args = ["--rollouts", two_process_stage1, "--teacher-loss", "ppo", "--epochs", "1", "--batch-size", "1",
            "--micro-batch", "1", "--eval-every", "0", "--kl-rollouts", "0", "--lr", "1e-3"]
    launch("erpd_stage1.py", 2, *args, "--out", tmp_path / "two")
    launch("erpd_stage1.py", 1, *args, "--out", tmp_path / "one")
    assert max_weight_diff(tmp_path / "one" / "teacher", tmp_path / "two" / "teacher") <= 1e-5
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if m.get("event") == "epoch" and "clip_fraction" in m] == [1]


def test_hsdp_four_processes_match_one(two_process_stage1, tmp_path):
    """--fsdp-shard-size 2 on 4 processes: shards over pairs, gradients all-reduced across the 2 pairs
    (HSDP, as on 2 nodes), the same teacher as 1 plain process; a shard size that does not divide the
    world is refused."""
    stage1 = ["--rollouts", two_process_stage1, "--teacher-loss", "ppo", "--epochs", "1", *UNEVEN]
    launch("erpd_stage1.py", 1, *stage1, "--out", tmp_path / "plain")
    launch("erpd_stage1.py", 4, *stage1, "--fsdp", "--fsdp-shard-size", "2", "--out", tmp_path / "hsdp")
    assert max_weight_diff(tmp_path / "plain" / "teacher", tmp_path / "hsdp" / "teacher") <= 1e-4
    assert max_weight_diff(tmp_path / "plain" / "teacher", Path(common.DEFAULT_MODEL)) > 1e-3
    with pytest.raises(AssertionError, match="--fsdp-shard-size 3: expected a divisor of the world size 2"):
        launch("erpd_stage1.py", 2, *stage1, "--fsdp", "--fsdp-shard-size", "3", "--out", tmp_path / "bad")


def test_fsdp_mixed_precision_keeps_ratio_one_at_the_first_step(two_process_stage1, tmp_path):
    """bf16 compute over float32 shards: log pi_0 (scored with the whole gathered model) and the
    training forward (gathered layer by layer) agree exactly, so with lr 0 every ratio is 1 and the
    exact KL to the frozen (also sharded) pi_0 is 0."""
    launch("erpd_stage1.py", 2, "--rollouts", two_process_stage1, "--teacher-loss", "ppo", *UNEVEN[:-2],
           "--lr", "0", "--epochs", "1", "--fsdp", "--autocast", "bfloat16", "--out", tmp_path)
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"epoch"' in line and '"event": "epoch"' in line]
    assert epochs[-1]["epoch"] == 1 and epochs[-1]["mean_abs_log_ratio"] == 0.0 and epochs[-1]["clip_fraction"] == 0.0
    assert epochs[-1]["kl_to_base"] == 0.0  # the frozen pi_0 is sharded too and computes in the same precision
    assert max_weight_diff(tmp_path / "teacher", Path(common.DEFAULT_MODEL)) == 0.0


def test_micro_batch_1x8_equals_8x1():
    """Gradient accumulation over 8 micro-batches of 1 gives the loss and update of one micro-batch of 8."""
    torch.manual_seed(0)
    model, tokenizer = load_model(common.DEFAULT_MODEL)
    rollouts = [{"prompt_ids": tokenizer("Q: 1+2")["input_ids"][: 3 + i % 3],
                 "response_ids": torch.randint(5, 20, (2 + i,)).tolist(), "advantage": (-1) ** i * 0.5}
                for i in range(8)]

    def loss_fn(indices, packed, logp, counts):
        adv = torch.tensor([rollouts[i]["advantage"] for i in indices])[:, None]
        return (common.sapo_loss(logp, logp.detach(), adv) * packed["mask"]).sum() / counts["tokens"], {}

    results = []
    for micro in (1, 8):
        m, _ = load_model(common.DEFAULT_MODEL)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        stats = train_epoch(m, opt, rollouts, loss_fn, epoch=0, ctx=CPU, pad_id=tokenizer.pad_token_id,
                            temperature=1.0, batch_size=8, micro_batch=micro, seed=0, max_grad_norm=1e9)
        results.append((stats["loss"], {k: v.detach().clone() for k, v in m.state_dict().items()}))
    (loss_1, w_1), (loss_8, w_8) = results
    assert loss_1 == pytest.approx(loss_8, rel=1e-5, abs=1e-7)
    assert max((w_1[k] - w_8[k]).abs().max().item() for k in w_1) <= 1e-6  # lr 1: weights differ by the gradients
    assert max((w_1[k] - model.state_dict()[k]).abs().max().item() for k in w_1) > 1e-4


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

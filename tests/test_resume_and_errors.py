"""Nothing lost: SIGKILL + --resume gives the same weights; bad input gives one clear line, no traceback."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import erpd_stage1
from runs import kill_after_first_checkpoint, max_weight_diff, run_in_process, run_ok

STAGE1 = ["--num-prompts", "8", "--samples-per-prompt", "4", "--max-new-tokens", "32", "--epochs", "3",
          "--batch-size", "8", "--micro-batch", "4", "--eval-every", "0", "--kl-rollouts", "32",
          "--save-every", "1", "--teacher-loss", "ppo"]
STAGE2 = ["--epochs", "3", "--batch-size", "8", "--micro-batch", "4", "--eval-every", "0", "--kl-rollouts", "32",
          "--save-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_ok("erpd_stage1.py", "--out", out / "s1", *STAGE1)
    run_ok("erpd_stage2.py", "--teacher", out / "s1", "--out", out / "s2", *STAGE2)
    return out


@pytest.mark.slow
def test_stage1_killed_and_resumed_matches_uninterrupted(uninterrupted, tmp_path):
    state = kill_after_first_checkpoint("erpd_stage1.py", ["--out", tmp_path, *STAGE1], tmp_path / "checkpoint-teacher")
    assert not (tmp_path / "teacher").exists() and state["epoch"] <= 3
    code, _, err = run_in_process("erpd_stage1.py", "--out", tmp_path, "--resume", *STAGE1)
    assert code == 0, err[-2000:]
    assert max_weight_diff(uninterrupted / "s1" / "teacher", tmp_path / "teacher") <= 1e-6
    full = json.loads((uninterrupted / "s1" / "shards" / "manifest.json").read_text())
    resumed = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["sha256"] for s in full["shards"]] == [s["sha256"] for s in resumed["shards"]]
    # resuming a finished run keeps its shards (sha256 checked) instead of rewriting them
    shard = next((tmp_path / "shards").glob("*.safetensors"))
    written = shard.stat().st_mtime_ns
    code, out, _ = run_in_process("erpd_stage1.py", "--out", tmp_path, "--resume", *STAGE1)
    assert code == 0 and "kept the finished shards" in out and shard.stat().st_mtime_ns == written
    # ... unless a shard was altered: then it is rewritten
    shard.write_bytes(shard.read_bytes()[:-10])
    code, out, _ = run_in_process("erpd_stage1.py", "--out", tmp_path, "--resume", *STAGE1)
    assert code == 0 and "kept the finished shards" not in out
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["shards"] == resumed["shards"]
    # ... or when the run was killed before rank 0 wrote the manifest, which comes last
    (tmp_path / "shards" / "manifest.json").unlink()
    code, out, _ = run_in_process("erpd_stage1.py", "--out", tmp_path, "--resume", *STAGE1)
    assert code == 0 and "kept the finished shards" not in out
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["shards"] == resumed["shards"]


@pytest.mark.slow
def test_stage2_killed_and_resumed_matches_uninterrupted(uninterrupted, tmp_path):
    args = ["--teacher", uninterrupted / "s1", "--out", tmp_path, *STAGE2]
    kill_after_first_checkpoint("erpd_stage2.py", args, tmp_path / "checkpoint")
    assert not (tmp_path / "student").exists()
    code, _, err = run_in_process("erpd_stage2.py", "--resume", *args)
    assert code == 0, err[-2000:]
    assert max_weight_diff(uninterrupted / "s2" / "student", tmp_path / "student") <= 1e-6


# ---- failure modes: exit code 2, one line naming the file and line / field, no traceback ---------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def expect_error(result, *fragments):
    """Exit code 2 and one message (run_in_process: any other exception would have raised here)."""
    code, _, err = result
    assert code == 2, err[-2000:]
    for fragment in fragments:
        assert fragment in err, err[-2000:]


@pytest.mark.parametrize("content, fragments", [
    ("", ["is empty"]),
    ('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": \n', [":2:", "malformed JSON"]),
    ('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n', [":2:", "missing answer field"]),
    ('{"prompt": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "no number here ####"}\n', [":2:", "gold answer"]),
])
def test_bad_data_is_one_clear_line(tmp_path, content, fragments):
    data = write(tmp_path / "bad.jsonl", content)
    expect_error(run_in_process("erpd_stage1.py", "--data", data, "--out", tmp_path / "out"), str(data), *fragments)


@pytest.mark.parametrize("flags, fragment", [
    (["--fsdp-shard-size", "2"], "--fsdp-shard-size 2: only with --fsdp"),
    (["--fsdp", "--fsdp-shard-size", "2"], "--fsdp-shard-size 2: expected a divisor of the world size 1"),
    (["--fsdp", "--chunked-lm-head"], "--chunked-lm-head calls the decoder outside the FSDP root"),
])
def test_bad_parallelism_flags_are_one_clear_line(tmp_path, flags, fragment):
    expect_error(run_in_process("erpd_stage1.py", *flags, "--out", tmp_path / "out"), fragment)


def test_bf16_training_weights_are_warned_and_fp16_refused(capsys):
    args = erpd_stage1.parse_args(["--dtype", "bfloat16"])
    model, _ = common.load_policy(args, common.Context(0, 0, 1, torch.device("cpu")))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert "--dtype bfloat16: AdamW updates smaller than ~1/256 of a weight are rounded away" in capsys.readouterr().err
    for flags in (["--dtype", "float16"], ["--autocast", "float16"]):  # no loss scaling: tiny gradients flush to 0
        with pytest.raises(SystemExit):
            erpd_stage1.parse_args(flags)


def test_long_prompts_are_skipped_or_fatal(tmp_path):
    rows = [{"prompt": "1+1", "answer": "2"}, {"prompt": "1+" * 200 + "1", "answer": "201"}] * 2
    data = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    args = ["--data", data, "--num-prompts", "4", "--samples-per-prompt", "2", "--epochs", "1", "--eval-every", "0",
            "--max-prompt-len", "64", "--kl-rollouts", "4"]
    expect_error(run_in_process("erpd_stage1.py", *args, "--long-prompts", "error", "--out", tmp_path / "a"),
                 "longer than --max-prompt-len 64")
    code, _, err = run_in_process("erpd_stage1.py", *args, "--out", tmp_path / "b")
    assert code == 0 and "skipped 2 prompt(s)" in err
    assert len((tmp_path / "b" / "rollouts" / "rollouts.jsonl").read_text().splitlines()) == 2 * 2


def test_corrupt_or_truncated_shard_is_refused(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted / "s1" / "shards", tmp_path / "shards")
    shard = next((tmp_path / "shards").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    expect_error(run_in_process("erpd_stage2.py", "--teacher", tmp_path, "--out", tmp_path / "out"),
                 shard.name, "sha256 mismatch")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(uninterrupted, tmp_path):
    args = ["--teacher", uninterrupted / "s1", "--out", tmp_path, "--epochs", "3", "--batch-size", "8",
            "--micro-batch", "8", "--eval-every", "0", "--kl-rollouts", "0", "--lr", "1e30", "--save-every", "1"]
    expect_error(run_in_process("erpd_stage2.py", *args), "non-finite")
    assert not (tmp_path / "student").exists()
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    weights = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert all(v.isfinite().all() for v in weights.values()) and state["epoch"] >= 1


def test_truncation_and_no_signal_are_warned(tmp_path):
    code, _, err = run_in_process("erpd_stage1.py", "--num-prompts", "4", "--samples-per-prompt", "2",
                                  "--max-new-tokens", "4", "--epochs", "1", "--eval-every", "0", "--kl-rollouts", "4",
                                  "--out", tmp_path)
    assert code == 0 and "hit --max-new-tokens" in err and "identical rewards" in err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["event"] == "rollouts")
    assert record["truncated"] == 1.0 and record["groups_with_signal"] == 0.0

"""erpd_rounds.py: the student of round k is the base of round k + 1, each round on fresh prompts, with
the lineage back to the original base recorded and the KL to it evaluated."""

import json
from pathlib import Path

import pytest

import common
from runs import launch

STAGE1 = ("--num-prompts 4 --samples-per-prompt 2 --max-new-tokens 32 --epochs 1 --batch-size 4 --micro-batch 4 "
          "--eval-every 0 --kl-rollouts 0")
STAGE2 = "--epochs 1 --batch-size 4 --micro-batch 4 --eval-every 0 --kl-rollouts 0 --lr 1e-4"
EVAL = "--num-prompts 4 --samples 2 --max-new-tokens 32"


@pytest.mark.slow
def test_two_rounds_chain_bases_draw_fresh_prompts_and_evaluate_against_the_original(tmp_path):
    launch("erpd_rounds.py", "--rounds", 2, "--out", tmp_path, "--stage1", STAGE1, "--stage2", STAGE2, "--eval",
           "--eval-args", EVAL)
    record = json.loads((tmp_path / "rounds.json").read_text())
    assert record["models"] == {"base": common.DEFAULT_MODEL, "round1": str(tmp_path / "round1/stage2/student"),
                                "round2": str(tmp_path / "round2/stage2/student")}
    # round 2 started from round 1's student, on prompts of its own
    meta2 = json.loads((tmp_path / "round2/stage1/rollouts/meta.json").read_text())
    assert meta2["model"] == str(tmp_path / "round1/stage2/student")
    prompts = [{json.loads(line)["prompt"] for line in (tmp_path / f"round{k}/stage1/rollouts/rollouts.jsonl")
                .read_text().splitlines()} for k in (1, 2)]
    assert prompts[0] != prompts[1]
    lineage = [entry["model"] for entry in record["lineage"]]
    assert lineage == [str(Path(common.DEFAULT_MODEL).resolve()), str((tmp_path / "round1/stage2/student").resolve())]
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    assert set(evaluation["models"]) == {"base", "round1", "round2"}
    assert evaluation["models"]["base"]["kl_to_ref"] == 0 and evaluation["models"]["round2"]["token_kl_to_ref"] > 0
    # a rerun skips the finished rounds
    proc = launch("erpd_rounds.py", "--rounds", 2, "--out", tmp_path, "--stage1", STAGE1, "--stage2", STAGE2)
    assert proc.stdout.count("exists: skipped") == 4


def test_flags_the_rounds_set_and_zero_rounds_are_refused(tmp_path):
    import erpd_rounds

    for flags, message in [(["--stage1=--model=other"], "--model in --stage1 / --stage2"),
                           (["--stage2", "--out other"], "--out in --stage1 / --stage2"),
                           (["--rounds", "0"], "--rounds 0: give at least 1")]:
        with pytest.raises(common.InputError, match=message):
            erpd_rounds.main(["--out", str(tmp_path), *flags])
    assert not any(tmp_path.iterdir())


def test_stage1_only_rounds_sample_each_round_from_the_last_teacher(tmp_path, monkeypatch):
    """On-policy GRPO as rounds of stage 1 alone: each round's teacher is the next round's base, each round
    draws prompts with a data seed of its own (the commands, without running them)."""
    import erpd_rounds

    calls = []

    def fake_run(script, flags, finished, nproc):
        calls.append((script, flags))
        teacher = Path(flags[flags.index("--out") + 1]) / "teacher"
        teacher.mkdir(parents=True)
        (teacher / "erpd.json").write_text(json.dumps({"lineage": []}))
    monkeypatch.setattr(erpd_rounds, "run", fake_run)
    erpd_rounds.main(["--rounds", "3", "--stage1-only", "--out", str(tmp_path), "--stage1", "--teacher-loss ppo"])
    assert [script for script, _ in calls] == ["erpd_stage1.py"] * 3
    bases = [flags[flags.index("--model") + 1] for _, flags in calls]
    assert bases == [common.DEFAULT_MODEL, str(tmp_path / "round1/stage1/teacher"), str(tmp_path / "round2/stage1/teacher")]
    assert [flags[flags.index("--data-seed") + 1] for _, flags in calls] == ["1", "2", "3"]
    assert all(flags[-2:] == ["--teacher-loss", "ppo"] for _, flags in calls)

"""The pipeline on the embedded tiny model: sampling, scoring, shards, and all three scripts."""

import json
import math

import pytest
import torch

import common
from common import (
    build_shard, encode_prompt, load_model, pack_rollouts, read_teacher_shards, response_logprobs,
    sample_responses, write_shard)
from runs import launch, run_in_process, run_ok

QUESTIONS = ["3+4", "12*3-5", "7-2*3+9", "1+1", "45-6*7+8*2", "9*9"]


@pytest.fixture(scope="module")
def tiny():
    return load_model(common.DEFAULT_MODEL)


def prompt_ids(tokenizer):
    return [encode_prompt(tokenizer, q) for q in QUESTIONS]


def sample(model, tokenizer, prompts, temperature, seed=0, batch_size=64, pad_id=None):
    return sample_responses(model, prompts, max_new_tokens=24, temperature=temperature, top_p=1.0,
                            stop_ids=[tokenizer.eos_token_id], generator=torch.Generator().manual_seed(seed),
                            pad_id=tokenizer.pad_token_id if pad_id is None else pad_id, batch_size=batch_size)


def test_prompt_is_the_chat_template(tiny):
    _, tokenizer = tiny
    text = tokenizer.decode(encode_prompt(tokenizer, "3+4"))
    assert text == tokenizer.bos_token + "Q: 3+4\nA: "


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) > 2  # different lengths: left padding is exercised
    batched = sample(model, tokenizer, prompts, temperature=0.0)
    single = [sample(model, tokenizer, [p], temperature=0.0)[0] for p in prompts]
    assert batched == single
    assert all(len(r["response_ids"]) > 1 for r in batched)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    model, tokenizer = tiny
    prompts = prompt_ids(tokenizer) * 4
    a, b = sample(model, tokenizer, prompts, 1.0, seed=3), sample(model, tokenizer, prompts, 1.0, seed=3)
    c = sample(model, tokenizer, prompts, 1.0, seed=4)
    assert a == b
    assert a != c


def test_eos_ends_a_response_and_is_a_response_token_when_pad_equals_eos(tiny):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    responses = sample(model, tokenizer, prompt_ids(tokenizer), 0.0, pad_id=eos)
    finished = [r for r in responses if not r["truncated"]]
    assert finished and all(r["response_ids"][-1] == eos and eos not in r["response_ids"][:-1] for r in finished)
    rollouts = [{"prompt_ids": p, "response_ids": r["response_ids"]}
                for p, r in zip(prompt_ids(tokenizer), responses)]
    packed = pack_rollouts(rollouts, pad_id=eos, device="cpu")
    lengths = torch.tensor([len(r["response_ids"]) for r in rollouts])
    assert torch.equal(packed["mask"].sum(-1), lengths)  # the EOS counts, the EOS-valued padding does not
    logp = response_logprobs(model, packed, 1.0)
    for i, r in enumerate(rollouts):
        n = len(r["response_ids"])
        assert logp[i, n - 1] < 0 and torch.all(logp[i, n:] == 0)
        # the same rollout alone (no padding at all) gives the same log-probs
        alone = response_logprobs(model, pack_rollouts([r], pad_id=eos, device="cpu"), 1.0)
        torch.testing.assert_close(logp[i, :n], alone[0], rtol=0, atol=1e-5)


def make_rollouts(model, tokenizer, group=4):
    prompts = prompt_ids(tokenizer)
    responses = sample(model, tokenizer, [p for p in prompts for _ in range(group)], 1.0, seed=1)
    return [{"prompt_index": k // group, "sample_index": k % group, "prompt_ids": prompts[k // group],
             "response_ids": r["response_ids"], "truncated": r["truncated"], "reward": float(k % 2),
             "advantage": 0.5 - (k % 2)} for k, r in enumerate(responses)]


def test_shards_round_trip_bit_exactly(tiny, tmp_path):
    model, tokenizer = tiny
    rollouts = make_rollouts(model, tokenizer)
    signals = {"logp_base": [torch.randn(len(r["response_ids"])) for r in rollouts],
               "logp_teacher": [torch.randn(len(r["response_ids"])) for r in rollouts]}
    digest = write_shard(tmp_path / "rank0.safetensors", build_shard(rollouts, signals))
    manifest = {"format_version": common.SHARD_FORMAT_VERSION, "base_fingerprint": "b", "tokenizer_fingerprint": "t",
                "base_model": "x", "temperature": 1.0, "num_rows": len(rollouts), "signals": sorted(signals),
                "shards": [{"file": "rank0.safetensors", "rows": len(rollouts), "sha256": digest}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _, back = read_teacher_shards(tmp_path, "b", "t")
    assert len(back) == len(rollouts)
    for i, (a, b) in enumerate(zip(rollouts, back)):
        for key in ("prompt_index", "sample_index", "prompt_ids", "response_ids", "truncated", "reward", "advantage"):
            assert a[key] == b[key], key
        for name in signals:
            assert torch.equal(signals[name][i], b[name])
    with pytest.raises(common.InputError, match="not from --model"):
        read_teacher_shards(tmp_path, "other-base", "t")
    data = bytearray((tmp_path / "rank0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "rank0.safetensors").write_bytes(bytes(data))
    with pytest.raises(common.InputError, match="sha256 mismatch"):
        read_teacher_shards(tmp_path, "b", "t")


# ---- the three scripts, end to end, as a user runs them -------------------------------------------

SMALL = ["--num-prompts", "8", "--samples-per-prompt", "4", "--max-new-tokens", "32", "--eval-prompts", "8",
         "--eval-samples", "2", "--batch-size", "16", "--micro-batch", "8", "--kl-rollouts", "16"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    launch("erpd_stage1.py", "--out", out, "--epochs", "2", "--eval-every", "2", "--unlearn", *SMALL)
    return out


def test_stage1_writes_teacher_shards_rollouts_and_curves(stage1):
    manifest = json.loads((stage1 / "shards" / "manifest.json").read_text())
    assert manifest["num_rows"] == 32
    assert manifest["signals"] == ["logp_base", "logp_teacher", "logp_unlearned"]
    assert (stage1 / "teacher" / "model.safetensors").is_file() and (stage1 / "rollouts" / "rollouts.jsonl").is_file()
    records = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch" and r["model"] == "teacher"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[0]["kl_to_base"] == 0.0 and epochs[-1]["kl_to_base"] > 0  # the teacher moved
    assert "heldout_accuracy" in epochs[-1]
    # every optimizer step is logged, with the trained tokens' entropy (collapse shows up step by step)
    steps = [r for r in records if r.get("event") == "step" and r["model"] == "teacher"]
    per_epoch = -(-32 // int(SMALL[SMALL.index("--batch-size") + 1]))
    assert [(r["epoch"], r["step"]) for r in steps] == [(e, k) for e in (1, 2) for k in range(1, per_epoch + 1)]
    assert all(r["tokens"] > 0 and r["lr"] > 0 and math.isfinite(r["loss"]) and r["entropy"] > 0 for r in steps)


def test_stage2_and_eval_end_to_end(stage1, tmp_path):
    run_ok("erpd_stage2.py", "--teacher", stage1, "--out", tmp_path / "s2", "--epochs", "2", "--eval-every", "0",
        "--batch-size", "16", "--micro-batch", "8", "--kl-rollouts", "16")
    assert (tmp_path / "s2" / "student" / "model.safetensors").is_file()
    code, _, err = run_in_process("erpd_stage2.py", "--teacher", stage1, "--signal", "unlearned", "--out",
                                  tmp_path / "s2u", "--epochs", "1", "--eval-every", "0", "--kl-rollouts", "0")
    assert code == 0, err[-2000:]
    run_ok("eval_math.py", "--model", f"base={common.DEFAULT_MODEL}", "--model", f"teacher={stage1 / 'teacher'}",
        "--model", f"student={tmp_path / 's2' / 'student'}", "--num-prompts", "8", "--samples", "2",
        "--max-new-tokens", "32", "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert set(result) == {"base", "teacher", "student"}
    for metrics in result.values():
        assert set(metrics) >= {"accuracy", "pass_at_k", "kl_to_ref", "token_kl_to_ref", "entropy",
                                "mean_length", "truncated"}
        assert 0 <= metrics["accuracy"] <= metrics["pass_at_k"] <= 1
    assert result["base"]["token_kl_to_ref"] == 0.0 and result["teacher"]["token_kl_to_ref"] > 0


def test_stage2_refuses_shards_from_another_base(stage1, tmp_path):
    code, _, err = run_in_process("erpd_stage2.py", "--model", stage1 / "teacher", "--teacher", stage1, "--out", tmp_path)
    assert code == 2 and "not from --model" in err
    assert not (tmp_path / "student").exists()

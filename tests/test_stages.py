"""The stages' own pieces, each against a hand computation: the loss each stage builds from its flags,
the teachers' signal, the prompt format, the real training loop's invariants; and the flags end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

import common
import erpd_stage1
import erpd_stage2
from common import Context
from runs import records, run_in_process

CPU = Context(0, 0, 1, torch.device("cpu"))
D = torch.float64


def micro_batch(lengths, seed=0):
    """A micro-batch's tensors: log pi_theta (a leaf), log pi_0 as [T_i] rows, the mask, and rollouts."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    old = [-torch.rand(n, generator=g, dtype=D) * 2 for n in lengths]
    logp = torch.zeros(len(lengths), width, dtype=D)
    for i, n in enumerate(lengths):
        logp[i, :n] = old[i] + torch.randn(n, generator=g, dtype=D) * 0.3
    rollouts = [{"advantage": a, "response_ids": [0] * n} for a, n in zip((0.75, -0.25, -0.5), lengths)]
    return logp.requires_grad_(True), old, mask, rollouts


def test_stage1_loss_is_the_flags_formula_by_hand():
    """ppo with eps 0.2 / 10, plus --kl-coef 0.5 times rho log rho - rho + 1, mean over the global tokens."""
    lengths = [4, 2, 3]
    logp, old, mask, rollouts = micro_batch(lengths)
    args = erpd_stage1.parse_args(["--teacher-loss", "ppo", "--kl-coef", "0.5"])
    counts = {"tokens": 20, "seqs": 5}  # the global batch is larger than this micro-batch
    loss, stats = erpd_stage1.teacher_loss(args, rollouts, old, +1.0)([0, 1, 2], {"mask": mask}, logp, counts)
    expected, clipped = 0.0, 0
    for i, n in enumerate(lengths):
        a = rollouts[i]["advantage"]
        for t in range(n):
            x = logp[i, t].item() - old[i][t].item()
            rho = math.exp(x)
            clipped += min(rho * a, min(max(rho, 0.8), 11.0) * a) != rho * a
            expected += -min(rho * a, min(max(rho, 0.8), 11.0) * a) + 0.5 * (rho * x - rho + 1)
    assert loss.item() == pytest.approx(expected / 20, rel=1e-12)
    assert int(stats["tokens"]) == 9 and int(stats["clipped"]) == clipped
    # sign -1 (the unlearned reference) is the same loss on -A
    neg, _ = erpd_stage1.teacher_loss(args, [{**r, "advantage": -r["advantage"]} for r in rollouts], old, +1.0)(
        [0, 1, 2], {"mask": mask}, logp, counts)
    flipped, _ = erpd_stage1.teacher_loss(args, rollouts, old, -1.0)([0, 1, 2], {"mask": mask}, logp, counts)
    assert flipped.item() == neg.item()


@pytest.mark.parametrize("aggregation", common.AGGREGATIONS)
def test_sequence_loss_and_kl_term_share_the_aggregations_scale(aggregation):
    """mse is one value per sequence, the KL term one per token: with token-mean every sequence's value
    stands for each of its tokens (both are means over tokens), with seq-mean-token-mean both are means
    over sequences; either way their ratio does not change with response length."""
    lengths = [4, 2, 3]
    logp, old, mask, rollouts = micro_batch(lengths, seed=1)
    args = erpd_stage1.parse_args(["--teacher-loss", "mse", "--mse-beta", "0.1", "--kl-coef", "2",
                                   "--aggregation", aggregation])
    loss, _ = erpd_stage1.teacher_loss(args, rollouts, old, +1.0)([0, 1, 2], {"mask": mask}, logp,
                                                                  {"tokens": 9, "seqs": 3})
    per_seq, kl_seq = [], []
    for i, n in enumerate(lengths):
        xs = [logp[i, t].item() - old[i][t].item() for t in range(n)]
        per_seq.append((0.1 * sum(xs) - rollouts[i]["advantage"]) ** 2)
        kl_seq.append([math.exp(x) * x - math.exp(x) + 1 for x in xs])
    if aggregation == "token-mean":
        expected = sum(n * m for n, m in zip(lengths, per_seq)) / 9 + 2 * sum(map(sum, kl_seq)) / 9
    else:
        expected = sum(per_seq) / 3 + 2 * sum(sum(k) / len(k) for k in kl_seq) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_stage2_loss_with_alpha_by_hand():
    """At rho = 1 the clipped objective is -A_t, with A_t = clip(delta_t, -c, c) + alpha A_seq."""
    lengths = [3, 2, 1]
    _, old, mask, rollouts = micro_batch(lengths)
    logp = common.pad_rows(old, "cpu").double().requires_grad_(True)  # rho = 1 on every token
    delta = [torch.tensor([0.5, -3.0, 1.5], dtype=D), torch.tensor([2.5, -0.2], dtype=D), torch.tensor([0.0], dtype=D)]
    args = erpd_stage2.parse_args(["--alpha", "0.5", "--clip-c", "1.0"])
    loss, stats = erpd_stage2.distill_loss(args, rollouts, old, delta)([0, 1, 2], {"mask": mask}, logp,
                                                                       {"tokens": 6, "seqs": 3})
    token_adv = [min(max(float(d), -1.0), 1.0) + 0.5 * r["advantage"] for dd, r in zip(delta, rollouts) for d in dd]
    assert loss.item() == pytest.approx(-sum(token_adv) / 6, rel=1e-12)
    loss.backward()  # d loss / d logp_t = -A_t / N at rho = 1
    grads = [float(logp.grad[i, t]) for i, n in enumerate(lengths) for t in range(n)]
    assert grads == pytest.approx([-a / 6 for a in token_adv], rel=1e-12)
    assert int(stats["moved"]) == 0 and int(stats["clipped"]) == 0


def fake_teacher(directory: Path, rollouts, teacher, unlearned, prompt=None):
    manifest = {"base_fingerprint": "b", "tokenizer_fingerprint": "t", "base_model": "x", "temperature": 1.0,
                "top_p": 1.0, "prompt_format": prompt or {"system_prompt": None, "instruction": None}}
    common.write_teacher_shards(directory / "shards", rollouts, {
        "logp_base": [torch.full((len(r["response_ids"]),), -1.0) for r in rollouts],
        "logp_teacher": teacher, "logp_unlearned": unlearned}, manifest, CPU)


@pytest.fixture
def two_teachers(tmp_path):
    g = torch.Generator().manual_seed(0)
    rollouts = [{"prompt_index": i, "sample_index": 0, "prompt_ids": [1, 2], "response_ids": [3] * (2 + i),
                 "reward": float(i % 2), "advantage": 0.5 - i % 2, "truncated": False} for i in range(3)]
    signals = [[-torch.rand(len(r["response_ids"]), generator=g) for r in rollouts] for _ in range(4)]
    fake_teacher(tmp_path / "a", rollouts, signals[0], signals[1])
    fake_teacher(tmp_path / "b", rollouts, signals[2], signals[3])
    return tmp_path, signals


@pytest.mark.parametrize("signal", ["base", "unlearned"])
def test_several_teachers_give_the_weighted_mean_of_their_deltas(two_teachers, signal):
    root, (teacher_a, unlearned_a, teacher_b, unlearned_b) = two_teachers
    args = erpd_stage2.parse_args(["--teacher", str(root / "a"), str(root / "b"), "--teacher-weights", "1", "3",
                                   "--signal", signal])
    _, delta, _ = erpd_stage2.load_signal(args, {"base_fingerprint": "b", "tokenizer_fingerprint": "t"})
    for i, d in enumerate(delta):
        for t in range(len(d)):
            other_a = -1.0 if signal == "base" else float(unlearned_a[i][t])
            other_b = -1.0 if signal == "base" else float(unlearned_b[i][t])
            expected = (1 * (float(teacher_a[i][t]) - other_a) + 3 * (float(teacher_b[i][t]) - other_b)) / 4
            assert float(d[t]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("weights", [["1", "-1"], ["-1", "2"], ["nan", "1"], ["0", "0"], ["1"]])
def test_bad_teacher_weights_are_one_clear_line(two_teachers, weights):
    root, _ = two_teachers
    args = erpd_stage2.parse_args(["--teacher", str(root / "a"), str(root / "b"), "--teacher-weights", *weights])
    with pytest.raises(common.InputError, match="--teacher-weights"):
        erpd_stage2.load_signal(args, {"base_fingerprint": "b", "tokenizer_fingerprint": "t"})


def test_teachers_on_different_prompts_are_refused(two_teachers):
    root, (teacher, unlearned, _, _) = two_teachers
    _, rows = common.read_teacher_shards(root / "a" / "shards")
    fake_teacher(root / "c", rows, teacher, unlearned, prompt={"system_prompt": "Be brief.", "instruction": None})
    args = erpd_stage2.parse_args(["--teacher", str(root / "a"), str(root / "c")])
    with pytest.raises(common.InputError, match="prompt_format"):
        erpd_stage2.load_signal(args, {"base_fingerprint": "b", "tokenizer_fingerprint": "t"})


def test_prompt_format_defaults_records_and_conflicts():
    _, tokenizer = common.load_model(common.DEFAULT_MODEL)
    standard = common.prompt_format(tokenizer)
    assert standard["instruction"] == common.DEFAULT_INSTRUCTION and standard["system_prompt"] is None
    tiny = common.recorded_prompt_format(common.DEFAULT_MODEL)  # the embedded model was trained on bare questions
    assert tiny == {"system_prompt": None, "instruction": None}
    assert common.prompt_format(tokenizer, default=tiny)["instruction"] is None
    assert common.prompt_format(tokenizer, instruction="Box it.", default=tiny)["instruction"] == "Box it."
    bound = ({"system_prompt": None, "instruction": "Box it."}, "the shards")
    assert common.prompt_format(tokenizer, instruction="Box it.", bound=bound)["instruction"] == "Box it."
    with pytest.raises(common.InputError, match="--instruction '' contradicts the prompt format recorded in the shards"):
        common.prompt_format(tokenizer, instruction="", bound=bound)
    text = tokenizer.decode(common.encode_prompt(tokenizer, "3+4", None, "Box it."))
    assert text == tokenizer.bos_token + "Q: 3+4\nBox it.\nA: "


def test_micro_batching_and_world_layout_do_not_change_a_step_of_the_real_loop():
    """The stages' own loss functions through train_epoch: one step on a batch of 8 gives the same loss and
    the same update in 1, 2 or 8 micro-batches (SGD, lr 1: the weights differ by the gradients)."""
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.DEFAULT_MODEL)
    g = torch.Generator().manual_seed(0)
    rollouts = [{"prompt_ids": tokenizer("Q: 1+2")["input_ids"][: 3 + i % 3],
                 "response_ids": torch.randint(5, 90, (2 + i,), generator=g).tolist(), "advantage": (-1) ** i * 0.5}
                for i in range(8)]
    base_logp = [-torch.rand(len(r["response_ids"]), generator=g) * 3 for r in rollouts]
    delta = [torch.randn(len(r["response_ids"]), generator=g) for r in rollouts]
    losses = {"ppo": erpd_stage1.teacher_loss(erpd_stage1.parse_args(["--teacher-loss", "ppo"]), rollouts, base_logp, 1),
              "sapo": erpd_stage1.teacher_loss(erpd_stage1.parse_args([]), rollouts, base_logp, 1),
              "mse": erpd_stage1.teacher_loss(erpd_stage1.parse_args(["--teacher-loss", "mse"]), rollouts, base_logp, 1),
              "distill": erpd_stage2.distill_loss(erpd_stage2.parse_args(["--kl-coef", "0.1"]), rollouts, base_logp, delta)}
    for name, loss_fn in losses.items():
        results = []
        for micro in (1, 2, 8):
            m, _ = common.load_model(common.DEFAULT_MODEL)
            stats = common.train_epoch(m, torch.optim.SGD(m.parameters(), lr=1.0), rollouts, loss_fn, epoch=0, ctx=CPU,
                                       pad_id=tokenizer.pad_token_id, temperature=1.0, batch_size=8, micro_batch=micro,
                                       seed=0, max_grad_norm=1e9)
            results.append((stats["loss"], [p.detach().clone() for p in m.parameters()]))
        (loss_1, w_1), *others = results
        update = max((a - b).abs().max().item() for a, b in zip(w_1, model.parameters()))
        assert update > 1e-4, name
        for loss_k, w_k in others:  # float32 summation order: ~1e-6 of the update, plus a few ulps of w ~ 1
            assert loss_k == pytest.approx(loss_1, rel=1e-5, abs=1e-7), name
            assert max((a - b).abs().max().item() for a, b in zip(w_1, w_k)) <= 1e-5 * update + 5e-7, name


# ---- the flags end to end (in this process: the runs are small) -------------------------------------

SMALL = ["--num-prompts", "6", "--samples-per-prompt", "4", "--max-new-tokens", "32", "--eval-every", "0",
         "--micro-batch", "8", "--kl-rollouts", "24"]


@pytest.fixture(scope="module")
def d_small(tmp_path_factory):
    """D (24 rollouts) and a default teacher trained on it in 2 epochs of 2 steps (batch 12)."""
    out = tmp_path_factory.mktemp("d_small")
    code, _, err = run_in_process("erpd_stage1.py", *SMALL, "--batch-size", "12", "--epochs", "2", "--out", out)
    assert code == 0, err[-2000:]
    return out


def test_ratio_is_exactly_one_at_the_first_step_of_a_real_run(d_small, tmp_path):
    """lr > 0, one global batch holding all of D: at the first step every token of every row has rho = 1
    bit for bit (log pi_0 was scored in that step's layout); the second step sees the update."""
    code, _, err = run_in_process("erpd_stage1.py", "--rollouts", d_small, *SMALL, "--batch-size", "24", "--epochs", "2",
                                  "--teacher-loss", "ppo", "--lr", "1e-3", "--out", tmp_path)
    assert code == 0, err[-2000:]
    steps = records(tmp_path, "step")
    assert [(r["epoch"], r["step"]) for r in steps] == [(1, 1), (2, 1)]
    assert steps[0]["tokens"] == sum(len(json.loads(line)["response_ids"]) for line in
                                     (d_small / "rollouts" / "rollouts.jsonl").read_text().splitlines())
    assert steps[0]["mean_abs_log_ratio"] == 0.0 and steps[0]["clip_fraction"] == 0.0
    assert steps[1]["mean_abs_log_ratio"] > 1e-4


def test_kl_coef_keeps_both_stages_closer_to_the_base(d_small, tmp_path):
    for stage, args in (("erpd_stage1.py", ["--rollouts", d_small, *SMALL, "--batch-size", "12", "--epochs", "2"]),
                        ("erpd_stage2.py", ["--teacher", d_small, "--epochs", "2", "--eval-every", "0",
                                            "--kl-rollouts", "24", "--batch-size", "12", "--lr", "1e-4"])):
        kl = {}
        for coef in ("0", "30"):
            out = tmp_path / f"{stage}-{coef}"
            code, _, err = run_in_process(stage, *args, "--kl-coef", coef, "--out", out)
            assert code == 0, err[-2000:]
            kl[coef] = records(out, "epoch")[-1]["kl_to_base"]
        assert 0 < kl["30"] < 0.8 * kl["0"], (stage, kl)


def test_unlearned_reference_moves_against_the_advantage(d_small, tmp_path):
    """pi_U is trained on -A: the advantage-weighted log-likelihood of D, sum_i A_i sum_t log pi(y_t), which
    the teacher raises, goes down under pi_U; positive-advantage rollouts lose probability under pi_U."""
    code, _, err = run_in_process("erpd_stage1.py", "--rollouts", d_small, *SMALL, "--batch-size", "12", "--epochs", "2",
                                  "--unlearn", "--out", tmp_path)
    assert code == 0, err[-2000:]
    _, rows = common.read_teacher_shards(tmp_path / "shards")

    def weighted_move(name):
        return sum(r["advantage"] * (r[name] - r["logp_base"]).sum().item() for r in rows)
    assert weighted_move("logp_unlearned") < 0 < weighted_move("logp_teacher")
    positive = [(r["logp_unlearned"] - r["logp_base"]).sum().item() for r in rows if r["advantage"] > 0]
    assert sum(positive) / len(positive) < 0


def test_mse_teacher_regresses_the_sequence_log_ratio_onto_the_advantage(d_small, tmp_path):
    """beta sum_t log rho_t moves towards A: the regression loss falls epoch by epoch, and the sequence
    log-ratio ends higher on positive-advantage rollouts than on negative ones, negative on those (a
    confident base has little probability left to raise on its own samples)."""
    code, _, err = run_in_process("erpd_stage1.py", "--rollouts", d_small, *SMALL, "--batch-size", "12", "--epochs", "3",
                                  "--teacher-loss", "mse", "--lr", "1e-4", "--out", tmp_path)
    assert code == 0, err[-2000:]
    epochs = records(tmp_path, "epoch")[1:]
    assert epochs[0]["loss"] > epochs[1]["loss"] > epochs[2]["loss"]
    assert "clip_fraction" not in epochs[-1]  # no hard clip: no clip fraction
    _, rows = common.read_teacher_shards(tmp_path / "shards")

    def mean_seq_log_ratio(positive):
        xs = [(r["logp_teacher"] - r["logp_base"]).sum().item() for r in rows
              if r["advantage"] != 0 and (r["advantage"] > 0) == positive]
        return sum(xs) / len(xs)
    assert mean_seq_log_ratio(False) < 0 and mean_seq_log_ratio(False) < mean_seq_log_ratio(True)


def test_d_reused_records_its_real_shape_and_prompt_format(d_small, tmp_path):
    code, out, err = run_in_process("erpd_stage1.py", "--rollouts", d_small, *SMALL, "--batch-size", "24", "--epochs", "1",
                                    "--out", tmp_path)
    assert code == 0, err[-2000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert (manifest["num_prompts"], manifest["samples_per_prompt"], manifest["num_rows"]) == (6, 4, 24)
    assert manifest["prompt_format"]["instruction"] is None  # the embedded model's recorded format
    assert records(tmp_path, "rollouts")[0]["num_prompts"] == 6
    assert "1 optimizer step(s) per epoch" in out and "only 1 optimizer step(s) per epoch" in err
    assert "\r" not in err and "\x1b[" not in err  # no progress bar redrawn into a file
    code, _, err = run_in_process("erpd_stage1.py", "--rollouts", d_small, "--instruction", "Box it.",
                                  "--out", tmp_path / "x")
    assert code == 2 and "--instruction 'Box it.' contradicts the prompt format recorded in" in err
    code, _, err = run_in_process("erpd_stage1.py", "--rollouts", d_small, "--temperature", "0.7", "--out", tmp_path / "t")
    assert code == 2 and "D was sampled at temperature 1.0, this run has --temperature 0.7" in err
    code, _, err = run_in_process("erpd_stage2.py", "--teacher", d_small, "--instruction", "Box it.",
                                  "--out", tmp_path / "y")
    assert code == 2 and "contradicts the prompt format recorded in" in err

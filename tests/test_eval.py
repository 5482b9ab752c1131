"""eval_math's uncertainty: bootstrap intervals over problems, paired differences, per-problem outcomes."""

import numpy as np
import pytest

import eval_math


def numpy_bootstrap(values, resamples=20000, seed=7):
    rng = np.random.default_rng(seed)
    x = np.asarray(values, dtype=np.float64)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(1)
    return np.percentile(means, [2.5, 97.5])


def synthetic(n, k, p, seed):
    rng = np.random.default_rng(seed)
    return rng.binomial(k, rng.beta(p * 4, (1 - p) * 4, size=n))  # per-problem correct counts, uneven difficulty


def test_bootstrap_interval_matches_numpy_and_the_normal_approximation():
    correct = synthetic(400, 16, 0.4, 0)
    values = (correct / 16).tolist()
    lo, hi = eval_math.bootstrap_ci(values, seed=0)
    ref_lo, ref_hi = numpy_bootstrap(values)
    assert abs(lo - ref_lo) < 0.006 and abs(hi - ref_hi) < 0.006
    half = 1.96 * np.std(values) / np.sqrt(len(values))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < np.mean(values) < hi
    assert eval_math.bootstrap_ci(values, seed=0) == [lo, hi]  # fixed seed: the same interval


def test_paired_difference_uses_shared_problems_and_pairs_them():
    k, n = 16, 400
    base = synthetic(n, k, 0.4, 1)
    better = np.minimum(k, base + np.random.default_rng(2).binomial(1, 0.6, size=n))  # +0.6 of 16 on average
    a = {"samples": k, "outcomes": [[i, int(c)] for i, c in enumerate(better)] + [[10_000, 16]]}  # one extra problem
    b = {"samples": k, "outcomes": [[i, int(c)] for i, c in enumerate(base)]}
    diff, (lo, hi) = eval_math.paired_diff(a, b, seed=0)
    diffs = (better - base) / k
    assert diff == pytest.approx(diffs.mean(), abs=1e-12)  # the extra problem is left out
    ref_lo, ref_hi = numpy_bootstrap(diffs)
    assert abs(lo - ref_lo) < 0.003 and abs(hi - ref_hi) < 0.003
    assert lo > 0  # a consistent per-problem gain is significant paired ...
    unpaired = numpy_bootstrap(better / k)[0] - numpy_bootstrap(base / k)[1]
    assert unpaired < 0 < lo  # ... where the overlap of two unpaired intervals would not show it
    same_diff, same_ci = eval_math.paired_diff(b, b)
    assert same_diff == 0.0 and same_ci == [0.0, 0.0]
    with pytest.raises(eval_math.InputError, match="share no problem"):
        eval_math.paired_diff(a, {"samples": k, "outcomes": [[-1, 0]]})


def test_summary_columns_by_hand():
    """accuracy = mean reward over samples; pass@k = any of a problem's k samples right; kl_to_ref = mean over
    samples of the sequence log-ratio; token KL and entropy = means over tokens; greedy: no distribution."""
    import torch

    rewards = {0: [1, 0, 0], 1: [0, 0, 0], 2: [1, 1, 0]}
    rollouts, scores = [], []
    for p, rs in rewards.items():
        for k, r in enumerate(rs):
            n = 1 + p + k  # response lengths 1..5
            rollouts.append({"prompt_index": p, "reward": float(r), "response_ids": [7] * n, "truncated": n == 5})
            logp = torch.full((n,), -0.5 - 0.1 * p)
            scores.append({"logp": logp, "ref_logp": logp - 0.2 * (k + 1), "kl": torch.full((n,), 0.01 * (p + 1)),
                           "entropy": torch.full((n,), 0.3)})
    result = eval_math.summarize(rollouts, scores, samples=3, seed=0)
    assert result["accuracy"] == pytest.approx(3 / 9)
    assert result["pass_at_k"] == pytest.approx(2 / 3)
    lengths = [1 + p + k for p in range(3) for k in range(3)]
    seq_kl = [0.2 * (k + 1) * (1 + p + k) for p in range(3) for k in range(3)]
    assert result["kl_to_ref"] == pytest.approx(sum(seq_kl) / 9)
    token_kl = sum(0.01 * (p + 1) * (1 + p + k) for p in range(3) for k in range(3)) / sum(lengths)
    assert result["token_kl_to_ref"] == pytest.approx(token_kl)
    assert result["entropy"] == pytest.approx(0.3)
    assert result["mean_length"] == pytest.approx(sum(lengths) / 9)
    assert result["truncated"] == pytest.approx(sum(n == 5 for n in lengths) / 9)
    assert result["outcomes"] == [[0, 1], [1, 0], [2, 2]] and result["samples"] == 3
    greedy = eval_math.summarize(rollouts, None, samples=3, seed=0)
    assert greedy["kl_to_ref"] is None and greedy["token_kl_to_ref"] is None and greedy["entropy"] is None
    assert greedy["accuracy"] == result["accuracy"]


def test_greedy_with_several_samples_is_refused():
    from runs import run_in_process

    code, _, err = run_in_process("eval_math.py", "--temperature", "0", "--samples", "4")
    assert code == 2 and "greedy samples of one problem are all the same" in err


def test_a_name_given_twice_is_refused(tmp_path):
    from runs import run_in_process

    code, _, err = run_in_process("eval_math.py", "--model", "a=tiny/model", "--model", "a=tiny/model",
                                  "--json", tmp_path / "e.json")
    assert code == 2 and "--model: the name a is given twice" in err and not (tmp_path / "e.json").exists()

"""The study's numbers: what the runs wrote, pooled over seeds with 95% intervals, and the verdict rules.

Every number the report prints is a `stat`: {"mean", "ci": [lo, hi] or None, "n": seeds, "per_seed": [...]}.
Two kinds of interval, chosen by what the runs record:

    accuracy and paired accuracy differences (eval_math.py keeps every problem's outcome)
        mean over seeds of the per-seed value; two-level bootstrap: draw the seeds with replacement,
        then each drawn seed's problems with replacement (2000 resamples, percentile interval). Both
        sources of noise are in it: the training seed and the finite set of held-out problems.
        With one seed it is eval_math.bootstrap_ci itself (problems only).
    everything else (KL, entropy, the curves' held-out accuracy, ratios): one number per seed
        mean over seeds, Student-t interval with n - 1 degrees of freedom (None with one seed).

A verdict comes from parts. A part compares one stat with a threshold on a claimed side: it holds when
the whole 95% interval lies on that side, fails when the mean lies on the other side (or on the
threshold), and is unclear otherwise. A claim is reproduced when every part holds, not reproduced when
no part holds and at least one fails, and mixed otherwise. The claim functions below (claim_e1 ...
claim_e7) are pure functions of stats, each with its rule's text next to it; report.py prints both.
"""

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval_math import BOOTSTRAP_RESAMPLES, bootstrap_ci  # noqa: E402  (the repo root is importable now)

# ---- what the runs wrote ----------------------------------------------------------------------------


def read_epochs(run_dir, model: str = "teacher") -> dict[int, dict]:
    """{epoch: record} of a stage run's "epoch" lines in metrics.jsonl for one model (teacher, unlearned,
    student). A resumed run may log an epoch twice (killed between its log line and its checkpoint):
    the last line wins, as it is the one the finished model continued from."""
    epochs = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill; the run rewrote the epoch after it
            continue
        if record.get("event") == "epoch" and record.get("model") == model:
            epochs[record["epoch"]] = record
    return epochs


def read_models(eval_json) -> dict[str, dict]:
    """{model name: eval_math's entry} of one eval_math.py --json file."""
    return json.loads(Path(eval_json).read_text(encoding="utf-8"))["models"]


def problem_values(entry: dict) -> dict[int, float]:
    """{problem id: fraction correct} of one eval_math entry ({"samples": k, "outcomes": [[id, correct], ...]})."""
    return {int(i): c / entry["samples"] for i, c in entry["outcomes"]}


def best_epoch(epochs: dict[int, dict], every: int) -> int | None:
    """The trained epoch (a multiple of `every`, so one with a snapshot) with the highest held-out accuracy
    on the run's own curve; the earliest on ties. None when no such epoch was evaluated."""
    scored = [(-r["heldout_accuracy"], e) for e, r in epochs.items()
              if e > 0 and every and e % every == 0 and r.get("heldout_accuracy") is not None]
    return min(scored)[1] if scored else None


# ---- statistics ---------------------------------------------------------------------------------------

# Student-t 0.975 quantiles for 1..30 degrees of freedom (no scipy in this project); beyond, the
# Cornish-Fisher term z + (z^3 + z) / (4 df), within 0.002 of the exact value there.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    z = 1.959964
    return _T975[df - 1] if df <= len(_T975) else z + (z ** 3 + z) / (4 * df)


def missing() -> dict:
    return {"mean": None, "ci": None, "n": 0, "per_seed": []}


def over_seeds(values: list) -> dict:
    """Mean over seeds with a Student-t 95% interval (None with fewer than 2 values); None values, from a
    seed where the quantity is undefined, are left out."""
    x = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not x:
        return missing()
    mean = sum(x) / len(x)
    ci = None
    if len(x) > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
        half = t975(len(x) - 1) * sd / math.sqrt(len(x))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci": ci, "n": len(x), "per_seed": x}


def seeds_bootstrap_ci(groups: list[list[float]], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = 0.95) -> list[float]:
    """Two-level percentile bootstrap interval of the mean over seeds of per-problem values: each resample
    draws len(groups) seeds with replacement, then each drawn seed's problems with replacement.

    groups: one list of per-problem values per seed. Resampling seeds puts the spread between training
    seeds into the interval, which a bootstrap over the pooled (seed, problem) pairs would leave out.
    """
    if len(groups) == 1:
        return bootstrap_ci(groups[0], seed, resamples, level)
    generator = torch.Generator().manual_seed(seed)
    values = [torch.tensor(g, dtype=torch.float64) for g in groups]
    picks = torch.randint(len(groups), (resamples, len(groups)), generator=generator)
    total = torch.zeros(resamples, dtype=torch.float64)
    for draw in range(len(groups)):
        for g, x in enumerate(values):
            rows = (picks[:, draw] == g).nonzero().squeeze(1)
            if len(rows):
                idx = torch.randint(len(x), (len(rows), len(x)), generator=generator)
                total[rows] += x[idx].mean(1)
    means = total / len(groups)
    tail = (1 - level) / 2
    return [means.quantile(tail).item(), means.quantile(1 - tail).item()]


def _pooled(groups: list[list[float]]) -> dict:
    if not groups:
        return missing()
    per_seed = [sum(g) / len(g) for g in groups]
    return {"mean": sum(per_seed) / len(per_seed), "ci": seeds_bootstrap_ci(groups), "n": len(groups),
            "per_seed": per_seed}


def accuracy_over_seeds(entries: list[dict]) -> dict:
    """Accuracy of one model over seeds (one eval_math entry per seed; None where a seed lacks it)."""
    return _pooled([list(problem_values(e).values()) for e in entries if e is not None])


def paired_over_seeds(entries_a: list[dict], entries_b: list[dict]) -> dict:
    """Accuracy of a minus b over seeds, paired by problem within each seed (the pairing of
    eval_math.paired_diff; the per-problem differences are kept here because the two-level interval
    resamples them). Seeds where either entry is missing are left out."""
    groups = []
    for a, b in zip(entries_a, entries_b):
        if a is None or b is None:
            continue
        va, vb = problem_values(a), problem_values(b)
        shared = sorted(va.keys() & vb.keys())
        if shared:
            groups.append([va[i] - vb[i] for i in shared])
    return _pooled(groups)


def metric_over_seeds(entries: list[dict], key: str) -> dict:
    """An eval_math column without per-problem values (kl_to_ref, token_kl_to_ref, entropy): t over seeds."""
    return over_seeds([e[key] if e is not None else None for e in entries])


def ratio_over_seeds(entries_a: list[dict], entries_b: list[dict], key: str) -> dict:
    """a[key] / b[key] per seed, t over seeds; a seed where b's value is not positive is left out."""
    return over_seeds([a[key] / b[key] if a is not None and b is not None and a[key] is not None
                       and b[key] is not None and b[key] > 0 else None for a, b in zip(entries_a, entries_b)])


def difference_over_seeds(entries_a: list[dict], entries_b: list[dict], key: str) -> dict:
    """a[key] - b[key] per seed, t over seeds."""
    return over_seeds([a[key] - b[key] if a is not None and b is not None and a[key] is not None
                       and b[key] is not None else None for a, b in zip(entries_a, entries_b)])


# ---- curves (stage 1's metrics.jsonl, one {epoch: record} per seed) ---------------------------------------


def evaluated_epochs(curves: list[dict]) -> list[int]:
    """Epochs with a held-out accuracy in every seed's curve."""
    sets = [{e for e, r in c.items() if r.get("heldout_accuracy") is not None} for c in curves]
    return sorted(set.intersection(*sets)) if sets else []


def curve_value(curves: list[dict], epoch: int, key: str) -> dict:
    return over_seeds([c[epoch].get(key) if epoch in c else None for c in curves])


def curve_change(curves: list[dict], later: int, earlier: int, key: str) -> dict:
    """key at epoch `later` minus at epoch `earlier`, per seed, t over seeds."""
    return over_seeds([c[later][key] - c[earlier][key] if later in c and earlier in c and
                       c[later].get(key) is not None and c[earlier].get(key) is not None else None for c in curves])


def e1_shape(curves: list[dict]) -> dict:
    """The four parts of the motivating shape for one loss, with e1 the first evaluated trained epoch and
    E the last: gain acc(e1) - acc(0), later acc(E) - acc(e1), drift KL(E) - KL(e1), collapse H(E) - H(0)."""
    epochs = evaluated_epochs(curves)
    trained = [e for e in epochs if e > 0]
    if 0 not in epochs or len(trained) < 2:
        return {"epochs": epochs, **{k: missing() for k in ("gain", "later", "drift", "collapse")}}
    e1, last = trained[0], trained[-1]
    return {"epochs": epochs, "e1": e1, "last": last,
            "gain": curve_change(curves, e1, 0, "heldout_accuracy"),
            "later": curve_change(curves, last, e1, "heldout_accuracy"),
            "drift": curve_change(curves, last, e1, "kl_to_base"),
            "collapse": curve_change(curves, last, 0, "entropy")}


def e2_constraint(curves: list[dict]) -> dict:
    """One --kl-coef's numbers: peak = per-seed maximum of the held-out accuracy over the evaluated trained
    epochs (the ceiling), final = at the last epoch, drop = acc(E) - acc(e_peak) with e_peak where the
    seed-mean curve peaks (0 when it peaks at the end), and the token KL to the base on D at the end."""
    epochs = [e for e in evaluated_epochs(curves) if e > 0]
    if not epochs:
        return {k: missing() for k in ("peak", "final", "drop", "kl_final")} | {"e_peak": None}
    last = epochs[-1]
    mean_curve = {e: curve_value(curves, e, "heldout_accuracy")["mean"] for e in epochs}
    e_peak = min(epochs, key=lambda e: (-mean_curve[e], e))
    return {"peak": over_seeds([max(c[e]["heldout_accuracy"] for e in epochs) for c in curves]),
            "final": curve_value(curves, last, "heldout_accuracy"),
            "drop": curve_change(curves, last, e_peak, "heldout_accuracy"),
            "kl_final": curve_value(curves, last, "kl_to_base"),
            "e_peak": e_peak}


# ---- verdicts -------------------------------------------------------------------------------------------

VERDICT_RULE = ("A part compares one measured quantity with a threshold on the claimed side: it **holds** when "
                "its whole 95% interval lies on that side, **fails** when its mean lies on the other side (or on "
                "the threshold), and is **unclear** otherwise. A claim is **reproduced** when every part holds, "
                "**not reproduced** when no part holds and at least one fails, and **mixed** otherwise.")


def part(name: str, stat: dict, side: str, threshold: float = 0.0, short: str | None = None,
         signed: bool = True) -> dict:
    """One comparison of a claim: stat on side ('>' or '<') of threshold; short: its name in the summary;
    signed: a difference (printed with its sign), not a ratio."""
    mean, ci = stat["mean"], stat["ci"]
    if mean is None:
        status = "missing"
    elif side == ">":
        status = "holds" if ci is not None and ci[0] > threshold else "fails" if mean <= threshold else "unclear"
    else:
        status = "holds" if ci is not None and ci[1] < threshold else "fails" if mean >= threshold else "unclear"
    return {"name": name, "short": short or name, "side": side, "threshold": threshold, "stat": stat, "status": status,
            "signed": signed}


def verdict(statuses: list[str]) -> str:
    """reproduced / not reproduced / mixed from the parts' statuses; 'not measured' if any part lacks data."""
    if not statuses or "missing" in statuses:
        return "not measured"
    if all(s == "holds" for s in statuses):
        return "reproduced"
    if "holds" not in statuses and "fails" in statuses:
        return "not reproduced"
    return "mixed"


AS_PART = {"reproduced": "holds", "not reproduced": "fails", "mixed": "unclear", "not measured": "missing"}


def claim(cid: str, experiment: str, text: str, rule: str, parts: list[dict], result: str | None = None,
          note: str = "", short: str = "") -> dict:
    return {"id": cid, "experiment": experiment, "claim": text, "short": short or text, "rule": rule, "parts": parts,
            "verdict": result or verdict([p["status"] for p in parts]), "note": note}


MARGIN = 0.02  # "comparable": an accuracy deficit of at most 2 points
KL_FRACTION = 0.5  # "substantially smaller KL": at most half

E1_CLAIM = ("Weakly constrained multi-epoch training on a fixed D gives a fast gain, then drift and entropy "
            "collapse, with held-out accuracy plateauing or falling (the paper's motivating shape).")
E1_RULE = ("Per loss, with e1 the first evaluated epoch and E the last (t-intervals over seeds): fast gain "
           "acc(e1) - acc(0) > 0; no further gain acc(E) - acc(e1) < +0.02; drift KL(E) - KL(e1) > 0 (exact "
           "token KL to the base on D); entropy collapse H(E) - H(0) < 0. A loss shows the shape by the verdict "
           "rule over its four parts, except that a loss whose fast gain fails does not show it (a flat curve "
           "'plateaus' trivially). The claim takes ppo, sapo and ce as its parts (reproduced = holds, mixed = "
           "unclear, not reproduced = fails); mse, the weak teacher, is reported but not judged.")


def loss_shape(loss: str, shape: dict) -> dict:
    """The verdict of one loss's curve (the four parts of E1_RULE)."""
    parts = [part("fast gain acc(e1) - acc(0)", shape["gain"], ">"),
             part("no further gain acc(E) - acc(e1)", shape["later"], "<", MARGIN),
             part("drift KL(E) - KL(e1)", shape["drift"], ">"),
             part("entropy collapse H(E) - H(0)", shape["collapse"], "<")]
    result = "not reproduced" if parts[0]["status"] == "fails" else None  # no gain, no shape
    return claim(f"E1-{loss}", "E1", f"{loss} shows the motivating shape", E1_RULE, parts, result)


def claim_e1(shapes: dict[str, dict], judged=("ppo", "sapo", "ce")) -> dict:
    """shapes: {loss: e1_shape(...)}. The per-loss verdicts are the claim's parts."""
    per_loss = {loss: loss_shape(loss, shapes[loss]) for loss in shapes}
    parts = [{"name": f"{loss} shows the shape", "short": f"{loss} shape, gain", "side": None, "threshold": None,
              "stat": shapes[loss]["gain"] if loss in shapes else missing(), "signed": True,
              "status": AS_PART[per_loss[loss]["verdict"]] if loss in per_loss else "missing"} for loss in judged]
    result = claim("C1", "E1", E1_CLAIM, E1_RULE, parts,
                   short="Weakly constrained teachers: fast gain, then drift and entropy collapse")
    result["per_loss"] = per_loss
    return result


E2_CLAIM = "A tighter constraint (--kl-coef) lowers the ceiling and does not remove the degradation."
E2_RULE = ("At the largest --kl-coef against --kl-coef 0 (t-intervals over seeds): lower ceiling: peak(largest) - "
           "peak(0) < 0, peak = a seed's best held-out accuracy over its evaluated trained epochs; degradation "
           "remains: acc(E) - acc(e_peak) < 0 at the largest --kl-coef, e_peak = where its seed-mean curve peaks "
           "(0, so not below, when it peaks at the end).")


def claim_e2(ceiling_change: dict, drop_at_tightest: dict) -> dict:
    parts = [part("lower ceiling peak(largest) - peak(0)", ceiling_change, "<", short="Δpeak"),
             part("degradation remains acc(E) - acc(e_peak), largest coef", drop_at_tightest, "<", short="drop")]
    return claim("C2", "E2", E2_CLAIM, E2_RULE, parts,
                 short="A tighter KL constraint lowers the ceiling; the drop stays")


E3_CLAIM = "The ERPD student is comparable to or better than the teacher, at substantially smaller KL."
E3_RULE = (f"Against the teacher ERPD distils, the final one: comparable or better: acc(student) - acc(teacher) > "
           f"-{MARGIN} (paired, two-level bootstrap); substantially smaller KL: KL(student) / KL(teacher) < "
           f"{KL_FRACTION} (sequence KL to the base on each model's own samples, per-seed ratio, t-interval).")
E3_BEST_RULE = ("The same parts against the teacher at its best epoch instead: an early-stopped teacher chosen on "
                "its curve's held-out accuracy (an oracle choice, on the same problems), the harder comparison.")


def claim_e3(student_vs_teacher: dict, kl_ratio: dict, best_epoch: bool = False) -> dict:
    which = "best epoch" if best_epoch else "end"
    parts = [part(f"acc(student) - acc(teacher, {which})", student_vs_teacher, ">", -MARGIN, short="Δacc"),
             part(f"KL(student) / KL(teacher, {which})", kl_ratio, "<", KL_FRACTION, short="KL ratio",
                  signed=False)]
    if best_epoch:
        return claim("C3e", "E3", E3_CLAIM + " (against the teacher's best epoch)", E3_BEST_RULE, parts,
                     short="Student ≥ the early-stopped teacher at much smaller KL")
    return claim("C3", "E3", E3_CLAIM, E3_RULE, parts, short="Student ≥ teacher at much smaller KL")


E3B_CLAIM = ("ERPD beats both baselines (on-policy GRPO, conservative off-policy RL on D) at equal samples: "
             "the teacher's token signal, not the trust region alone, makes the gain.")
E3B_RULE = ("Every method used the same number of sampled rollouts. acc(student) - acc(GRPO) > 0 and "
            "acc(student) - acc(conservative) > 0 (paired, two-level bootstrap).")


def claim_e3_samples(vs_grpo: dict, vs_conservative: dict) -> dict:
    parts = [part("acc(student) - acc(GRPO)", vs_grpo, ">", short="Δ GRPO"),
             part("acc(student) - acc(conservative)", vs_conservative, ">", short="Δ conservative")]
    return claim("C3b", "E3", E3B_CLAIM, E3B_RULE, parts, short="ERPD beats both baselines at equal samples")


E3C_CLAIM = "ERPD beats both baselines at no more KL (higher accuracy and smaller KL to the base: Pareto)."
E3C_RULE = ("The two accuracy parts of C3b, and KL(student) - KL(GRPO) < 0 and KL(student) - KL(conservative) < 0 "
            "(sequence KL to the base, per-seed differences, t-intervals).")


def claim_e3_kl(vs_grpo: dict, vs_conservative: dict, kl_vs_grpo: dict, kl_vs_conservative: dict) -> dict:
    parts = [part("acc(student) - acc(GRPO)", vs_grpo, ">", short="Δ GRPO"),
             part("acc(student) - acc(conservative)", vs_conservative, ">", short="Δ conservative"),
             part("KL(student) - KL(GRPO)", kl_vs_grpo, "<", short="ΔKL GRPO"),
             part("KL(student) - KL(conservative)", kl_vs_conservative, "<", short="ΔKL conservative")]
    return claim("C3c", "E3", E3C_CLAIM, E3C_RULE, parts, short="ERPD beats both baselines at no more KL")


E4_CLAIM = "With a weak or degenerate teacher (one that ends at or below the base), the student still beats the base."
E4_RULE = ("Weak teacher: mse (chosen before the runs). acc(student, --signal base) - acc(base) > 0 and "
           "acc(student, --unlearn + --signal unlearned) - acc(base) > 0 (paired, two-level bootstrap). The "
           "claim is about a teacher at or below the base: if the teacher's mean accuracy is above the base's, "
           "the verdict is at most mixed.")


def claim_e4(base_signal_vs_base: dict, unlearned_signal_vs_base: dict, teacher_vs_base: dict) -> dict:
    parts = [part("acc(student, signal base) - acc(base)", base_signal_vs_base, ">", short="Δ base signal"),
             part("acc(student, signal unlearned) - acc(base)", unlearned_signal_vs_base, ">", short="Δ unlearned")]
    result = verdict([p["status"] for p in parts])
    note = ""
    if teacher_vs_base["mean"] is not None and teacher_vs_base["mean"] > 0:
        note = "the teacher ended above the base, so it was not weak: the experiment does not test the claim fully"
        result = "mixed" if result == "reproduced" else result
    return claim("C4", "E4", E4_CLAIM, E4_RULE, parts, result, note, short="A weak teacher's student beats the base")


E5_CLAIM = "Combining several teachers (equal weights, same D) helps further."
E5_RULE = ("acc(student of sapo+ce) - acc(the better single-teacher student of sapo, ce) > 0 and "
           "acc(student of sapo+ce+mse) - acc(the best single-teacher student of sapo, ce, mse) > 0 (paired, "
           "two-level bootstrap; 'better' = higher mean accuracy over seeds, chosen on the same evaluation, "
           "which favours the single teachers).")


def claim_e5(pair_vs_best: dict, triple_vs_best: dict) -> dict:
    parts = [part("acc(sapo+ce) - acc(best of sapo, ce)", pair_vs_best, ">", short="Δ sapo+ce"),
             part("acc(sapo+ce+mse) - acc(best of sapo, ce, mse)", triple_vs_best, ">", short="Δ sapo+ce+mse")]
    return claim("C5", "E5", E5_CLAIM, E5_RULE, parts, short="Combining teachers helps")


E6_CLAIM = ("Rounds compound: the last round's student beats round 1's, and ERPD rounds beat on-policy GRPO on the "
            "same total rollouts (the issue's comparison; the paper describes rounds without a number).")
E6_RULE = ("acc(ERPD, last round) - acc(ERPD, round 1) > 0 and acc(ERPD, last round) - acc(GRPO after the same "
           "number of rollouts) > 0 (paired, two-level bootstrap).")


def claim_e6(last_vs_first: dict, last_vs_grpo: dict) -> dict:
    parts = [part("acc(ERPD, last round) - acc(ERPD, round 1)", last_vs_first, ">", short="Δ round 1"),
             part("acc(ERPD, last round) - acc(GRPO, same rollouts)", last_vs_grpo, ">", short="Δ GRPO")]
    return claim("C6", "E6", E6_CLAIM, E6_RULE, parts, short="Rounds compound and beat GRPO at equal rollouts")


E7_CLAIM = ("The tight trust region is what keeps the student near the base, at no cost in accuracy (the "
            "method's design choice; the paper gives no ablation number).")
E7_RULE = (f"KL(eps no clip) - KL(eps 0.2) > 0 (sequence KL to the base, per-seed difference, t-interval) and "
           f"acc(eps 0.2) - acc(eps no clip) > -{MARGIN} (paired, two-level bootstrap).")


def claim_e7(kl_unclipped_minus_default: dict, default_vs_unclipped: dict) -> dict:
    parts = [part("KL(no clip) - KL(eps 0.2)", kl_unclipped_minus_default, ">", short="ΔKL"),
             part("acc(eps 0.2) - acc(no clip)", default_vs_unclipped, ">", -MARGIN, short="Δacc")]
    return claim("C7", "E7", E7_CLAIM, E7_RULE, parts, short="The tight trust region keeps KL small, at no cost")

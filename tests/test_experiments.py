"""experiments/: the study runner end to end at micro sizes (through the real stage-1 / stage-2 / rounds / eval
subprocesses), the report and its verdicts on synthetic runs with known numbers, the statistics and verdict
rules, and `compare` on synthetic eval files against a direct computation."""

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")  # requirements-experiments.txt (make test installs it)

from eval_math import bootstrap_ci, paired_diff  # noqa: E402
from experiments import analysis, run  # noqa: E402
from runs import ENV, ROOT  # noqa: E402


# ---- the smoke study: the whole path, micro sizes --------------------------------------------------------------


def test_smoke_study_runs_writes_a_report_and_a_figure_then_skips_finished_runs(tmp_path):
    committed = ROOT / "experiments" / "REPORT.md"
    before = committed.read_bytes() if committed.exists() else None
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "--preset", "smoke", "--only", "E3", "--jobs", "2",
           "--out", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "report")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "## Summary" in text and "## E3. The headline" in text and "**C3. Claim:**" in text
    assert re.search(r"\*\*Verdict: (reproduced|not reproduced|mixed|not measured)\*\*", text)
    assert (tmp_path / "report" / "figures" / "e3_accuracy_vs_kl.png").stat().st_size > 1000
    # each run was a subprocess with --seed, its wall time recorded; the committed report was not touched
    step = json.loads((tmp_path / "runs/smoke/steps/seed0/student.json").read_text())
    assert "erpd_stage2.py" in step["command"] and "--seed 0" in step["command"] and step["wall_s"] > 0
    assert (committed.read_bytes() if committed.exists() else None) == before
    # a rerun finds every run finished and runs nothing
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and "5 of 5 steps finished before (cached), 0 to run" in again.stdout


# ---- the report on synthetic runs: every section, figure and verdict ------------------------------------------------

PROBLEMS, K = 50, 8
# accuracy and sequence KL per eval model; chosen so that each claim's verdict is known
EVAL = {"base": (0.40, 0.0), "teacher_best": (0.45, 0.5), "teacher_end": (0.35, 2.0), "student": (0.48, 0.1),
        "grpo": (0.41, 0.2), "conservative": (0.42, 0.15),
        "teacher_mse": (0.35, 0.3), "student_mse": (0.36, 0.05), "student_mse_unlearned": (0.37, 0.05),
        "student_ce": (0.44, 0.1), "student_sapo_ce": (0.52, 0.1), "student_sapo_ce_mse": (0.45, 0.1),
        "erpd_round2": (0.53, 0.2), "grpo_round2": (0.43, 0.4),
        "eps1e+06": (0.47, 0.3), "c1e+06": (0.47, 0.12)}
# held-out accuracy, token KL to the base, entropy at epochs 0, 1, 2 (the smoke preset's curve)
CURVES = {"sapo": ([0.40, 0.46, 0.41], [0.0, 0.02, 0.06], [0.10, 0.09, 0.06]),
          "ppo": ([0.40, 0.45, 0.40], [0.0, 0.03, 0.08], [0.10, 0.08, 0.05]),
          "ce": ([0.40, 0.47, 0.42], [0.0, 0.02, 0.05], [0.10, 0.09, 0.07]),
          "mse": ([0.40, 0.38, 0.35], [0.0, 0.01, 0.02], [0.10, 0.10, 0.10]),
          0.1: ([0.40, 0.43, 0.41], [0.0, 0.01, 0.015], [0.10, 0.095, 0.09])}
EXPECTED = {"C1": "reproduced", "C2": "reproduced", "C3": "reproduced", "C3e": "reproduced", "C3b": "reproduced",
            "C3c": "reproduced",
            "C4": "not reproduced", "C5": "mixed", "C6": "reproduced", "C7": "reproduced"}


def write_curve(folder, values, seed):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"event": "config"}]
    for epoch, (acc, kl, ent) in enumerate(zip(*values)):
        jitter = 0.001 * ((seed + epoch) % 3 - 1)  # seeds differ a little
        lines.append({"event": "epoch", "model": "teacher", "epoch": epoch, "heldout_accuracy": acc + jitter,
                      "kl_to_base": kl + abs(jitter), "entropy": ent + jitter})
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")


def eval_entry(accuracy, kl, seed):
    """K samples on PROBLEMS problems: correct counts spread evenly (a model with more correct answers wins on
    some problems, ties on the rest), a shared difficulty pattern, and a seed offset of one answer."""
    total = round(accuracy * PROBLEMS * K) + seed - 1
    counts = [total // PROBLEMS + (i < total % PROBLEMS) + (1 if i % 2 else -1) for i in range(PROBLEMS)]
    return {"accuracy": sum(counts) / (PROBLEMS * K), "accuracy_ci": [0.0, 1.0], "samples": K,
            "outcomes": [[i, c] for i, c in enumerate(counts)], "pass_at_k": 1.0, "kl_to_ref": kl + 0.01 * seed,
            "token_kl_to_ref": kl / 30, "entropy": 0.08}


def test_report_on_synthetic_runs_has_every_section_figure_and_the_verdicts_its_rules_give(tmp_path):
    steps, layout = run.study(dict(run.PRESETS["smoke"], seeds=[0, 1, 2]), tmp_path / "runs")
    for seed, where in layout["seeds"].items():  # the stage runs: curves and final folders
        for loss, folder in where["curves"].items():
            write_curve(folder, CURVES[loss], seed)
        for coef, folder in where["kl"].items():
            if coef:
                write_curve(folder, CURVES[coef], seed)
    for s in steps:  # the final artefacts: stage 1's manifest, the students' and the rounds' model folders
        if s["kind"] != "eval":
            if s["done"].suffix == ".json":
                s["done"].parent.mkdir(parents=True, exist_ok=True)
                s["done"].write_text("{}")
            else:
                s["done"].mkdir(parents=True, exist_ok=True)
    for s in steps:  # the evaluations, with the models each step names
        if s["kind"] == "eval":
            seed = int(s["name"][len("seed"):s["name"].index("/")])
            argv = s["argv"]() if callable(s["argv"]) else s["argv"]
            names = [a.split("=")[1] for a in argv if a.startswith("--model=")]
            s["done"].parent.mkdir(parents=True, exist_ok=True)
            s["done"].write_text(json.dumps({"models": {n: eval_entry(*EVAL[n], seed) for n in names}}))
    path = run.write_report("synthetic", steps, layout, tmp_path / "runs", tmp_path / "report")
    text = path.read_text()
    verdicts = dict(re.findall(r"\*\*(C\d\w?)\. Claim:\*\*.*?\*\*Verdict: ([a-z ]+)\*\*", text, re.S))
    assert verdicts == EXPECTED
    for eid in ("E1", "E2", "E3", "E4", "E5", "E6", "E7"):
        assert f"## {eid}." in text and f"--only {eid}" in text
    for figure in ("e1_curves", "e2_constraint", "e3_accuracy_vs_kl", "e6_rounds", "e7_trust_region"):
        assert (tmp_path / "report/figures" / f"{figure}.png").stat().st_size > 1000
        assert f"(figures/{figure}.png)" in text
    summary = text.split("## Summary")[1].split("## Statistics")[0]
    assert all(f"| {cid} (" in summary for cid in EXPECTED)
    assert "0.480 [" in text  # the student's accuracy over the three seeds, with its interval


# ---- statistics and verdict rules ------------------------------------------------------------------------------------


def stat(mean, lo=None, hi=None):
    return {"mean": mean, "ci": None if lo is None else [lo, hi], "n": 3, "per_seed": []}


def test_parts_hold_fail_or_are_unclear_by_their_interval_and_mean():
    assert analysis.part("x", stat(0.05, 0.01, 0.09), ">")["status"] == "holds"
    assert analysis.part("x", stat(0.05, -0.01, 0.09), ">")["status"] == "unclear"
    assert analysis.part("x", stat(-0.01, -0.05, 0.03), ">")["status"] == "fails"
    assert analysis.part("x", stat(0.0, -0.05, 0.05), ">")["status"] == "fails"  # on the threshold: fails
    assert analysis.part("x", stat(-0.01, -0.019, -0.001), ">", -0.02)["status"] == "holds"  # "comparable"
    assert analysis.part("x", stat(0.3, 0.2, 0.45), "<", 0.5)["status"] == "holds"
    assert analysis.part("x", stat(0.6, 0.2, 0.9), "<", 0.5)["status"] == "fails"
    assert analysis.part("x", stat(0.3), "<", 0.5)["status"] == "unclear"  # one seed: no interval, never holds
    assert analysis.part("x", analysis.missing(), "<")["status"] == "missing"


def test_verdict_combines_the_parts():
    assert analysis.verdict(["holds", "holds"]) == "reproduced"
    assert analysis.verdict(["holds", "unclear"]) == "mixed"
    assert analysis.verdict(["holds", "fails"]) == "mixed"
    assert analysis.verdict(["unclear", "unclear"]) == "mixed"
    assert analysis.verdict(["unclear", "fails"]) == "not reproduced"
    assert analysis.verdict(["fails", "fails"]) == "not reproduced"
    assert analysis.verdict(["holds", "missing"]) == "not measured"


def test_claim_rules():
    c3 = analysis.claim_e3(stat(0.01, -0.015, 0.03), stat(0.2, 0.1, 0.3))
    assert c3["verdict"] == "reproduced" and "-0.02" in c3["rule"] and "0.5" in c3["rule"]
    assert analysis.claim_e3(stat(-0.05, -0.08, -0.03), stat(0.8, 0.6, 1.0))["verdict"] == "not reproduced"
    assert analysis.claim_e3(stat(0.01, -0.015, 0.03), stat(0.8, 0.6, 1.0))["verdict"] == "mixed"
    # E4: a teacher above the base does not test the claim: at most mixed
    weak, strong = stat(-0.05, -0.07, -0.03), stat(0.03, 0.01, 0.05)
    assert analysis.claim_e4(stat(0.03, 0.01, 0.05), stat(0.04, 0.02, 0.06), weak)["verdict"] == "reproduced"
    capped = analysis.claim_e4(stat(0.03, 0.01, 0.05), stat(0.04, 0.02, 0.06), strong)
    assert capped["verdict"] == "mixed" and "not weak" in capped["note"]
    # E1: ppo, sapo and ce are judged; mse, the weak teacher, is not
    good = {"gain": stat(0.05, 0.02, 0.08), "later": stat(-0.04, -0.06, -0.02), "drift": stat(0.04, 0.03, 0.05),
            "collapse": stat(-0.03, -0.04, -0.02)}
    flat = {"gain": stat(-0.01, -0.03, 0.01), "later": stat(0.0, -0.01, 0.01), "drift": stat(0.0, -0.01, 0.01),
            "collapse": stat(0.0, -0.01, 0.01)}
    assert analysis.claim_e1({"ppo": good, "sapo": good, "ce": good, "mse": flat})["verdict"] == "reproduced"
    assert analysis.claim_e1({"ppo": good, "sapo": flat, "ce": good, "mse": flat})["verdict"] == "mixed"
    assert analysis.claim_e1({"ppo": flat, "sapo": flat, "ce": flat, "mse": good})["verdict"] == "not reproduced"


def test_curve_numbers():
    curves = [{0: {"heldout_accuracy": 0.4, "kl_to_base": 0.0, "entropy": 0.1},
               2: {"heldout_accuracy": 0.5 + d, "kl_to_base": 0.02, "entropy": 0.09},
               3: {"kl_to_base": 0.03, "entropy": 0.08},  # not evaluated
               4: {"heldout_accuracy": 0.45, "kl_to_base": 0.05, "entropy": 0.05}} for d in (0.0, 0.01, 0.02)]
    shape = analysis.e1_shape(curves)
    assert (shape["e1"], shape["last"]) == (2, 4)
    assert shape["gain"]["mean"] == pytest.approx(0.11) and shape["later"]["mean"] == pytest.approx(-0.06)
    assert shape["drift"]["mean"] == pytest.approx(0.03) and shape["collapse"]["mean"] == pytest.approx(-0.05)
    e2 = analysis.e2_constraint(curves)
    assert e2["e_peak"] == 2 and e2["peak"]["mean"] == pytest.approx(0.51)
    assert e2["drop"]["mean"] == pytest.approx(-0.06)
    assert analysis.best_epoch(curves[0], 2) == 2 and analysis.best_epoch({0: curves[0][0]}, 2) is None


def test_intervals():
    s = analysis.over_seeds([1.0, 2.0, 3.0])  # sd 1: half-width t(2) / sqrt(3)
    assert s["mean"] == 2.0 and s["ci"] == pytest.approx([2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5])
    assert analysis.over_seeds([1.0])["ci"] is None and analysis.over_seeds([None])["mean"] is None
    assert analysis.t975(1) == 12.706 and analysis.t975(100) == pytest.approx(1.984, abs=0.002)
    values = [0.1 * (i % 7) for i in range(40)]
    assert analysis.seeds_bootstrap_ci([values], seed=3) == bootstrap_ci(values, 3)  # one seed: eval_math's own
    agree = analysis.seeds_bootstrap_ci([values, values, values])
    apart = analysis.seeds_bootstrap_ci([values, [v + 0.2 for v in values], [v + 0.4 for v in values]])
    assert apart[1] - apart[0] > 2 * (agree[1] - agree[0])  # the spread between seeds widens the interval
    mean = sum(values) / len(values)
    assert agree[0] < mean < agree[1] and apart[0] < mean + 0.2 < apart[1]


# ---- compare --------------------------------------------------------------------------------------------------------


def entry(counts: dict, k: int = 4) -> dict:
    n = len(counts)
    acc = sum(counts.values()) / (n * k)
    return {"accuracy": acc, "accuracy_ci": [acc - 0.1, acc + 0.1], "samples": k,
            "outcomes": [[i, c] for i, c in sorted(counts.items())], "pass_at_k": 0.9, "kl_to_ref": 0.25,
            "token_kl_to_ref": 0.01, "entropy": 0.08}


def write_eval(path, models: dict, **config):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": models, "config": {"samples": 4, "seed": 1, **config}}))


def vs_column(out: str, label: str) -> tuple[float, float, float]:
    line = next(line for line in out.splitlines() if line.startswith(label + " "))
    mean, lo, hi = re.findall(r"\]\s+([+-]\d\.\d+) \[([+-]\d\.\d+), ([+-]\d\.\d+)\]", line)[0]
    return float(mean), float(lo), float(hi)


def test_compare_pairs_by_problem_id_like_a_direct_computation(tmp_path, capsys):
    a = {i: (i * 7) % 5 for i in range(30)}  # problems 0..29, counts of 4
    b = {i: (i * 3 + 1) % 5 for i in range(10, 40)}  # problems 10..39: 20 shared
    write_eval(tmp_path / "a" / "eval.json", {"base": entry(a), "x": entry(b)})
    write_eval(tmp_path / "b.json", {"y": entry(b)}, seed=2)
    run.compare([str(tmp_path / "a") + ":base", f"Y={tmp_path / 'b.json'}:y", "--baseline", "Y"])
    out = capsys.readouterr().out
    shared = sorted(a.keys() & b.keys())
    direct = sum(a[i] / 4 - b[i] / 4 for i in shared) / len(shared)
    mean, ci = paired_diff(entry(a), entry(b))
    assert mean == pytest.approx(direct)
    assert vs_column(out, "base") == pytest.approx((direct, *ci), abs=6e-4)
    assert vs_column(out, "Y") == (0.0, 0.0, 0.0)
    assert "differs from Y in seed" in out
    # a folder: every model in it, against the first row by default
    run.compare([str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert vs_column(out, "x")[0] == pytest.approx(paired_diff(entry(b), entry(a))[0], abs=6e-4)


def test_compare_pools_seeds_given_with_commas(tmp_path, capsys):
    for seed in (0, 1):
        write_eval(tmp_path / f"s{seed}.json", {"base": entry({i: (i + seed) % 5 for i in range(20)}),
                                               "new": entry({i: min(4, (i + seed) % 5 + 1) for i in range(20)})})
    run.compare([f"NEW={tmp_path / 's0.json'}:new,{tmp_path / 's1.json'}:new",
                 f"BASE={tmp_path / 's0.json'}:base,{tmp_path / 's1.json'}:base", "--baseline", "BASE"])
    out = capsys.readouterr().out
    per_seed = [paired_diff(json.loads((tmp_path / f"s{s}.json").read_text())["models"]["new"],
                            json.loads((tmp_path / f"s{s}.json").read_text())["models"]["base"])[0] for s in (0, 1)]
    assert vs_column(out, "NEW")[0] == pytest.approx(sum(per_seed) / 2, abs=6e-4)


# ---- the runner's bookkeeping ----------------------------------------------------------------------------------------


def test_selection_pulls_in_dependencies_and_partial_runs_resume(tmp_path):
    steps, _ = run.study(run.PRESETS["smoke"], tmp_path)
    names = {s["name"] for s in run.select(steps, ["E7"])}
    # E7 compares with E3's default student, evaluated with E3's models
    assert {"seed0/eps1e+06", "seed0/eval-e7", "seed0/eval-e3", "seed0/teacher-sapo", "seed0/grpo"} <= names
    assert "seed0/teacher-ppo" not in names and "seed0/kl-0.1" not in names
    student = next(s for s in steps if s["name"] == "seed0/student")
    assert run.status(student) == "new" and run.command(student)[-1] != "--resume"
    student["out"].mkdir(parents=True)
    (student["out"] / "metrics.jsonl").write_text("{}\n")
    assert run.status(student) == "partial" and run.command(student)[-1] == "--resume"
    (student["out"] / "student").mkdir()
    assert run.status(student) == "done"
    grpo = next(s for s in steps if s["name"] == "seed0/grpo")  # erpd_rounds.py resumes its own rounds
    grpo["out"].mkdir(parents=True)
    (grpo["out"] / "round1").mkdir()
    assert run.command(grpo)[-1] != "--resume"

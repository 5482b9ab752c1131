"""REPORT.md and figures/*.png from the study's finished runs: a summary of the claims with their verdicts,
then one section per experiment (command, figure, table, what it shows), the statistics, the machine, the
time and the commit. Every number comes from analysis.py; nothing here is written by hand.
"""

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from experiments import analysis  # noqa: E402

LOSSES = ("sapo", "ppo", "ce", "mse")
E3_MODELS = [("base", "base"), ("teacher_best", "teacher, best epoch"), ("teacher_end", "teacher, end"),
             ("student", "ERPD student"), ("grpo", "on-policy GRPO"),
             ("conservative", "conservative off-policy RL on D")]
E4_MODELS = [("base", "base"), ("teacher_mse", "mse teacher (weak)"), ("student_mse", "student, --signal base"),
             ("student_mse_unlearned", "student, --unlearn + --signal unlearned")]
E5_SINGLE = [("student", "sapo"), ("student_ce", "ce"), ("student_mse", "mse")]
E5_COMBINED = [("student_sapo_ce", "sapo + ce"), ("student_sapo_ce_mse", "sapo + ce + mse")]


# ---- formatting ----------------------------------------------------------------------------------------------


def fmt(stat: dict, digits: int = 3, signed: bool = False) -> str:
    """mean [lo, hi] (no interval with one seed); n/a when not measured."""
    if stat is None or stat["mean"] is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f.format(stat["mean"]) + (f" [{f.format(stat['ci'][0])}, {f.format(stat['ci'][1])}]" if stat["ci"] else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parts_text(c: dict) -> str:
    """The measured parts of a claim, one after the other, each with the status it got."""
    out = []
    for p in c["parts"]:
        rule = f" (claimed {p['side']} {p['threshold']:+g})" if p["side"] else ""
        out.append(f"{p['name']}: {fmt(p['stat'], signed=p['signed'])}{rule} → {p['status']}" if p["side"]
                   else f"{p['name']} → {p['status']}")
    return "; ".join(out)


MARKS = {"holds": "✓", "fails": "✗", "unclear": "?", "missing": "n/a"}


def summary_text(c: dict) -> str:
    """The parts in a few words for the summary table: value [CI] and ✓ (holds) / ✗ (fails) / ? (unclear)."""
    return "; ".join(f"{p['short']} {fmt(p['stat'], signed=p['signed'])} {MARKS[p['status']]}" for p in c["parts"])


def claim_block(c: dict) -> str:
    lines = [f"**{c['id']}. Claim:** {c['claim']}", "",
             f"*Rule:* {c['rule']}", "",
             f"*Measured:* {parts_text(c)}", "",
             f"**Verdict: {c['verdict']}**" + (f" ({c['note']})" if c["note"] else "")]
    return "\n".join(lines)


# ---- the data: every seed's evaluations and curves -------------------------------------------------------------


class Results:
    """What the finished runs of a study hold, by seed; missing files give None (not yet run)."""

    def __init__(self, layout: dict):
        self.layout = layout
        self.seeds = sorted(layout["seeds"])
        self.models = {}
        for seed in self.seeds:
            merged = {}
            for path in layout["seeds"][seed]["evals"].values():
                if Path(path).is_file():  # every eval of a seed used the same problems and seed: they pair
                    merged.update(analysis.read_models(path))
            self.models[seed] = merged

    def entries(self, name: str) -> list:
        return [self.models[s].get(name) for s in self.seeds]

    def has(self, *names) -> bool:
        return all(any(e is not None for e in self.entries(n)) for n in names)

    def curves(self, run_key, key=None) -> list[dict]:
        """One {epoch: record} per seed whose stage-1 run finished (its shards' manifest, written last)."""
        out = []
        for s in self.seeds:
            run = self.layout["seeds"][s][run_key][key] if key is not None else self.layout["seeds"][s][run_key]
            if (Path(run) / "shards" / "manifest.json").is_file():
                out.append(analysis.read_epochs(run))
        return out

    def accuracy(self, name):
        return analysis.accuracy_over_seeds(self.entries(name))

    def diff(self, a, b):
        return analysis.paired_over_seeds(self.entries(a), self.entries(b))

    def metric(self, name, key):
        return analysis.metric_over_seeds(self.entries(name), key)

    def kl_diff(self, a, b):
        return analysis.difference_over_seeds(self.entries(a), self.entries(b), "kl_to_ref")


# ---- figures ------------------------------------------------------------------------------------------------------


def save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def band(ax, curves, key, label):
    """Seed-mean curve of `key` over the epochs every seed has, with its t-interval as a band."""
    epochs = sorted(set.intersection(*[{e for e, r in c.items() if r.get(key) is not None} for c in curves]))
    if not epochs:
        return
    stats = [analysis.curve_value(curves, e, key) for e in epochs]
    line, = ax.plot(epochs, [s["mean"] for s in stats], marker="o", ms=3, label=label)
    if all(s["ci"] for s in stats):
        ax.fill_between(epochs, [s["ci"][0] for s in stats], [s["ci"][1] for s in stats], alpha=0.2,
                        color=line.get_color())


def figure_e1(curves: dict, path: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for loss, cs in curves.items():
        for ax, key in zip(axes, ("heldout_accuracy", "kl_to_base", "entropy")):
            band(ax, cs, key, loss)
    titles = ("held-out accuracy (T = 1)", "exact token KL(teacher || base) on D", "token entropy on D")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("stage-1 epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(title="teacher loss")
    return save(fig, path)


def errorbar(ax, x: dict, y: dict, label: str, **kw):
    """One point: mean with its intervals in both axes (none where there is no interval)."""
    xerr = [[x["mean"] - x["ci"][0]], [x["ci"][1] - x["mean"]]] if x["ci"] else None
    yerr = [[y["mean"] - y["ci"][0]], [y["ci"][1] - y["mean"]]] if y["ci"] else None
    ax.errorbar([x["mean"]], [y["mean"]], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=label, **kw)


KL_LINEAR_BELOW = 0.1  # figures' KL axes: linear from 0 to here (the base sits at 0), logarithmic above


def figure_points(points: list[tuple[str, dict, dict]], xlabel: str, title: str, path: Path) -> str:
    """Accuracy against KL, one point per model, with 95% intervals in both axes."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, kl, acc in points:
        if kl["mean"] is not None and acc["mean"] is not None:
            errorbar(ax, kl, acc, label)
            ax.annotate(label, (kl["mean"], acc["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("symlog", linthresh=KL_LINEAR_BELOW)  # KL spans 0 to ~100: the near-base models would overlap
    ax.set_xlabel(f"{xlabel}, log scale above {KL_LINEAR_BELOW:g}")
    ax.set_ylabel("held-out accuracy (T = 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def figure_e2(rows: list[tuple[float, dict]], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (coef, r) in enumerate(rows):
        if r["kl_final"]["mean"] is None:
            continue
        errorbar(ax, r["kl_final"], r["peak"], f"kl-coef {coef:g}: peak", color=f"C{i}")
        errorbar(ax, r["kl_final"], r["final"], f"kl-coef {coef:g}: end", color=f"C{i}", mfc="none")
    ax.set_xscale("symlog", linthresh=KL_LINEAR_BELOW / 100)  # from ~0.003 (kl-coef 1) to ~4 (kl-coef 0)
    ax.set_xlabel(f"exact token KL to the base on D, at the end, log scale above {KL_LINEAR_BELOW / 100:g}")
    ax.set_ylabel("held-out accuracy (T = 1)")
    ax.set_title("E2: peak (filled) and final (open) accuracy against KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def figure_e6(rounds: list[dict], path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("ERPD", "GRPO"):
        xs = [r["rollouts"] for r in rounds if r[method]["acc"]["mean"] is not None]
        for ax, key in zip(axes, ("acc", "kl")):
            stats = [r[method][key] for r in rounds if r[method]["acc"]["mean"] is not None]
            ax.errorbar(xs, [s["mean"] for s in stats], capsize=3, marker="o", label=method,
                        yerr=[[s["mean"] - s["ci"][0] for s in stats], [s["ci"][1] - s["mean"] for s in stats]]
                        if all(s["ci"] for s in stats) else None)
    axes[0].set_ylabel("held-out accuracy (T = 1)")
    axes[1].set_ylabel("sequence KL to the original base")
    for ax in axes:
        ax.set_xlabel("sampled rollouts, in units of |D| (ERPD round k: k x |D|)")
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


# ---- the experiments ---------------------------------------------------------------------------------------------


def e1(res: Results, fig_dir: Path) -> dict:
    curves = {loss: res.curves("curves", loss) for loss in LOSSES}
    curves = {loss: cs for loss, cs in curves.items() if cs}
    if not curves:
        return {}
    shapes = {loss: analysis.e1_shape(cs) for loss, cs in curves.items()}
    c = analysis.claim_e1(shapes)
    rows, shows = [], []
    for loss, cs in curves.items():
        s = shapes[loss]
        if "e1" not in s:
            continue
        e1_, last = s["e1"], s["last"]
        acc = [analysis.curve_value(cs, e, "heldout_accuracy") for e in (0, e1_, last)]
        kl = [analysis.curve_value(cs, e, "kl_to_base") for e in (e1_, last)]
        ent = [analysis.curve_value(cs, e, "entropy") for e in (0, last)]
        rows.append([loss, *[fmt(a) for a in acc], *[fmt(k, 4) for k in kl], *[fmt(h, 4) for h in ent],
                     c["per_loss"][loss]["verdict"] + ("" if loss in ("ppo", "sapo", "ce") else " (not judged)")])
        shows.append(f"{loss}: accuracy {acc[0]['mean']:.3f} → {acc[1]['mean']:.3f} at epoch {e1_} → "
                     f"{acc[2]['mean']:.3f} at epoch {last}; KL {kl[0]['mean']:.4f} → {kl[1]['mean']:.4f}; "
                     f"entropy {ent[0]['mean']:.4f} → {ent[1]['mean']:.4f}.")
    any_shape = next(iter(shapes.values()))
    header = ["loss", "acc, epoch 0", f"acc, epoch {any_shape.get('e1')}", f"acc, epoch {any_shape.get('last')}",
              f"KL, epoch {any_shape.get('e1')}", f"KL, epoch {any_shape.get('last')}", "entropy, epoch 0",
              f"entropy, epoch {any_shape.get('last')}", "shape"]
    detail = "\n".join(f"- {loss}: {parts_text(c['per_loss'][loss])}" for loss in c["per_loss"])
    return {"claims": [c], "figure": figure_e1(curves, fig_dir / "e1_curves.png"),
            "table": table(header, rows) + "\n\nPer loss, the parts of the shape:\n\n" + detail,
            "shows": " ".join(shows)}


def e2(res: Results, fig_dir: Path) -> dict:
    coefs = sorted(res.layout["seeds"][res.seeds[0]]["kl"])
    per = {coef: res.curves("kl", coef) for coef in coefs}
    if not all(per.values()):
        return {}
    numbers = [(coef, analysis.e2_constraint(per[coef])) for coef in coefs]
    tightest = dict(numbers)[coefs[-1]]
    ceiling = analysis.over_seeds([a - b for a, b in zip(tightest["peak"]["per_seed"],
                                                         numbers[0][1]["peak"]["per_seed"])])
    c = analysis.claim_e2(ceiling, tightest["drop"])
    rows = [[f"{coef:g}", fmt(r["peak"]), fmt(r["final"]),
             fmt(r["drop"], signed=True) + f" (peak at epoch {r['e_peak']})", fmt(r["kl_final"], 4)]
            for coef, r in numbers]
    shows = (f"Peak accuracy goes from {numbers[0][1]['peak']['mean']:.3f} at --kl-coef 0 to "
             f"{numbers[-1][1]['peak']['mean']:.3f} at {coefs[-1]:g}, final accuracy from "
             f"{numbers[0][1]['final']['mean']:.3f} to {numbers[-1][1]['final']['mean']:.3f}, and the KL at the end "
             f"from {numbers[0][1]['kl_final']['mean']:.4f} to {numbers[-1][1]['kl_final']['mean']:.4f}.")
    return {"claims": [c], "figure": figure_e2(numbers, fig_dir / "e2_constraint.png"),
            "table": table(["--kl-coef", "peak accuracy", "final accuracy", "final - at the peak epoch",
                            "token KL to base on D, end"], rows), "shows": shows}


def model_rows(res: Results, models, reference: str) -> list[list[str]]:
    """One row per model: accuracy, paired difference to `reference`, KL and entropy columns."""
    return [[label, fmt(res.accuracy(name)), fmt(res.diff(name, reference), signed=True),
             fmt(res.metric(name, "kl_to_ref"), 3), fmt(res.metric(name, "token_kl_to_ref"), 4),
             fmt(res.metric(name, "entropy"), 4)] for name, label in models if res.has(name)]


MODEL_HEADER = ["model", "accuracy", "vs {}", "sequence KL to base", "token KL to base", "entropy"]


def header(ref_label):
    return [h.format(ref_label) for h in MODEL_HEADER]


def e3(res: Results, fig_dir: Path) -> dict:
    names = [n for n, _ in E3_MODELS]
    if not res.has(*names):
        return {}
    acc = {n: res.accuracy(n) for n in names}
    kl = {n: res.metric(n, "kl_to_ref") for n in names}
    claims = [analysis.claim_e3(res.diff("student", "teacher_end"), analysis.ratio_over_seeds(
                  res.entries("student"), res.entries("teacher_end"), "kl_to_ref")),
              analysis.claim_e3(res.diff("student", "teacher_best"), analysis.ratio_over_seeds(
                  res.entries("student"), res.entries("teacher_best"), "kl_to_ref"), best_epoch=True),
              analysis.claim_e3_samples(res.diff("student", "grpo"), res.diff("student", "conservative")),
              analysis.claim_e3_kl(res.diff("student", "grpo"), res.diff("student", "conservative"),
                                   res.kl_diff("student", "grpo"), res.kl_diff("student", "conservative"))]
    best = [analysis.best_epoch(analysis.read_epochs(res.layout["seeds"][s]["curves"]["sapo"]),
                                res.layout["seeds"][s]["snapshot_every"]) for s in res.seeds]
    figure = figure_points([(label, kl[n], acc[n]) for n, label in E3_MODELS],
                           "sequence KL to the base (own samples)", "E3: accuracy against KL, equal rollouts",
                           fig_dir / "e3_accuracy_vs_kl.png")
    shows = (f"The student reaches {acc['student']['mean']:.3f} at KL {kl['student']['mean']:.3f}; the teacher "
             f"{acc['teacher_best']['mean']:.3f} at its best epoch (KL {kl['teacher_best']['mean']:.3f}) and "
             f"{acc['teacher_end']['mean']:.3f} at the end (KL {kl['teacher_end']['mean']:.3f}); GRPO "
             f"{acc['grpo']['mean']:.3f} (KL {kl['grpo']['mean']:.3f}); conservative off-policy RL "
             f"{acc['conservative']['mean']:.3f} (KL {kl['conservative']['mean']:.3f}); the base "
             f"{acc['base']['mean']:.3f}. The teacher's best epoch per seed: {', '.join(map(str, best))} (chosen on "
             f"its curve's held-out accuracy, on the same problems: this favours the teacher).")
    pairs = table(["comparison", "accuracy difference (paired)", "sequence KL difference"],
                  [[f"student - {label}", fmt(res.diff("student", n), signed=True), fmt(res.kl_diff("student", n),
                                                                                       signed=True)]
                   for n, label in E3_MODELS if n not in ("base", "student")])
    return {"claims": claims, "figure": figure, "shows": shows,
            "table": table(header("base"), model_rows(res, E3_MODELS, "base")) + "\n\n" + pairs}


def e4(res: Results, fig_dir: Path) -> dict:
    names = [n for n, _ in E4_MODELS]
    if not res.has(*names):
        return {}
    c = analysis.claim_e4(res.diff("student_mse", "base"), res.diff("student_mse_unlearned", "base"),
                          res.diff("teacher_mse", "base"))
    shows = (f"The mse teacher ends at {res.accuracy('teacher_mse')['mean']:.3f} against the base's "
             f"{res.accuracy('base')['mean']:.3f}; its students reach {res.accuracy('student_mse')['mean']:.3f} "
             f"(--signal base) and {res.accuracy('student_mse_unlearned')['mean']:.3f} (--signal unlearned).")
    return {"claims": [c], "table": table(header("base"), model_rows(res, E4_MODELS, "base")), "shows": shows}


def e5(res: Results, fig_dir: Path) -> dict:
    names = [n for n, _ in E5_SINGLE + E5_COMBINED]
    if not res.has(*names):
        return {}
    acc = {n: res.accuracy(n) for n in names}
    best2 = max(("student", "student_ce"), key=lambda n: acc[n]["mean"])
    best3 = max(("student", "student_ce", "student_mse"), key=lambda n: acc[n]["mean"])
    c = analysis.claim_e5(res.diff("student_sapo_ce", best2), res.diff("student_sapo_ce_mse", best3))
    label = dict(E5_SINGLE)
    rows = model_rows(res, [(n, f"student of {t}") for n, t in E5_SINGLE + E5_COMBINED], best2)
    shows = (f"The better single-teacher student is {label[best2]}'s ({acc[best2]['mean']:.3f}); sapo + ce reaches "
             f"{acc['student_sapo_ce']['mean']:.3f}, sapo + ce + mse {acc['student_sapo_ce_mse']['mean']:.3f} "
             f"(the best single of the three: {label[best3]}).")
    return {"claims": [c], "table": table(header(f"student of {label[best2]}"), rows), "shows": shows}


def e6(res: Results, fig_dir: Path) -> dict:
    last = res.layout["erpd_rounds"]
    erpd = ["base", "student"] + [f"erpd_round{k}" for k in range(2, last + 1)]
    grpo = ["base", "grpo"] + [f"grpo_round{k}" for k in range(2, last + 1)]
    if not res.has(*erpd, *grpo):
        return {}
    rounds = [{"round": k, "rollouts": k,
               "ERPD": {"acc": res.accuracy(e), "kl": res.metric(e, "kl_to_ref")},
               "GRPO": {"acc": res.accuracy(g), "kl": res.metric(g, "kl_to_ref")}, "diff": res.diff(e, g)}
              for k, (e, g) in enumerate(zip(erpd, grpo))]
    c = analysis.claim_e6(res.diff(erpd[-1], "student"), res.diff(erpd[-1], grpo[-1]))
    r = res.layout["grpo_rounds"]
    rows = [[str(x["round"]), f"{x['rollouts']} x D", fmt(x["ERPD"]["acc"]), fmt(x["ERPD"]["kl"]),
             fmt(x["GRPO"]["acc"]) + ("" if x["round"] == 0 else f" (after {x['round'] * r} GRPO rounds)"),
             fmt(x["GRPO"]["kl"]), fmt(x["diff"], signed=True)] for x in rounds]

    def chain(method, key):
        return " → ".join("n/a" if x[method][key]["mean"] is None else f"{x[method][key]['mean']:.3f}"
                          for x in rounds)
    shows = (f"ERPD goes {chain('ERPD', 'acc')} over rounds 0..{last} (KL to the original base "
             f"{chain('ERPD', 'kl')}); GRPO on the same rollouts {chain('GRPO', 'acc')} (KL {chain('GRPO', 'kl')}).")
    return {"claims": [c], "figure": figure_e6(rounds, fig_dir / "e6_rounds.png"),
            "table": table(["round", "rollouts", "ERPD accuracy", "ERPD KL to original base", "GRPO accuracy",
                            "GRPO KL to original base", "ERPD - GRPO (paired)"], rows), "shows": shows}


def e7(res: Results, fig_dir: Path) -> dict:
    settings = [("student", "eps 0.2, c 2 (defaults)")] + [(name, label) for label, name, _ in res.layout["e7"]]
    if not res.has(*[n for n, _ in settings]):
        return {}
    no_clip = next((name for label, name, _ in res.layout["e7"] if name.startswith("eps") and "no clip" in label), None)
    c = analysis.claim_e7(res.kl_diff(no_clip, "student"), res.diff("student", no_clip)) if no_clip else None
    figure = figure_points([(label, res.metric(n, "kl_to_ref"), res.accuracy(n)) for n, label in settings],
                           "sequence KL to the base (own samples)", "E7: stage-2 trust region",
                           fig_dir / "e7_trust_region.png")
    shows = "; ".join(f"{label}: {res.accuracy(n)['mean']:.3f} at KL {res.metric(n, 'kl_to_ref')['mean']:.3f}"
                      for n, label in settings) + "."
    return {"claims": [c] if c else [], "figure": figure,
            "table": table(header("eps 0.2, c 2"), model_rows(res, settings, "student")), "shows": shows}


def grpo_steps(layout: dict) -> int:
    """On-policy GRPO's optimizer steps over |D| rollouts: per round, its share of D in global batches."""
    rounds = layout["grpo_rounds"]
    return rounds * -(-(layout["rollouts"] // rounds) // layout["batch_size"])


def values(xs) -> str:
    return ", ".join("no clip (1e6)" if x >= 1e6 else f"{x:g}" for x in xs)


SECTIONS = [  # (id, title, build, what runs: a function of the preset)
    ("E1", "Extraction curves", e1, lambda p, layout:
     f"Stage 1 with the ppo (eps_high 10), sapo, ce and mse losses on the same D per seed, {p['curve_epochs']} "
     f"epochs, with the held-out accuracy every {p['eval_every']} epochs, and the exact token KL to the base on D "
     "and the token entropy every epoch (the runs' metrics.jsonl)."),
    ("E2", "Tightening the constraint", e2, lambda p, layout:
     f"The sapo teacher with --kl-coef 0 (E1's run) and {values(p['kl_coefs'])}, on the same D, "
     f"{p['curve_epochs']} epochs each."),
    ("E3", "The headline, as KL efficiency", e3, lambda p, layout:
     "Every method samples the same number of rollouts, |D|: the base; the sapo teacher at its best curve epoch "
     "and at the end; the ERPD student (the stage-2 defaults); on-policy GRPO (erpd_rounds.py --stage1-only: "
     f"{p['grpo_rounds']} rounds of fresh samples from the current policy, |D| in all, one epoch each, PPO clip "
     "0.2); conservative off-policy RL on D (stage 2 with --signal none --alpha 1: A_t = A_seq, eps 0.2). The "
     "last one tests whether the teacher's token signal, rather than the trust region alone, makes the gain. "
     f"Equal rollouts are not equal updates: GRPO takes {grpo_steps(layout)} optimizer steps in all, the teacher "
     f"{-(-layout['rollouts'] // layout['batch_size'])} per epoch."),
    ("E4", "Weak and degenerate teachers", e4, lambda p, layout:
     "The mse teacher of E1 (trained with --unlearn too) distilled with --signal base and with --signal unlearned."),
    ("E5", "Several teachers", e5, lambda p, layout:
     "Students of sapo + ce and of sapo + ce + mse (equal weights, the same D) against each single-teacher "
     "student."),
    ("E6", "Rounds", e6, lambda p, layout:
     f"erpd_rounds.py --rounds {p['erpd_rounds']}: each round's student is the next round's base, with a fresh D "
     "sampled from it (round 1 is E3's run); on-policy GRPO continued (erpd_rounds.py --stage1-only) to the same "
     "total rollouts. KL is to the original base."),
    ("E7", "Stage-2 trust region", e7, lambda p, layout:
     f"Stage 2 on the sapo teacher with eps in {{{values([0.2] + p['eps'])}}} (c = 2) and clip c in "
     f"{{{values([2.0] + p['clip_c'])}}} (eps = 0.2). 'No clip' is the value 1e6: far beyond any ratio "
     "(|log rho| <= 20 in this code) or token signal, so it never binds."),
]

STATISTICS = """Accuracy is mean@k on the held-out problems at temperature 1 (eval_math.py; the curves: the stage
scripts' held-out accuracy every few epochs). Every number is a mean over the seeds with its 95% interval:

- accuracy and paired accuracy differences: per seed, from every problem's outcome (differences paired by
  problem id, as eval_math.paired_diff pairs them); over seeds, the mean of the per-seed values with a
  two-level percentile bootstrap (2,000 resamples: the seeds with replacement, then each drawn seed's problems
  with replacement), so that both the training seed and the finite problem set are in the interval;
- everything else (KL, entropy, ratios, the curves' values and their differences): one number per seed, mean
  with a Student-t interval on n - 1 degrees of freedom (no interval with one seed).

All held-out evaluations of one seed use the same problems and sampling seed, so its models pair across
eval files; each seed samples with its own eval seed, so even the base's accuracy varies across seeds (by
sampling alone). "Sequence KL" is
eval_math's kl_to_ref (sum over a response of log pi - log pi_base, on the model's own samples, averaged);
"token KL" is the exact per-token KL over the vocabulary. The curves' KL is the exact token KL to the base on
D's states (the stage scripts' kl_to_base)."""


# ---- the report ---------------------------------------------------------------------------------------------------


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def section(eid: str, title: str, what: str, body: dict, mine: list[dict], wall: float, meta: dict,
            first_seed) -> str:
    """One experiment's section: what runs, how to run it, and once it has finished its figure, table,
    reading and claims."""
    lines = [f"## {eid}. {title}", "", what, ""]
    if not mine:
        return "\n".join(lines + [f"Not in the `{meta['preset']}` preset (its experiments: "
                                  f"{', '.join(meta['experiments'])})."])
    if not body:
        lines += [f"Not finished: {sum(s['done'].exists() for s in mine)} of {len(mine)} steps done; the command "
                  "below runs the rest.", ""]
    lines += [f"Run: `{meta['command']} --only {eid}` (finished runs are skipped)" +
              (f"; step time {minutes(wall)}, steps shared with other experiments included" if wall else ""), "",
              f"<details><summary>The runs it makes for seed {first_seed} (the other seeds differ in --seed, data "
              "seeds and folders)</summary>", "", "```",
              *[s["shown"] for s in mine if s["name"].startswith(f"seed{first_seed}/")], "```", "", "</details>"]
    if body:
        if body.get("figure"):
            lines += ["", f"![{eid}](figures/{body['figure']})"]
        lines += ["", body["table"], "", f"**What it shows.** {body['shows']}"]
        lines += [block for c in body["claims"] for block in ("", claim_block(c))]
    return "\n".join(lines)


def write(p: dict, layout: dict, steps: list[dict], meta: dict, report_dir: Path, timings) -> Path:
    """REPORT.md and figures/ in report_dir from whatever has finished; returns the report's path.
    steps: every step of the preset, each with "shown" (its command); timings(step): its timing file."""
    report_dir = Path(report_dir)
    res = Results(layout)
    walls, commits, settings = {}, set(), set()
    for s in steps:
        if timings(s).is_file():
            record = json.loads(timings(s).read_text())
            walls[s["name"]] = record["wall_s"]
            commits.add(record["commit"])
            settings.add(f"{record.get('jobs', '?')} run(s) at a time with {record.get('threads', '?')} torch "
                         "thread(s) each")
    elapsed = sum(i["elapsed_s"] for i in meta["invocations"])
    sections, claims = [], []
    for eid, title, build, what in SECTIONS:
        mine = [s for s in steps if eid in s["owners"]] if eid in meta["experiments"] else []
        body = build(res, report_dir / "figures") if mine and all(s["done"].exists() for s in mine) else {}
        claims += body.get("claims", [])
        wall = sum(walls.get(s["name"], 0.0) for s in mine)
        sections.append(section(eid, title, what(p, layout), body, mine, wall, meta, res.seeds[0]))
    head = [
        "# The ERPD study on the embedded task", "",
        f"Generated by `{meta['command']}` (preset `{meta['preset']}`: experiments {', '.join(meta['experiments'])}; "
        f"seeds {', '.join(map(str, res.seeds))}) on {time.strftime('%Y-%m-%d')}. Written by experiments/run.py from "
        "the finished runs: every number and verdict below is computed, none is typed in.", "",
        f"- Code: commit {meta['commit']}; the runs were made at: {', '.join(sorted(commits)) or 'n/a'}",
        f"- Machine: {meta['machine']}; the runs: {'; '.join(sorted(settings)) or 'n/a'}, {meta['nproc']} "
        "process(es) per run",
        f"- Time: {minutes(elapsed)} wall clock over {len(meta['invocations'])} invocation(s) of the runner; "
        f"{minutes(sum(walls.values()))} of step time (each step counted once; with several runs at a time it "
        "exceeds the wall clock; per experiment in its section)",
        f"- Sizes (preset `{meta['preset']}`, PRESETS in experiments/run.py): {preset_text(p, layout)}", "",
        "## Summary", "",
        table(["claim", "measured: mean over seeds [95% CI], part holds ✓ / fails ✗ / unclear ?", "verdict"],
              [[f"{c['id']} ({c['experiment']}) {c['short']}", summary_text(c), f"**{c['verdict']}**"]
               for c in claims]) if claims else "No experiment has finished yet.", "",
        f"How verdicts are derived: {analysis.VERDICT_RULE} Each claim's parts are listed with it below.", "",
        "## Statistics", "", STATISTICS]
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(head) + "\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return path


def preset_text(p: dict, layout: dict) -> str:
    flags = lambda f: " ".join(map(str, f)) or "none (the scripts' defaults)"  # noqa: E731
    return (f"|D| = {layout['rollouts']} rollouts; stage-1 extra flags: {flags(p['stage1'])}; stage-2 extra flags: "
            f"{flags(p['stage2'])}; teachers trained {p['curve_epochs']} epochs, curve points every {p['eval_every']} "
            f"({p['curve_eval_prompts']} problems x {p['curve_eval_samples']} samples); evaluation "
            f"{p['eval_prompts'] or 'all'} held-out problems x {p['eval_samples']} samples, T = 1; E2 --kl-coef "
            f"0, {', '.join(f'{c:g}' for c in p['kl_coefs'])}; GRPO {layout['grpo_rounds']} rounds per |D|; "
            f"{layout['erpd_rounds']} ERPD rounds")

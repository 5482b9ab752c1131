"""Throughput of `verify` on ~300 typical (prediction, gold) pairs, next to math-verify; recall and
specificity on a held-out table of answer formats.

    python bench/bench_verifier.py [--repeats 5]

Prints checks/second for our verifier (cold: caches cleared before every check, so every gold
and prediction is parsed anew, as math-verify does it; and with caches kept within a pass), the
same for math_verify (PyPI `math-verify`, optional; gold parsed per check), their agreement,
each one's agreement with the intended labels, and our worst single-check time over adversarial
inputs. Pairs are generated deterministically (seed 0), half GSM8K-like, half MATH-like.

Then recall (equal pairs accepted) and specificity (unequal pairs rejected) of both on
bench/verifier_cases.jsonl: hand-labelled pairs in the formats of MATH, NuminaMath and OpenThoughts
(golds as the datasets store them, `$..$` included; whole model responses), never used by the tests.
They were written in three batches, each before the verifier changes it prompted, so only a fresh
batch measures what is not yet handled. Then the pairs on which the two disagree.
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import verify  # noqa: E402

VERIFIER = sys.modules[verify.__module__]  # _verifier, or common once the code is merged into it
HELD_OUT = Path(__file__).resolve().parent / "verifier_cases.jsonl"

GSM_TEMPLATES = [
    "Let's compute step by step. First {a} * 2 = {b}. Then we add the rest.\n#### {ans}",
    "She buys {a} apples and pays ${b}. So the answer is {ans}.",
    "Total = {a} + {b} = {ans_plain}. The answer is ${ans} dollars.",
    "He earns {a} per hour for {b} hours, which gives $\\boxed{{{ans}}}$.",
    "Adding them up: {a} + {b} gives {ans_plain} in total.",
    "So Tom has {ans} marbles left.\nFinal Answer: The final answer is {ans}. I hope it is correct.",
]

# (gold, [equivalent spellings], [wrong spellings])
MATH_ITEMS = [
    ("\\frac{3}{4}", ["\\dfrac{3}{4}", "0.75", "3/4", "\\frac{6}{8}"], ["\\frac{4}{3}", "0.7"]),
    ("\\frac{\\sqrt{3}}{2}", ["\\dfrac{\\sqrt3}{2}", "\\frac{1}{2}\\sqrt{3}", "\\frac{\\sqrt{3}}{2}"], ["\\frac{\\sqrt2}{2}", "\\sqrt{3}"]),
    ("2\\sqrt{2}", ["\\sqrt{8}", "2\\sqrt2", "2 \\sqrt{2}"], ["\\sqrt{2}", "4"]),
    ("6\\pi", ["6\\pi", "6 \\pi", "\\pi \\cdot 6"], ["3\\pi", "12\\pi"]),
    ("(3, -\\frac{1}{2})", ["\\left(3, -\\frac12\\right)", "(3,-0.5)"], ["(-\\frac12, 3)", "(3, \\frac12)"]),
    ("[2, 5)", ["x \\in [2,5)", "[2,5)"], ["[2,5]", "(2,5)"]),
    ("(-\\infty, 1) \\cup (2, \\infty)", ["(2,\\infty)\\cup(-\\infty,1)", "(-\\infty,1)\\cup(2,\\infty)"], ["(-\\infty,1]\\cup(2,\\infty)"]),
    ("\\text{(C)}", ["C", "(C)", "\\text{(C)}", "\\textbf{(C)}"], ["B", "(D)"]),
    ("\\text{Evelyn}", ["\\text{Evelyn}", "Evelyn", "\\text{evelyn}"], ["\\text{Bob}"]),
    ("x^2 + 2x + 1", ["(x+1)^2", "x^2+2x+1", "1 + 2x + x^2"], ["x^2+1", "(x-1)^2"]),
    ("y = 2x + 3", ["2x+3", "y=2x+3", "y = 3 + 2x"], ["y = 3x + 2"]),
    ("1, 2", ["2, 1", "x = 1, x = 2", "\\{1, 2\\}"], ["1, 3", "1"]),
    ("1 \\pm \\sqrt{2}", ["1+\\sqrt2, 1-\\sqrt2", "1 \\pm \\sqrt 2"], ["1+\\sqrt2"]),
    ("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", ["\\begin{pmatrix}1\\\\-2\\end{pmatrix}", "\\begin{bmatrix} 1 \\\\ -2 \\end{bmatrix}"], ["\\begin{pmatrix}1\\\\2\\end{pmatrix}"]),
    ("50\\%", ["50\\%", "50", "0.5"], ["5"]),
    ("90^\\circ", ["90", "90^{\\circ}", "90^\\circ"], ["45"]),
    ("\\frac{1}{3}", ["\\frac13", "0.3333", "1/3"], ["0.33", "\\frac{1}{4}"]),
    ("10", ["10", "10.0", "10\\text{ cm}", "\\$10"], ["100"]),
    ("\\sqrt[3]{2}", ["2^{1/3}", "\\sqrt[3]{2}"], ["\\sqrt{2}"]),
    ("-\\frac{\\pi}{4}", ["-\\pi/4", "-\\frac{\\pi}{4}"], ["\\frac{\\pi}{4}"]),
    ("3 + 4i", ["4i + 3", "3+4i"], ["3 - 4i"]),
    ("\\binom{6}{2}", ["15", "\\binom{6}{2}"], ["20"]),
    ("1024", ["2^{10}", "1024", "1,024"], ["2^{11}"]),
    ("\\frac{1+\\sqrt{5}}{2}", ["\\frac{1+\\sqrt5}{2}", "(1+\\sqrt{5})/2"], ["\\frac{1-\\sqrt5}{2}"]),
]
MATH_TEMPLATES = [
    "Simplifying, we obtain $\\boxed{{{pred}}}$.",
    "Therefore the final answer is $\\boxed{{{pred}}}$. I hope it is correct.",
    "Putting everything together:\n\\[\n\\boxed{{{pred}}}\n\\]",
    "So the answer is $\\boxed{{{pred}}}$.",
]

ADVERSARIAL = [
    "\\boxed{9^{9^{9^9}}}", "\\boxed{10^{10^{10}}}", "\\boxed{1000000!}", "\\boxed{\\binom{10^9}{5}}",
    "\\boxed{" + "9" * 10_000 + "}", "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
    "\\boxed{" + "(" * 200 + "x" + ")" * 200 + "}", "\\boxed{__import__('os').system('echo hi')}",
    "\\boxed{lambda: 1}", "\\boxed{\\sqrt[383]{12446574996}}", "\\boxed{e^{e^{e^{e^{10}}}}}",
    "\\boxed{\\frac{1}{2}", "}}}{{{", "", "x" * 1_000_000, "\\boxed{" * 3000,
    "\\boxed{" + "\\sqrt{" * 100 + "2" + "}" * 100 + "}", "\\boxed{" + "1+" * 240 + "1}",
    "\\boxed{" + "x^{2}" * 90 + "}", "\\boxed{\\sin(10^{999}) + \\lfloor \\pi \\cdot 10^{999} \\rfloor}",
]


def make_pairs(seed: int = 0) -> list:
    """[(prediction, gold, intended_label)], 150 GSM8K-like then 150 MATH-like."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(150):
        gold = rng.choice([rng.randint(1, 200), rng.randint(200, 5000), rng.randint(5000, 2_000_000)])
        correct = rng.random() < 0.7
        shown = gold if correct else gold + rng.choice([-10, -1, 1, 2, 100])
        ans = f"{shown:,}" if rng.random() < 0.3 else str(shown)
        text = rng.choice(GSM_TEMPLATES).format(a=rng.randint(2, 40), b=rng.randint(2, 90), ans=ans,
                                                ans_plain=shown)
        pairs.append((text, str(gold), correct))
    for _ in range(150):
        gold, good, bad = rng.choice(MATH_ITEMS)
        correct = rng.random() < 0.65
        pred = rng.choice(good if correct else bad)
        pairs.append((rng.choice(MATH_TEMPLATES).format(pred=pred), gold, correct))
    return pairs


def clear_caches():
    for name in ("_normalize", "_parsed", "_gold"):
        fn = getattr(VERIFIER, name, None)
        if fn is not None and hasattr(fn, "cache_clear"):
            fn.cache_clear()


def bench_ours(pairs, repeats, cold: bool):
    """checks/s; cold: caches cleared before every check (nothing reused), else once per pass
    (a gold then is parsed once for all its predictions, as for G rollouts of one prompt)."""
    best, results = float("inf"), None
    for _ in range(repeats):
        clear_caches()
        t0 = time.perf_counter()
        results = []
        for p, g, _ in pairs:
            if cold:
                clear_caches()
            results.append(verify(p, g))
        best = min(best, time.perf_counter() - t0)
    return len(pairs) / best, results


def math_verify_check():
    """math-verify's check as (prediction, gold) -> bool, or None when it is not installed. A gold
    without math delimiters is wrapped in `$..$` (its LaTeX extraction needs them)."""
    try:
        from math_verify import parse, verify as mv_verify
    except ImportError:
        return None

    def check(prediction, gold):
        if not any(d in gold for d in ("$", "\\(", "\\[", "\\boxed")):
            gold = "$" + gold + "$"
        try:
            return bool(mv_verify(parse(gold), parse(prediction)))
        except Exception:  # noqa: BLE001
            return False
    return check


def bench_math_verify(pairs, repeats):
    check = math_verify_check()
    if check is None:
        return None
    best, results = float("inf"), None
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        results = [check(p, g) for p, g, _ in pairs]
        best = min(best, time.perf_counter() - t0)
    return len(pairs) / best, results


def recall_specificity(results, labels) -> str:
    equal = [r for r, e in zip(results, labels) if e]
    unequal = [r for r, e in zip(results, labels) if not e]
    return (f"recall {sum(equal)}/{len(equal)} = {sum(equal) / len(equal):.3f}, "
            f"specificity {len(unequal) - sum(unequal)}/{len(unequal)} = "
            f"{(len(unequal) - sum(unequal)) / len(unequal):.3f}")


def held_out():
    """Recall and specificity of ours (and math-verify's) on bench/verifier_cases.jsonl."""
    cases = [json.loads(line) for line in HELD_OUT.read_text().splitlines() if line.strip()]
    labels = [c["equal"] for c in cases]
    worst, ours, t_all = 0.0, [], time.perf_counter()
    for c in cases:
        clear_caches()
        t0 = time.perf_counter()
        ours.append(verify(c["prediction"], c["gold"]))
        worst = max(worst, time.perf_counter() - t0)
    ours_rate = len(cases) / (time.perf_counter() - t_all)
    print(f"held-out {HELD_OUT.name}: {len(cases)} pairs "
          f"({sum(labels)} equal, {len(cases) - sum(labels)} unequal)")
    print(f"  ours:        {recall_specificity(ours, labels)}   "
          f"({ours_rate:.0f} checks/s cold, worst check {worst * 1e3:.1f} ms)")
    for c, o in zip(cases, ours):
        if o != c["equal"]:
            print(f"    ours wrong: intended={c['equal']!s:5} [{c['category']}] gold={c['gold']!r} "
                  f"pred=...{c['prediction'][-70:]!r}")
    check = math_verify_check()
    if check is None:
        return
    t_all = time.perf_counter()
    mv = [check(c["prediction"], c["gold"]) for c in cases]
    mv_rate = len(cases) / (time.perf_counter() - t_all)
    print(f"  math_verify: {recall_specificity(mv, labels)}   "
          f"({mv_rate:.0f} checks/s; ours {ours_rate / mv_rate:.1f}x)")
    print(f"  agreement ours vs math_verify: {sum(a == b for a, b in zip(ours, mv))}/{len(cases)}")
    for c, o, m in zip(cases, ours, mv):
        if o != m:
            print(f"    differ: ours={o!s:5} math_verify={m!s:5} intended={c['equal']!s:5} "
                  f"[{c['category']}] gold={c['gold']!r} pred=...{c['prediction'][-70:]!r}")


def worst_case(inputs, golds=("1", "x", "\\frac{1}{2}", "(1,2)")):
    worst = (0.0, "")
    for text in inputs:
        for gold in golds:
            clear_caches()
            t0 = time.perf_counter()
            verify(text, gold)
            dt = time.perf_counter() - t0
            worst = max(worst, (dt, text[:60]))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    pairs = make_pairs()
    labels = [e for *_, e in pairs]
    n_gsm = 150

    verify("\\boxed{1}", "1")  # import-time warm-up of sympy singletons, not a cache of the pairs
    ours_rate, ours = bench_ours(pairs, args.repeats, cold=True)
    reuse_rate, _ = bench_ours(pairs, args.repeats, cold=False)
    print(f"pairs: {len(pairs)} ({n_gsm} GSM8K-like, {len(pairs) - n_gsm} MATH-like), "
          f"{sum(labels)} intended equal")
    print(f"ours:        {ours_rate:10.0f} checks/s   ({1e6 / ours_rate:8.1f} us/check, caches cleared before each check)")
    print(f"ours:        {reuse_rate:10.0f} checks/s   ({1e6 / reuse_rate:8.1f} us/check, caches kept within a pass)")
    acc = sum(o == e for o, e in zip(ours, labels)) / len(pairs)
    print(f"ours agrees with the intended labels on {acc:.1%}")

    mv = bench_math_verify(pairs, args.repeats)
    if mv is None:
        print("math_verify: not installed (pip install math-verify) -- comparison skipped")
    else:
        mv_rate, mv_res = mv
        print(f"math_verify: {mv_rate:10.0f} checks/s   ({1e6 / mv_rate:8.1f} us/check, gold parsed per check)")
        print(f"speed-up: {ours_rate / mv_rate:.1f}x")
        agree = sum(a == b for a, b in zip(ours, mv_res))
        print(f"agreement ours vs math_verify: {agree}/{len(pairs)} = {agree / len(pairs):.1%} "
              f"(GSM8K-like {sum(a == b for a, b in zip(ours[:n_gsm], mv_res[:n_gsm]))}/{n_gsm}, "
              f"MATH-like {sum(a == b for a, b in zip(ours[n_gsm:], mv_res[n_gsm:]))}/{len(pairs) - n_gsm})")
        print(f"math_verify agrees with the intended labels on "
              f"{sum(o == e for o, e in zip(mv_res, labels)) / len(pairs):.1%}")
        shown = 0
        for (p, g, e), a, b in zip(pairs, ours, mv_res):
            if a != b and shown < 8:
                shown += 1
                print(f"  differ: ours={a!s:5} math_verify={b!s:5} intended={e!s:5} gold={g!r} "
                      f"pred=...{p[-60:]!r}")

    dt, text = worst_case(ADVERSARIAL)
    print(f"worst single check over {len(ADVERSARIAL)} adversarial inputs x 4 golds: {dt * 1e3:.1f} ms "
          f"({text!r}...)")
    held_out()


if __name__ == "__main__":
    main()

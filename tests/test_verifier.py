"""The math answer verifier: a table of realistic model outputs, adversarial inputs, properties."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import extract_answer, gold_answer_from_solution, verify, verify_with_reason  # noqa: E402

BOUND_S = 1.0  # every single check must finish within this, whatever the input

GSM8K = """Natalia sold 48/2 = <<48/2=24>>24 clips in May.
Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.
#### 72"""

# (prediction text, gold answer, expected)
CASES = [
    # --- GSM8K-style outputs -------------------------------------------------------------------
    (GSM8K, "72", True),
    (GSM8K, "73", False),
    ("#### 1,234", "1234", True),
    ("#### 1,234", "1243", False),
    ("#### -5", "-5", True),
    ("The answer is 12 dollars.", "12", True),
    ("The answer is 12 dollars.", "13", False),
    ("She earns $18.00 per day. The answer is $18.", "18", True),
    ("So he has 5 + 3 = 8 apples left.", "8", True),
    ("So he has 5 + 3 = 8 apples left.", "5", False),
    ("The answer is: 42", "42", True),
    ("**Answer:** 42", "42", True),
    ("**Final Answer:** 41", "42", False),
    ("Total cost: 3 * $4 = $12\n#### 12", "12", True),
    ("The answer is -5.", "5", False),
    ("The final answer is 0.5", "1/2", True),
    ("Thus, the answer is \\boxed{150}.", "150", True),
    ("Thus, the answer is \\boxed{150}.", "15", False),
    ("He pays \\boxed{150.00} in total.", "150", True),
    ("\\boxed{\\$150}", "150", True),
    ("\\boxed{150\\text{ dollars}}", "150", True),
    ("\\boxed{1,500}", "1500", True),
    ("\\boxed{1,500}", "1600", False),
    ("The answer is 3.5 hours.", "3.5", True),
    ("The answer is 3.4 hours.", "3.5", False),
    ("\\boxed{3\\frac{1}{2}}", "3.5", True),
    ("The answer is 1,000,000.", "1000000", True),
    ("He needs 10 more. The answer is 10 cookies!", "10", True),
    ("I think the answer is 7, because 3+4 = 7.", "7", True),
    ("I think the answer is 7, because 3+4 = 7.", "3", False),
    ("In total: 20 + 30 = 50 minutes", "50", True),
    ("In total: 20 + 30 = 50 minutes", "30", False),
    ("The price is $1,250.50 after tax.", "1250.5", True),
    ("Final Answer: The final answer is $24$. I hope it is correct.", "24", True),
    ("Final Answer: The final answer is $25$. I hope it is correct.", "24", False),
    ("#### 5\n\nThe end.", "5", True),
    ("The answer is 18 dollars per week", "18", True),
    ("The answer is 0.25.", "25\\%", True),
    ("\\boxed{25\\%}", "25", True),
    ("\\boxed{25}", "25\\%", True),
    ("\\boxed{0.25}", "25\\%", True),
    ("\\boxed{2.5}", "25\\%", False),
    ("\\boxed{0.25}", "25", False),
    ("The answer is 40 percent.", "40", True),
    # --- MATH-style: numbers, fractions, radicals ----------------------------------------------
    ("So the total is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}", True),
    ("So the total is $\\boxed{\\frac{3}{4}}$.", "\\frac{4}{3}", False),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{\\tfrac34}", "3/4", True),
    ("\\boxed{\\frac{6}{8}}", "\\frac34", True),
    ("\\boxed{\\frac{3}{5}}", "\\frac34", False),
    ("$\\boxed{\\frac{9}{2}}$", "4.5", True),
    ("\\boxed{\\frac92}", "\\frac{9}{2}", True),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}", True),
    ("\\boxed{\\frac{-1}{2}}", "-0.5", True),
    ("\\boxed{-0.5}", "0.5", False),
    ("\\boxed{.5}", "0.5", True),
    ("\\boxed{12}", "12.0", True),
    ("\\boxed{0}", "0", True),
    ("\\boxed{-0}", "0", True),
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{\\dfrac{\\sqrt{3}}{3}}", "\\frac{\\sqrt3}{2}", False),
    ("\\boxed{\\sqrt{2}}", "\\sqrt2", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}", True),
    ("\\boxed{\\frac{2}{\\sqrt{3}}}", "\\frac{2\\sqrt3}{3}", True),
    ("\\boxed{(1+\\sqrt{5})/2}", "\\frac{1+\\sqrt5}{2}", True),
    ("\\boxed{\\dfrac{1+\\sqrt{5}}{2}}", "\\frac{1-\\sqrt5}{2}", False),
    ("\\boxed{\\sqrt{6}-\\sqrt{2}}", "\\sqrt2(\\sqrt3-1)", True),
    ("\\boxed{\\sqrt[3]{2}}", "2^{1/3}", True),
    ("\\boxed{2^{\\frac{1}{3}}}", "\\sqrt[3]{2}", True),
    ("\\boxed{\\sqrt[3]{8}}", "2", True),
    ("\\boxed{\\left(\\frac{1}{2}\\right)^{3}}", "\\frac18", True),
    ("\\boxed{2^{10}}", "1024", True),
    ("\\boxed{2^{100}}", "1267650600228229401496703205376", True),
    ("\\boxed{2^{100}+1}", "1267650600228229401496703205376", False),
    ("\\boxed{1.5 \\times 10^{3}}", "1500", True),
    ("\\boxed{1.5\\cdot 10^3}", "1500", True),
    ("\\boxed{1.5e3}", "1500", True),
    ("\\boxed{10^{-3}}", "0.001", True),
    ("\\boxed{\\binom{6}{2}}", "15", True),
    ("\\boxed{\\dbinom{6}{3}}", "15", False),
    ("\\boxed{6!}", "720", True),
    ("\\boxed{\\frac{7!}{5!}}", "42", True),
    ("\\boxed{\\log_2 32}", "5", True),
    ("\\boxed{\\ln e^2}", "2", True),
    ("\\boxed{\\lfloor 3.7 \\rfloor}", "3", True),
    # --- decimals against exact values ---------------------------------------------------------
    ("\\boxed{0.333}", "\\frac{1}{3}", False),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),
    ("\\boxed{0.3333}", "\\frac{1}{3}", True),
    ("\\boxed{0.6667}", "\\frac23", True),
    ("\\boxed{0.142857}", "\\frac17", True),
    ("\\boxed{1.414}", "\\sqrt{2}", True),
    ("\\boxed{1.41}", "\\sqrt2", False),
    ("\\boxed{3.14}", "\\pi", False),
    ("\\boxed{3.1416}", "\\pi", True),
    ("\\boxed{5.000001}", "5", False),
    ("\\boxed{0.30000000000000004}", "0.3", True),
    ("\\boxed{1000000.5}", "1000000", False),
    ("\\boxed{5.001}", "5", False),
    ("\\boxed{2.9999}", "3", False),
    # --- constants, complex numbers, infinity ---------------------------------------------------
    ("\\boxed{\\pi}", "\\pi", True),
    ("\\boxed{2\\pi}", "2 \\pi", True),
    ("\\boxed{3\\pi}", "6\\pi", False),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("\\boxed{-\\frac{\\pi}{4}}", "-\\pi/4", True),
    ("\\boxed{e^{i\\pi}}", "-1", True),
    ("\\boxed{i}", "i", True),
    ("\\boxed{-i}", "i", False),
    ("\\boxed{1 + 2i}", "2i+1", True),
    ("\\boxed{1 - 2i}", "2i+1", False),
    ("\\boxed{\\frac{1+i}{2}}", "\\frac12+\\frac{i}{2}", True),
    ("\\boxed{\\infty}", "\\infty", True),
    ("\\boxed{-\\infty}", "\\infty", False),
    ("\\boxed{\\frac{1}{0}}", "1", False),
    # --- degrees, units, spacing, formatting ---------------------------------------------------
    ("\\boxed{60^\\circ}", "60", True),
    ("\\boxed{60^{\\circ}}", "60", True),
    ("The angle is $\\boxed{45°}$.", "45", True),
    ("\\boxed{60^\\circ}", "30", False),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{5\\,\\text{cm}^2}", "5", True),
    ("\\boxed{12 \\text{ square units}}", "12", True),
    ("\\boxed{3\\sqrt{2}\\text{ cm}}", "3\\sqrt2", True),
    ("\\boxed{1\\,000\\,000}", "1000000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{\u22123}", "-3", True),
    ("\\boxed{\\displaystyle \\frac{1}{2}}", "1/2", True),
    ("\\boxed{\\mathbf{5}}", "5", True),
    ("\\boxed{\\mathrm{5}}", "6", False),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{\\!\\;\\:\\quad 7}", "7", True),
    # --- expressions and equations -------------------------------------------------------------
    ("\\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    ("\\boxed{x^2 + 1}", "(x-1)(x+1)", False),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\frac{a+b}{2}}", "\\frac{b+a}{2}", True),
    ("\\boxed{\\frac{a-b}{2}}", "\\frac{b-a}{2}", False),
    ("\\boxed{\\sin 2x}", "2\\sin x\\cos x", True),
    ("\\boxed{\\cos^2 x - \\sin^2 x}", "\\cos 2x", True),
    ("\\boxed{\\tan x}", "\\frac{\\sin x}{\\cos x}", True),
    ("\\boxed{|x - 1|}", "|1-x|", True),
    ("\\boxed{\\sqrt{x}}", "x^{1/2}", True),
    ("\\boxed{6x^2y}", "6yx^2", True),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{x = -3}", "3", False),
    ("\\boxed{y = 2x + 3}", "y=2x+3", True),
    ("\\boxed{y = 3x + 2}", "y=2x+3", False),
    ("\\boxed{2x + 3}", "y=2x+3", True),
    ("\\boxed{f(x) = 2x + 3}", "2x+3", True),
    ("\\boxed{x^2+y^2=25}", "x^2 + y^2 = 25", True),
    ("\\boxed{x^2+y^2=25}", "x^2 + y^2 = 5", False),
    ("\\boxed{2x + 2y = 10}", "x + y = 5", True),
    ("\\boxed{\\frac{6}{8} = \\frac{3}{4}}", "\\frac34", True),
    # --- tuples, sets, lists, intervals, matrices ----------------------------------------------
    ("\\boxed{(3, -\\frac{1}{2})}", "\\left(3,-\\frac{1}{2}\\right)", True),
    ("\\boxed{(-\\frac12, 3)}", "(3, -\\frac12)", False),
    ("\\boxed{(1,2)}", "(2,1)", False),
    ("\\boxed{(1, 2, 3)}", "(1,2,3)", True),
    ("\\boxed{x \\in [2, 5)}", "[2,5)", True),
    ("\\boxed{[2, 5]}", "[2,5)", False),
    ("\\boxed{(1,2]}", "(1,2)", False),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True),
    ("\\boxed{[-\\infty, 3)}", "(-\\infty,3)", True),
    ("\\boxed{(-\\infty, 1) \\cup (2, \\infty)}", "(2,\\infty)\\cup(-\\infty,1)", True),
    ("\\boxed{(-\\infty, 1] \\cup (2, \\infty)}", "(-\\infty,1)\\cup(2,\\infty)", False),
    ("\\boxed{x > 3}", "(3,\\infty)", True),
    ("\\boxed{-2 < x \\le 5}", "(-2, 5]", True),
    ("\\boxed{x \\geq 3}", "[3, \\infty)", True),
    ("\\boxed{x \\le 3}", "[3, \\infty)", False),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}", True),
    ("\\boxed{\\{1,2\\}}", "1,2", True),
    ("\\boxed{1, 2, 3}", "3, 2, 1", True),
    ("\\boxed{1, 2}", "1, 2, 3", False),
    ("\\boxed{x=1, x=2}", "2, 1", True),
    ("\\boxed{x=1, x=3}", "2, 1", False),
    ("\\boxed{\\frac{1}{2}, \\frac{1}{3}}", "\\frac13, \\frac12", True),
    ("\\boxed{4 \\text{ and } 6}", "4, 6", True),
    ("\\boxed{\\emptyset}", "\\varnothing", True),
    ("\\boxed{\\pm 2}", "2, -2", True),
    ("\\boxed{\\pm 2}", "2", False),
    ("\\boxed{3 \\pm \\sqrt{5}}", "3+\\sqrt5, 3-\\sqrt5", True),
    ("The roots are $x = 2$ and $x = -2$, so the answer is $\\boxed{\\pm 2}$.", "-2,2", True),
    ("\\boxed{\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}}", "\\begin{pmatrix}2\\\\-1\\end{pmatrix}", True),
    ("\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}", "\\begin{pmatrix}2\\\\-1\\end{pmatrix}", False),
    ("\\boxed{\\begin{bmatrix} 1 & 0 \\\\ 0 & 1 \\end{bmatrix}}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", True),
    ("\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
    # --- multiple choice and text answers ------------------------------------------------------
    ("\\boxed{\\text{(C)}}", "C", True),
    ("\\boxed{\\text{(C)}}", "B", False),
    ("\\boxed{C}", "\\text{(C)}", True),
    ("\\boxed{(C)}", "C", True),
    ("\\boxed{\\textbf{(B) }14}", "B", True),
    ("The answer is (D).", "D", True),
    ("\\boxed{D}", "C", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{evelyn}}", "Evelyn", True),
    ("\\boxed{\\text{Bob}}", "Evelyn", False),
    ("\\boxed{\\text{No}}", "\\text{no}", True),
    ("\\boxed{\\text{yes}}", "no", False),
    ("\\boxed{10}", "\\text{10}", True),
    # --- extraction priority -------------------------------------------------------------------
    ("First \\boxed{5}, but on reflection \\boxed{6}.", "6", True),
    ("First \\boxed{5}, but on reflection \\boxed{6}.", "5", False),
    ("\\boxed{7} then an empty \\boxed{}", "7", True),
    ("\\boxed{\\boxed{7}}", "7", True),
    ("\\fbox{7}", "7", True),
    ("so the answer is \\boxed 7", "7", True),
    ("The answer is 4.\n#### 5", "5", True),
    ("#### 5\nThe answer is \\boxed{4}", "4", True),
    ("The answer is 3 and the last number is 9", "3", True),
    ("no digits at all here", "1", False),
    ("#### Step 1: add\n3+4 = 7\n#### Step 2: double\nSo the answer is 14.", "14", True),
    ("Let me check that the answer is correct: 3 * 5 = 15", "15", True),
    # --- gold answers as MATH writes them ------------------------------------------------------
    ("\\boxed{32348}", "\\$32,\\!348", True),
    ("\\boxed{32384}", "\\$32,\\!348", False),
    ("\\boxed{1011_2}", "1011_2", True),
    ("\\boxed{17.5}", "17\\frac{1}{2}", True),
    ("\\boxed{(1,-2,-1)}", "\\begin{pmatrix} 1 \\\\ -2 \\\\ -1 \\end{pmatrix}", True),
    ("\\boxed{x \\le -2 \\text{ or } x \\ge 2}", "(-\\infty,-2]\\cup[2,\\infty)", True),
    ("\\boxed{\\frac{x-3}{2}}", "f^{-1}(x) = \\frac{x-3}{2}", True),
    ("\\boxed{\\sqrt{5+2\\sqrt6}}", "\\sqrt{2}+\\sqrt{3}", True),
    ("\\boxed{\\cos(\\pi/3)}", "\\frac12", True),
    ("\\boxed{\\sqrt[3]{-8}}", "-2", True),
    ("\\boxed{12\\sqrt3}", "12\\sqrt{3} \\text{ square units}", True),
    ("\\boxed{x = -3 \\text{ or } x = 1}", "\\{-3, 1\\}", True),
    ("\\boxed{\\text{Even}}", "\\text{even}", True),
    ("\\boxed{\\text{odd}}", "\\text{even}", False),
]


LONG = ("Let's solve this step by step.\n\nFirst we write down what we know and set up the equation. "
        "Expanding and collecting terms, we simplify both sides.\n\n")

# Formats real model outputs and datasets (MATH, NuminaMath, OpenThoughts) use; expected values by hand.
# (prediction text, gold answer as the dataset stores it, expected)
FORMAT_CASES = [
    # --- gold written in math mode (the raw dataset string, delimiters included) ----------------
    ("\\boxed{\\frac{1}{3}}", "$1/3$", True),
    ("$[0,1)$", "$[0,1)$", True),
    ("$[0,1)$", "$[0,1]$", False),
    (LONG + "Therefore, the final answer is $\\boxed{(1,+\\infty)}$.", "$$(1, +\\infty)$$", True),
    (LONG + "Therefore, the final answer is $\\boxed{[1,+\\infty)}$.", "$$(1, +\\infty)$$", False),
    ("The correct option is $\\boxed{E}$.", "$\\text{E}$", True),
    ("The correct option is $\\boxed{D}$.", "$\\text{E}$", False),
    ("\\boxed{-\\dfrac{7}{25}}", "$-\\frac{7}{25}$", True),
    ("\\boxed{\\dfrac{7}{25}}", "$-\\frac{7}{25}$", False),
    ("\\boxed{2\\sqrt{5}}", "\\(2\\sqrt{5}\\)", True),
    ("\\boxed{\\frac{9}{4}}", "\\[\\frac{9}{4}\\]", True),
    ("\\boxed{60^\\circ}", "$60^{\\circ}$", True),
    ("\\boxed{-2 \\text{ or } 3}", "$-2$ or $3$", True),
    ("\\boxed{-2}", "$-2$ or $3$", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "$\\frac{{\\sqrt{3}}}{2}$", True),
    # --- final answer in math mode, not boxed ----------------------------------------------------
    ("Thus $x = \\frac{1}{3}$.", "\\frac{1}{3}", True),
    ("Thus $x = \\frac{1}{3}$.", "3", False),                      # not the last number, 3
    ("$\\frac13 $", "$1/3$", True),
    ("$\\frac13 $", "3", False),
    (LONG + "Hence the probability is $\\frac{5}{36}$.", "\\frac{5}{36}", True),
    ("Therefore, the area is \\(6\\sqrt{3}\\).", "6\\sqrt3", True),
    ("Therefore, the area is \\(6\\sqrt{3}\\).", "3", False),
    ("We conclude that\n\\[\nx = \\dfrac{7}{2}.\n\\]", "3.5", True),
    ("Hence $\\frac3{4}$ of the tank is full.", "0.75", True),
    ("The slope is \\(-\\tfrac{2}{3}\\).", "-2/3", True),
    ("The slope is \\(-\\tfrac{2}{3}\\).", "2/3", False),
    ("The length is $\\sqrt3$.", "\\sqrt{3}", True),
    ("The answer: $\\cfrac{2}{5}$", "0.4", True),
    ("The vertex is $\\left( \\frac{1}{2}, 3 \\right)$.", "(\\frac12, 3)", True),
    ("The vertex is $\\left( \\frac{1}{2}, 3 \\right)$.", "(3, \\frac12)", False),
    ("The radius is $r = 5\\text{ cm}$.", "5", True),
    ("The speed is $\\textbf{12 km/h}$.", "12", True),
    ("Thus $\\angle ABC = 45^\\circ$.", "45", True),
    ("We have $x=2$ and $y=3$, so $x+y=5$.", "5", True),
    ("Hence $AB = 5$ and $BC = 12$.", "5", False),                 # the last expression is BC = 12
    ("So $x = 4$, where $x$ is the number of apples.", "4", True),   # `$x$` only names the variable
    ("The answer is therefore $5$, as required.", "5", True),
    ("The answer is 3. Checking: $x^2 = 9$.", "3", True),          # the phrase, not a later check
    ("The limit is $e$.", "e", True),
    ("So the area is $\\pi$.", "\\pi", True),
    # --- the last-number fallback never reads a number out of an expression ----------------------
    (LONG + "Therefore, the ratio is $\\frac{1+\\sqrt{5}}{2}$.", "$2$", False),
    ("The ratio is (1+sqrt(5))/2", "2", False),
    ("so x^2", "2", False),
    ("It equals 2x", "2", False),
    ("So he has 5 + 3 = 8 apples left.", "8", True),
    ("So she saved 25 000 dollars.", "25000", True),
    ("The probability is .4 overall", "0.4", True),
    ("The temperature dropped to -5 degrees.", "-5", True),
    # --- bare predictions (no delimiters at all) --------------------------------------------------
    ("\\frac{1}{3}", "$\\frac13$", True),
    ("(0,9)", "[0,9)", False),                                        # an interval's closedness matters
    ("[0,9)", "(0,9)", False),
    ("[0,9)", "$[0, 9)$", True),
    ("x \\geq 5", "[5,+\\infty)", True),
    ("y = 2x + 1", "$y=2x+1$", True),
    ("**42**", "42", True),
    ("**42**", "24", False),
    # --- several boxes: the final group is one unordered answer ----------------------------------
    ("The solutions are \\boxed{(2, 2)} and \\boxed{(6, 2)}.", "(2,2), (6,2)", True),
    ("The solutions are \\boxed{(2, 2)} and \\boxed{(6, 2)}.", "(6,2), (2,2)", True),
    ("The solutions are \\boxed{(2, 2)} and \\boxed{(6, 2)}.", "(2,2)", False),
    ("The solutions are \\boxed{(2, 2)} and \\boxed{(6, 2)}.", "(2,2), (2,6)", False),
    ("\\boxed{1} and \\boxed{2} and \\boxed{3}", "\\{1,2,3\\}", True),
    ("\\boxed{1} and \\boxed{2} and \\boxed{3}", "\\{1,2\\}", False),
    ("So $x = \\boxed{-1}$ or $x = \\boxed{4}$.", "$x=-1$ or $x=4$", True),
    ("So $x = \\boxed{-1}$ or $x = \\boxed{4}$.", "4", False),
    ("Hence $a = \\boxed{2}$ and $b = \\boxed{-3}$.", "(2, -3)", True),      # in order against a tuple
    ("Hence $a = \\boxed{2}$ and $b = \\boxed{-3}$.", "(-3, 2)", False),
    ("(1) $\\boxed{\\frac12}$\n(2) $\\boxed{\\frac12}$", "\\frac{1}{2}", True),  # one answer, repeated
    ("$\\boxed{\\sqrt2}$,\\ $\\boxed{-\\sqrt2}$", "\\pm\\sqrt{2}", True),
    ("I guessed \\boxed{4}. That is wrong; recomputing, the answer is \\boxed{5}.", "5", True),
    ("I guessed \\boxed{4}. That is wrong; recomputing, the answer is \\boxed{5}.", "4, 5", False),
    ("The roots are $2$ and $3$.", "2, 3", True),                       # math spans group the same way
    ("The roots are $2$ and $3$.", "3", False),
    # --- assignments and relations ---------------------------------------------------------------
    ("\\boxed{(p,q)=(3,2)}", "(3,2)", True),
    ("\\boxed{(p,q)=(3,2)}", "(2,3)", False),
    ("$k = \\frac{1}{3}$", "\\frac13", True),
    ("\\boxed{x \\geq 5}", "x \\ge 5", True),
    ("\\boxed{x >= 5}", "[5, \\infty)", True),
    ("\\boxed{x >= 5}", "(5, \\infty)", False),
    ("\\boxed{5 \\leq x}", "x\\geq 5", True),
    ("\\boxed{5 \\leq x}", "x\\leq 5", False),
    ("\\boxed{x \\lt 2}", "x<2", True),
    ("\\boxed{2 \\gt x}", "x<2", True),
    ("\\boxed{x \\neq 3}", "x != 3", True),
    ("\\boxed{x \\neq 3}", "(-\\infty,3)\\cup(3,\\infty)", True),
    ("\\boxed{x \\neq 3}", "x = 3", False),
    ("\\boxed{-x > -1}", "x < 1", True),
    ("\\boxed{-x > -1}", "x > 1", False),
    ("\\boxed{x \\in [-2, 7]}", "[-2,7]", True),
    ("\\boxed{x \\in (-2, 7]}", "[-2,7]", False),
    ("\\boxed{x \\approx 11}", "11", True),
    ("\\boxed{x \\approx 11}", "12", False),
    ("\\boxed{\\{x \\mid x > 2\\}}", "(2,+\\infty)", True),
    ("\\boxed{(2,+\\infty)}", "$\\{x|x \\geq 2\\}$", False),
    ("\\boxed{-1 \\le a \\le 3}", "[-1,3]", True),
    ("\\boxed{-1 < a \\le 3}", "[-1,3]", False),
    ("\\boxed{m < -1 \\text{ or } m > 3}", "(-\\infty,-1)\\cup(3,+\\infty)", True),
    ("\\boxed{y = x + 1}", "$x-y+1=0$", True),                       # one line, written two ways
    ("\\boxed{y = x + 1}", "$x+y+1=0$", False),
    ("\\boxed{x = 3}", "$x - 3 = 0$", True),
    ("\\boxed{f(x) = x^2}", "f(x)=x^{2}", True),
    ("\\boxed{f(x) = -x^2}", "f(x)=x^{2}", False),
    ("\\boxed{a_n = 2n - 1}", "2n-1", True),
    ("\\boxed{\\begin{cases} x = 2 \\\\ y = 1 \\end{cases}}", "(2, 1)", True),
    ("\\boxed{\\begin{cases} x = 2 \\\\ y = 1 \\end{cases}}", "(1, 2)", False),
    # --- matrices: element-wise ------------------------------------------------------------------
    ("\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}",
     "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}",
     "\\begin{bmatrix}1&3\\\\2&4\\end{bmatrix}", False),
    ("\\boxed{\\left[\\begin{array}{cc} 1 & 0 \\\\ 0 & 1 \\end{array}\\right]}",
     "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", True),
    ("\\boxed{\\left[\\begin{array}{cc} 1 & 0 \\\\ 0 & 1 \\end{array}\\right]}",
     "\\begin{pmatrix}0&1\\\\1&0\\end{pmatrix}", False),
    ("\\boxed{\\begin{pmatrix} \\frac{1}{2} \\\\ -\\frac{3}{2} \\end{pmatrix}}",
     "\\begin{pmatrix}0.5\\\\-1.5\\end{pmatrix}", True),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1&2\\end{pmatrix}", False),
    ("The vector is $\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}$.", "(1,2,3)", True),
    # --- numbers as people write them ------------------------------------------------------------
    ("\\boxed{11,\\! 111,\\! 111,\\! 100}", "11111111100", True),
    ("\\boxed{11,\\! 111,\\! 111,\\! 100}", "11111111101", False),
    ("\\boxed{1 000}", "1000", True),
    ("\\boxed{1\\ 000}", "1000", True),
    ("\\boxed{.4}", "0.4", True),
    ("\\boxed{.4}", "4", False),
    ("\\boxed{2,74}", "2.74", True),                                # a decimal comma, against one value
    ("\\boxed{2,74}", "274", False),
    ("\\boxed{2,74}", "2, 74", True),                               # ... and a list against a list
    ("\\boxed{0,5}", "$\\frac{1}{2}$", True),
    ("\\boxed{3{,}14}", "3.14", True),
    ("\\boxed{3,500}", "3.5", False),                               # three digits: thousands
    ("\\boxed{1, 5}", "1.5", False),                                # a space: a list
    ("\\boxed{2.5}", "2", False),
    ("\\boxed{2}", "2.5", False),
    ("\\boxed{5\\text{ m}}", "5", True),
    ("\\boxed{9.8 \\, \\text{m/s}^2}", "9.8", True),
    ("\\boxed{2\\frac34}", "2.75", True),
    # --- text answers and choices ----------------------------------------------------------------
    ("\\boxed{\\text{odd}}", "$odd$", True),
    ("\\boxed{\\text{odd}}", "$even$", False),
    ("\\boxed{\\text{E}}", "E", True),
    ("$\\text{(B)}$", "B", True),
    ("$\\text{(B)}$", "C", False),
    ("\\boxed{B, D}", "BD", True),
    ("\\boxed{BD}", "$\\text{BD}$", True),
    ("\\boxed{D}", "BD", False),
    ("\\boxed{ABD}", "ABC", False),
    ("\\boxed{\\text{Friday}}", "Friday", True),
    # --- sets, tuples, intervals -----------------------------------------------------------------
    ("\\boxed{\\{(1, 2)\\}}", "(1,2)", True),
    ("\\boxed{(2, 3)}", "\\{2, 3\\}", False),                       # a pair or an interval, not a set
    ("\\boxed{[2, 3]}", "\\{2, 3\\}", False),
    ("\\boxed{(-\\infty, 3]}", "$(-\\infty, 3)$", False),
    ("\\boxed{\\{2, 3\\}}", "{2, 3}", True),
]


def test_table_is_large_and_balanced():
    assert len(CASES) >= 150
    assert sum(1 for *_, expect in CASES if not expect) >= 50
    assert len(FORMAT_CASES) >= 100
    assert sum(1 for *_, expect in FORMAT_CASES if not expect) >= 40


@pytest.mark.parametrize("prediction,gold,expected", CASES + FORMAT_CASES)
def test_table(prediction, gold, expected):
    t0 = time.perf_counter()
    ok, reason = verify_with_reason(prediction, gold)
    assert time.perf_counter() - t0 < BOUND_S
    assert ok is expected, reason


@pytest.mark.parametrize("text,expected", [
    ("So $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("a \\boxed{x^{2}} b \\fbox{7}", "7"),
    ("#### 1,234", "1,234"),
    ("The answer is 12 dollars.", "12 dollars"),
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("Answer: 17", "17"),
    ("we get 3, then 4, and finally -2.5.", "-2.5"),
    ("nothing here", None),
    ("", None),
    ("\\boxed{(2, 2)} and \\boxed{(6, 2)}", "(2, 2), (6, 2)"),
    ("First \\boxed{5}, but on reflection \\boxed{6}.", "6"),
    ("\\boxed{7} and \\boxed{7}", "7"),
    ("Thus $x = \\frac{1}{3}$.", "x = \\frac{1}{3}"),
    ("The roots are $2$ and $3$.", "2, 3"),
    ("So $x = 4$, where $x$ is the count.", "x = 4"),
    ("She paid $5 for apples and $3 for pears.", "3"),
    ("[0, 1)", "[0, 1)"),
    ("Therefore the ratio is (1+sqrt(5))/2", None),
    ("So the total is 1 000 000 people.", "1 000 000"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("solution,expected", [
    ("72", "72"),
    ("Natalia sold 24 clips.\n#### 72", "72"),
    ("He has 1,234 left.\n#### 1,234", "1234"),
    ("So the area is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
    ("First \\boxed{1} then \\boxed{(1, 2)}", "(1, 2)"),
    ("The solutions are $\\boxed{1}$ and $\\boxed{-3}$.", "1, -3"),
    ("\\frac{14}{3}", "\\frac{14}{3}"),
    ("broken \\boxed{12", None),
    ("", None),
    ("   ", None),
    ("####", None),
])
def test_gold_answer_from_solution(solution, expected):
    assert gold_answer_from_solution(solution) == expected


def test_gold_may_be_a_full_solution():
    assert verify("\\boxed{72}", "Natalia sold 24 clips.\n#### 72")
    assert verify("\\boxed{\\frac{1}{2}}", "so the answer is $\\boxed{\\dfrac12}$")


# ------------------------------------------------------------------------------------------------
# Adversarial inputs: False (or the right answer), quickly, never an exception
# ------------------------------------------------------------------------------------------------

HUGE = [
    "\\boxed{9^{9^{9^9}}}", "\\boxed{10^{10^{10}}}", "\\boxed{2^{2^{100}}}", "\\boxed{1000000!}",
    "\\boxed{(10^{100})!}", "\\boxed{100!!}", "\\boxed{\\binom{10^{9}}{5}}", "\\boxed{x^{10^{9}}}",
    "\\boxed{1e999999999}", "\\boxed{\\sqrt{10^{999}+1}}", "\\boxed{(\\sqrt{2})^{10^{8}}}",
    "\\boxed{" + "9" * 10_000 + "}", "The answer is " + "9" * 10_000, "#### " + "9" * 10_000,
    "\\boxed{" + "9" * 480 + "^{" + "9" * 10 + "}}", "\\boxed{\\sin(10^{999})}",
    "\\boxed{\\lfloor \\pi \\cdot 10^{999} \\rfloor}", "\\boxed{\\sqrt[10^{9}]{2}}",
    "\\boxed{2^{0.000001}}", "\\boxed{" + "2^{" * 40 + "2" + "}" * 40 + "}",
]
INJECTION = [
    "\\boxed{__import__('os').system('echo hi')}", "__import__('os').system('echo hi')",
    "\\boxed{lambda: 1}", "\\boxed{eval('1')}", "\\boxed{exec('import os')}", "\\boxed{().__class__}",
    "\\boxed{open('/etc/passwd').read()}", "\\boxed{\\input{/etc/passwd}}",
    "\\boxed{Symbol('x')}", "\\boxed{sympify('1')}", "\\boxed{1; import os}",
]
MALFORMED = [
    "", " ", "\n\n", "\\boxed{", "\\boxed{}", "}}}}{{{{", "\\boxed{\\frac{1}{2}", "\\boxed{((((}",
    "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}", "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
    "\\boxed{" + "\\frac{" * 60 + "1" + "}{2}" * 60 + "}", "\\boxed{" + "-" * 400 + "1}",
    "\\boxed{" + "\\sqrt{" * 100 + "2" + "}" * 100 + "}", "\\boxed{" * 3000, "{" * 100_000,
    "\\boxed{\\left(\\right.}", "\\boxed{1/0}", "\\boxed{0^{-1}}", "\\boxed{\\infty - \\infty}",
    "\\boxed{\\begin{pmatrix}\\end{pmatrix}}", "\\boxed{,,,,}", "\\boxed{\\{\\}\\}}", "\\boxed{[)}",
    "\\boxed{" + "x" * 450 + "}", "\\boxed{" + "1," * 200 + "1}", "\\boxed{" + "\\pm 1" * 20 + "}",
    "a " * 500_000 + "the end", "\u0000\uffff\ud7ff\U0001F600 \\boxed{\u00e9}", "\\boxed{x_{" + "1" * 300 + "}}",
]


def _timed(prediction, gold):
    t0 = time.perf_counter()
    ok, reason = verify_with_reason(prediction, gold)
    elapsed = time.perf_counter() - t0
    assert elapsed < BOUND_S, (prediction[:80], elapsed, reason)
    return ok


@pytest.mark.parametrize("prediction", HUGE + INJECTION + MALFORMED)
def test_adversarial_false_and_fast(prediction):
    for gold in ("1", "0", "x", "\\frac{1}{2}", "(1,2)"):
        assert _timed(prediction, gold) is False


def test_huge_values_are_not_computed():
    # identical strings are fine (a string compare), but nothing huge is ever evaluated
    assert _timed("\\boxed{9^{9^{9^9}}}", "9^{9^{9^9}}") is True
    assert _timed("\\boxed{9^{9^{9^9}}}", "9^{9^{9^{9}}}") is False
    assert _timed("\\boxed{" + "1+" * 200 + "1}", "201") is True


def test_megabyte_response():
    text = "Let me think. " * 75_000 + "So the answer is $\\boxed{5}$."
    assert len(text) > 1_000_000
    assert _timed(text, "5") is True
    assert _timed("x" * 1_000_000, "5") is False
    assert _timed("1" * 1_000_000, "5") is False


def test_bad_argument_types():
    assert verify(None, "1") is False
    assert verify("\\boxed{1}", None) is False
    assert verify(b"\\boxed{1}", "1") is False
    assert verify("\\boxed{1}", "") is False


def test_threads():
    pairs = [(p, g, e) for p, g, e in CASES[:60]] + [(h, "1", False) for h in HUGE[:6]]
    errors = []

    def work():
        for p, g, e in pairs:
            t0 = time.perf_counter()
            if verify(p, g) is not e or time.perf_counter() - t0 > BOUND_S:
                errors.append((p, g))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

PROPS = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])


def _spellings(q: Fraction) -> list:
    a, b = q.numerator, q.denominator
    sign, a_abs = ("-" if a < 0 else ""), abs(a)
    out = [f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\dfrac{{{a}}}{{{b}}}", f"{sign}\\frac{{{a_abs}}}{{{b}}}",
           f"\\tfrac{{{a}}}{{{b}}}", f"\\left({a}\\right)/{b}", f"{a * 3}/{b * 3}"]
    if b == 1:
        out += [str(a), f"{a}.0", f"{a:,}"]
    digits = 12
    out.append(f"{float(q):.{digits}g}" if abs(q) >= 1e-3 else str(a / b))
    return out


@PROPS
@given(st.fractions(min_value=-10**6, max_value=10**6, max_denominator=10**4))
def test_fraction_spellings_are_equal(q):
    spellings = _spellings(q)
    for i, s in enumerate(spellings):
        gold = spellings[(i + 1) % len(spellings)]
        assert _timed(f"So the answer is $\\boxed{{{s}}}$.", gold), (s, gold)
    assert not _timed(f"\\boxed{{{spellings[0]}}}", f"\\frac{{{q.numerator + q.denominator}}}{{{q.denominator}}}")


@PROPS
@given(st.integers(min_value=-10**9, max_value=10**9))
def test_integer_spellings_are_equal(n):
    for text in (f"#### {n:,}", f"The answer is {n}.", f"\\boxed{{{n:,}}}", f"\\boxed{{{n}.00}}",
                 f"So the total is {n} dollars", f"$\\boxed{{\\text{{{n}}}}}$"):
        assert _timed(text, str(n)), text
    assert not _timed(f"\\boxed{{{n + 1}}}", str(n))


@PROPS
@given(st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_decimal_spellings_are_equal(d):
    q = Fraction(d)
    assert _timed(f"\\boxed{{{d}}}", f"\\frac{{{q.numerator}}}{{{q.denominator}}}")
    assert _timed(f"The answer is {d}.", str(q))
    assert not _timed(f"\\boxed{{{d + 1}}}", str(d))


_ATOMS = st.sampled_from(["x", "y", "2", "3", "\\pi", "\\sqrt{2}", "\\frac{1}{2}", "a", "7"])


def _expr_strategy():
    def combine(children):
        return st.one_of(
            st.tuples(children, children).map(lambda t: f"({t[0]}) + ({t[1]})"),
            st.tuples(children, children).map(lambda t: f"({t[0]}) \\cdot ({t[1]})"),
            st.tuples(children, children).map(lambda t: f"\\frac{{{t[0]}}}{{({t[1]})^2 + 1}}"),
            children.map(lambda c: f"\\sqrt{{({c})^2 + 4}}"),
            children.map(lambda c: f"-({c})"),
            children.map(lambda c: f"\\sin({c})"),
        )
    return st.recursive(_ATOMS, combine, max_leaves=8)


@PROPS
@given(_expr_strategy())
def test_random_expression_equals_itself(expr):
    respelled = expr.replace("\\frac", "\\dfrac").replace("\\cdot", "\\times")
    assert _timed(f"\\boxed{{{expr}}}", respelled), expr
    assert _timed(f"\\boxed{{{expr} + 0}}", expr), expr
    assert not _timed(f"\\boxed{{{expr} + 1}}", expr), expr


_LATEX_SOUP = st.lists(st.sampled_from(
    ["\\boxed{", "}", "{", "\\frac", "\\sqrt", "^", "_", "(", ")", "[", "]", "1", "9", "x", "\\pi", ",",
     "=", "\\pm", "\\{", "\\}", "!", "\\text{", "cm", "####", "answer is", ".", "-", "\\cup", "&", "\\\\",
     "\\begin{pmatrix}", "\\end{pmatrix}", "%", "\\infty", "<", "\\le", "e", "i", "|", " ", "\n", "$"]),
    max_size=60).map("".join)


@PROPS
@given(st.one_of(st.text(max_size=300), _LATEX_SOUP), st.one_of(st.text(max_size=30), _LATEX_SOUP))
def test_arbitrary_text_never_raises_and_is_fast(prediction, gold):
    ok = _timed(prediction, gold)
    assert isinstance(ok, bool)
    assert extract_answer(prediction) is None or isinstance(extract_answer(prediction), str)

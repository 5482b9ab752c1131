r"""Math answer verifier: extract the final answer from model text, normalise it, compare it to gold.

Model output is untrusted input. It is never evaluated: a small tokenizer and recursive-descent
parser turn a whitelisted LaTeX subset into inert sympy trees (Rational, Symbol, Add, Mul, Pow, a
few functions, all with evaluate=False; only rational arithmetic is folded). Every size that could
blow up (digits, powers, roots, factorials, binomials, nesting, list lengths) is bounded before
anything is computed, so a check takes milliseconds by construction, from any thread, with no
signals; a time budget is also checked between stages. Comparison runs cheapest first:
normalised strings, plain numbers (exact fractions), structures, then expressions, evaluated
numerically (complex floats) at fixed points; sympy's simplify is never called (unbounded time).

Conventions (math-verify's where it has one):
  * `50\%` equals 50 and 0.5; plain 50 does not equal 0.5.
  * A decimal equals an exact value only if it is that value correctly rounded and has at least 4
    significant digits (0.3333 = 1/3, 0.33 != 1/3), or within float noise (relative 1e-9).
  * Tuples `(a, b)` are ordered; sets `\{..\}`, bare lists `x=1, x=2` and `\pm` are unordered; an
    open interval and a point are both written `(a, b)` and compare equal; `[a, b)` is an interval.
  * `x = 3`, `y = 2x + 3`, `f(x) = ...` compare by their right-hand side; other equations compare
    as lhs - rhs up to a constant factor. `2\frac{1}{2}` is the mixed number 5/2.
  * `e` and `i` are Euler's number and the imaginary unit; `\log` is the natural log.
"""

import cmath
import functools
import math
import random
import re
import time
from fractions import Fraction

import sympy

_MAX_TEXT = 5000        # only the tail of a response is searched for its answer
_MAX_ANSWER = 500       # longer extracted answers are rejected (never equal)
_MAX_DIGITS = 1000      # integer literals, and estimated digits of a numeric power
_MAX_DEPTH = 50         # nesting of brackets / groups / unary operators
_MAX_FACTORIAL = 1000
_MAX_ITEMS = 32         # elements of a tuple, set, list or matrix
_TIME_BUDGET = 0.9      # seconds; checked between stages (each stage is bounded by construction)
_REL_TOL = 1e-9         # exact answers compared numerically (irrationals, symbolic identities)
_DEC_REL_TOL = 1e-9     # a decimal literal against anything: float noise only (see _decimal_close)
_DEC_MIN_SIG = 4        # ... or the correctly rounded value, if it has at least this many digits


class _Unsupported(Exception):
    """Not in the parsed subset: the answer is compared as text instead."""


class _TooBig(Exception):
    """Outside the safe size bounds: never equal (unless the strings are identical)."""


class _Timeout(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Extraction: last \boxed{}, then "#### N", then "the answer is X", then the last number
# ------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_HASH_RE = re.compile(r"####[ \t]*(?=[-+$\\\d.(])([^\n]*)")  # not a markdown "#### Step 1" header
_ANSWER_IS_RE = re.compile(r"(?=answer\**\s*(?:is\b|:)\s*:?\**[ \t]*([^\n]*))", re.I)  # overlapping
_NOT_AN_ANSWER_RE = re.compile(    # "check that the answer is correct" names no answer
    r"(?:correct|incorrect|right|wrong|reasonable|valid|invalid|consistent|indeed|likely|probably|"
    r"clearly|not|that|the|to|as|of|still|also|given|found|obtained|below|above)\b", re.I)
_LAST_NUM_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?<![\w.])\d[\d,]*(?:\.\d+)?")


def _brace_pairs(text: str) -> dict:
    """{index of '{': index of its matching '}'} in one pass; escaped \\{ \\} are not braces."""
    pairs, stack, i, n = {}, [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _boxed_contents(text: str) -> list:
    """Contents of every \\boxed{...} / \\fbox{...} (nested braces) and `\\boxed 5`, in order."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return []
    pairs, out = _brace_pairs(text), []
    for i in starts:
        j = i
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if j in pairs:                       # unbalanced boxes are skipped
                out.append(text[j + 1:pairs[j]])
        elif j > i:                              # `\boxed 5`
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                out.append(m.group(0))
    return out


def _clean_phrase(x: str) -> str:
    """The answer part of 'the answer is X. Because...': math delimiters or the first clause."""
    x = x.strip().strip("*").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if x.startswith(left):
            end = x.find(right, len(left))
            if end > 0:
                return x[len(left):end].strip()
    x = re.split(r"\.(?=\s|$)|;|(?:,|\s(?:and|but|because|since|which|as|so))\s+(?=[a-zA-Z]{2})", x, maxsplit=1)[0]
    return x.strip().rstrip(".!,:").strip()


def _extract(text: str):
    """(answer, how) or (None, why)."""
    if not isinstance(text, str):
        return None, "prediction is not a string"
    text = text[-_MAX_TEXT:]
    for content in reversed(_boxed_contents(text)):
        if content.strip():
            return content.strip(), "boxed"
    for pattern, how in ((_HASH_RE, "####"), (_ANSWER_IS_RE, "answer is")):
        for m in reversed(list(pattern.finditer(text))):
            phrase = _clean_phrase(m.group(1))
            if phrase and not _NOT_AN_ANSWER_RE.match(phrase):
                return phrase, how
    nums = _LAST_NUM_RE.findall(text)
    if nums and nums[-1].rstrip(","):
        return nums[-1].rstrip(","), "last number"
    return None, "no answer found"


def extract_answer(text: str) -> str | None:
    """The final answer in a model response, as written (not normalised); None if there is none."""
    try:
        return _extract(text)[0]
    except Exception:
        return None


def gold_answer_from_solution(solution: str) -> str | None:
    """Gold answer from a plain answer, a GSM8K solution (`#### 72`) or a MATH solution (last box)."""
    if solution is None:
        return None
    s = str(solution).strip()
    if "####" in s:
        ans = s.rsplit("####", 1)[1].strip().replace(",", "").rstrip(".").strip()
        return ans or None
    if _BOX_RE.search(s):
        boxes = [b.strip() for b in _boxed_contents(s) if b.strip()]
        return boxes[-1] if boxes else None
    return s if 0 < len(s) <= _MAX_ANSWER else None


# ------------------------------------------------------------------------------------------------
# Normalisation (string level): delimiters, spacing, units, percent, thousands separators
# ------------------------------------------------------------------------------------------------

_UNICODE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ",
                          "\u00f7": "\\div ", "\u00b7": "\\cdot ", "\u03c0": "\\pi ", "\u221e": "\\infty ",
                          "\u221a": "\\sqrt", "\u2264": "\\le ", "\u2265": "\\ge ", "\u00b0": "",
                          "\u222a": "\\cup ", "\u00b1": "\\pm ", "\u2009": " ", "\u00a0": " "})
_REWRITES = [(re.compile(p), r) for p, r in (
    (r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?|middle)(?![a-zA-Z])", ""),
    (r"\\(?:displaystyle|textstyle|scriptstyle|limits)(?![a-zA-Z])", ""),
    (r"(?<!\\)\\[,;:!>]|\{,\}", ""),              # thin spaces; `1\,000` and `1{,}000` are numbers
    (r"(?<!\\)\\ |\\q?quad(?![a-zA-Z])|~", " "),
    (r"\\\$|\$|(?<!\\)\\[()\[\]]", " "),           # currency and math delimiters
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"), (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
    (r"\\leq?(?:slant)?(?![a-zA-Z])", r"\\le "), (r"\\geq?(?:slant)?(?![a-zA-Z])", r"\\ge "),
    (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"), (r"\\approx(?![a-zA-Z])", "="),
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", ""),
    (r"\\(?:emptyset|varnothing)(?![a-zA-Z])", r"\\{\\}"),
    (r"\\mathbb\s*\{?R\}?", r"(-\\infty,\\infty)"),
    (r"(?<![\\a-zA-Z])(?:infinity|inf)(?![a-zA-Z])", r"\\infty"),
    (r"(?<![\\a-zA-Z])(sqrt|frac|pi|sin|cos|tan|ln|log|exp)(?![a-zA-Z])", r"\\\1"),
)]
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|textsf|mbox|mathrm|mathbf|mathit|"
                          r"mathsf|mathbb|operatorname|boldsymbol)\s*\{([^{}]*)\}(\s*\^\s*\{?\d\}?)?")
_UNIT_WORD_RE = re.compile(r"[a-zA-Z]{2,}(?:/[a-zA-Z]+)?\.?(?:\^\{?\d\}?)?|[a-zA-Z]/[a-zA-Z]+")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d{1,3}(?: \d{3})+")
_LHS_VAR = r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\^\{?-1\}?)?(?:\([a-z]\))?"


def _text_cmd(m: re.Match) -> str:
    """\\text{...}: ' and '/' or ' separate answers; words after a value are units; else unwrap."""
    word = m.group(1).strip()
    if word.lower() in ("and", "or", ","):
        return ","
    before = m.string[:m.start()].strip()
    if before and before[-1] not in "(,=" and re.fullmatch(r"[a-zA-Z][a-zA-Z .\-]+", word):
        return " "
    return m.group(1) + (m.group(2) or "")


def _strip_units(s: str) -> str:
    """'12 dollars', '3 square units', '5 km/h' -> the value (only after something number-like)."""
    words = s.split()
    k = len(words)
    while k > 1 and _UNIT_WORD_RE.fullmatch(words[k - 1]) and not words[k - 1].startswith("\\"):
        k -= 1
    head = " ".join(words[:k])
    if k < len(words) and re.search(r"[\d}]|\\pi", head) and re.search(r"[\d})\]]$|\\[a-zA-Z]+$", head):
        return head
    return s


@functools.lru_cache(maxsize=8192)
def _normalize(s: str) -> tuple:
    """(normalised string, is_percent). Pure string rewriting; cheap and total."""
    s = s.translate(_UNICODE)
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    for _ in range(4):                                     # nested \textbf{\text{..}}
        s, n = _TEXT_CMD_RE.subn(_text_cmd, s)
        if not n:
            break
    s = " ".join(s.split()).rstrip(" .,;:").lstrip(" ,;:")
    percent = False
    m = re.search(r"\s*(?:\\%|%|\s+percent|\s+per\s*cent)$", s)
    if m:
        percent, s = True, s[:m.start()]
    s = s.replace("\\%", "").replace("%", "").rstrip(" .,;:")
    s = re.sub(r"\s+(?:and|or)\s+", ", ", s)
    s = _strip_units(s)
    s = re.sub(r"^(?:[a-zA-Z]\s*\\in\s*|=\s*)", "", s)           # x \in [2, 5); \approx 3.14
    s = re.sub(r"^(\d+)_\{?\d+\}?$", r"\1", s)                  # 1011_2: the base is implied
    if s.count("=") == 1:                                       # `x = 1,000`
        s = re.sub(r"^" + _LHS_VAR + r"\s*=\s*", "", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"\s*([^\w\s\\])\s*", r"\1", s)                  # spaces around symbols carry nothing
    return s, percent


# ------------------------------------------------------------------------------------------------
# Plain numbers: exact fractions, without sympy
# ------------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FRAC_RE = re.compile(r"([+-]?)(?:\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|(\d+)/(\d+))")


def _decimal(literal: str):
    """Fraction value and (ulp, significant digits) of a number literal; dec is None for integers."""
    mant, _, exp = literal.lower().partition("e")
    exp = int(exp) if exp else 0
    if len(mant) > _MAX_DIGITS or abs(exp) > _MAX_DIGITS:
        raise _TooBig("number literal too long")
    value = Fraction(mant.rstrip(".")) * Fraction(10) ** exp
    if "." not in mant:
        return value, None
    frac_digits = len(mant.split(".")[1])
    sig = len(re.sub(r"\D", "", mant).lstrip("0")) or 1
    return value, (Fraction(1, 10 ** frac_digits) * Fraction(10) ** exp, sig)


def _plain_number(s: str):
    """(Fraction, dec) for an int / decimal / sci / a/b / \\frac{a}{b} string, else None."""
    if _NUM_RE.fullmatch(s):
        return _decimal(s)
    m = _FRAC_RE.fullmatch(s)
    if m:
        num, den = int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5))
        if den != 0:
            return Fraction(-num if m.group(1) == "-" else num, den), None
    return None


def _decimal_close(x, dx, y, dy) -> bool:
    """Equality when a decimal literal is involved. It equals a value within float noise, or when
    it is that value correctly rounded to the digits written AND has at least 4 significant
    digits: 0.3333 and 0.1429 count as 1/3 and 1/7, a coarse 0.33 does not. (A flat relative
    tolerance such as 1e-6 would make 1000000.5 equal 1000000, wrong for GSM8K-sized amounts.)"""
    diff, scale = abs(x - y), max(abs(x), abs(y))
    if diff <= _DEC_REL_TOL * scale:
        return True
    return any(d is not None and d[1] >= _DEC_MIN_SIG and diff <= float(d[0]) / 2 * (1 + 1e-9)
               for d in (dx, dy))


def _with_percent(alts: tuple, percent: bool) -> tuple:
    """`50\\%` equals 50 and 0.5 (math-verify's convention); plain 50 does not equal 0.5."""
    if not percent:
        return alts
    scale = (lambda v: v / 100) if isinstance(alts[0][0], Fraction) else (lambda v: _div(v, sympy.Integer(100)))
    return alts + tuple((scale(v), None if d is None else (d[0] / 100, d[1])) for v, d in alts)


def _numbers_equal(pa: tuple, ga: tuple) -> bool:
    for x, dx in pa:
        for y, dy in ga:
            if x == y or ((dx or dy) and _decimal_close(x, dx, y, dy)):
                return True
    return False


# ------------------------------------------------------------------------------------------------
# Expressions: whitelisted tokens -> sympy objects, sizes bounded before anything is computed
# ------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
                       r"|(\\[a-zA-Z]+|\\[{}|])|([a-zA-Z](?:_\{[a-zA-Z0-9]{1,10}\}|_[a-zA-Z0-9])?)"  # x, x_1, a_{10}
                       r"|([-+*/^_()\[\]{}|!,]))")
_GREEK = frozenset("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda "
                   "mu nu xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi "
                   "Sigma Phi Psi Omega".split())
_FUNCS = {"sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
          "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
          "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log,
          "log": sympy.log, "exp": sympy.exp}
_CONSTS = {"pi": sympy.pi, "infty": sympy.oo}
_IMPLICIT_CMDS = frozenset(["frac", "sqrt", "binom", "lfloor", "lceil"]) | _GREEK | set(_FUNCS) | set(_CONSTS)


def _tokenize(s: str) -> list:
    toks, i = [], 0
    while i < len(s):
        m = _TOKEN_RE.match(s, i)
        if not m:
            if s[i:].strip():
                raise _Unsupported(f"unexpected character {s[i]!r}")
            break
        kind = m.lastindex
        toks.append((("num", "cmd", "letter", "op")[kind - 1], m.group(kind)))
        i = m.end()
    return toks


# The tree is built inert (evaluate=False): sympy's automatic simplification is unbounded (it
# factors bases of roots, expands binomials, calls evalf at growing precision from assumption
# queries). Only rational arithmetic is folded, exactly and within the size bounds.

def _add(a, b):
    return a + b if a.is_Rational and b.is_Rational else sympy.Add(a, b, evaluate=False)


def _neg(a):
    return -a if a.is_Number else sympy.Mul(sympy.S.NegativeOne, a, evaluate=False)


def _mul(a, b):
    return a * b if a.is_Rational and b.is_Rational else sympy.Mul(a, b, evaluate=False)


def _div(a, b):
    if a.is_Rational and b.is_Rational:
        if b == 0:
            raise _Unsupported("division by zero")
        return a / b
    return sympy.Mul(a, sympy.Pow(b, sympy.S.NegativeOne, evaluate=False), evaluate=False)


def _log10_size(value) -> float:
    """Rough |log10| of a constant (digits of a rational), to bound powers before computing them."""
    if value.is_Rational:
        return sum(math.log10(abs(int(k))) for k in (value.p, value.q) if k)
    try:
        return abs(math.log10(abs(_ev(value, {})) or 1.0))
    except (ArithmeticError, ValueError, _Unsupported):
        raise _TooBig("power of an unbounded base") from None


def _pow(base, exp):
    if exp.is_Rational:
        if exp.q > _MAX_DIGITS:
            raise _TooBig("root index too large")
        if base.free_symbols:
            if abs(exp) > _MAX_DIGITS:
                raise _TooBig("exponent of a symbolic base")
        elif base not in (sympy.S.Zero, sympy.S.One, sympy.S.NegativeOne):
            if float(abs(exp)) * _log10_size(base) > 2 * _MAX_DIGITS:
                raise _TooBig("power too large")
        if base.is_Rational and exp.is_Integer:
            if base == 0 and exp < 0:
                raise _Unsupported("division by zero")
            return base ** exp                    # exact, and bounded by the check above
    return sympy.Pow(base, exp, evaluate=False)


def _factorial(n):
    if n.is_Number and not (n.is_Integer and n >= 0):
        raise _Unsupported("factorial of a non-natural number")
    if n.is_Integer and n > _MAX_FACTORIAL:
        raise _TooBig("factorial too large")
    return sympy.factorial(n) if n.is_Integer else sympy.factorial(n, evaluate=False)


def _binomial(n, k):
    if n.is_Integer and k.is_Integer:
        if abs(n) > 10 ** 4 or (n < 0 and abs(k) > _MAX_FACTORIAL):
            raise _TooBig("binomial too large")
        return sympy.binomial(n, k)
    return sympy.binomial(n, k, evaluate=False)


class _Parser:
    """Recursive descent over the tokens: expr := term (+|- term)*; term := unary (op unary)*."""

    def __init__(self, s: str):
        self.toks, self.i, self.depth = _tokenize(s), 0, 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def at(self, kind, *values) -> bool:
        k, v = self.peek()
        return k == kind and (not values or v in values)

    def expect(self, value):
        if not self.at("op", value):
            raise _Unsupported(f"expected {value!r}")
        self.i += 1

    def enter(self):
        self.depth += 1
        if self.depth > 2 * _MAX_DEPTH:       # about two grammar levels per bracket
            raise _TooBig("nesting too deep")

    def parse(self):
        e = self.expr()
        if self.i != len(self.toks):
            raise _Unsupported(f"unexpected {self.peek()[1]!r}")
        return e

    def expr(self):
        self.enter()
        e = self.term()
        while self.at("op", "+", "-"):
            op = self.take()[1]
            t = self.term()
            e = _add(e, t if op == "+" else _neg(t))
        self.depth -= 1
        return e

    def term(self):
        e = self.unary()
        while True:
            k, v = self.peek()
            if (k, v) in (("op", "*"), ("cmd", "\\cdot"), ("cmd", "\\times")):
                self.take()
                e = _mul(e, self.unary())
            elif (k, v) in (("op", "/"), ("cmd", "\\div")):
                self.take()
                e = _div(e, self.unary())
            elif k == "letter" or (k == "op" and v in "({") or (k == "cmd" and v[1:] in _IMPLICIT_CMDS):
                e = _mul(e, self.power())         # implicit product: 2x, 2\sqrt{3}, (a)(b)
            else:
                return e

    def unary(self):
        self.enter()
        if self.at("op", "-", "+"):
            sign = self.take()[1]
            e = self.unary()
            e = _neg(e) if sign == "-" else e
        else:
            e = self.power()
        self.depth -= 1
        return e

    def power(self):
        e = self.primary()
        while self.at("op", "!"):
            self.take()
            e = _factorial(e)
        if self.at("op", "^"):
            self.take()
            e = _pow(e, self.exponent())
        return e

    def exponent(self):
        self.enter()
        if self.at("op", "-", "+"):
            sign = self.take()[1]
            e = self.exponent()
            e = _neg(e) if sign == "-" else e
        elif self.at("op", "{", "("):
            e = self.group()
        else:
            e = self.primary()
        self.depth -= 1
        return e

    def group(self):
        """A macro argument: {expr}, (expr), or a single token (`\\frac12`, `\\sqrt3`)."""
        k, v = self.peek()
        if k == "op" and v in "{(":
            self.take()
            e = self.expr()
            self.expect("}" if v == "{" else ")")
            return e
        if k == "num" and len(v) > 1 and v[:2].isdigit():     # `\frac12`: one digit per argument
            self.toks[self.i] = ("num", v[1:])
            return sympy.Integer(int(v[0]))
        return self.primary()

    def primary(self):
        k, v = self.take()
        if k == "num":
            value, _ = _decimal(v)
            return sympy.Rational(value.numerator, value.denominator)
        if k == "letter":                        # single letters (subscripted) only: words are text
            return {"e": sympy.E, "i": sympy.I}.get(v) or sympy.Symbol(v.replace("{", "").replace("}", ""))
        if k == "op" and v in "({[":
            e = self.expr()
            self.expect({"(": ")", "{": "}", "[": "]"}[v])
            return e
        if k == "op" and v == "|":
            e = self.expr()
            self.expect("|")
            return sympy.Abs(e, evaluate=False)
        if k == "cmd":
            return self.command(v[1:])
        raise _Unsupported(f"unexpected {v!r}")

    def command(self, name: str):
        if name in _CONSTS:
            return _CONSTS[name]
        if name in _GREEK:
            return sympy.Symbol(name)
        if name == "frac":
            num = self.group()
            return _div(num, self.group())
        if name == "binom":
            n = self.group()
            return _binomial(n, self.group())
        if name == "sqrt":
            if self.at("op", "["):
                self.take()
                index = self.expr()
                self.expect("]")
                return _pow(self.group(), _div(sympy.S.One, index))
            return _pow(self.group(), sympy.Rational(1, 2))
        if name in ("lfloor", "lceil"):
            e = self.expr()
            self.expect_cmd("rfloor" if name == "lfloor" else "rceil")
            return (sympy.floor if name == "lfloor" else sympy.ceiling)(e, evaluate=False)
        if name in _FUNCS:
            return self.function(name)
        raise _Unsupported(f"unknown command \\{name}")

    def expect_cmd(self, name):
        if not self.at("cmd", "\\" + name):
            raise _Unsupported(f"expected \\{name}")
        self.take()

    def function(self, name: str):
        """\\sin x, \\sin(x), \\sin^2 x, \\log_2 8, \\ln x."""
        base = power = None
        if name == "log" and self.at("op", "_"):
            self.take()
            base = self.group()
        if self.at("op", "^"):
            self.take()
            power = self.exponent()
        if self.at("op", "(", "{"):
            arg = self.group()
        else:                                    # \sin 2x: the implicit product that follows
            arg = self.power()
            while self.at("letter") or (self.at("cmd") and self.peek()[1][1:] in _IMPLICIT_CMDS - set(_FUNCS)):
                arg = _mul(arg, self.power())
        # unevaluated: sympy's own simplification of f(arg) is unbounded; numeric evaluation decides
        e = _FUNCS[name](arg, evaluate=False)
        if base is not None:
            e = _div(e, sympy.log(base, evaluate=False))
        return _pow(e, power) if power is not None else e


def _parse_expr(s: str):
    """sympy expression for `s`; mixed numbers like `2\\frac{1}{2}` mean 2 + 1/2 (GSM8K style)."""
    s = re.sub(r"(?<![\w.}^_])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", r"(\1+\2/\3)", s)
    return _Parser(s).parse()


# ------------------------------------------------------------------------------------------------
# Numeric evaluation of the sympy objects we build (complex floats; no lambdify, no eval)
# ------------------------------------------------------------------------------------------------

def _real_fn(f):
    def g(z):
        if abs(z.imag) > 1e-12:
            raise ValueError("complex argument")
        return complex(f(z.real))
    return g


_EVAL_FUNCS = {
    sympy.sin: cmath.sin, sympy.cos: cmath.cos, sympy.tan: cmath.tan, sympy.asin: cmath.asin,
    sympy.acos: cmath.acos, sympy.atan: cmath.atan, sympy.sinh: cmath.sinh, sympy.cosh: cmath.cosh,
    sympy.tanh: cmath.tanh, sympy.exp: cmath.exp, sympy.log: cmath.log,
    sympy.cot: lambda z: 1 / cmath.tan(z), sympy.sec: lambda z: 1 / cmath.cos(z),
    sympy.csc: lambda z: 1 / cmath.sin(z), sympy.Abs: lambda z: complex(abs(z)),
    sympy.floor: _real_fn(math.floor), sympy.ceiling: _real_fn(math.ceil),
    sympy.factorial: _real_fn(lambda x: math.gamma(x + 1)),
}
_EVAL_CONSTS = {sympy.pi: complex(math.pi), sympy.E: complex(math.e), sympy.I: 1j}


def _ev(e, env: dict) -> complex:
    """Value of a sympy expression at env {Symbol: complex}; raises on anything unknown or infinite."""
    if e.is_Rational:
        v = complex(float(Fraction(int(e.p), int(e.q))))
    elif e.is_Symbol:
        v = env[e]
    elif e.is_Atom and e in _EVAL_CONSTS:
        v = _EVAL_CONSTS[e]
    elif e.is_Add:
        v = sum(_ev(a, env) for a in e.args)
    elif e.is_Mul:
        v = 1 + 0j
        for a in e.args:
            v *= _ev(a, env)
    elif e.is_Pow:
        b, x = _ev(e.args[0], env), e.args[1]
        if x.is_Rational and b.imag == 0 and b.real < 0 and x.q % 2:    # real odd root: cbrt(-8) = -2
            v = complex((-1) ** int(x.p) * (-b.real) ** float(x))
        else:
            v = b ** (int(x) if x.is_Integer else _ev(x, env))
    elif e.func is sympy.binomial:
        n, k = (_ev(a, env).real for a in e.args)
        v = complex(math.gamma(n + 1) / (math.gamma(k + 1) * math.gamma(n - k + 1)))
    elif e.func in _EVAL_FUNCS and len(e.args) == 1:
        v = _EVAL_FUNCS[e.func](_ev(e.args[0], env))
    else:
        raise _Unsupported(f"cannot evaluate {type(e).__name__}")
    if not cmath.isfinite(v):
        raise OverflowError("not finite")
    return v


def _close(x: complex, y: complex, rel: float) -> bool:
    return abs(x - y) <= rel * max(abs(x), abs(y)) + 1e-12


def _fixed_points(count: int = 6, dims: int = 12, seed: int = 1234) -> list:
    """Evaluation points for expressions in symbols: fixed, so every verdict is deterministic;
    positive, so roots and logs stay on their principal real branch."""
    rng = random.Random(seed)
    return [[rng.uniform(0.3, 2.7) for _ in range(dims)] for _ in range(count)]


_POINTS = _fixed_points()


def _values_equal(x, dx, y, dy) -> bool:
    """Exact rationals exactly; constants numerically; expressions in symbols at 6 fixed points."""
    if x == y:
        return True
    if x.is_Rational and y.is_Rational:
        return bool(dx or dy) and _decimal_close(Fraction(int(x.p), int(x.q)), dx,
                                                 Fraction(int(y.p), int(y.q)), dy)
    syms = sorted(x.free_symbols | y.free_symbols, key=str)
    if not syms:
        try:
            vx, vy = _ev(x, {}), _ev(y, {})
        except (_Unsupported, ArithmeticError, ValueError):
            return False
        return _decimal_close(vx, dx, vy, dy) if (dx or dy) else _close(vx, vy, _REL_TOL)
    return _same_function(x, y, syms, ratio=False)


def _same_function(x, y, syms, ratio: bool) -> bool:
    """x == y at >= 3 of 6 fixed points and never different there. With ratio=True (equations,
    as lhs - rhs) x / y must instead be the same non-zero constant at every point."""
    if len(syms) > len(_POINTS[0]):
        return False
    agree, c = 0, None
    for point in _POINTS:
        env = {s: complex(point[j]) for j, s in enumerate(syms)}
        try:
            vx, vy = _ev(x, env), _ev(y, env)
        except (_Unsupported, ArithmeticError, ValueError, KeyError):
            continue
        if ratio:
            if abs(vy) < 1e-9:
                continue
            vx, vy = vx / vy, (c if c is not None else vx / vy)
            c = vy
        if not _close(vx, vy, 1e-8):
            return False
        agree += 1
    return agree >= 3 and (c is None or abs(c) > 1e-12)


# ------------------------------------------------------------------------------------------------
# Structures: tuples, sets, lists, intervals, matrices, equations, inequalities, text
# ------------------------------------------------------------------------------------------------

_MATRIX_RE = re.compile(r"\\begin\{(\w*matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_INEQ_RE = re.compile(r"\\le(?![a-zA-Z])|\\ge(?![a-zA-Z])|<|>")


def _split_top(s: str, sep: str) -> list:
    """Split at `sep` outside any (), [], {} (bracket kinds are not matched: `[1, 2)` is fine)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i = i + len(sep)
            continue
        i += 1
    parts.append(s[start:])
    if len(parts) > _MAX_ITEMS:
        raise _TooBig("too many elements")
    return [p.strip() for p in parts]


def _wrapped(s: str) -> bool:
    """True when the first bracket of `s` closes at its last character."""
    depth = 0
    for i, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if depth == 0:
            return i == len(s) - 1
    return False


def _text_key(s: str) -> str:
    return re.sub(r"[\s{}\\]", "", s).lower()


def _element(s: str):
    """One value: ('expr', ((sympy, dec),)), ('eq', lhs - rhs) or ('text', key)."""
    parts = _split_top(s, "=")
    if len(parts) > 2:
        s = parts[-1]                             # a chain: the last member is the result
    elif len(parts) == 2:
        lhs, rhs = parts
        if re.fullmatch(_LHS_VAR + r"|[a-zA-Z ]+", lhs):
            s = rhs                               # y = 2x + 3, Total = 42
        elif re.fullmatch(_LHS_VAR, rhs):
            s = lhs
        else:
            left, right = _parse_expr(lhs), _parse_expr(rhs)
            if left.free_symbols:
                return ("eq", _add(left, _neg(right)))  # a genuine equation: x + y = 5
            s = rhs                               # 6/8 = 3/4: the result
    if not s or re.search(r"[a-zA-Z]{3,}", re.sub(r"\\[a-zA-Z]+", " ", s)):
        return ("text", _text_key(s))            # words are text, not products of letters
    try:
        value = _parse_expr(s)
    except _Unsupported:
        return ("text", _text_key(s))
    m = _NUM_RE.fullmatch(s)
    return ("expr", ((value, _decimal(s)[1] if m else None),))


def _interval(lo, hi, left_closed: bool, right_closed: bool):
    # an infinite end is open whatever bracket was written
    inf = lambda item: item[0] == "expr" and item[1][0][0] in (sympy.oo, -sympy.oo)  # noqa: E731
    return ("interval", left_closed and not inf(lo), lo, hi, right_closed and not inf(hi))


def _inequality(s: str):
    """x > 3, x \\le 5, -2 < x \\le 5 (one variable) -> an interval; None if not of that shape."""
    ops = _INEQ_RE.findall(s)
    if not 1 <= len(ops) <= 2:
        return None
    parts = [p.strip() for p in _INEQ_RE.split(s)]
    is_var = [bool(re.fullmatch(r"[a-zA-Z]", p)) for p in parts]
    less = [op in ("<", "\\le") for op in ops]
    closed = [op in ("\\le", "\\ge") for op in ops]
    inf = ("expr", ((sympy.oo, None),))
    ninf = ("expr", ((-sympy.oo, None),))
    if len(ops) == 2 and is_var == [False, True, False] and less[0] == less[1]:
        a, b = _structure(parts[0], 1), _structure(parts[2], 1)
        return _interval(a, b, closed[0], closed[1]) if less[0] else _interval(b, a, closed[1], closed[0])
    if len(ops) == 1 and is_var.count(True) == 1:
        var_left = is_var[0]
        bound = _structure(parts[1] if var_left else parts[0], 1)
        upper = less[0] == var_left            # x < b or b > x
        return _interval(ninf, bound, False, closed[0]) if upper else _interval(bound, inf, closed[0], False)
    return None


def _structure(s: str, depth: int = 0):
    """Parse a normalised answer into nested ('kind', ...) tuples (see _element for leaves)."""
    s = s.strip()
    if depth > 4:
        raise _TooBig("structure too deep")
    m = _MATRIX_RE.fullmatch(s)
    if m:
        rows = [r for r in _split_top(m.group(2), "\\\\") if r]
        return ("matrix", tuple(tuple(_element(c) for c in _split_top(r, "&")) for r in rows))
    parts = _split_top(s, "\\cup")
    if len(parts) > 1:
        return ("set", _items(parts, depth))
    if s.startswith("\\{") and s.endswith("\\}") and _wrapped(s[1:]):
        inner = s[2:-2].strip()
        return ("set", _items(_split_top(inner, ","), depth) if inner else ())
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and _wrapped(s):
        items = _split_top(s[1:-1], ",")
        if len(items) == 2 and (s[0] == "[" or s[-1] == "]"):
            lo, hi = (_structure(p, depth + 1) for p in items)
            return _interval(lo, hi, s[0] == "[", s[-1] == "]")
        if len(items) >= 2:
            return ("tuple", tuple(_structure(p, depth + 1) for p in items))
    items = _split_top(s, ",")
    if len(items) > 1:
        return ("list", _items(items, depth))
    pm = [m.start() for m in re.finditer(r"\\(?:pm|mp)(?![a-zA-Z])", s)]
    if 0 < len(pm) <= 3:                          # 1 \pm \sqrt{2}: the two-element list
        k = pm[0]
        return ("list", _items([s[:k] + "+" + s[k + 3:], s[:k] + "-" + s[k + 3:]], depth))
    return _inequality(s) or _element(s)


def _items(parts, depth) -> tuple:
    """Elements of an unordered collection; a nested \\pm list is flattened into it."""
    out = []
    for p in parts:
        item = _structure(p, depth + 1)
        out.extend(item[1] if item[0] == "list" else (item,))
    if len(out) > _MAX_ITEMS:
        raise _TooBig("too many elements")
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def _parsed(norm: str, percent: bool):
    """Cached structure of a normalised answer; ('reject', why) when it is out of bounds."""
    try:
        item = _structure(norm)
    except (_TooBig, RecursionError, OverflowError) as err:
        return ("reject", str(err) or type(err).__name__)
    except Exception:  # noqa: BLE001  (outside the parsed subset: compare as text)
        return ("text", _text_key(norm))
    if percent and item[0] == "expr":
        item = ("expr", _with_percent(item[1], True))
    return item


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------

_SEQ = ("tuple", "list", "set")


def _match(a, b, deadline: float) -> bool:
    if time.perf_counter() > deadline:
        raise _Timeout()
    ka, kb = a[0], b[0]
    if "reject" in (ka, kb):
        return False
    if ka == "text" or kb == "text":
        return ka == kb and a[1] == b[1]
    for x, y in ((a, b), (b, a)):                 # {3} or "x = 3" against 3
        if x[0] in ("list", "set") and len(x[1]) == 1 and y[0] not in _SEQ:
            return _match(x[1][0], y, deadline)
    if ka == kb == "expr":
        return any(_values_equal(x, dx, y, dy) for x, dx in a[1] for y, dy in b[1])
    if ka == kb == "eq":
        syms = sorted(a[1].free_symbols | b[1].free_symbols, key=str)
        return bool(syms) and _same_function(a[1], b[1], syms, ratio=True)
    if ka == kb == "interval":
        return a[1] == b[1] and a[4] == b[4] and _match(a[2], b[2], deadline) and _match(a[3], b[3], deadline)
    for x, y in ((a, b), (b, a)):                 # an open interval is written like a point
        if x[0] == "interval" and y[0] == "tuple" and not x[1] and not x[4] and len(y[1]) == 2:
            return _match(x[2], y[1][0], deadline) and _match(x[3], y[1][1], deadline)
        if x[0] == "matrix" and y[0] == "tuple" and x[1] and 1 in (len(x[1]), len(x[1][0])):  # a vector
            return _ordered([c for r in x[1] for c in r], y[1], deadline)
    if ka == kb == "matrix":
        return len(a[1]) == len(b[1]) and all(_ordered(r, s, deadline) for r, s in zip(a[1], b[1]))
    if ka in _SEQ and kb in _SEQ:
        if "set" in (ka, kb) or ka == kb == "list":
            return _unordered(a[1], b[1], deadline)
        return _ordered(a[1], b[1], deadline)
    return False


def _ordered(xs, ys, deadline) -> bool:
    return len(xs) == len(ys) and all(_match(x, y, deadline) for x, y in zip(xs, ys))


def _unordered(xs, ys, deadline) -> bool:
    if len(xs) != len(ys):
        return False
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and _match(x, y, deadline):
                used[j] = True
                break
        else:
            return False
    return True


_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z .,'\-]*")
_CHOICE_RE = re.compile(r"\(?([A-E])\)?")
_CHOICE_PRED_RE = re.compile(r"\(([A-Ea-e])\).*|([A-Ea-e])(?:[).:].*)?", re.S)


@functools.lru_cache(maxsize=8192)
def _gold(gold: str):
    """(normalised, percent, plain number alternatives or None, choice letter or None)."""
    if "####" in gold or _BOX_RE.search(gold):
        gold = gold_answer_from_solution(gold) or ""
    norm, percent = _normalize(gold.strip())
    return norm, percent, _number_alts(norm, percent), (_CHOICE_RE.fullmatch(norm) or [None, None])[1]


def _number_alts(norm: str, percent: bool):
    num = _plain_number(norm)
    return None if num is None else _with_percent((num,), percent)


def verify_with_reason(prediction_text: str, gold_answer: str) -> tuple:
    """(is_correct, reason). Never raises; anything unexpected is (False, 'error: ...')."""
    deadline = time.perf_counter() + _TIME_BUDGET
    try:
        raw, how = _extract(prediction_text)
        if raw is None:
            return False, how
        if len(raw) > _MAX_ANSWER:
            return False, f"answer longer than {_MAX_ANSWER} characters"
        if not isinstance(gold_answer, str) or not gold_answer.strip():
            return False, "empty gold answer"
        g_norm, g_pct, g_num, g_choice = _gold(gold_answer)
        p_norm, p_pct = _normalize(raw)
        if not p_norm or not g_norm:
            return False, "empty answer after normalisation"
        if p_norm == g_norm and p_pct == g_pct:
            return True, f"string match ({how})"
        if _WORDS_RE.fullmatch(p_norm) and _text_key(p_norm) == _text_key(g_norm):
            return True, f"text match ({how})"         # `No` vs `no`: too short to be seen as text
        if g_choice:                                   # multiple choice: compare the letters only
            m = _CHOICE_PRED_RE.fullmatch(p_norm)
            letter = m and (m.group(1) or m.group(2)).upper()
            return letter == g_choice, f"choice {letter} vs {g_choice}"
        if g_num is not None:
            p_num = _number_alts(p_norm, p_pct)
            if p_num is not None:
                return _numbers_equal(p_num, g_num), f"numbers ({how})"
        g_item, p_item = _parsed(g_norm, g_pct), _parsed(p_norm, p_pct)
        if time.perf_counter() > deadline:
            raise _Timeout()
        if "reject" in (g_item[0], p_item[0]):
            return False, f"rejected: {(g_item if g_item[0] == 'reject' else p_item)[1]}"
        return _match(p_item, g_item, deadline), f"structural {p_item[0]} vs {g_item[0]} ({how})"
    except _Timeout:
        return False, "time budget exceeded"
    except _TooBig as err:
        return False, f"rejected: {err}"
    except Exception as err:  # noqa: BLE001  (untrusted input: any failure is a wrong answer)
        return False, f"error: {type(err).__name__}: {err}"


def verify(prediction_text: str, gold_answer: str) -> bool:
    """True when the final answer in `prediction_text` is equivalent to `gold_answer`."""
    return verify_with_reason(prediction_text, gold_answer)[0]


def math_reward(text: str, gold: str) -> float:
    """Verifier reward: 1.0 for a correct final answer, else 0.0."""
    return 1.0 if verify(text, gold) else 0.0

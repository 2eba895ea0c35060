"""MATH (Hendrycks et al.): loader, workflow input and the 0/1 answer-equivalence scorer.

SCOREFLOW.md §4 table: the workflow and the generator both get `problem`; the gold is the last
\\boxed{} in `solution`; the id is the problem text. §4 "Training scorers / MATH": take the last
\\boxed{...} of output and gold (no box: the last sentence); equal if the strings match, else if
both are numbers within 1e-3 (commas removed, a trailing % means /100), else if a symbolic
comparison finds them equal. The official code uses sympy for the last step; sympy is not a runtime
dependency, so this module has its own normaliser and a small exact evaluator (fractions stay
fractions) that compares values, and compares expressions with variables at fixed sample points.

Data: the ScoreFlow files math_{validate,test}.jsonl and MATH's public layout (the same keys, as
.jsonl or a folder of .json files). With no data, `load` returns the embedded procedural set
(bench/mathgen_task.py) so `--bench math` runs offline.

Non-goals: a computer-algebra system. Equivalence is decided by value, so answers that differ only
by form (1/2, 0.5, \\frac12, 50\\%) are equal; answers that need algebra beyond evaluation (equal
sets of roots written as equations, simplified trig identities) may not be.
"""
from __future__ import annotations

import cmath
import math
import re
from fractions import Fraction

from bench import Problem, build_problems, check_split, field_of, read_records, resolve_data

NAME = "math"
OPERATOR_SET = "math"
TOLERANCE = 1e-3  # SCOREFLOW.md §4: numbers equal when |a - b| <= 1e-3


# --- loading ------------------------------------------------------------------------------------

def load(split: str, data: str | None = None, *, strict: bool = False, **opts) -> list[Problem]:
    """MATH problems of `split`; data None = the embedded procedural set (opts go to it)."""
    check_split(NAME, split)
    if data is None:
        from bench import mathgen_task  # imported here: mathgen_task imports this module's scorer
        return mathgen_task.load(split, None, strict=strict, **opts)
    if opts:
        raise TypeError(f"math: unexpected options {sorted(opts)} with --data (only strict=)")
    path = resolve_data(NAME, split, data)
    return build_problems(read_records(path, strict=strict), _problem, strict=strict)


def _problem(rec: dict, line: int) -> Problem:
    problem, solution = field_of(rec, "problem"), field_of(rec, "solution")
    gold = last_boxed(solution)
    if gold is None:
        raise ValueError("field 'solution' has no \\boxed{...} answer")
    extra = {"level": rec.get("level"), "type": rec.get("type"), "hidden_solution": solution}
    return Problem(id=problem, question=problem, input=problem, gold=gold, extra=extra)


def score(answer: str, problem: Problem) -> float:
    """1.0 if the final answer in `answer` equals problem.gold (SCOREFLOW.md §4), else 0.0."""
    return 1.0 if is_equiv(answer, problem.gold) else 0.0


# --- answer extraction --------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}) with nested braces, or None."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\b", text)]
    for m in reversed(starts[-8:]):  # unbalanced boxes fall back a few, not quadratically many
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j]
            continue  # unbalanced: try the box before it
        word = re.match(r"[^\s$]+", text[i:])  # "\boxed 5"
        if word:
            return word.group(0)
    return None


def extract_answer(text: str) -> str:
    """The last boxed answer; with no box, the last sentence (SCOREFLOW.md §4)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s.strip()]
    return sentences[-1].strip().rstrip(".") if sentences else ""


# --- normalisation ------------------------------------------------------------------------------

_UNICODE = {"−": "-", "–": "-", "×": "\\times ", "·": "\\cdot ", "÷": "\\div ", "π": "\\pi ",
            "√": "\\sqrt", "∞": "\\infty ", "°": "^\\circ", "\u00a0": " "}
_TEXT_CMDS = r"text|textrm|textbf|textit|mbox|mathrm|mathbf|operatorname"
_FUNCS = ("sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan",
          "ln", "log", "exp")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"


def normalize(s: str) -> str:
    """Canonical string for an answer: LaTeX spacing, \\left/\\right, \\dfrac/\\tfrac, $ and \\$,
    degrees, \\text units, thousands commas, trailing zeros, "x =" prefixes and spaces removed."""
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\(?:displaystyle|!)", "", s)  # (?<!\\): "\\ " is a matrix row break
    s = re.sub(r"(?<!\\)\\(?:,|;|:| |quad|qquad)(?![a-zA-Z])|~", " ", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree", "", s)  # degrees
    s = s.replace("\\%", "%")
    s = re.sub(r"\s*\bpercent\b", "%", s)
    # a trailing unit in \text{...} ("5\text{ cm}^2", "162\text{ minutes}") goes; other \text{} unwraps
    while True:
        m = re.fullmatch(rf"(.*?[\d}}%])\s*\\(?:{_TEXT_CMDS})\{{\s*[a-zA-Z][a-zA-Z .]*\}}\s*(?:\^\s*\{{?\d\}}?)?\s*",
                         s)
        if not m:
            break
        s = m.group(1)
    s = re.sub(rf"\\(?:{_TEXT_CMDS})\s*\{{([^{{}}]*)\}}", r"\1", s)
    # a plain trailing unit word after a number: "18 inches", "3.5 dollars" (not "2x", "3 \pi")
    m = re.fullmatch(rf"({_NUMBER}|\\frac\{{\d+\}}\{{\d+\}})\s+([a-zA-Z]{{2,}}(?:\s+[a-zA-Z]+)*)\s*(?:\^\s*\d)?\.?", s)
    if m and m.group(2).split()[0].lower() not in _FUNCS + ("pi", "i"):
        s = m.group(1)
    s = re.sub(r"\s+and\s+", ",", s)  # "12 and 13" is the list 12, 13
    s = s.replace("{,}", ",").replace("\\{", "{").replace("\\}", "}")
    # thousands separators: the whole answer, or a brace group, is a number in 1,234,567 form
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?", s.strip()):  # "5, 125" stays a list
        s = s.replace(",", "")
    s = re.sub(r"\{(\d{1,3}(?:,\d{3})+)\}", lambda m: "{" + m.group(1).replace(",", "") + "}", s)
    # spaces: keep one only where it separates a command from a letter ("\pi r")
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    # LaTeX shorthands: \frac12, \frac{1}2, \frac1{2}, \sqrt2
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\w)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    s = re.sub(r"(?<![\w.}^])(\d+)\\frac\{(\d+)\}\{(\d+)\}", _mixed, s)  # 11\frac{2}{3} = 35/3
    s = re.sub(r"^[a-zA-Z](?:_\w+)?=(?!.*=)", "", s)  # "x=5" -> "5" (one variable on the left)
    s = s.rstrip(".")
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # multiple choice "(C)"
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    s = re.sub(r"(\d)\.(\d*?)0+(?!\d)", lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), s)
    s = re.sub(r"(\d)\.(?![\d])", r"\1", s)  # "5." -> "5"
    return s


def _mixed(m: re.Match) -> str:
    whole, num, den = (int(g) for g in m.groups())
    return f"\\frac{{{whole * den + num}}}{{{den}}}" if num < den else m.group(0)


# --- a small exact evaluator --------------------------------------------------------------------
# Grammar (recursive descent over normalised answers):
#   expr   := term (('+' | '-') term)*
#   term   := factor (('*' | '/' | \cdot | \times | \div | implicit) factor)*
#   factor := ('+' | '-') factor | power ;  power := postfix ('^' factor)? ;  postfix := atom '!'*
#   atom   := number | variable | \pi | i | \infty | (expr) | {expr} | [expr] | \frac{a}{b}
#           | \sqrt[n]{x} | \sqrt{x} | function atom | |expr|
# Values are Fraction where exact, else float or complex; any failure gives None.

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\d*\.\d+|\d+)|(\\[a-zA-Z]+)|([a-zA-Z]+)|(\*\*|[-+*/^()\[\]{}!|,]))")
_CONSTS = {"pi", "infty", "i"}


def _tokens(s: str) -> list[tuple[str, str]] | None:
    out, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m:
            return None if s[pos:].strip() else out
        pos = m.end()
        num, cmd, word, op = m.groups()
        if num is not None:
            out.append(("num", num))
        elif cmd is not None:
            name = cmd[1:]
            if name in ("cdot", "times"):
                out.append(("op", "*"))
            elif name == "div":
                out.append(("op", "/"))
            elif name in ("frac", "sqrt", "overline") or name in _FUNCS:
                out.append(("fn", name))
            elif name in _CONSTS:
                out.append(("const", name))
            else:
                out.append(("var", cmd))  # \theta, \alpha ... are variables
        elif word is not None:
            while word:  # "sqrt", "pi", "sin" are names; other letter runs are single-letter variables
                name = next((f for f in sorted(_FUNCS + ("pi",), key=len, reverse=True) if word.startswith(f)), None)
                if name:
                    out.append(("const", "pi") if name == "pi" else ("fn", name))
                    word = word[len(name):]
                else:
                    out.append(("const", "i") if word[0] == "i" else ("var", word[0]))
                    word = word[1:]
        else:
            out.append(("op", "^" if op == "**" else op))
    return out


class _Parser:
    """Parses a token list into a nested-tuple tree; raises ValueError on anything it can't read."""

    def __init__(self, tokens):
        self.t, self.i = tokens, 0

    def peek(self, k=0):
        return self.t[self.i + k] if self.i + k < len(self.t) else ("end", "")

    def take(self, kind=None, value=None):
        tok = self.peek()
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            raise ValueError(f"expected {value or kind}, got {tok}")
        self.i += 1
        return tok

    def parse(self):
        tree = self.expr()
        if self.i != len(self.t):
            raise ValueError(f"trailing {self.peek()}")
        return tree

    def expr(self):
        tree = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            tree = (self.take()[1], tree, self.term())
        return tree

    def term(self):
        tree = self.factor()
        while True:
            tok = self.peek()
            if tok in (("op", "*"), ("op", "/")):
                self.take()
                tree = (tok[1], tree, self.factor())
            elif tok[0] in ("num", "var", "const", "fn") or tok in (("op", "("), ("op", "{"), ("op", "[")):
                tree = ("*", tree, self.factor())  # implicit multiplication: 2\pi, 3x, 2(x+1)
            else:
                return tree

    def factor(self):
        if self.peek() in (("op", "-"), ("op", "+")):
            sign = self.take()[1]
            return ("neg", self.factor()) if sign == "-" else self.factor()
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            return ("^", base, self.factor())
        return base

    def postfix(self):
        tree = self.atom()
        while self.peek() == ("op", "!"):
            self.take()
            tree = ("!", tree)
        return tree

    def group(self):
        close = {"{": "}", "(": ")", "[": "]"}
        tok = self.peek()
        if tok[0] == "op" and tok[1] in close:
            self.take()
            tree = self.expr()
            self.take("op", close[tok[1]])
            return tree
        return self.atom()  # \frac12 style single-token arguments

    def atom(self):
        kind, val = tok = self.take()
        if kind == "num":
            if self.peek() == ("fn", "overline"):  # 0.\overline{3}: a repeating decimal
                self.take()
                self.take("op", "{")
                rep = self.take("num")[1]
                self.take("op", "}")
                return ("num", _repeating(val, rep))
            return ("num", Fraction(val))
        if kind == "var":
            return ("var", val)
        if kind == "const":
            return ("const", val)
        if kind == "fn":
            if val == "frac":
                return ("/", self.group(), self.group())
            if val == "sqrt":
                index = ("num", Fraction(2))
                if self.peek() == ("op", "["):
                    self.take()
                    index = self.expr()
                    self.take("op", "]")
                return ("root", self.group(), index)
            if val == "overline":
                raise ValueError("\\overline without a decimal")
            return ("fn", val, self.power_arg())
        if tok == ("op", "|"):
            tree = self.expr()
            self.take("op", "|")
            return ("fn", "abs", tree)
        if kind == "op" and val in "({[":
            self.i -= 1
            return self.group()
        raise ValueError(f"unexpected {tok}")

    def power_arg(self):
        base = self.postfix()
        if self.peek() == ("op", "^"):
            self.take()
            return ("^", base, self.factor())
        return base


def _repeating(decimal: str, rep: str) -> Fraction:
    """0.1\\overline{6} = 1/6: the decimal plus the repeating block scaled past its digits."""
    whole, _, frac_digits = decimal.partition(".")
    base = Fraction(whole + "." + frac_digits) if frac_digits else Fraction(whole or "0")
    return base + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(frac_digits))


def parse(s: str):
    """The expression tree of a normalised answer, or None if it is not an expression we read."""
    if len(s) > 400:
        return None
    toks = _tokens(s)
    if not toks:
        return None
    try:
        return _Parser(toks).parse()
    except (ValueError, IndexError, RecursionError):
        return None


def free_vars(tree) -> set[str]:
    if tree[0] == "var":
        return {tree[1]}
    return set().union(*(free_vars(c) for c in tree[1:] if isinstance(c, tuple)))


def _pow(a, b):
    if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
        bits = max(abs(a.numerator).bit_length(), a.denominator.bit_length())
        if abs(b) * bits <= 100_000:  # exact while the result stays a few thousand digits
            return a ** int(b)
    if isinstance(b, Fraction) and b.denominator != 1 and isinstance(a, Fraction) and a >= 0:
        root = _exact_root(a, b.denominator)  # 8^(2/3) stays exact when 8 is a perfect cube
        if root is not None:
            return _pow(root, Fraction(b.numerator))
    a, b = _num(a), _num(b)
    if abs(b) > 10_000 and abs(a) != 1:
        raise OverflowError("exponent too large")
    return a ** b


def _exact_root(x: Fraction, n: int) -> Fraction | None:
    if x < 0 or n > 64:
        return None
    parts = []
    for v in (x.numerator, x.denominator):
        r = round(v ** (1.0 / n)) if v < 2 ** 1000 else None
        if r is None:
            return None
        r = next((c for c in (r - 1, r, r + 1) if c >= 0 and c ** n == v), None)
        if r is None:
            return None
        parts.append(r)
    return Fraction(parts[0], parts[1])


def _num(v):
    return float(v) if isinstance(v, Fraction) else v


_FN = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "cot": lambda x: 1 / cmath.tan(x),
       "sec": lambda x: 1 / cmath.cos(x), "csc": lambda x: 1 / cmath.sin(x), "arcsin": cmath.asin,
       "arccos": cmath.acos, "arctan": cmath.atan, "ln": cmath.log, "log": cmath.log10, "exp": cmath.exp,
       "abs": abs, "sqrt": cmath.sqrt}


def _real(v):
    """Drop a zero imaginary part that cmath leaves behind."""
    if isinstance(v, complex) and abs(v.imag) <= 1e-12 * max(1.0, abs(v.real)):
        return v.real
    return v


def _eval(tree, env):
    op = tree[0]
    if op == "num":
        return tree[1]
    if op == "var":
        return env[tree[1]]
    if op == "const":
        return {"pi": math.pi, "infty": math.inf, "i": 1j}[tree[1]]
    if op == "neg":
        return -_eval(tree[1], env)
    if op == "!":
        n = _eval(tree[1], env)
        if not (isinstance(n, Fraction) and n.denominator == 1 and 0 <= n <= 1000):
            raise ValueError("factorial of a non-integer")
        return Fraction(math.factorial(int(n)))
    if op == "root":
        x, n = _eval(tree[1], env), _eval(tree[2], env)
        if isinstance(x, Fraction) and isinstance(n, Fraction) and n.denominator == 1 and n > 0:
            exact = _exact_root(x, int(n))
            if exact is not None:
                return exact
        if n == 2:
            return _real(cmath.sqrt(_num(x)))
        return _real(_pow(x, 1 / _num(n))) if _num(x) >= 0 else -_pow(-x, 1 / _num(n))
    if op == "fn":
        x = _eval(tree[2], env)
        return _real(_FN[tree[1]](_num(x) if tree[1] != "abs" else x))
    a, b = _eval(tree[1], env), _eval(tree[2], env)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    if op == "^":
        return _real(_pow(a, b))
    raise ValueError(f"unknown node {op}")


def evaluate(s: str, env: dict | None = None):
    """Value of a normalised answer (Fraction, float or complex), or None."""
    tree = parse(s)
    if tree is None:
        return None
    try:
        return _eval(tree, env or {})
    except (ValueError, ZeroDivisionError, OverflowError, TypeError, KeyError, RecursionError):
        return None


def _close(x, y, abs_tol: float) -> bool:
    if x is None or y is None:
        return False
    try:
        if isinstance(x, Fraction) and isinstance(y, Fraction):
            return abs(x - y) <= abs_tol
        x, y = complex(x), complex(y)
    except (OverflowError, TypeError):
        return False
    if any(map(math.isinf, (x.real, x.imag, y.real, y.imag))):
        return x == y
    if any(map(math.isnan, (x.real, x.imag, y.real, y.imag))):
        return False
    return abs(x - y) <= max(abs_tol, 1e-9 * max(abs(x), abs(y)))


# --- equivalence --------------------------------------------------------------------------------

_OPEN, _CLOSE = "([{", ")]}"
_POINTS = 3  # sample points for expressions with variables


def _split_top(s: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in s:
        depth += (c in _OPEN) - (c in _CLOSE)
        if c == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    return parts + [cur]


def _outer_pair(s: str) -> bool:
    """True if s[0] opens a bracket that closes exactly at s[-1] (any of ()[]{}: intervals mix them)."""
    if len(s) < 2 or s[0] not in _OPEN or s[-1] not in _CLOSE:
        return False
    depth = 0
    for k, c in enumerate(s):
        depth += (c in _OPEN) - (c in _CLOSE)
        if depth == 0 and k < len(s) - 1:
            return False
    return True


def _structure(s: str):
    """("matrix", rows) | ("seq", brackets, items) | ("set", items) | ("scalar", s)."""
    m = re.fullmatch(r"\\begin\{([pbv]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}", s)
    if m:
        rows = [r.split("&") for r in m.group(2).split("\\\\") if r != ""]
        return ("matrix", rows)
    if "\\pm" in s and s.count("\\pm") == 1 and "," not in s:  # a \pm b is the set {a + b, a - b}
        return ("set", [s.replace("\\pm", "+"), s.replace("\\pm", "-")])
    if _outer_pair(s):
        items = _split_top(s[1:-1])
        if len(items) > 1:
            return ("set", items) if s[0] == "{" else ("seq", s[0] + s[-1], items)
    items = _split_top(s)
    if len(items) > 1:
        return ("set", items)  # a bare list of answers ("1, -3"): order does not matter
    return ("scalar", s)


def is_equiv(output: str, gold: str) -> bool:
    """SCOREFLOW.md §4 MATH rule on the final answers of `output` and `gold`."""
    boxed = last_boxed(gold)  # Problem.gold is already the boxed content; a full solution also works
    return _equiv(normalize(extract_answer(output)), normalize(gold if boxed is None else boxed))


def _equiv(a: str, b: str) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    sa, sb = _structure(a), _structure(b)
    if sa[0] != sb[0]:
        return False
    if sa[0] == "matrix":
        return ([len(r) for r in sa[1]] == [len(r) for r in sb[1]]
                and all(_equiv(x, y) for ra, rb in zip(sa[1], sb[1]) for x, y in zip(ra, rb)))
    if sa[0] == "seq":
        return sa[1] == sb[1] and len(sa[2]) == len(sb[2]) and all(map(_equiv, sa[2], sb[2]))
    if sa[0] == "set":
        if len(sa[1]) != len(sb[1]):
            return False
        left = list(sb[1])
        for x in sa[1]:  # greedy matching is exact here: equivalence is transitive
            k = next((k for k, y in enumerate(left) if _equiv(x, y)), None)
            if k is None:
                return False
            left.pop(k)
        return True
    return _scalar_equiv(a, b)


_BASE = re.compile(r"(-?[0-9A-Z.]+)_\{?(\d+)\}?")  # 1011_2: digits in a base


def _scalar_equiv(a: str, b: str) -> bool:
    ma, mb = _BASE.fullmatch(a), _BASE.fullmatch(b)
    if ma or mb:  # base-b numerals compare as digit strings; a missing base subscript is accepted
        (da, ba), (db, bb) = (ma.groups() if ma else (a, None)), (mb.groups() if mb else (b, None))
        return da == db and (ba is None or bb is None or ba == bb)
    if a.count("=") == 1 and b.count("=") == 1:  # equations: same sides, or same left - right
        (la, ra), (lb, rb) = a.split("="), b.split("=")
        return ((_expr_equiv(la, lb) and _expr_equiv(ra, rb))
                or _expr_equiv(f"({la})-({ra})", f"({lb})-({rb})"))
    if "=" in a or "=" in b:
        return False
    return _expr_equiv(a, b)


def _expr_equiv(a: str, b: str) -> bool:
    # a trailing % means /100 (SCOREFLOW.md §4); the bare number is accepted too, as MATH graders do
    ca = [(a[:-1], Fraction(1, 100)), (a[:-1], 1)] if a.endswith("%") else [(a, 1)]
    cb = [(b[:-1], Fraction(1, 100)), (b[:-1], 1)] if b.endswith("%") else [(b, 1)]
    for sa, ka in ca:
        ta = parse(sa)
        if ta is None:
            continue
        for sb, kb in cb:
            tb = parse(sb)
            if tb is None:
                continue
            if _tree_equiv(ta, tb, ka, kb):
                return True
    return False


def _tree_equiv(ta, tb, ka, kb) -> bool:
    names = sorted(free_vars(ta) | free_vars(tb))
    if not names:
        try:
            return _close(_eval(ta, {}) * ka, _eval(tb, {}) * kb, TOLERANCE)
        except (ValueError, ZeroDivisionError, OverflowError, TypeError, KeyError, RecursionError):
            return False
    if free_vars(ta) != free_vars(tb):
        return False
    for k in range(_POINTS):  # an identity in the variables holds at every point; a wrong one almost never
        env = {n: 0.5 + 0.3719 * (j + 1) + 1.1371 * k for j, n in enumerate(names)}
        try:
            x, y = _eval(ta, env) * ka, _eval(tb, env) * kb
        except (ValueError, ZeroDivisionError, OverflowError, TypeError, KeyError, RecursionError):
            return False
        if not _close(x, y, 1e-7 * max(1.0, abs(complex(x)))):
            return False
    return True

"""The embedded math set: seeded, procedurally generated competition-style problems with exact answers.

What `--bench math` runs with no --data: offline, deterministic, scored by the MATH scorer
(bench/math_task.py, SCOREFLOW.md §4). Twenty kinds of problem (arithmetic, fractions, linear
equations and systems, exponential equations, gcd/lcm, remainders, divisors, primes, digit sums,
bases, inclusion-exclusion, combinations, arrangements, dice probability, arithmetic and geometric
sequences, series, percentages, means), each at levels 1-5, plus "basic": one operation on two
numbers ("What is $45 + 38$?"), with more digits at higher levels. Measured with the embedded
SmolLM2-135M-Instruct (greedy, plain prompts, validate split of seed 0): of the 20 basic problems
it answered 1 directly (even counting the last number of its reply) and 13 by a one-line program
it wrote and we ran; of 40 problems of the other kinds, none either way. The basic share is what a
small generator can learn to route to the Programmer operator (SCOREFLOW.md §3); the other kinds
need multi-step programs or a stronger executor.

The set for a seed is `size` problems (default 500) in rounds of 25: one problem of each kind and
five basic ones, the level drawn per problem, duplicates redrawn. The split is fixed by round, as
the paper's 1:4 (SCOREFLOW.md §8): rounds 0, 5, 10, 15 are validate (100 problems, each kind 4
times, basic 20), the other 16 test (400). Only random.Random(seed)
draws numbers (integer seeding and randrange are stable across Python versions and machines), no
hash order is used, and answers are computed with integers and fractions.Fraction, so a seed gives
the same problems and golds everywhere. Golds are MATH-style answers ("\\frac{3}{4}", "-7",
"1011_{2}"); extra holds the kind, the level and a short hidden solution ending in \\boxed{}.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

from bench import Problem, check_split
from bench.math_task import score  # noqa: F401  (the task interface: the MATH scorer)

NAME = "mathgen"
OPERATOR_SET = "math"
SIZE = 500  # problems per seed; validate = every fifth round of 25


def load(split: str, data: str | None = None, *, strict: bool = False, seed: int = 0,
         size: int = SIZE, kinds=None) -> list[Problem]:
    """The `split` part of the set generated from `seed` (data must be None: the set is built in;
    strict is accepted for a uniform interface: generated records are never malformed). kinds: a
    collection of kind names (KIND_NAMES) to keep, None = all; the split is the same either way."""
    check_split(NAME, split)
    if data is not None:
        raise ValueError(f"mathgen: the embedded set takes no --data (got {data!r}); use --bench math --data")
    if kinds is not None:
        check_kinds(kinds)
    return [p for k, p in enumerate(generate(seed, size)) if in_validate(k) == (split == "validate")
            and (kinds is None or p.extra["kind"] in kinds)]


def check_kinds(kinds) -> None:
    """ValueError unless kinds is a non-empty collection of names from KIND_NAMES."""
    unknown = sorted(set(kinds) - set(KIND_NAMES))
    if unknown or not kinds:
        raise ValueError(f"mathgen: kinds {sorted(kinds)!r}: unknown {unknown!r}; expected some of {KIND_NAMES}")


def in_validate(index: int) -> bool:
    """Every fifth round of 25 is a validate round: the 1:4 split of SCOREFLOW.md §8."""
    return (index // len(ROUND)) % 5 == 0


def generate(seed: int = 0, size: int = SIZE) -> list[Problem]:
    """All `size` problems for `seed`, in index order."""
    if not isinstance(seed, int) or not isinstance(size, int) or size < 0:
        raise ValueError(f"mathgen: seed and size must be ints >= 0, got seed={seed!r} size={size!r}")
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < size:
        kind, make = ROUND[len(out) % len(ROUND)]
        level = 1 + rng.randrange(5)
        question, answer, steps = make(rng, level)
        if question in seen:
            continue
        seen.add(question)
        gold = answer if isinstance(answer, str) else fmt_decimal(answer) if kind == "percent" else fmt(answer)
        out.append(Problem(id=f"mathgen-{seed}-{len(out):04d}", question=question, input=question, gold=gold,
                           extra={"kind": kind, "level": level,
                                  "hidden_solution": f"{steps} The answer is $\\boxed{{{gold}}}$."}))
    return out


# --- helpers --------------------------------------------------------------------------------------

def _ri(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + rng.randrange(hi - lo + 1)


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def fmt(q) -> str:
    """A MATH-style exact answer: "-7" or "-\\frac{3}{4}"."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    return ("-" if q < 0 else "") + f"\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def fmt_decimal(q: Fraction) -> str:
    """A terminating decimal (denominator 2^a 5^b) written exactly, else fmt(q)."""
    d = q.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return fmt(q)
    digits = 0
    while (q * 10 ** digits).denominator != 1:
        digits += 1
    whole = abs(q.numerator) * 10 ** digits // q.denominator
    text = str(whole).rjust(digits + 1, "0")
    text = text[:-digits] + "." + text[-digits:] if digits else text
    return ("-" if q < 0 else "") + text


def _lin(a, b, var="x") -> str:
    """a x + b rendered as LaTeX ("3x - 7", "-x", "\\frac{2}{3}x + 1")."""
    a, b = Fraction(a), Fraction(b)
    if a == 0:
        return fmt(b)
    coef = {1: "", -1: "-"}.get(a, fmt(a) if a.denominator == 1 else f"{fmt(a)}")
    s = f"{coef}{var}"
    if b:
        s += f" + {fmt(b)}" if b > 0 else f" - {fmt(-b)}"
    return s


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _ordinal(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


# --- expression kinds -----------------------------------------------------------------------------

def _basic(rng, level):
    hi = [20, 100, 1000, 10 ** 4, 10 ** 6][level - 1]
    op = _pick(rng, "+-*/")
    a, b = _ri(rng, 2, hi), _ri(rng, 2, hi)
    if op == "/":
        b = _ri(rng, 2, [9, 12, 30, 99, 999][level - 1])
        a = b * _ri(rng, 2, max(2, hi // b))  # exact quotient
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    sym = {"+": "+", "-": "-", "*": "\\times", "/": "\\div"}[op]
    return f"What is ${a} {sym} {b}$?", value, f"${a} {sym} {b} = {value}$."


# An expression is a leaf Fraction or (op, left, right) with op in + - * / ^ (^ takes a small int).

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 3}


def _eval_tree(t) -> Fraction:
    if not isinstance(t, tuple):
        return t
    op, a, b = t
    x, y = _eval_tree(a), _eval_tree(b)
    return {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y, "/": lambda: x / y,
            "^": lambda: x ** int(y)}[op]()


def _render(t, parent=None, right=False) -> str:
    if not isinstance(t, tuple):
        if t.denominator != 1:
            s = f"\\frac{{{abs(t.numerator)}}}{{{t.denominator}}}"
            return f"\\left(-{s}\\right)" if t < 0 else s
        return f"({t.numerator})" if t < 0 and parent is not None else str(t.numerator)
    op, a, b = t
    if op == "^":
        base = _render(a, "^")
        if isinstance(a, tuple) or a < 0 or a.denominator != 1:
            base = f"\\left({_render(a)}\\right)"
        s = f"{base}^{{{int(b)}}}"
    else:
        sym = {"+": "+", "-": "-", "*": "\\times", "/": "\\div"}[op]
        s = f"{_render(a, op)} {sym} {_render(b, op, True)}"
    if parent is not None and parent != "^" and (
            _PREC[op] < _PREC[parent] or (right and _PREC[op] == _PREC[parent] and parent in "-/")):
        s = f"\\left({s}\\right)"
    return s


def _tree(rng, n_ops: int, leaf, ops: str):
    t = leaf()
    for _ in range(n_ops):
        op = _pick(rng, ops)
        if op == "^" and not isinstance(t, tuple) and abs(t) <= 12:
            t = ("^", t, Fraction(_ri(rng, 2, 3)))  # small powers of a number only
        elif op == "^":
            t = ("*", t, leaf())
        elif op == "/":
            t = ("/", t, Fraction(_ri(rng, 2, 12)))  # divide by a small number: readable fractions
        else:
            t = (op, t, leaf()) if rng.randrange(2) else (op, leaf(), t)
    return t


def _arithmetic(rng, level):
    ops = ["+-", "+-*", "+-*^", "+-*/", "+-*/^"][level - 1]
    hi = [20, 50, 99, 199, 150][level - 1]
    lo = -50 if level == 5 else 1

    def leaf():
        return Fraction(_ri(rng, lo, hi) or 7)
    while True:
        t = _tree(rng, [1, 2, 3, 4, 5][level - 1] if level > 1 else _ri(rng, 1, 2), leaf, ops)
        try:
            value = _eval_tree(t)
        except ZeroDivisionError:
            continue
        if abs(value.numerator) < 10 ** 9:
            break
    tail = "" if value.denominator == 1 else " Express your answer as a common fraction."
    return f"Compute ${_render(t)}$.{tail}", value, f"Evaluating with the order of operations gives ${fmt(value)}$."


def _fractions(rng, level):
    n_ops, ops, hi = [(1, "+", 9), (1, "+-", 12), (2, "+-", 15), (2, "+-*/", 12), (3, "+-*/", 20)][level - 1]
    den = _ri(rng, 2, hi)

    def leaf():
        d = den if level == 1 else _ri(rng, 2, hi)
        return Fraction(_ri(rng, 1, 2 * d), d) if level > 2 else Fraction(_ri(rng, 1, d - 1), d)
    while True:
        t = _tree(rng, n_ops, leaf, ops)
        try:
            value = _eval_tree(t)
        except ZeroDivisionError:
            continue
        break
    return (f"Compute ${_render(t)}$. Express your answer as a common fraction in lowest terms.",
            value, f"With a common denominator the result is ${fmt(value)}$.")


# --- algebra ----------------------------------------------------------------------------------------

def _linear(rng, level):
    x0 = Fraction(_ri(rng, -12, 12))
    if level == 1:
        a, b = _ri(rng, 2, 9), _ri(rng, -20, 20)
        eq = f"{_lin(a, b)} = {fmt(a * x0 + b)}"
    elif level in (2, 3):
        a, c = _ri(rng, -9, 9), _ri(rng, -9, 9)
        while c == a or a == 0 or c == 0:
            a, c = _ri(rng, -9, 9), _ri(rng, -9, 9)
        b = _ri(rng, -30, 30)
        d = (a - c) * x0 + b if level == 2 else _ri(rng, -30, 30)
        x0 = Fraction(d - b, a - c)
        eq = f"{_lin(a, b)} = {_lin(c, d)}"
    elif level == 4:
        a, c = _ri(rng, 2, 9), _ri(rng, 2, 9)
        while c == a:
            c = _ri(rng, 2, 9)
        b, d, e = _ri(rng, 1, 15), _ri(rng, 1, 15), _ri(rng, -20, 20)
        x0 = Fraction(-c * d + e - a * b, a - c)
        eq = f"{a}(x + {b}) = {c}(x - {d}) {'+' if e >= 0 else '-'} {abs(e)}"
    else:
        a, b = _ri(rng, 2, 9), _ri(rng, 2, 9)
        while b == a:
            b = _ri(rng, 2, 9)
        c = _ri(rng, 1, 20)
        x0 = Fraction(c * a * b, a + b)
        eq = f"\\frac{{x}}{{{a}}} + \\frac{{x}}{{{b}}} = {c}"
    return f"Solve for $x$: ${eq}$.", x0, f"Collecting the $x$ terms gives $x = {fmt(x0)}$."


def _system(rng, level):
    hi = [3, 5, 7, 9, 12][level - 1]
    x0, y0 = _ri(rng, -hi, hi), _ri(rng, -hi, hi)
    while True:
        a, b, c, d = (_ri(rng, -hi, hi) for _ in range(4))
        if a * d - b * c != 0 and 0 not in (a, b, c, d):
            break
    target, value = _pick(rng, [("x + y", x0 + y0), ("x - y", x0 - y0), ("xy", x0 * y0), ("x", x0), ("y", y0)])

    def side(p, q):
        s = _lin(p, 0, "x") + (f" + {_lin(q, 0, 'y')}" if q > 0 else f" - {_lin(-q, 0, 'y')}")
        return s
    return (f"If ${side(a, b)} = {a * x0 + b * y0}$ and ${side(c, d)} = {c * x0 + d * y0}$, what is the value of "
            f"${target}$?", Fraction(value), f"Eliminating one variable gives $x = {x0}$ and $y = {y0}$.")


def _exponent(rng, level):
    base = _pick(rng, [2, 3, 5] if level < 4 else [2, 3])
    x0 = _ri(rng, 1, 6) if level < 3 else _ri(rng, -4, 8)
    if level == 1:
        return f"Solve for $x$: ${base}^{{x}} = {base ** x0}$.", x0, f"${base ** x0} = {base}^{{{x0}}}$."
    if level == 2:
        k = _ri(rng, 1, 3)
        return (f"Solve for $x$: ${base}^{{x + {k}}} = {base ** (x0 + k)}$.", x0,
                f"So $x + {k} = {x0 + k}$.")
    p, q = _ri(rng, 1, 3), _ri(rng, 1, 3)
    while p == q:
        q = _ri(rng, 1, 3)
    r, s = _ri(rng, 1, 3), _ri(rng, -5, 5)
    # (base^p)^(r x + t) = (base^q)^(x + s): p (r x0 + t) = q (x0 + s) -> pick t to make x0 a solution
    while (q * (x0 + s) - p * r * x0) % p != 0 or p * r == q:
        r, s = _ri(rng, 1, 3), _ri(rng, -5, 5)
    t = (q * (x0 + s) - p * r * x0) // p
    left, right = base ** p, base ** q
    return (f"Solve for $x$: ${left}^{{{_lin(r, t)}}} = {right}^{{{_lin(1, s)}}}$.", x0,
            f"Writing both sides as powers of ${base}$ gives a linear equation with $x = {x0}$.")


# --- number theory --------------------------------------------------------------------------------

def _gcd_lcm(rng, level):
    if level <= 3:
        g = _ri(rng, 2, [9, 12, 30][level - 1])
        hi = [12, 10, 40][level - 1]
        a, b = g * _ri(rng, 1, hi), g * _ri(rng, 1, hi)
        while a == b:
            b = g * _ri(rng, 1, hi)
        if level == 2:
            return (f"What is the least common multiple of ${a}$ and ${b}$?", math.lcm(a, b),
                    f"$\\operatorname{{lcm}}({a}, {b}) = {math.lcm(a, b)}$.")
        return (f"What is the greatest common divisor of ${a}$ and ${b}$?", math.gcd(a, b),
                f"By the Euclidean algorithm, $\\gcd({a}, {b}) = {math.gcd(a, b)}$.")
    nums = [_ri(rng, 4, 60) for _ in range(3)] if level == 4 else [_ri(rng, 2, 20) * 6 for _ in range(3)]
    if level == 4:
        return (f"What is the least common multiple of ${nums[0]}$, ${nums[1]}$, and ${nums[2]}$?",
                math.lcm(*nums), "Take the highest power of each prime.")
    g, m = math.gcd(*nums), math.lcm(*nums)
    return (f"What is the sum of the greatest common divisor and the least common multiple of ${nums[0]}$, "
            f"${nums[1]}$, and ${nums[2]}$?", g + m, f"The gcd is ${g}$ and the lcm is ${m}$.")


def _remainder(rng, level):
    if level <= 2:
        n, m = _ri(rng, 100, [10 ** 4, 10 ** 7][level - 1]), _ri(rng, 3, [12, 97][level - 1])
        return f"What is the remainder when ${n}$ is divided by ${m}$?", n % m, f"${n} = {m} \\cdot {n // m} + {n % m}$."
    if level == 3:
        a, n = _ri(rng, 2, 19), _ri(rng, 10, 200)
        return (f"What is the units digit of ${a}^{{{n}}}$?", pow(a, n, 10),
                "The units digits repeat with period dividing 4.")
    a, m = _ri(rng, 2, 30), _ri(rng, 5, 50)
    n = _ri(rng, 20, 100) if level == 4 else _ri(rng, 1000, 5000)
    return (f"What is the remainder when ${a}^{{{n}}}$ is divided by ${m}$?", pow(a, n, m),
            "Reduce the powers modulo the divisor.")


def _divisors_kind(rng, level):
    if level <= 2:
        n = _ri(rng, 12, [100, 1000][level - 1])
        return f"How many positive divisors does ${n}$ have?", len(_divisors(n)), f"Its divisors are {len(_divisors(n))} in number."
    if level == 3:
        n = _ri(rng, 12, 500)
        return (f"What is the sum of all of the positive divisors of ${n}$?", sum(_divisors(n)),
                "Add the divisors in pairs $d$, $n/d$.")
    primes = [2, 3, 5, 7, 11, 13]
    n = 1
    for p in primes[:_ri(rng, 2, 4)]:
        n *= p ** _ri(rng, 1, 4 if level == 4 else 6)
    if level == 4:
        return (f"How many positive divisors does ${n}$ have?", len(_divisors(n)),
                "Multiply one more than each exponent of its prime factorisation.")
    count = sum(1 for d in _divisors(n) if math.isqrt(d) ** 2 == d)
    return (f"How many positive divisors of ${n}$ are perfect squares?", count,
            "Count the even exponents available for each prime.")


def _primes(rng, level):
    if level == 1:
        a = _ri(rng, 1, 40)
        b = a + _ri(rng, 10, 30)
        count = sum(_is_prime(k) for k in range(a, b + 1))
        return f"How many prime numbers are between ${a}$ and ${b}$, inclusive?", count, "List them."
    if level == 2:
        n = _ri(rng, 30, 1000)
        big = max(p for p in _divisors(n) if _is_prime(p))
        return f"What is the largest prime factor of ${n}$?", big, "Factor the number completely."
    if level == 3:
        n = _ri(rng, 20, 100)
        return (f"What is the sum of all prime numbers less than ${n}$?", sum(k for k in range(n) if _is_prime(k)),
                "Add the primes.")
    if level == 4:
        n = _ri(rng, 1000, 20000)
        p = next(k for k in range(n + 1, 2 * n + 2) if _is_prime(k))
        return f"What is the smallest prime number greater than ${n}$?", p, "Test the candidates in order."
    a = _ri(rng, 100, 2000)
    b = a + _ri(rng, 100, 500)
    count = sum(_is_prime(k) for k in range(a, b + 1))
    return f"How many prime numbers are between ${a}$ and ${b}$, inclusive?", count, "Sieve the interval."


def _digits(rng, level):
    if level == 1:
        n = _ri(rng, 100, 99999)
        return f"What is the sum of the digits of ${n}$?", sum(map(int, str(n))), "Add the digits."
    if level == 3:
        n = _ri(rng, 8, 25)
        return (f"What is the sum of the digits of ${n}!$?", sum(map(int, str(math.factorial(n)))),
                "Compute the factorial and add its digits.")
    a = _pick(rng, [2, 3, 7]) if level == 2 else _pick(rng, [2, 3, 5, 7, 11])
    n = _ri(rng, 8, 30) if level == 2 else _ri(rng, 40, [0, 0, 0, 100, 300][level - 1])
    return (f"What is the sum of the digits of ${a}^{{{n}}}$?", sum(map(int, str(a ** n))),
            "Compute the power and add its digits.")


def _to_base(n: int, b: int) -> str:
    digits = ""
    while n:
        digits = str(n % b) + digits
        n //= b
    return digits or "0"


def _base(rng, level):
    if level <= 3:
        b = [2, 8, 3][level - 1] if level != 2 else _pick(rng, [5, 6, 7, 8, 9])
        n = _ri(rng, 10, [63, 999, 999][level - 1])
        return (f"Express the base-10 number ${n}$ in base ${b}$.", f"{_to_base(n, b)}_{{{b}}}",
                f"Repeated division by ${b}$ gives the digits.")
    b1, b2 = _pick(rng, [2, 3, 4, 5]), _pick(rng, [6, 7, 8, 9])
    n = _ri(rng, 50, 3000 if level == 4 else 100000)
    if level == 5:
        b1, b2 = b2, b1
    return (f"Express ${_to_base(n, b1)}_{{{b1}}}$ in base ${b2}$.", f"{_to_base(n, b2)}_{{{b2}}}",
            f"In base 10 the number is ${n}$.")


def _incl_excl(rng, level):
    n = _ri(rng, 50, [100, 500, 1000, 5000, 20000][level - 1])
    if level <= 3:
        a = _ri(rng, 2, 9)
        b = _ri(rng, 2, 13)
        while b == a:
            b = _ri(rng, 2, 13)
        value = n // a + n // b - n // math.lcm(a, b)
        return (f"How many positive integers less than or equal to ${n}$ are divisible by ${a}$ or ${b}$?",
                value, "Add the multiples of each and subtract the common multiples.")
    a, b, c = _ri(rng, 2, 7), _ri(rng, 2, 11), _ri(rng, 3, 13)
    while len({a, b, c}) < 3:
        a, b, c = _ri(rng, 2, 7), _ri(rng, 2, 11), _ri(rng, 3, 13)
    union = (n // a + n // b + n // c - n // math.lcm(a, b) - n // math.lcm(a, c) - n // math.lcm(b, c)
             + n // math.lcm(a, b, c))
    return (f"How many positive integers less than or equal to ${n}$ are divisible by none of ${a}$, ${b}$, "
            f"and ${c}$?", n - union, "Use inclusion-exclusion on the three sets of multiples.")


# --- counting and probability ---------------------------------------------------------------------

def _choose(rng, level):
    if level <= 2:
        n = _ri(rng, 5, [10, 25][level - 1])
        k = _ri(rng, 2, n - 2)
        return (f"A club has ${n}$ members. In how many ways can a committee of ${k}$ members be chosen?",
                math.comb(n, k), f"$\\binom{{{n}}}{{{k}}} = {math.comb(n, k)}$.")
    if level == 3:
        m, w = _ri(rng, 4, 10), _ri(rng, 4, 10)
        k = _ri(rng, 3, 6)
        j = _ri(rng, 1, min(k - 1, w))
        value = math.comb(w, j) * math.comb(m, k - j)
        return (f"A club has ${m}$ men and ${w}$ women. In how many ways can a committee of ${k}$ people be "
                f"chosen that has exactly ${j}$ women?", value, "Choose the women, then the men.")
    if level == 4:
        m, w = _ri(rng, 4, 12), _ri(rng, 4, 12)
        k = _ri(rng, 3, 6)
        value = math.comb(m + w, k) - math.comb(m, k)
        return (f"A club has ${m}$ men and ${w}$ women. In how many ways can a committee of ${k}$ people be "
                f"chosen that has at least one woman?", value, "Subtract the all-men committees.")
    a, b = _ri(rng, 3, 9), _ri(rng, 3, 9)
    return (f"A path on a grid goes from $(0, 0)$ to $({a}, {b})$, one unit right or one unit up at each step. "
            f"How many such paths are there?", math.comb(a + b, a), "Choose which steps go right.")


_WORDS = ("LEVEL", "BANANA", "PEPPER", "ALGEBRA", "LETTER", "BOOKKEEPER", "COFFEE", "SUCCESS",
          "PARALLEL", "GEOMETRY", "ADDITION", "BALLOON", "MATH", "PRIME", "RADAR", "TATTOO")


def _arrange(rng, level):
    if level == 1:
        n = _ri(rng, 3, 7)
        return (f"In how many ways can ${n}$ people stand in a line?", math.factorial(n),
                f"${n}! = {math.factorial(n)}$.")
    if level == 2:
        n = _ri(rng, 5, 12)
        k = _ri(rng, 2, 4)
        return (f"In how many ways can ${k}$ of ${n}$ different books be arranged in a row on a shelf?",
                math.perm(n, k), f"${n} \\cdot {n - 1} \\cdots$, ${k}$ factors.")
    if level == 3:
        word = _pick(rng, _WORDS)
        value = math.factorial(len(word))
        for ch in sorted(set(word)):
            value //= math.factorial(word.count(ch))
        return (f"How many distinct arrangements of the letters in the word {word} are there?", value,
                "Divide by the factorials of the repeated letters.")
    if level == 4:
        n = _ri(rng, 4, 10)
        return (f"In how many ways can ${n}$ people be seated around a round table, if two seatings are the "
                f"same when one is a rotation of the other?", math.factorial(n - 1), f"$({n} - 1)!$.")
    k = _ri(rng, 3, 4)
    s = _ri(rng, 5, 9 * k - 5)
    value = sum(1 for v in range(10 ** (k - 1), 10 ** k) if sum(map(int, str(v))) == s)
    return f"How many ${k}$-digit positive integers have digits whose sum is ${s}$?", value, "Count digit strings."


def _dice(rng, level):
    if level == 1:
        k = _ri(rng, 1, 5)
        return (f"A fair six-sided die is rolled. What is the probability that the number rolled is greater "
                f"than ${k}$? Express your answer as a common fraction.", Fraction(6 - k, 6), "Count the faces.")
    sides = 6 if level < 4 else _pick(rng, [4, 6, 8])
    n_dice = 3 if level == 5 else 2
    total = _ri(rng, n_dice + 1, n_dice * sides - 1)
    counts = [1]  # counts[s] = number of ways to roll a total of s with the dice so far
    for _ in range(n_dice):
        counts = [sum(counts[s - f] for f in range(1, sides + 1) if 0 <= s - f < len(counts))
                  for s in range(len(counts) + sides)]
    if level == 3:
        ways = sum(counts[total:])
        cond = f"at least ${total}$"
    elif level == 4:
        ways = sum(c for s, c in enumerate(counts) if _is_prime(s))
        cond = "a prime number"
    else:
        ways, cond = counts[total], f"${total}$"
    name = {2: "Two", 3: "Three"}[n_dice]
    return (f"{name} fair ${sides}$-sided dice, with faces numbered $1$ through ${sides}$, are rolled. What is the "
            f"probability that the sum of the numbers rolled is {cond}? Express your answer as a common fraction.",
            Fraction(ways, sides ** n_dice), f"There are ${ways}$ favourable outcomes of ${sides ** n_dice}$.")


# --- sequences and series -------------------------------------------------------------------------

def _arith_seq(rng, level):
    a, d = _ri(rng, -20, 30), _ri(rng, -9, 12) or 3
    n = _ri(rng, 10, [20, 40, 60, 100, 200][level - 1])
    if level == 1:
        return (f"The first term of an arithmetic sequence is ${a}$ and the common difference is ${d}$. "
                f"What is the ${n}$th term?", a + (n - 1) * d, f"$a_n = {a} + (n - 1) \\cdot {d}$.")
    if level == 2:
        return (f"The first term of an arithmetic sequence is ${a}$ and the common difference is ${d}$. "
                f"What is the sum of the first ${n}$ terms?", n * (2 * a + (n - 1) * d) // 2,
                "Average of first and last term times the number of terms.")
    if level == 3:
        i, j = _ri(rng, 2, 5), _ri(rng, 6, 9)
        return (f"The ${i}${_ordinal(i)} term of an arithmetic sequence is ${a + (i - 1) * d}$ and the "
                f"${j}${_ordinal(j)} term is ${a + (j - 1) * d}$. What is the ${n}$th term?", a + (n - 1) * d,
                f"The common difference is ${d}$.")
    d = abs(d) or 3
    last = a + (n - 1) * d
    if level == 4:
        return (f"How many numbers are in the list ${a}, {a + d}, {a + 2 * d}, \\ldots, {last}$?", n,
                f"$({last} - {a}) / {d} + 1$.")
    return (f"What is the sum of the arithmetic series ${a} + {a + d} + {a + 2 * d} + \\cdots + {last}$?",
            n * (a + last) // 2, f"There are ${n}$ terms.")


def _geom_seq(rng, level):
    a = _ri(rng, 1, 9)
    if level <= 3:
        r = _ri(rng, 2, [3, 4, 5][level - 1])
        n = _ri(rng, 5, [8, 12, 15][level - 1])
        if level < 3:
            return (f"What is the ${n}$th term of the geometric sequence ${a}, {a * r}, {a * r * r}, \\ldots$?",
                    a * r ** (n - 1), f"$a_n = {a} \\cdot {r}^{{n - 1}}$.")
        return (f"What is the sum of the first ${n}$ terms of the geometric sequence ${a}, {a * r}, {a * r * r}, "
                f"\\ldots$?", a * (r ** n - 1) // (r - 1), "Use $a(r^n - 1)/(r - 1)$.")
    p, q = _ri(rng, 1, 4), _ri(rng, 2, 7)
    while p >= q or math.gcd(p, q) != 1:
        p, q = _ri(rng, 1, 4), _ri(rng, 2, 7)
    r = Fraction(_pick(rng, [1, -1]) * p, q) if level == 5 else Fraction(p, q)
    a = a * q ** 2
    if level == 4:
        n = _ri(rng, 5, 9)
        return (f"What is the ${n}$th term of the geometric sequence ${fmt(a)}, {fmt(a * r)}, {fmt(a * r * r)}, "
                f"\\ldots$? Express your answer as a common fraction.", a * r ** (n - 1), "Multiply by the ratio.")
    return (f"Evaluate the infinite geometric series ${fmt(a)} + {_term(a * r)} + {_term(a * r * r)} + \\cdots$.",
            a / (1 - r), "Use $a / (1 - r)$.")


def _term(q: Fraction) -> str:
    """A series term after a plus sign: negative terms in parentheses."""
    return f"\\left({fmt(q)}\\right)" if q < 0 else fmt(q)


def _series(rng, level):
    n = _ri(rng, 10, [50, 100, 50, 30, 99][level - 1])
    if level == 1:
        return f"Compute $1 + 2 + 3 + \\cdots + {n}$.", n * (n + 1) // 2, "Use $n(n + 1)/2$."
    if level == 2:
        return (f"What is the sum of the first ${n}$ odd positive integers?", n * n, "The sum is $n^2$.")
    if level == 3:
        return (f"Compute $1^2 + 2^2 + 3^2 + \\cdots + {n}^2$.", n * (n + 1) * (2 * n + 1) // 6,
                "Use $n(n + 1)(2n + 1)/6$.")
    if level == 4:
        return (f"Compute $1^3 + 2^3 + 3^3 + \\cdots + {n}^3$.", (n * (n + 1) // 2) ** 2,
                "The sum of cubes is the square of the sum.")
    return (f"Compute $\\frac{{1}}{{1 \\cdot 2}} + \\frac{{1}}{{2 \\cdot 3}} + \\cdots + "
            f"\\frac{{1}}{{{n} \\cdot {n + 1}}}$. Express your answer as a common fraction.",
            Fraction(n, n + 1), "The sum telescopes.")


# --- everyday arithmetic --------------------------------------------------------------------------

def _percent(rng, level):
    if level == 1:
        p, n = _pick(rng, [10, 20, 25, 50, 75, 5, 15]), _ri(rng, 2, 40) * 20
        return f"What is ${p}\\%$ of ${n}$?", Fraction(p * n, 100), "Multiply by the percent over 100."
    if level == 2:
        u, j = _ri(rng, 1, 12), _ri(rng, 1, 39)
        a, b = u * j, 40 * u  # a / b = j / 40: a terminating percent, 2.5 j
        value = Fraction(100 * a, b)
        return (f"The number ${a}$ is what percent of ${b}$? Give the percent as a number.", value,
                "Divide and multiply by 100.")
    price = _ri(rng, 20, 400)
    if level == 3:
        up, down = _pick(rng, [10, 20, 25, 30, 50]), _pick(rng, [10, 20, 25, 40])
        value = Fraction(price) * (100 + up) / 100 * (100 - down) / 100
        return (f"A jacket costs ${price}$ dollars. Its price is increased by ${up}\\%$, and then the new price is "
                f"decreased by ${down}\\%$. What is the final price, in dollars?", value, "Apply the two factors.")
    if level == 4:
        off = _pick(rng, [10, 20, 25, 30, 40, 60])
        sale = Fraction(price * 4 * (100 - off), 100)
        return (f"After a discount of ${off}\\%$, a bicycle costs ${fmt_decimal(sale)}$ dollars. What was its "
                f"original price, in dollars?", Fraction(price * 4), "Divide by the remaining fraction.")
    rates = [_pick(rng, [5, 10, 20, 25, 50]) * _pick(rng, [1, -1]) for _ in range(3)]
    value = Fraction(price)
    for r in rates:
        value = value * (100 + r) / 100
    words = ", then ".join(f"{'increases' if r > 0 else 'decreases'} by ${abs(r)}\\%$" for r in rates)
    return (f"A stock worth ${price}$ dollars {words}. What is it worth now, in dollars?", value,
            "Apply the factors in turn.")


def _mean(rng, level):
    k = _ri(rng, 4, [5, 6, 7, 8, 9][level - 1])
    nums = [_ri(rng, 1, [20, 50, 100, 100, 500][level - 1]) for _ in range(k)]
    if level <= 2:
        value = Fraction(sum(nums), k)
        return (f"What is the arithmetic mean of the numbers ${', '.join(map(str, nums))}$? Express your answer "
                f"as a common fraction if it is not an integer.", value, "Add and divide by the count.")
    if level == 3:
        srt = sorted(nums)
        value = Fraction(srt[k // 2]) if k % 2 else Fraction(srt[k // 2 - 1] + srt[k // 2], 2)
        return f"What is the median of the numbers ${', '.join(map(str, nums))}$?", value, "Sort them."
    mean = _ri(rng, 10, 90)
    total = mean * (k + 1)
    if level == 4:
        return (f"The mean of ${k + 1}$ numbers is ${mean}$. Of these, ${k}$ numbers are "
                f"${', '.join(map(str, nums))}$. What is the remaining number?", total - sum(nums),
                "The total is the mean times the count.")
    new_mean = _ri(rng, 10, 90)
    removed = mean * (k + 1) - new_mean * k
    return (f"The mean of ${k + 1}$ numbers is ${mean}$. When one of the numbers is removed, the mean of the "
            f"remaining numbers is ${new_mean}$. What number was removed?", removed, "Compare the totals.")


KINDS = (("arithmetic", _arithmetic), ("fractions", _fractions), ("linear", _linear), ("system", _system),
         ("exponent", _exponent), ("gcd_lcm", _gcd_lcm), ("remainder", _remainder), ("divisors", _divisors_kind),
         ("primes", _primes), ("digits", _digits), ("base", _base), ("incl_excl", _incl_excl),
         ("choose", _choose), ("arrange", _arrange), ("dice", _dice), ("arith_seq", _arith_seq),
         ("geom_seq", _geom_seq), ("series", _series), ("percent", _percent), ("mean", _mean))
ROUND = KINDS + (("basic", _basic),) * 5  # one round of the set: every kind once, five basic problems
KIND_NAMES = tuple(name for name, _ in KINDS) + ("basic",)

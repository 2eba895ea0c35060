"""The embedded math set: deterministic for a seed, and every gold recomputed here from the question
text alone, by methods independent of the generator (brute force, enumeration, substitution)."""
import hashlib
import itertools
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from functools import lru_cache

import pytest

import bench
from bench import math_task, mathgen_task
from conftest import ROOT

# sha256 over "question\tgold\n" of the 500 problems for seed 0: a change of generator, Python or
# machine that alters any problem shows up here
DIGEST_SEED0 = "036d5955ca0aa4bdf7ccf2d1b2799f9990305b22f01fbb51b144f9a2aff79984"


def _digest(problems):
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.question}\t{p.gold}\n".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def problems():
    return mathgen_task.generate(0)


def test_deterministic_split_and_sizes(problems):
    assert len(problems) == 500 and len({p.question for p in problems}) == 500
    assert _digest(problems) == DIGEST_SEED0
    assert _digest(mathgen_task.generate(0)) == DIGEST_SEED0
    assert _digest(mathgen_task.generate(1)) != DIGEST_SEED0
    val, test = mathgen_task.load("validate"), mathgen_task.load("test")
    assert (len(val), len(test)) == (100, 400)
    assert [p.id for p in val] == [p.id for k, p in enumerate(problems) if (k // 25) % 5 == 0]
    assert not {p.question for p in val} & {p.question for p in test}
    assert bench.load_task("math").load("validate")[3].question == val[3].question  # no data: embedded
    kinds = {(p.extra["kind"], p.extra["level"]) for p in val}
    assert len({k for k, _ in kinds}) == 21 and len(kinds) > 50  # every kind, most levels, in validate
    assert sum(p.extra["kind"] == "basic" for p in val) == 20


def test_kinds_filter_keeps_the_split():
    """kinds= keeps those kinds of the same split (ids unchanged, so no problem moves split); an
    unknown or empty kind list is an error naming the known kinds."""
    val = mathgen_task.load("validate")
    basic = bench.load_task("math").load("validate", kinds=("basic",))
    assert [p.id for p in basic] == [p.id for p in val if p.extra["kind"] == "basic"] and len(basic) == 20
    two = mathgen_task.load("test", kinds={"basic", "percent"})
    assert {p.extra["kind"] for p in two} == {"basic", "percent"} and len(two) == 80 + 16
    for bad in (("basic", "algebra"), ()):
        with pytest.raises(ValueError, match="expected some of"):
            mathgen_task.load("test", kinds=bad)


def test_same_set_in_a_fresh_process_with_other_hash_seeds():
    code = "import bench.mathgen_task as g, hashlib; print(hashlib.sha256(repr([(p.question, p.gold) for p in g.generate(7, 120)]).encode()).hexdigest())"
    outs = set()
    for hash_seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        outs.add(run.stdout.strip())
    assert len(outs) == 1


def test_levels_and_solutions_score(problems):
    for p in problems:
        assert 1 <= p.extra["level"] <= 5
        assert math_task.score(p.extra["hidden_solution"], p) == 1.0, p.question
        assert math_task.score(f"\\boxed{{{p.gold} + 1}}", p) == 0.0, p.question


# --- independent recomputation ---------------------------------------------------------------------

def gold_value(gold):
    """The gold as a number, parsed here (not by the scorer): 7, -\\frac{3}{4}, 102.608, 1011_{2}."""
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    return Fraction(gold)


def py(latex):
    """The generator's LaTeX as a Python expression over Fractions (test-only; eval'd below)."""
    s = latex.replace("\\left(", "(").replace("\\right)", ")")
    s = s.replace("\\times", "*").replace("\\div", "/").replace("\\cdot", "*")
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
    s = re.sub(r"\^\{([^{}]*)\}", r"**(\1)", s)
    s = re.sub(r"(\d)\s*([a-z(])", r"\1*\2", s)
    s = re.sub(r"\)\s*([a-z(\d])", r")*\1", s)
    return re.sub(r"(?<![\w.])(\d+)", r"F(\1)", s)


def ev(latex, **env):
    return eval(py(latex), {"F": Fraction, "__builtins__": {}}, env)


def ints(question):
    return [int(x) for x in re.findall(r"-?\d+", " ".join(re.findall(r"\$(.*?)\$", question)))]


def is_prime(n):
    if n < 2:
        return False
    k = 2
    while k * k <= n:
        if n % k == 0:
            return False
        k += 1
    return True


def pascal(n, k):
    row = [1]
    for _ in range(n):
        row = [a + b for a, b in zip([0] + row, row + [0])]
    return row[k] if 0 <= k <= n else 0


def digit_sum(n):
    total = 0
    while n:
        n, d = divmod(n, 10)
        total += d
    return total


@lru_cache(maxsize=None)
def arrangements(counts):
    if sum(counts) == 0:
        return 1
    return sum(arrangements(counts[:i] + (c - 1,) + counts[i + 1:]) for i, c in enumerate(counts) if c)


def recompute(q):
    """The answer to question q, worked out from its text."""
    n = ints(q)
    if q.startswith("Compute $") and "\\cdots" not in q:
        return ev(re.match(r"Compute \$(.*)\$\.", q).group(1))
    if q.startswith("Solve for $x$"):
        left, right = re.match(r"Solve for \$x\$: \$(.*) = (.*)\$\.", q).groups()
        return ("solve", left, right)
    if q.startswith("If $"):
        e1, e2, target = re.match(r"If \$(.*)\$ and \$(.*)\$, what is the value of \$(.*)\$\?", q).groups()
        (l1, r1), (l2, r2) = e1.split(" = "), e2.split(" = ")
        a, b, c = ev(l1, x=1, y=0), ev(l1, x=0, y=1), ev(r1)
        d, e, f = ev(l2, x=1, y=0), ev(l2, x=0, y=1), ev(r2)
        det = a * e - b * d
        assert det != 0
        x, y = (c * e - b * f) / det, (a * f - c * d) / det
        return ev(target.replace("xy", "x*y"), x=x, y=y)
    if "greatest common divisor and the least common multiple" in q:
        g = max(k for k in range(1, min(n) + 1) if all(v % k == 0 for v in n))
        m = next(k for k in itertools.count(max(n), max(n)) if all(k % v == 0 for v in n))
        return g + m
    if "greatest common divisor" in q:
        return max(k for k in range(1, min(n) + 1) if all(v % k == 0 for v in n))
    if "least common multiple" in q:
        return next(k for k in itertools.count(max(n), max(n)) if all(k % v == 0 for v in n))
    if "units digit of" in q:
        a, e = n
        r = 1
        for _ in range(e):
            r = r * a % 10
        return r
    if "remainder when" in q:
        if len(n) == 3:
            a, e, m = n
            r = 1
            for _ in range(e):
                r = r * a % m
            return r
        return n[0] - n[1] * (n[0] // n[1])
    if "divisors of" in q and "perfect squares" in q:
        return sum(1 for k in range(1, math.isqrt(n[0]) + 1) if n[0] % (k * k) == 0)
    if "How many positive divisors" in q:
        return sum(1 for k in range(1, n[0] + 1) if n[0] % k == 0) if n[0] < 10 ** 6 else \
            sum(2 - (k * k == n[0]) for k in range(1, math.isqrt(n[0]) + 1) if n[0] % k == 0)
    if "sum of all of the positive divisors" in q:
        return sum(k for k in range(1, n[0] + 1) if n[0] % k == 0)
    if "How many prime numbers are between" in q:
        return sum(is_prime(k) for k in range(n[0], n[1] + 1))
    if "largest prime factor" in q:
        v, p, big = n[0], 2, 1
        while v > 1:
            while v % p == 0:
                v, big = v // p, p
            p += 1
        return big
    if "sum of all prime numbers less than" in q:
        return sum(k for k in range(n[0]) if is_prime(k))
    if "smallest prime number greater than" in q:
        return next(k for k in itertools.count(n[0] + 1) if is_prime(k))
    if "sum of the digits of" in q:
        expr = re.search(r"digits of \$(.*)\$\?", q).group(1)
        if expr.endswith("!"):
            v = 1
            for k in range(2, int(expr[:-1]) + 1):
                v *= k
        elif "^" in expr:
            a, e = n
            v = 1
            for _ in range(e):
                v *= a
        else:
            v = int(expr)
        return digit_sum(v)
    if q.startswith("Express"):
        return ("base", q)
    if "divisible by none of" in q:
        top, *ds = n
        return sum(1 for k in range(1, top + 1) if all(k % d for d in ds))
    if "are divisible by" in q:
        top, a, b = n
        return sum(1 for k in range(1, top + 1) if k % a == 0 or k % b == 0)
    if "exactly" in q and "women" in q:
        men, women, k, j = n
        return pascal(women, j) * pascal(men, k - j)
    if "at least one woman" in q:
        men, women, k = n
        return sum(pascal(women, j) * pascal(men, k - j) for j in range(1, k + 1))
    if "committee of" in q:
        return pascal(n[0], n[1])
    if "A path on a grid" in q:
        a, b = n[2], n[3]
        grid = [[1] * (b + 1) for _ in range(a + 1)]
        for i in range(1, a + 1):
            for j in range(1, b + 1):
                grid[i][j] = grid[i - 1][j] + grid[i][j - 1]
        return grid[a][b]
    if "stand in a line" in q:
        return math.prod(range(1, n[0] + 1))
    if "books be arranged" in q:
        k, total = n
        return math.prod(range(total - k + 1, total + 1))
    if "arrangements of the letters" in q:
        word = re.search(r"the word ([A-Z]+)", q).group(1)
        return arrangements(tuple(word.count(c) for c in sorted(set(word))))
    if "round table" in q:
        return math.prod(range(1, n[0] + 1)) // n[0]
    if "digits whose sum is" in q:
        k, s = n
        return sum(1 for digits in itertools.product(range(10), repeat=k) if digits[0] and sum(digits) == s)
    if "die is rolled" in q:
        return Fraction(sum(1 for f in range(1, 7) if f > n[0]), 6)
    if "dice" in q:
        sides = n[0]
        count = 3 if q.startswith("Three") else 2
        rolls = list(itertools.product(range(1, sides + 1), repeat=count))
        if "a prime number" in q:
            good = sum(is_prime(sum(r)) for r in rolls)
        elif "at least" in q:
            good = sum(sum(r) >= n[-1] for r in rolls)
        else:
            good = sum(sum(r) == n[-1] for r in rolls)
        return Fraction(good, len(rolls))
    if "first term of an arithmetic sequence" in q:
        a, d, k = n
        terms = [a]
        while len(terms) < k:
            terms.append(terms[-1] + d)
        return terms[-1] if "th term?" in q else sum(terms)
    if "term of an arithmetic sequence is" in q:
        i, ti, j, tj, k = n
        d = Fraction(tj - ti, j - i)
        return ti + (k - i) * d
    if "How many numbers are in the list" in q:
        a, b, _, last = n
        return len(range(a, last + 1, b - a))
    if "arithmetic series" in q:
        a, b, _, last = n
        return sum(range(a, last + 1, b - a))
    if "geometric sequence" in q or "geometric series" in q:
        body = re.search(r"\$([^$]*\\(?:ldots|cdots))\$", q).group(1)
        terms = [ev(t.strip()) for t in re.split(r",|\s\+\s", body)[:3]]
        r = terms[1] / terms[0]
        assert terms[2] == terms[1] * r
        if "infinite" in q:
            return ("series", terms[0], r)
        m = re.search(r"\$(\d+)\$th term|first \$(\d+)\$ terms", q)
        k = int(m.group(1) or m.group(2))
        seq = [terms[0]]
        while len(seq) < k:
            seq.append(seq[-1] * r)
        return seq[-1] if "th term" in q else sum(seq)
    if "odd positive integers" in q:
        return sum(range(1, 2 * n[0], 2))
    if q.startswith("Compute $1^2"):
        return sum(k * k for k in range(1, n[-2] + 1))
    if q.startswith("Compute $1^3"):
        return sum(k ** 3 for k in range(1, n[-2] + 1))
    if q.startswith("Compute $1 + 2"):
        return sum(range(1, n[-1] + 1))
    if q.startswith("Compute $\\frac{1}{1"):
        last = n[-2]
        return sum(Fraction(1, k * (k + 1)) for k in range(1, last + 1))
    if re.match(r"What is \$\d+\\%\$ of", q):
        return Fraction(n[0] * n[1], 100)
    if re.fullmatch(r"What is \$[^$]*\$\?", q):  # basic: one operation
        return ev(q[9:-2])
    if "is what percent of" in q:
        return Fraction(100 * n[0], n[1])
    if "jacket" in q:
        price, up, down = n
        return Fraction(price) * Fraction(100 + up, 100) * Fraction(100 - down, 100)
    if "After a discount" in q:
        off = n[0]
        sale = Fraction(re.search(r"costs \$([\d.]+)\$", q).group(1))
        return sale / Fraction(100 - off, 100)
    if "stock worth" in q:
        value = Fraction(n[0])
        for sign, r in re.findall(r"(increases|decreases) by \$(\d+)", q):
            value *= Fraction(100 + int(r) * (1 if sign == "increases" else -1), 100)
        return value
    if "arithmetic mean of the numbers" in q:
        return Fraction(sum(n), len(n))
    if "median" in q:
        s = sorted(n)
        return Fraction(s[(len(s) - 1) // 2] + s[len(s) // 2], 2)
    if "What is the remaining number" in q:
        count, mean, *rest = n
        return count * mean - sum(rest[1:])
    if "What number was removed" in q:
        count, mean, new_mean = n
        return count * mean - (count - 1) * new_mean
    raise AssertionError(f"no recomputation for: {q}")


def test_every_answer_recomputed_from_the_question(problems):
    kinds = set()
    for p in problems:
        q, got = p.question, recompute(p.question)
        kinds.add(p.extra["kind"])
        if isinstance(got, tuple) and got[0] == "solve":  # substitute the gold: it solves, x + 1 does not
            _, left, right = got
            x = gold_value(p.gold)
            assert ev(left, x=x) == ev(right, x=x), q
            assert ev(left, x=x + 1) != ev(right, x=x + 1), q
        elif isinstance(got, tuple) and got[0] == "base":
            m = re.fullmatch(r"(\d+)_\{(\d+)\}", p.gold)
            digits, base = m.group(1), int(m.group(2))
            assert all(int(c) < base for c in digits) and digits[0] != "0"
            n = ints(q)
            if "base-10" in q:
                assert base == n[1] and int(digits, base) == n[0], q
            else:
                src = re.search(r"\$(\d+)_\{(\d+)\}\$ in base \$(\d+)\$", q)
                assert base == int(src.group(3)) and int(digits, base) == int(src.group(1), int(src.group(2))), q
        elif isinstance(got, tuple) and got[0] == "series":  # S = a + r S, |r| < 1
            _, a, r = got
            s = gold_value(p.gold)
            assert abs(r) < 1 and a + r * s == s, q
        else:
            assert gold_value(p.gold) == got, (q, p.gold, got)
    assert len(kinds) == 21

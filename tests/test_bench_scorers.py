"""Training scorers of SCOREFLOW.md §4 on hand-made cases: MATH equivalence, GSM8K numbers, token F1."""
import pytest

from bench import Problem
from bench import drop_task, gsm8k_task, hotpotqa_task, math_task


def _p(gold, **extra):
    return Problem(id="t", question="q", input="q", gold=gold, extra=extra)


# --- MATH -----------------------------------------------------------------------------------------

EQUIVALENT = [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}"),
    ("\\boxed{\\tfrac{3}{4}}", "3/4"),
    ("$\\boxed{-\\frac{17}{19}}$", "-17/19"),
    ("\\boxed{10\\%}", "0.1"),  # trailing % means /100 (SCOREFLOW.md §4)
    ("\\boxed{28\\%}", "28"),  # ... and the bare number is accepted
    ("\\boxed{5 \\text{ cm}^2}", "5"),
    ("\\boxed{162\\text{ minutes}}", "162"),
    ("\\boxed{3.25\\text{ dollars}}", "3.25"),
    ("\\boxed{18 inches}", "18"),
    ("\\boxed{118^{\\circ}}", "118"),
    ("\\boxed{120^\\circ}", "120"),
    ("\\boxed{2.50}", "2.5"),
    ("\\boxed{7.0}", "7"),
    ("\\boxed{.5}", "\\frac12"),
    ("\\boxed{\\$15.48}", "15.48"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{10,\\!236}", "10236"),
    ("\\boxed{14{,}916}", "14916"),
    ("\\boxed{1,000,000}", "10^6"),
    ("\\boxed{11 \\frac{2}{3}}", "\\frac{35}{3}"),  # a mixed number
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "0.866"),  # |diff| = 2.5e-5 <= 1e-3
    ("\\boxed{10\\pi}", "31.416"),
    ("\\boxed{\\frac{21}{2}\\pi}", "\\frac{21\\pi}{2}"),
    ("\\boxed{8+4\\sqrt3}", "4(2+\\sqrt{3})"),
    ("\\boxed{\\sqrt[3]{8}}", "2"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{5!}", "120"),
    ("\\boxed{0.\\overline{3}}", "\\frac13"),
    ("\\boxed{116 - 75i}", "116-75i"),
    ("\\boxed{-34 + 12x}", "12x - 34"),
    ("\\boxed{32R^2 - 3(a^2 + b^2 + c^2)}", "32R^2-3a^2-3b^2-3c^2"),
    ("\\boxed{y = 2x + 3}", "2x+3"),
    ("\\boxed{3 \\pm 2 \\sqrt{2}}", "3-2\\sqrt2, 3+2\\sqrt2"),
    ("\\boxed{1, -3}", "-3, 1"),  # a bare list: order free
    ("\\boxed{12\\text{ and }13}", "12, 13"),
    ("\\boxed{\\left( \\frac{4}{3}, -\\frac{1}{3} \\right)}", "(4/3,-1/3)"),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"),
    ("\\boxed{\\begin{pmatrix} -4/9 \\\\ 1/9 \\end{pmatrix}}", "\\begin{pmatrix}-\\frac49\\\\ \\frac19\\end{pmatrix}"),
    ("\\boxed{\\text{Friday}}", "Friday"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("\\boxed{1011_{2}}", "1011"),
    ("\\boxed{\\boxed{7}}", "7"),  # nested boxes
    ("first \\boxed{3}, finally \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),  # the last box counts
    ("Adding them up.\n42.", "42"),  # no box: the last sentence
    ("\\boxed 5", "5"),
    ("\\boxed{3^{2007}}", "3^{2007}"),
]

NOT_EQUIVALENT = [
    ("\\boxed{10}", "11"),
    ("\\boxed{0.5}", "0.51"),  # |diff| = 0.01 > 1e-3
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "0.87"),
    ("\\boxed{\\frac{1}{2}}", "2"),
    ("\\boxed{27,93}", "2793"),  # a list, not a thousands separator
    ("\\boxed{5, 125}", "5125"),  # a list: thousands commas take no space
    ("\\boxed{(4/3,-1/3)}", "(-1/3,4/3)"),  # tuples are ordered
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3]"),  # interval ends matter
    ("\\boxed{-34 + 12x}", "12x+34"),
    ("\\boxed{x^2}", "2x"),
    ("\\boxed{3^{2007}}", "3^{2006}"),
    ("\\boxed{1, -3}", "1, 3"),
    ("\\boxed{1, -3}", "1"),
    ("\\boxed{\\text{Friday}}", "Monday"),
    ("\\boxed{1011_{2}}", "1011_{3}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"),
    ("The answer is 5.", "5"),  # the last sentence is "The answer is 5", not a number
    ("\\boxed{}", "5"),
    ("", "5"),
    ("\\boxed{9^{9^{9^{9}}}}", "1"),  # too large to evaluate: unequal, and no hang
]


@pytest.mark.parametrize("output,gold", EQUIVALENT)
def test_math_equivalent(output, gold):
    assert math_task.score(output, _p(gold)) == 1.0


@pytest.mark.parametrize("output,gold", NOT_EQUIVALENT)
def test_math_not_equivalent(output, gold):
    assert math_task.score(output, _p(gold)) == 0.0


def test_math_extraction_and_normaliser_units():
    assert math_task.last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert math_task.last_boxed("no box") is None
    assert math_task.extract_answer("Step one.\nThus x is 4.") == "Thus x is 4"
    assert math_task.normalize("\\left( 3, \\dfrac{1}{2} \\right)") == "(3,\\frac{1}{2})"
    assert math_task.normalize("\\pi r^2") == "\\pi r^2"  # the space after a command stays
    assert math_task.evaluate("\\frac{1}{3}+\\frac{1}{6}") == math_task.Fraction(1, 2)  # exact, not 0.4999
    assert math_task.evaluate("2^{-2}") == math_task.Fraction(1, 4)
    assert math_task.evaluate("1/0") is None


# --- GSM8K ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("output,gold,want", [
    ("The answer is 1,234.", "1234", 1.0),
    ("so she pays $65,960 in total", "65,960", 1.0),
    ("#### 72", "72", 1.0),
    ("72.0", "72", 1.0),
    ("It takes -3 steps", "-3", 1.0),
    ("It takes 3 steps", "-3", 0.0),
    ("72.5", "72", 0.0),
    ("first 5, then 7", "7", 1.0),  # the last number counts
    ("first 5, then 7", "5", 0.0),
    ("no number here", "5", 0.0),
    ("0.3333333", "0.3333333", 1.0),
    ("0.333", "0.3333333", 0.0),  # tolerance is 1e-6
])
def test_gsm8k(output, gold, want):
    assert gsm8k_task.score(output, _p(gold)) == want


# --- DROP / HotpotQA F1 ---------------------------------------------------------------------------

def test_f1_by_hand():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]: P = 2/2, R = 2/3, F1 = 2PR/(P+R) = 0.8
    assert drop_task.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multisets: [x, x, y] vs [x, y, y] share one x and one y: P = R = 2/3, F1 = 2/3
    assert drop_task.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # [x, x] vs [x, x, y]: both x count (a set would count one): P = 2/2, R = 2/3, F1 = 0.8
    assert drop_task.token_f1("x x", "x x y") == pytest.approx(0.8)
    assert drop_task.token_f1("Hello, world!", "hello world") == 1.0  # punctuation and case
    assert drop_task.token_f1("dog", "cat") == 0.0
    assert drop_task.token_f1("", "cat") == 0.0
    assert drop_task.normalize_answer("The  U.S. an Army") == "us army"
    assert drop_task.normalize_answer("theme") == "theme"  # whole words only


def test_drop_max_over_golds_and_parts():
    p = _p("88|33")
    assert drop_task.score("33", p) == 1.0
    # [answer, is, 33] vs [33]: P = 1/3, R = 1, F1 = 2 (1/3) / (4/3) = 0.5
    assert drop_task.score("the answer is 33", p) == pytest.approx(0.5)
    assert drop_task.score("12|33", p) == 1.0  # each |-part of the output is tried
    assert drop_task.score("12", p) == 0.0
    assert drop_task.score("5", _p("|5")) == 1.0  # blank golds are skipped


def test_hotpotqa_f1():
    p = _p("Gesellschaft mit beschränkter Haftung")
    assert hotpotqa_task.score("Gesellschaft mit beschränkter Haftung", p) == 1.0
    # [gesellschaft, mit] vs 4 tokens: P = 1, R = 1/2, F1 = 2/3
    assert hotpotqa_task.score("Gesellschaft mit", p) == pytest.approx(2 / 3)

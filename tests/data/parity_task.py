"""A user's own task file (the `--bench path/to/task.py` interface) for the loop's tests: a few
arithmetic questions, scored by the parity of the answer's length, so that workflows of the tiny
embedded model get different scores and the loop has pairs to train on in seconds."""
from bench import Problem

NAME = "parity"
OPERATOR_SET = "math"


def load(split, data=None, **opts):
    qs = ["What is 2 + 3?", "What is 10 - 4?", "What is 3 * 3?", "What is 8 / 2?", "What is 7 + 6?"]
    return [Problem(id=f"{split}-{i}", question=q, input=q, gold="") for i, q in enumerate(qs)]


def score(answer, problem):
    return float(len(answer) % 2)

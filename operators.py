"""operators.py: the operator library, workflow extraction, validation and safe execution.

SCOREFLOW.md §3 (operators and the per-benchmark sets), §2.1 (the Workflow class contract) and §2.3
(the runnable check). A workflow is Python written by the generator model; operators run Python
written by the executor model. Neither runs unchecked: a workflow passes an AST whitelist, then runs
in this process under a wall-clock limit, an operator-call cap and a statement/size guard inserted
into its code; model-written programs (Programmer, Test) run in executor.run_python's OS sandbox.

Public API (stable; scoreflow.py and the tests use only these names):
    OPERATOR_SETS: {set name: tuple of operator class names}   "math", "qa", "code" (§3 table)
    TEMPLATES: {set name: workflow source}   the paper's templates (§2.2 item 2), without tags
    operator_menu(set_name) -> str           purpose, exact signature and example per operator
    extract_graph(text) -> str | None        the <graph>...</graph> program (§2.3 step 1)
    validate_workflow(code, set_name) -> (ok, reason)              the AST whitelist
    await run_workflow(code, problem, client, set_name, *, timeout, max_calls, options) -> WorkflowRun
    template_similarity(code, set_name) -> float                   difflib ratio of run_workflow bodies
    await runnable_check(code, set_name, client, *, threshold, timeout, options) -> (ok, reason)  (§2.3)
    await extract_answer(output, problem, client, set_name, *, options) -> str   §3 "Extractor"
    await judge(problem, answer, client, bench_name, *, options) -> float        §4 "At test time"
    sanitize_code(text, entry_point) -> str  the code operators' output cleaner (§3)
    OperatorOptions                          sampling and sandbox settings for one run
    WorkflowRun                              answer, status ("ok" | "workflow_error" | "infra_error"),
                                             reason, n_calls, seconds, calls, notes, error, tokens
    SandboxFailure                           the sandbox itself failed (an infrastructure error)

`problem` is any object with `.input` (text, or for code a dict with "prompt" and "entry_point")
and `.extra` (a dict; "public_tests" feeds Test). Operators see only problem.input and the public
extras (entry_point, public_tests), never gold or any "hidden_*" extra (bench/__init__.py's rule).
Every executor call goes through `client.chat` (executor.ChatClient) via asyncio.to_thread; an
ExecutorError is never caught by an operator: run_workflow reports it as "infra_error" (SCOREFLOW.md
§10.7: an endpoint failure is no evidence about the workflow) and keeps it in WorkflowRun.error.
Two ExecutorErrors are stops, not failures: BudgetExceeded and EndpointDown propagate out of
run_workflow, so the stage in flight records nothing and the run stops resumably. Each call is keyed
in the client's journal by the run's sample and attempt and by its occurrence in the run (_Context).

Non-goals: the generator prompt (scoreflow.py builds it from TEMPLATES and operator_menu) and
running workflows that use Python beyond the whitelist.
"""
from __future__ import annotations

import ast
import asyncio
import contextlib
import difflib
import inspect
import json
import re
import secrets
import textwrap
import time
from dataclasses import dataclass, field

import executor

# --- operator sets, templates, menu (SCOREFLOW.md §3, §2.2) -------------------------------------

OPERATOR_SETS = {  # SCOREFLOW.md §3 "operators offered"; there is no separate Revise or Format
    "math": ("Custom", "Programmer", "ScEnsemble", "Review"),
    "qa": ("Custom", "AnswerGenerate", "ScEnsemble", "Review"),
    "code": ("CustomCodeGenerate", "ScEnsemble", "Test"),
}
ATTRIBUTE = {"Custom": "custom", "AnswerGenerate": "answer_generate", "Programmer": "programmer",
             "ScEnsemble": "sc_ensemble", "Review": "review", "CustomCodeGenerate": "code_generate",
             "Test": "test"}  # the attribute each template binds an operator to

# §2.3 step 3: a workflow whose run_workflow body is this similar to the template's is a copy.
# Keys are benchmark names (the math set serves MATH and GSM8K with different thresholds); None = off.
SIMILARITY_THRESHOLDS = {"math": 0.75, "mathgen": 0.75, "gsm8k": 0.80, "drop": 0.75, "hotpotqa": 0.75,
                         "humaneval": None, "mbpp": None}
SET_THRESHOLDS = {"math": 0.75, "qa": 0.75, "code": None}  # when only the operator set is known
TRIAL_TIMEOUTS = {"math": 60.0, "qa": 60.0, "code": 120.0}  # §2.3 step 5, seconds


def _template(set_name, body):
    inits = "".join(f"        self.{ATTRIBUTE[op]} = {op}(config)\n" for op in OPERATOR_SETS[set_name])
    return ("class Workflow:\n    def __init__(self, config, problem):\n"
            f"{inits}\n    async def run_workflow(self):\n{body}")


# The paper's templates (§2.2 item 2): every operator of the set is created, one call is made.
TEMPLATES = {
    "math": _template("math", '        solution = await self.custom(instruction="Solve the problem step by step. '
                              'Put the final answer in \\\\boxed{}.")\n        return solution\n'),
    "qa": _template("qa", "        answer = await self.answer_generate()\n        return answer\n"),
    "code": _template("code", '        solution = await self.code_generate(instruction="Write a correct Python '
                              'function for the task, thinking about edge cases.")\n        return solution\n'),
}

_MENU = {  # purpose, exact signature, one-line example (§2.2 item 3)
    "Custom": ("Sends your instruction together with the problem to the executor model and returns its reply.",
               "custom(instruction: str) -> str",
               'steps = await self.custom(instruction="Break the problem into small steps and solve each one.")'),
    "AnswerGenerate": ("Asks the executor model to think step by step about the question and give a short final "
                       "answer; returns the reasoning followed by the answer.",
                       "answer_generate() -> str",
                       "answer = await self.answer_generate()"),
    "Programmer": ("Has the executor model write a Python function solve() for the problem (using your analysis), "
                   "runs it in a sandbox, fixes errors up to 3 times, and returns the code and its output.",
                   "programmer(analysis: str = 'None') -> str",
                   "result = await self.programmer(analysis=steps)"),
    "ScEnsemble": ("Shows several candidate solutions to the executor model and returns the one most consistent "
                   "with the others, unchanged.",
                   "sc_ensemble(solutions: list[str]) -> str",
                   "best = await self.sc_ensemble(solutions=[first, second, third])"),
    "Review": ("Checks a solution for wrong logic, arithmetic slips, misread questions and missing details; "
               "returns it unchanged if it is right, otherwise a corrected solution.",
               "review(pre_solution: str) -> str",
               "checked = await self.review(pre_solution=best)"),
    "CustomCodeGenerate": ("Sends your instruction with the coding task and its function name to the executor "
                           "model and returns the Python code it writes.",
                           "code_generate(instruction: str) -> str",
                           'code = await self.code_generate(instruction="Write a simple, correct solution.")'),
    "Test": ("Runs a code solution against the task's example tests in a sandbox; if it fails, asks for a fix "
             "(several rounds) and returns the best code.",
             "test(solution: str) -> str",
             "final = await self.test(solution=code)"),
}


def operator_menu(set_name: str) -> str:
    """The operator menu the generator prompt shows for one set (§2.2 item 3)."""
    ops = _operator_names(set_name)
    lines = []
    for op in ops:
        purpose, signature, example = _MENU[op]
        lines.append(f"- {op}: {purpose}\n  Create: self.{ATTRIBUTE[op]} = {op}(config)\n"
                     f"  Call: await self.{signature}\n  Example: {example}")
    return "\n".join(lines)


def _operator_names(set_name):
    if set_name not in OPERATOR_SETS:
        raise ValueError(f"operator set {set_name!r}: expected one of {', '.join(OPERATOR_SETS)}")
    return OPERATOR_SETS[set_name]


# --- workflow text: extraction, similarity (SCOREFLOW.md §2.3 steps 1-3) -------------------------

_GRAPH = re.compile(r"<graph>(.*?)</graph>", re.S)


def extract_graph(text: str) -> str | None:
    """The program between <graph> and </graph>; sampling stops at </graph> and drops it, so it is
    appended first (§2.3 step 1). A ``` fence inside the tags is removed. None when there is no tag."""
    m = _GRAPH.search(text + "</graph>")
    if m is None:
        return None
    code = m.group(1).strip("\n")
    fenced = re.fullmatch(r"\s*```[a-zA-Z]*\n(.*?)\n?```\s*", code, re.S)
    return fenced.group(1) if fenced else code


def _run_workflow_body(code):
    """Source of run_workflow's body, found by the syntax tree (not the official cut at the first
    'return' substring, which a docstring's "returns" ends early: SCOREFLOW.md §10.11)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "run_workflow":
            lines = code.splitlines()
            return "\n".join(lines[node.body[0].lineno - 1:node.end_lineno]).strip()
    return None


def template_similarity(code: str, set_name: str) -> float:
    """difflib.SequenceMatcher ratio between run_workflow's stripped body and the template's
    (§2.3 step 3); 0.0 when the code has no run_workflow."""
    body, template = _run_workflow_body(code), _run_workflow_body(TEMPLATES[set_name])
    if body is None:
        return 0.0
    return difflib.SequenceMatcher(None, body, template).ratio()


# --- the AST whitelist --------------------------------------------------------------------------
# A workflow is a class Workflow with __init__(self, config, problem), whose statements only bind
# operators (self.name = Op(config)) or self.problem, and `async def run_workflow(self)`. In
# run_workflow: assignments, if/else, `for` over bounded iterables, return; expressions over local
# names, literals, + and -, comparisons, f-strings, awaited operator calls, asyncio.gather of
# operator calls, a few safe builtins and string/list methods. No imports, no names starting with
# "_" (`_` itself aside), no other attribute access, no while, try, with, lambda, def, class, global,
# del, raise. An inserted guard bounds steps, sizes and time at run time (see _Context.tick).

SAFE_BUILTINS = ("len", "range", "enumerate", "zip", "min", "max", "sorted", "reversed", "str", "int",
                 "float", "bool", "list", "abs", "round", "sum", "any", "all")
STR_METHODS = ("strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "join", "lower", "upper",
               "title", "capitalize", "startswith", "endswith", "find", "rfind", "count", "isdigit",
               "isalpha", "isnumeric", "isspace")  # no replace/center/format: output can outgrow input
LIST_METHODS = ("append", "extend", "insert", "pop", "index", "reverse", "sort", "copy")
MAX_RANGE = 10          # range() bounds in loops and comprehensions are int literals up to this
MAX_LOOP_DEPTH = 2      # nested for loops
MAX_STEPS = 2000        # statements a run may execute (inserted guard)
MAX_CHARS = 1_000_000   # characters held in run_workflow's locals at any statement (inserted guard)
MAX_CODE_CHARS = 20_000  # the workflow's source
_BINOPS = (ast.Add, ast.Sub)
_UNARYOPS = (ast.USub, ast.UAdd, ast.Not)


class WorkflowRejected(ValueError):
    """The workflow failed validation; str() is the reason."""


class WorkflowError(RuntimeError):
    """The workflow failed while running through its own fault (cap, guard, bad return)."""


class SandboxFailure(RuntimeError):
    """executor.run_python reported "internal": the sandbox failed, not the code (infrastructure)."""


def validate_workflow(code: str, set_name: str) -> tuple[bool, str]:
    """(True, "") if `code` passes the whitelist for `set_name`, else (False, reason)."""
    try:
        _check_workflow(code, set_name)
        return True, ""
    except WorkflowRejected as e:
        return False, str(e)


def _check_workflow(code, set_name):
    """The whitelist; raises WorkflowRejected naming the line and what is wrong. Returns the tree
    and the operator attributes created in __init__ ({attr: operator class name})."""
    ops = _operator_names(set_name)
    if not isinstance(code, str) or not code.strip():
        raise WorkflowRejected("empty workflow")
    if len(code) > MAX_CODE_CHARS:
        raise WorkflowRejected(f"the workflow has {len(code)} characters, more than {MAX_CODE_CHARS}")
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise WorkflowRejected(f"syntax error at line {e.lineno}: {e.msg}") from None
    body = [n for n in tree.body if not _is_docstring(n)]
    if len(body) != 1 or not isinstance(body[0], ast.ClassDef) or body[0].name != "Workflow":
        raise WorkflowRejected("the program must be exactly one `class Workflow:` (no imports or other code)")
    cls = body[0]
    if cls.bases or cls.keywords or cls.decorator_list:
        raise WorkflowRejected(f"line {cls.lineno}: class Workflow takes no bases or decorators")
    methods = {}
    for node in cls.body:
        if _is_docstring(node):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ("__init__", "run_workflow"):
            if node.name in methods:
                raise WorkflowRejected(f"line {node.lineno}: {node.name} defined twice")
            methods[node.name] = node
        else:
            raise WorkflowRejected(f"line {node.lineno}: class Workflow may hold only __init__ and run_workflow")
    init, run = methods.get("__init__"), methods.get("run_workflow")
    if not isinstance(init, ast.FunctionDef) or _arg_names(init) != ["self", "config", "problem"]:
        raise WorkflowRejected("Workflow needs `def __init__(self, config, problem):`")
    if not isinstance(run, ast.AsyncFunctionDef) or _arg_names(run) != ["self"]:
        raise WorkflowRejected("Workflow needs `async def run_workflow(self):`")
    for fn in (init, run):
        if fn.decorator_list or fn.returns:
            raise WorkflowRejected(f"line {fn.lineno}: {fn.name} takes no decorators or annotations")
    attrs = {}
    for stmt in init.body:
        if _is_docstring(stmt):
            continue
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _is_self_attr(stmt.targets[0])):
            raise WorkflowRejected(f"line {stmt.lineno}: __init__ may only bind operators: "
                                   f"self.name = Operator(config)")
        name, value = stmt.targets[0].attr, stmt.value
        if name == "problem" and isinstance(value, ast.Name) and value.id == "problem":
            continue
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and not value.keywords
                and len(value.args) == 1 and isinstance(value.args[0], ast.Name) and value.args[0].id == "config"):
            raise WorkflowRejected(f"line {stmt.lineno}: expected self.{name} = Operator(config)")
        if value.func.id not in ops:
            raise WorkflowRejected(f"line {stmt.lineno}: {value.func.id} is not an operator of the {set_name} set "
                                   f"(offered: {', '.join(ops)})")
        if name.startswith("_") or name == "problem":
            raise WorkflowRejected(f"line {stmt.lineno}: bad operator attribute name {name!r}")
        attrs[name] = value.func.id
    if not attrs:
        raise WorkflowRejected("__init__ creates no operators")
    _RunChecker(attrs, run).check()
    return tree, attrs


def _is_docstring(node):
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _arg_names(fn):
    a = fn.args
    if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.posonlyargs:
        return None
    return [x.arg for x in a.args]


def _is_self_attr(node):
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"


class _RunChecker:
    """Checks run_workflow's body statement by statement (see the rules above)."""

    def __init__(self, attrs, fn):
        self.attrs, self.fn = attrs, fn
        self.locals = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for name in self.locals:
            if (name.startswith("_") and name != "_") or name in ("self", "asyncio") or name in SAFE_BUILTINS:
                raise WorkflowRejected(f"run_workflow: cannot assign to {name!r}")

    def fail(self, node, what):
        raise WorkflowRejected(f"line {getattr(node, 'lineno', self.fn.lineno)}: {what}")

    def check(self):
        body = [s for s in self.fn.body if not _is_docstring(s)]
        if not body:
            self.fail(self.fn, "run_workflow is empty")
        self.block(body, 0)
        if not any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(self.fn)):
            self.fail(self.fn, "run_workflow never returns an answer")

    def block(self, stmts, depth):
        for s in stmts:
            self.stmt(s, depth)

    def stmt(self, s, depth):
        if isinstance(s, ast.Assign):
            for t in s.targets:
                self.target(t)
            self.expr(s.value)
        elif isinstance(s, ast.AugAssign):
            if not isinstance(s.target, ast.Name) or not isinstance(s.op, _BINOPS):
                self.fail(s, "only `name += value` and `name -= value` are allowed")
            self.expr(s.value)
        elif isinstance(s, ast.AnnAssign):
            self.fail(s, "annotations are not allowed")
        elif isinstance(s, ast.Expr):
            if not isinstance(s.value, (ast.Await, ast.Call)) and not _is_docstring(s):
                self.fail(s, "a bare expression does nothing here")
            self.expr(s.value)
        elif isinstance(s, ast.If):
            self.expr(s.test)
            self.block(s.body, depth)
            self.block(s.orelse, depth)
        elif isinstance(s, ast.For):
            if depth + 1 > MAX_LOOP_DEPTH:
                self.fail(s, f"loops nest deeper than {MAX_LOOP_DEPTH}")
            if s.orelse:
                self.fail(s, "for ... else is not allowed")
            self.target(s.target)
            self.loop_iter(s.iter)
            self.block(s.body, depth + 1)
        elif isinstance(s, ast.AsyncFor):
            self.fail(s, "async for is not allowed")
        elif isinstance(s, ast.Return):
            if s.value is not None:
                self.expr(s.value)
        elif isinstance(s, (ast.Pass, ast.Break, ast.Continue)):
            pass
        elif isinstance(s, ast.While):
            self.fail(s, "while loops are not allowed (unbounded); use `for i in range(n)` with n <= "
                         f"{MAX_RANGE}")
        elif isinstance(s, (ast.Import, ast.ImportFrom)):
            self.fail(s, "imports are not allowed")
        else:
            self.fail(s, f"{type(s).__name__} statements are not allowed")

    def target(self, t):
        if isinstance(t, ast.Name):
            return
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self.target(e)
        elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
            self.expr(t.value)
            self.expr(t.slice)
        else:
            self.fail(t, "you may assign only to local names (not to attributes)")

    def loop_iter(self, it):
        """Bounded iterables: range(literals <= MAX_RANGE or len(name)), a local list, a list
        literal, or enumerate/zip/reversed/sorted of those."""
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and not it.keywords:
            name = it.func.id
            if name == "range" and 1 <= len(it.args) <= 3:
                for a in it.args:
                    is_len = (isinstance(a, ast.Call) and isinstance(a.func, ast.Name) and a.func.id == "len"
                              and len(a.args) == 1 and not a.keywords and isinstance(a.args[0], ast.Name))
                    if not (_small_int(a) or is_len):
                        self.fail(it, f"range() arguments must be integers from 0 to {MAX_RANGE} or len(name)")
                    self.expr(a)
                return
            if name in ("enumerate", "zip", "reversed", "sorted") and it.args:
                for a in it.args:
                    self.loop_iter(a)
                return
        if isinstance(it, ast.Name):
            self.expr(it)
            return
        if isinstance(it, (ast.List, ast.Tuple)):
            self.expr(it)
            return
        self.fail(it, "a for loop may go over range(n), a list, or enumerate/zip of lists")

    def expr(self, e, in_gather=False):
        if isinstance(e, ast.Constant):
            if isinstance(e.value, (bytes, complex)) or e.value is Ellipsis:
                self.fail(e, f"{type(e.value).__name__} literals are not allowed")
        elif isinstance(e, ast.Name):
            if e.id.startswith("_") and e.id != "_":
                self.fail(e, f"names starting with '_' are not allowed ({e.id!r})")
            if e.id not in self.locals and e.id not in SAFE_BUILTINS and e.id not in ("True", "False", "None"):
                if e.id in ("self", "asyncio"):
                    self.fail(e, f"{e.id} may only be used to call operators")
                self.fail(e, f"unknown or forbidden name {e.id!r}")
        elif isinstance(e, ast.Await):
            v = e.value
            if not isinstance(v, ast.Call) or not (self.is_operator(v.func) or self.is_gather(v.func)):
                self.fail(e, "await only operator calls (await self.op(...)) or asyncio.gather(...)")
            self.call(v, awaited=True)
        elif isinstance(e, ast.Call):
            if self.is_operator(e.func) and not in_gather:
                self.fail(e, f"operator call self.{e.func.attr}(...) must be awaited")
            self.call(e, awaited=in_gather)
        elif isinstance(e, ast.Attribute):
            self.fail(e, f"attribute access .{e.attr} is allowed only to call operators and str/list methods")
        elif isinstance(e, (ast.List, ast.Tuple)):
            for x in e.elts:
                self.expr(x)
        elif isinstance(e, ast.BinOp):
            if not isinstance(e.op, _BINOPS):
                self.fail(e, f"operator {type(e.op).__name__} is not allowed (only + and -)")
            self.expr(e.left)
            self.expr(e.right)
        elif isinstance(e, ast.UnaryOp):
            if not isinstance(e.op, _UNARYOPS):
                self.fail(e, f"operator {type(e.op).__name__} is not allowed")
            self.expr(e.operand)
        elif isinstance(e, ast.BoolOp):
            for x in e.values:
                self.expr(x)
        elif isinstance(e, ast.Compare):
            self.expr(e.left)
            for x in e.comparators:
                self.expr(x)
        elif isinstance(e, ast.IfExp):
            for x in (e.test, e.body, e.orelse):
                self.expr(x)
        elif isinstance(e, ast.Subscript):
            self.expr(e.value)
            self.expr(e.slice)
        elif isinstance(e, ast.Slice):
            for x in (e.lower, e.upper, e.step):
                if x is not None:
                    self.expr(x)
        elif isinstance(e, ast.JoinedStr):
            for x in e.values:
                self.expr(x)
        elif isinstance(e, ast.FormattedValue):
            if e.format_spec is not None:  # f"{x:>999999999}" would build a gigabyte in one step
                self.fail(e, "format specs in f-strings are not allowed")
            self.expr(e.value)
        elif isinstance(e, ast.ListComp):
            self.comprehension(e, in_gather)
        elif isinstance(e, ast.Starred):
            if not in_gather:
                self.fail(e, "*unpacking is allowed only in asyncio.gather(*[...])")
            self.expr(e.value, in_gather=True)
        else:
            self.fail(e, f"{type(e).__name__} expressions are not allowed")

    def comprehension(self, e, in_gather):
        if len(e.generators) != 1:
            self.fail(e, "a list comprehension may have one `for`")
        g = e.generators[0]
        if g.is_async:
            self.fail(e, "async comprehensions are not allowed")
        if not (isinstance(g.iter, ast.Call) and isinstance(g.iter.func, ast.Name) and g.iter.func.id == "range"
                and not g.iter.keywords and 1 <= len(g.iter.args) <= 3 and all(map(_small_int, g.iter.args))):
            if not isinstance(g.iter, ast.Name):
                self.fail(e, f"a list comprehension may go over range(n <= {MAX_RANGE}) or a local list")
        self.target(g.target)
        self.expr(g.iter)
        for cond in g.ifs:
            self.expr(cond)
        self.expr(e.elt, in_gather=in_gather)

    def is_operator(self, f):
        return _is_self_attr(f) and f.attr in self.attrs

    def is_gather(self, f):
        return (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "asyncio"
                and f.attr == "gather")

    def call(self, c, awaited):
        f = c.func
        for kw in c.keywords:
            if kw.arg is None:
                self.fail(c, "**kwargs are not allowed")
        if self.is_operator(f):
            if not awaited:
                self.fail(c, f"operator call self.{f.attr}(...) must be awaited")
            for a in c.args + [kw.value for kw in c.keywords]:
                if isinstance(a, ast.Starred):
                    self.fail(c, "*args are not allowed in operator calls")
                self.expr(a)
        elif self.is_gather(f):
            if not awaited or c.keywords:
                self.fail(c, "use `await asyncio.gather(self.op(...), ...)` with no keywords")
            for a in c.args:
                if not (isinstance(a, ast.Call) and self.is_operator(a.func)) and not (
                        isinstance(a, ast.Starred) and isinstance(a.value, ast.ListComp)):
                    self.fail(c, "asyncio.gather takes operator calls, or *[self.op(...) for i in range(n)]")
                self.expr(a, in_gather=True)
        elif isinstance(f, ast.Name):
            if f.id not in SAFE_BUILTINS:
                self.fail(c, f"calling {f.id!r} is not allowed (allowed: operators, {', '.join(SAFE_BUILTINS)})")
            if f.id == "range" and not all(map(_small_int, c.args)):
                self.fail(c, f"range() arguments must be integers from 0 to {MAX_RANGE}")
            for a in c.args + [kw.value for kw in c.keywords]:
                if isinstance(a, ast.Starred):
                    self.fail(c, "*args are not allowed")
                self.expr(a)
        elif isinstance(f, ast.Attribute):
            if f.attr not in STR_METHODS + LIST_METHODS:
                self.fail(c, f"method .{f.attr}() is not allowed (allowed: operators and "
                             f"{', '.join(STR_METHODS + LIST_METHODS)})")
            if isinstance(f.value, ast.Name) and f.value.id in ("self", "asyncio"):
                self.fail(c, f"{f.value.id}.{f.attr} is not an operator")
            self.expr(f.value)
            for a in c.args + [kw.value for kw in c.keywords]:
                if isinstance(a, ast.Starred):
                    self.fail(c, "*args are not allowed")
                self.expr(a)
        else:
            self.fail(c, "only operators, safe builtins and str/list methods may be called")


def _small_int(node):
    return (isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= MAX_RANGE) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) is int and 0 <= node.operand.value <= MAX_RANGE)


# --- running a workflow -------------------------------------------------------------------------

@dataclass
class OperatorOptions:
    """Sampling and sandbox settings shared by the operators of one run."""
    temperature: float = 0.0     # executor sampling (paper: GPT-4o-mini at 0)
    max_tokens: int = 1024       # per operator call (official code: 4096)
    seed: int | None = None      # executor seed; ScoreFlow's 3 runs per workflow may use 0, 1, 2
    sample: int = 0              # cache key: the k-th repeat of the same request
    stage: str = "execute"       # ChatClient accounting labels
    tag: str = ""
    program_timeout: float = 30.0   # seconds per Programmer/Test sandbox run (official: 30)
    programmer_attempts: int = 3    # Programmer: write, run, feed the error back (official: 3)
    test_rounds: int = 3            # Test: repair rounds (official: 10 HumanEval, 6 MBPP)
    programmer_examples: int = 2    # Programmer: worked example turns before the real request (paper: 0)
    keep_prompts: bool = True       # WorkflowRun.calls keeps each prompt and reply text
    attempt: int = 0                # which attempt of this run (a retried run asks the executor anew)
    programmer_call_attempts: int = 1   # Programmer's whole call, when it raises (paper: 3, SCOREFLOW.md §3)
    programmer_call_delay: float = 2.0  # seconds between those attempts (paper: 2)


@dataclass
class WorkflowRun:
    """One execution of one workflow on one problem."""
    answer: str          # the workflow's return value ("" unless status == "ok")
    status: str          # "ok" | "workflow_error" (its own fault: scores 0) | "infra_error" (no evidence)
    reason: str          # why not ok, one line
    n_calls: int         # operator calls made
    seconds: float
    calls: list = field(default_factory=list)  # per executor call: operator, prompt, reply, notes
    notes: list = field(default_factory=list)  # fallbacks taken (bad ensemble letter, ...)
    error: BaseException | None = None         # the ExecutorError / SandboxFailure of an infra_error
    raised: bool = False                       # a workflow_error where the workflow raised or timed out
    #                                            (a retry may help, SCOREFLOW.md §4), not a bad return value
    executor_seconds: float = 0.0              # time with an executor call queued or in flight (not
    #                                            counted against the timeout)
    tokens: int = 0      # executor prompt + completion tokens of its calls (cache replays count: same text)


class _Context:
    """What the generated code receives as `config`: the client, the problem, the caps, the log.

    The run's clock: `timeout` seconds of the workflow's own work (SCOREFLOW.md §4 "Timeouts",
    §10.7). Time while an executor call is queued or in flight (at our client, in the thread pool,
    at the endpoint) is the executor's, not the workflow's: own_seconds() leaves it out, so a slow
    or serial endpoint cannot make a workflow "time out"."""

    def __init__(self, client, problem, set_name, options, max_calls, timeout):
        self.client, self.problem, self.set_name, self.options = client, problem, set_name, options
        self.max_calls, self.timeout = max_calls, timeout
        self.n_calls, self.steps, self.tokens = 0, 0, 0
        self.calls, self.notes = [], []
        self.t0 = time.monotonic()
        self.waiting = 0                 # executor calls outstanding now
        self._wait_since = 0.0           # when `waiting` last went from 0 to 1
        self.executor_seconds = 0.0      # closed intervals with a call outstanding
        self._seen = {}                  # request -> how many times this run has made it (occurrence)

    def own_seconds(self):
        now = time.monotonic()
        waiting = now - self._wait_since if self.waiting else 0.0
        return now - self.t0 - self.executor_seconds - waiting

    def waited_seconds(self):
        return self.executor_seconds + (time.monotonic() - self._wait_since if self.waiting else 0.0)

    @contextlib.contextmanager
    def executor_time(self):
        """The clock stops while at least one executor call is outstanding (gathered calls overlap)."""
        if self.waiting == 0:
            self._wait_since = time.monotonic()
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1
            if self.waiting == 0:
                self.executor_seconds += time.monotonic() - self._wait_since

    def occurrence(self, *request):
        """0 for the first time this run makes `request`, 1 for the second, ...: repeated identical
        calls are distinct calls (a loop of three Custom calls asks three times), and a resumed run
        replays each one (the n-th occurrence has the same key every time the run is made)."""
        key = json.dumps(request, sort_keys=True, ensure_ascii=False)
        n = self._seen.get(key, 0)
        self._seen[key] = n + 1
        return n

    def start_call(self, operator):
        if self.max_calls and self.n_calls >= self.max_calls:  # max_calls 0: no cap (the paper has none)
            raise WorkflowError(f"operator call cap reached: {self.max_calls} calls")
        self.n_calls += 1

    async def chat(self, operator, prompt, examples=()):
        """One executor call: the user message `prompt`, after (user, assistant) example turns.
        ExecutorError propagates untouched."""
        o = self.options
        turns = [{"role": role, "content": text} for pair in examples for role, text in zip(("user", "assistant"), pair)]
        messages = turns + [{"role": "user", "content": prompt}]
        sampling = dict(temperature=o.temperature, max_tokens=o.max_tokens, seed=o.seed)
        occurrence = self.occurrence(messages, sampling)  # counted before the await: gather order is fixed
        with self.executor_time():
            result = await asyncio.to_thread(self.client.chat, messages, **sampling, sample=o.sample,
                                             attempt=o.attempt, occurrence=occurrence, stage=o.stage,
                                             tag=o.tag or operator)
        self.tokens += result.prompt_tokens + result.completion_tokens
        self.calls.append({"operator": operator, "prompt": prompt if o.keep_prompts else len(prompt),
                           "reply": result.text if o.keep_prompts else len(result.text),
                           "finish_reason": result.finish_reason})
        return result.text

    def note(self, text):
        self.notes.append(text)

    def tick(self, frame_locals):
        """The guard inserted before each statement of run_workflow: deadline, steps, sizes."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise WorkflowError(f"more than {MAX_STEPS} statements executed")
        if self.own_seconds() > self.timeout:
            raise WorkflowError(f"time limit reached: {self.timeout:g} s of the workflow's own work")
        if sum(_chars(v) for k, v in frame_locals.items() if k != "self") > MAX_CHARS:
            raise WorkflowError(f"run_workflow's variables hold more than {MAX_CHARS} characters")


def _chars(v, depth=0):
    if isinstance(v, str):
        return len(v)
    if isinstance(v, (list, tuple)) and depth < 3:
        return len(v) + sum(_chars(x, depth + 1) for x in v)
    return 1


class _Guard(ast.NodeTransformer):
    """Inserts `_sf_tick(locals())` before every statement of run_workflow (after validation: model
    code may not use names starting with '_', so it cannot touch the guard)."""

    def visit_AsyncFunctionDef(self, node):
        if node.name == "run_workflow":
            node.body = self.guarded(node.body)
        return node

    def guarded(self, stmts):
        out = []
        for s in stmts:
            for name in ("body", "orelse"):
                if isinstance(s, (ast.For, ast.If)) and getattr(s, name):
                    setattr(s, name, self.guarded(getattr(s, name)))
            tick = ast.Expr(ast.Call(ast.Name("_sf_tick", ast.Load()),
                                     [ast.Call(ast.Name("locals", ast.Load()), [], [])], []))
            out += [ast.copy_location(tick, s), s]
        return out


async def run_workflow(code: str, problem, client, set_name: str, *, timeout: float = 120.0,
                       max_calls: int = 20, options: OperatorOptions | None = None) -> WorkflowRun:
    """Validate, then run one workflow on one problem (SCOREFLOW.md §2.1, §4 "Timeouts": the paper
    gives a run 120 s for math/QA, 240 s for code), `timeout` counting the workflow's own work only
    (see _Context). max_calls 0 = no operator-call cap (the paper has none; the statement guard and
    the timeout still bound the run). Never raises for the workflow's faults or the infrastructure's:
    the status says which. The clock stands still while an executor call is outstanding, so only the
    workflow's own work can time it out; an executor call that takes too long ends as the client's
    own timeout, an infra_error (SCOREFLOW.md §10.7).
    Raises executor.BudgetExceeded and executor.EndpointDown: they stop the stage, not the run."""
    t0 = time.monotonic()
    options = options or OperatorOptions()
    ctx = _Context(client, problem, set_name, options, max_calls, timeout)

    def result(answer, status, reason, error=None, raised=False):
        return WorkflowRun(answer, status, reason, ctx.n_calls, time.monotonic() - t0, ctx.calls, ctx.notes, error,
                           raised, round(ctx.waited_seconds(), 3), ctx.tokens)

    try:
        tree, attrs = _check_workflow(code, set_name)
    except WorkflowRejected as e:
        return result("", "workflow_error", f"rejected: {e}")
    tree = ast.fix_missing_locations(_Guard().visit(tree))
    names = {"__builtins__": _builtins(), "__name__": "workflow", "_sf_tick": ctx.tick,
             "asyncio": _GatherOnly()}
    names.update({op: _factory(op) for op in OPERATOR_SETS[set_name]})
    try:
        exec(compile(tree, "<workflow>", "exec"), names)
        workflow = names["Workflow"](ctx, problem)
        answer = await _within_own_time(workflow.run_workflow(), ctx)
    except (executor.BudgetExceeded, executor.EndpointDown):
        raise
    except (executor.ExecutorError, SandboxFailure) as e:
        kind = getattr(e, "kind", "sandbox")
        return result("", "infra_error", f"{type(e).__name__} ({kind}): {e}", e)
    except _OutOfTime:
        return result("", "workflow_error", f"timed out after {timeout:g} s of its own work", raised=True)
    except Exception as e:  # the workflow's own fault: it raised
        return result("", "workflow_error", f"{type(e).__name__}: {e}"[:500], raised=True)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        return result("", "workflow_error", f"run_workflow returned {type(answer).__name__}, expected str")
    if not answer.strip():
        return result("", "workflow_error", "run_workflow returned an empty answer")
    return result(answer, "ok", "")


class _OutOfTime(Exception):
    """The workflow's own time is spent."""


async def _within_own_time(coro, ctx):
    """Await coro while ctx.own_seconds() < ctx.timeout; then cancel it and raise _OutOfTime. The
    clock stands still during executor calls, so the wait is re-armed until the own time is spent
    (polled each second while a call is outstanding)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            left = ctx.timeout - ctx.own_seconds()
            if left <= 0 and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise _OutOfTime()
            done, _ = await asyncio.wait({task}, timeout=max(left, 0.001) if not ctx.waiting else min(max(left, 0.05), 1.0))
            if done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()


def _builtins():
    import builtins
    safe = {name: getattr(builtins, name) for name in SAFE_BUILTINS}
    safe["locals"] = builtins.locals          # used by the inserted guard only (names with '_' aside,
    safe["__build_class__"] = builtins.__build_class__  # model code cannot name these: not whitelisted)
    return safe


class _GatherOnly:
    """The `asyncio` a workflow sees: gather and nothing else."""
    __slots__ = ()

    @staticmethod
    def gather(*aws):
        return asyncio.gather(*aws)


# --- operators (SCOREFLOW.md §3) ----------------------------------------------------------------
# Each operator is bound to the run's context (the generated code's `config`); calling it is one or
# more executor calls. Structured replies come in <field>...</field> tags; a missing field is "".

def _field(text, name):
    m = re.search(rf"<{name}>(.*?)(?:</{name}>|$)", text, re.S | re.I)
    return m.group(1).strip() if m else ""


def _problem_text(problem):
    """What operators see of the problem: its input; code tasks as in §3 ("You have the following task:")."""
    inp = problem.input
    if isinstance(inp, dict):
        return "You have the following task:\n" + str(inp.get("prompt", ""))
    return str(inp)


def _entry_point(problem):
    inp = problem.input if isinstance(problem.input, dict) else {}
    return inp.get("entry_point") or (problem.extra or {}).get("entry_point") or ""


class _Operator:
    name = ""

    def __init__(self, config):
        if not isinstance(config, _Context):
            raise TypeError(f"{type(self).__name__}(config): pass the `config` given to __init__")
        self.ctx = config

    async def __call__(self, *args, **kwargs):
        self.ctx.start_call(self.name)
        return await self.run(*args, **kwargs)


_INFRA = (executor.ExecutorError, SandboxFailure)  # never retried by an operator: the run reports them


class Custom(_Operator):
    """custom(instruction) -> the executor's reply to instruction + problem."""
    name = "Custom"

    async def run(self, instruction: str = ""):
        prompt = f"{instruction}\n\n{_problem_text(self.ctx.problem)}"
        return await self.ctx.chat(self.name, prompt)


class AnswerGenerate(_Operator):
    """answer_generate() -> step-by-step thought, then a short answer (joined)."""
    name = "AnswerGenerate"

    async def run(self):
        prompt = (f"{_problem_text(self.ctx.problem)}\n\n"
                  "Think it through step by step, then give the final answer as briefly as possible.\n"
                  "Reply in this form:\n<thought>your reasoning</thought>\n<answer>the short answer</answer>")
        reply = await self.ctx.chat(self.name, prompt)
        thought, answer = _field(reply, "thought"), _field(reply, "answer")
        if not answer:
            self.ctx.note("AnswerGenerate: no <answer> field; kept the whole reply")
            return reply.strip()
        return f"{thought}\n\nAnswer: {answer}" if thought else answer


class ScEnsemble(_Operator):
    """sc_ensemble(solutions) -> the candidate most consistent with the others, verbatim. A bad
    letter does not fail the run (the official code's accident, SCOREFLOW.md §10.11): we fall back
    to the most frequent candidate (the first on ties) and record a note."""
    name = "ScEnsemble"

    async def run(self, solutions: list | None = None):
        if not isinstance(solutions, (list, tuple)) or not solutions:
            raise WorkflowError("sc_ensemble(solutions=...) needs a non-empty list of solutions")
        solutions = [str(s) for s in solutions][:26]
        letters = [chr(ord("A") + i) for i in range(len(solutions))]
        listing = "\n\n".join(f"{k}:\n{s}" for k, s in zip(letters, solutions))
        prompt = (f"{_problem_text(self.ctx.problem)}\n\nHere are candidate solutions:\n\n{listing}\n\n"
                  "Compare them and find the one whose result agrees with most of the others.\n"
                  "Reply in this form:\n<thought>your comparison</thought>\n"
                  f"<solution_letter>one letter from {letters[0]} to {letters[-1]}</solution_letter>")
        reply = await self.ctx.chat(self.name, prompt)
        letter = _field(reply, "solution_letter").strip().strip(".:()").upper()[:1]
        if letter in letters:
            return solutions[letters.index(letter)]
        counts = {}
        for s in solutions:
            counts[s.strip()] = counts.get(s.strip(), 0) + 1
        best = max(range(len(solutions)), key=lambda i: (counts[solutions[i].strip()], -i))
        self.ctx.note(f"ScEnsemble: bad letter {letter or reply[:40]!r}; fell back to the most frequent "
                      f"candidate {letters[best]}")
        return solutions[best]


class Review(_Operator):
    """review(pre_solution) -> the solution unchanged if judged right, else a corrected one."""
    name = "Review"

    async def run(self, pre_solution: str = ""):
        prompt = (f"{_problem_text(self.ctx.problem)}\n\nProposed solution:\n{pre_solution}\n\n"
                  "Check it carefully: the logic, every calculation, whether the question was read correctly, "
                  "and whether any detail is missing.\nReply in this form:\n<review>what you checked and "
                  "found</review>\n<verdict>correct or wrong</verdict>\n"
                  "<solution>if wrong, the complete corrected solution</solution>")
        reply = await self.ctx.chat(self.name, prompt)
        verdict, revised = _field(reply, "verdict").lower(), _field(reply, "solution")
        if "wrong" in verdict and revised:
            return revised
        if not verdict:
            self.ctx.note("Review: no <verdict> field; kept the solution")
        return str(pre_solution)


# Programmer's worked examples, as earlier chat turns (OperatorOptions.programmer_examples). The
# format is the lesson: a no-argument solve() with the problem's numbers written in. Measured with
# the embedded SmolLM2-135M-Instruct as executor on 36 basic problems of the embedded set (greedy,
# analysis "Compute the answer."): 11/36 with no example turn, 34/36 with these two.
PROGRAMMER_EXAMPLES = (
    ("What is $96 \\div 8$?", "Divide.", "```python\ndef solve():\n    return 96 // 8\n```"),
    ("How many positive divisors does 12 have?", "None",
     "```python\ndef solve():\n    return sum(1 for d in range(1, 13) if 12 % d == 0)\n```"),
)


def programmer_prompt(problem_text, analysis, code="", error=""):
    return (f"{problem_text}\n\nAnalysis so far:\n{analysis}\n\n"
            + (f"Your previous code failed:\n```python\n{code}\n```\nError:\n{error}\n\n" if error else "")
            + "Write a short Python program that computes the final answer: a function solve() taking "
              "no arguments and returning it, or code that prints it. Use only the standard library. "
              "Reply with one ```python code block.")


class Programmer(_Operator):
    """programmer(analysis) -> code and its output, run in the sandbox, errors fed back. The model may
    write a solve() returning the answer or a program printing it (small executors rarely follow the
    solve() contract); see runnable_program."""
    name = "Programmer"

    async def __call__(self, *args, **kwargs):
        """The whole call gets options.programmer_call_attempts attempts, programmer_call_delay s
        apart, when it raises by its own fault (SCOREFLOW.md §3: 3 attempts, 2 s apart); it counts
        as one operator call. A retry's requests repeat earlier ones, so they are new occurrences:
        asked anew, and replayed exactly on resume."""
        self.ctx.start_call(self.name)
        o = self.ctx.options
        for attempt in range(max(1, o.programmer_call_attempts)):
            try:
                return await self.run(*args, **kwargs)
            except (*_INFRA, WorkflowError, asyncio.CancelledError):
                raise
            except Exception as e:
                if attempt + 1 >= max(1, o.programmer_call_attempts):
                    raise
                self.ctx.note(f"Programmer: call attempt {attempt + 1} raised {type(e).__name__}: {str(e)[:120]}")
                await asyncio.sleep(o.programmer_call_delay)

    async def run(self, analysis: str = "None"):
        o, error, code, output = self.ctx.options, "", "", ""
        examples = [(programmer_prompt(q, a), reply) for q, a, reply in PROGRAMMER_EXAMPLES[:o.programmer_examples]]
        for attempt in range(o.programmer_attempts):
            prompt = programmer_prompt(_problem_text(self.ctx.problem), analysis, code, error)
            reply = await self.ctx.chat(self.name, prompt, examples)
            code = runnable_program(reply)
            run = await asyncio.to_thread(executor.run_python, code, timeout=o.program_timeout)
            if run.status == "internal":
                raise SandboxFailure(run.reason)
            if run.status == "ok" and run.stdout.strip():
                output = run.stdout.strip()[:2000]
                break
            error = (run.stderr.strip()[-1000:] or run.reason or "the program printed nothing")
            self.ctx.note(f"Programmer: attempt {attempt + 1} {run.status}: {error[:120]}")
        else:
            output = f"(no successful run; last error: {error[-300:]})"
        return f"```python\n{code}\n```\nOutput: {output}"


def runnable_program(reply: str) -> str:
    """The program Programmer runs from a reply: with a solve() that needs no arguments, the
    sanitized solve() and `print(solve())`; otherwise the reply's code block as a whole program
    (its longest parsing prefix), plus a print of the last argument-free function it defines and
    never calls at top level (small models often define main() and stop)."""
    code = sanitize_code(reply, "solve")
    try:
        fns = {n.name: n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)}
    except SyntaxError:
        fns = {}
    solve = fns.get("solve")
    if solve is not None and not (solve.args.args or solve.args.posonlyargs or solve.args.kwonlyargs):
        return code + "\n\nprint(solve())\n"
    blocks = re.findall(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|$)", reply, re.S)
    lines = (max(blocks, key=len) if blocks else reply).splitlines()
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        program = "\n".join(lines[:end])
        called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        free = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.args.args
                and not n.args.posonlyargs and not n.args.kwonlyargs and n.name not in called]
        return program + (f"\n\nprint({free[-1]}())\n" if free else "")
    return code


class CustomCodeGenerate(_Operator):
    """code_generate(instruction) -> sanitized code for the task's entry point."""
    name = "CustomCodeGenerate"

    async def run(self, instruction: str = ""):
        ep = _entry_point(self.ctx.problem)
        prompt = (f"{instruction}\n\n{_problem_text(self.ctx.problem)}\n\n"
                  f"Write the complete function `{ep}` in Python, with any imports it needs. Think about edge "
                  "cases (empty inputs, zero, negative numbers, duplicates). Reply with one ```python code block.")
        reply = await self.ctx.chat(self.name, prompt)
        return sanitize_code(reply, ep)


class Test(_Operator):
    """test(solution) -> the solution if it passes the task's PUBLIC tests (problem.extra
    ["public_tests"], asserts on `candidate`), else a repaired one: up to options.test_rounds
    rounds of reflection + fix, then a fresh code_generate if it still fails. Hidden tests are
    never read here."""
    name = "Test"

    async def run(self, solution: str = ""):
        ep = _entry_point(self.ctx.problem)
        tests = [t for t in (self.ctx.problem.extra or {}).get("public_tests", []) if str(t).strip()]
        code = sanitize_code(str(solution), ep)
        if not tests:
            self.ctx.note("Test: the task has no public tests; solution returned as is")
            return code
        for round_ in range(self.ctx.options.test_rounds + 1):
            failure = await self.failure(code, ep, tests)
            if failure is None:
                return code
            if round_ == self.ctx.options.test_rounds:
                break
            prompt = (f"{_problem_text(self.ctx.problem)}\n\nThis solution fails a test:\n```python\n{code}\n```\n"
                      f"Failure:\n{failure}\n\nExplain the mistake briefly in <reflection>...</reflection>, then "
                      f"give the complete fixed function `{ep}` in one ```python code block.")
            code = sanitize_code(await self.ctx.chat(self.name, prompt), ep)
        self.ctx.note(f"Test: still failing after {self.ctx.options.test_rounds} repairs; wrote a fresh solution")
        fresh = CustomCodeGenerate(self.ctx)
        return await fresh.run("Write a correct solution from scratch.")

    async def failure(self, code, ep, tests):
        """None if every public assert passes, else the first failure's description."""
        done = "all-public-tests-ran-" + secrets.token_hex(8)  # an early exit(0) cannot fake a pass
        checks = "".join(
            f"try:\n{textwrap.indent(t.strip(), '    ')}\nexcept Exception as e:\n"
            f"    print('FAILED: ' + {t.strip()!r} + ' -> ' + type(e).__name__ + ': ' + str(e)[:200])\n"
            f"    raise SystemExit(1)\n" for t in tests)
        program = f"{code}\n\ncandidate = {ep}\n{checks}print({done!r})\n"
        run = await asyncio.to_thread(executor.run_python, program, timeout=self.ctx.options.program_timeout)
        if run.status == "internal":
            raise SandboxFailure(run.reason)
        if run.status == "ok" and done in run.stdout:
            return None
        failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED: ")]
        return failed[0][8:] if failed else f"{run.status}: {(run.stderr.strip()[-600:] or run.reason)}"


def _factory(op):
    return {"Custom": Custom, "AnswerGenerate": AnswerGenerate, "Programmer": Programmer,
            "ScEnsemble": ScEnsemble, "Review": Review, "CustomCodeGenerate": CustomCodeGenerate,
            "Test": Test}[op]


# --- code sanitizing (SCOREFLOW.md §3: "the longest valid span, plus the imports and definitions
# reachable from the entry point") ---------------------------------------------------------------

def sanitize_code(text: str, entry_point: str | None = None) -> str:
    """Code from a model reply: the ``` block defining entry_point (else the longest block, else the
    text), cut to its longest prefix that parses; then only imports and the top-level definitions
    the entry point reaches (all definitions when there is no entry point or it is missing)."""
    blocks = re.findall(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|$)", text, re.S)
    if entry_point:
        defining = [b for b in blocks if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)]
        blocks = defining or blocks
    code = max(blocks, key=len) if blocks else text
    lines = code.splitlines()
    tree = None
    for end in range(len(lines), 0, -1):  # the longest prefix that parses
        try:
            tree = ast.parse("\n".join(lines[:end]))
            code = "\n".join(lines[:end])
            break
        except SyntaxError:
            continue
    if tree is None:
        return code.strip()
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    assigned = {t.id: n for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if not entry_point or entry_point not in defs:
        keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef,
                                                       ast.AsyncFunctionDef, ast.ClassDef, ast.Assign))]
    else:
        reach, todo = set(), [entry_point]
        while todo:
            name = todo.pop()
            if name in reach:
                continue
            reach.add(name)
            node = defs.get(name) or assigned.get(name)
            if node is not None:
                todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
        keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                or (getattr(n, "name", None) in reach)
                or (isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id in reach for t in n.targets))]
    source = code.splitlines()
    return "\n\n".join("\n".join(source[_first_line(n) - 1:n.end_lineno]) for n in keep).strip()


def _first_line(node):
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


# --- the runnable check (SCOREFLOW.md §2.3) ------------------------------------------------------

class _Toy:
    def __init__(self, input, extra=None):
        self.input, self.extra, self.gold, self.id = input, extra or {}, "", "toy"


TOY_PROBLEMS = {  # §2.3 step 5: a tiny problem per set; the output is not checked
    "math": _Toy("A is 1 and B is 2. What is A + B?"),
    "qa": _Toy("Question: How many legs do two cats have in total?"),
    "code": _Toy({"task_id": "toy/add", "entry_point": "add_two",
                  "prompt": 'def add_two(a, b):\n    """Return the sum of a and b.\n'
                            '    >>> add_two(2, 3)\n    5\n    """\n'},
                 {"entry_point": "add_two", "public_tests": ["assert candidate(2, 3) == 5"]}),
}


def forbidden_usage(code: str) -> str:
    """§2.3 step 4 by meaning, not by substring (SCOREFLOW.md §10.11: `int(` also matched `print(`):
    a call to int(...) or a .split(' ') call. "" if neither occurs."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"syntax error: {e.msg}"
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "int":
            return f"line {n.lineno}: int(...) is not allowed (model outputs rarely parse as integers)"
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "split"
                and len(n.args) == 1 and isinstance(n.args[0], ast.Constant) and n.args[0].value == " "):
            return f"line {n.lineno}: .split(' ') is not allowed"
    return ""


def straight_line(code: str, set_name: str, max_calls: int = 20) -> bool:
    """True when a whitelisted workflow provably cannot raise by its own fault, so §2.3's trial run
    could only fail through the infrastructure or the executor's text: run_workflow is a sequence
    of `name = await self.op(...)` with each operator's own parameter names, every argument a string
    literal or a name bound above (a non-empty list of such for sc_ensemble, whose one parameter
    needs a list), at most max_calls calls, then `return name` of a bound name or `return await
    self.op(...)` of such a call. Every operator returns a str, so each name holds one. Anything else (loops, branches, expressions) gets the
    trial run."""
    try:
        tree, attrs = _check_workflow(code, set_name)
    except WorkflowRejected:
        return False
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    run = next(n for n in cls.body if isinstance(n, ast.AsyncFunctionDef))
    body = [n for n in run.body if not _is_docstring(n)]
    bound = set()

    def text(a):
        return (isinstance(a, ast.Constant) and isinstance(a.value, str)) or (isinstance(a, ast.Name) and a.id in bound)

    def operator_call(c):  # self.op(...) with the operator's own parameters, each given text
        if not (_is_self_attr(c.func) and c.func.attr in attrs):
            return False
        params = list(inspect.signature(_factory(attrs[c.func.attr]).run).parameters)[1:]  # without self
        if len(c.args) + len(c.keywords) > len(params) or any(k.arg not in params for k in c.keywords):
            return False
        given = dict(zip(params, c.args)) | {k.arg: k.value for k in c.keywords}
        if len(given) != len(c.args) + len(c.keywords):
            return False  # a parameter given twice
        for name, a in given.items():
            if name == "solutions":
                if not (isinstance(a, ast.List) and a.elts and all(map(text, a.elts))):
                    return False
            elif not text(a):
                return False
        return attrs[c.func.attr] != "ScEnsemble" or "solutions" in given

    def awaited_call(e):
        return isinstance(e, ast.Await) and isinstance(e.value, ast.Call) and operator_call(e.value)

    for stmt in body[:-1]:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and awaited_call(stmt.value)):
            return False
        bound.add(stmt.targets[0].id)
    last = body[-1] if body else None
    if not isinstance(last, ast.Return) or last.value is None:
        return False
    cap = max_calls or len(body)  # max_calls 0: no cap
    if awaited_call(last.value):  # `return await self.op(...)`: one more call
        return len(body) <= cap
    return len(body) - 1 <= cap and isinstance(last.value, ast.Name) and last.value.id in bound


async def runnable_check(code: str, set_name: str, client, *, threshold: float | None = -1.0,
                         timeout: float | None = None, options: OperatorOptions | None = None,
                         max_calls: int = 20, trial: bool = True) -> tuple[bool, str]:
    """§2.3 steps 2-5 on an extracted graph: the whitelist, not a near copy of the template
    (ratio must be below threshold; -1 = the set's default from SET_THRESHOLDS, None = off),
    no forbidden usage, and (if trial) one trial run on the set's toy problem that must not fail
    within timeout (default 60 s math/QA, 120 s code). An infra_error in the trial is reported as
    such in the reason ("infra: ..."): the caller should retry rather than regenerate."""
    ok, reason = validate_workflow(code, set_name)
    if not ok:
        return False, f"rejected: {reason}"
    threshold = SET_THRESHOLDS[set_name] if threshold == -1.0 else threshold
    if threshold is not None:
        ratio = template_similarity(code, set_name)
        if ratio >= threshold:
            return False, f"too close to the template (similarity {ratio:.2f} >= {threshold})"
    bad = forbidden_usage(code)
    if bad:
        return False, f"forbidden: {bad}"
    if not trial:
        return True, ""
    run = await run_workflow(code, TOY_PROBLEMS[set_name], client, set_name,
                             timeout=timeout or TRIAL_TIMEOUTS[set_name], max_calls=max_calls, options=options)
    if run.status == "infra_error":
        return False, f"infra: {run.reason}"
    if run.status != "ok":
        return False, f"trial run failed: {run.reason}"
    return True, ""


# --- the answer extractor (SCOREFLOW.md §3 "Not offered: Extractor") -----------------------------

async def extract_answer(output: str, problem, client, set_name: str, *,
                         options: OperatorOptions | None = None) -> str:
    """One executor call after a math or QA workflow (training and test): keeps only the final
    answer (\\boxed{x} for math, a short phrase for QA). Code outputs are returned unchanged."""
    if set_name == "code":
        return output
    o = options or OperatorOptions(stage="extract")
    form = ("the final answer only, written as \\boxed{answer}" if set_name == "math"
            else "the final answer only, as a short phrase or number")
    prompt = (f"Question:\n{_problem_text(problem)}\n\nA solution:\n{output}\n\n"
              f"Give {form}. Reply in this form: <answer>...</answer>")
    result = await asyncio.to_thread(client.chat, [{"role": "user", "content": prompt}],
                                     temperature=o.temperature, max_tokens=min(o.max_tokens, 256), seed=o.seed,
                                     sample=o.sample, attempt=o.attempt, stage=o.stage, tag="extract")
    answer = _field(result.text, "answer") or result.text.strip()
    if set_name == "math" and "\\boxed" not in answer and answer:
        answer = f"\\boxed{{{answer}}}"
    return answer


# --- the test-time judge (SCOREFLOW.md §4 "At test time", §3 "Not offered: Judge") ----------------

JUDGED = ("math", "drop", "hotpotqa")  # the benchmarks the official code judges at test time
HOTPOTQA_RATIO = 10.0  # §4: 0 without judging when len(out)/len(gold) >= 10 or <= 1/10


def judge_prompt(problem, answer: str, bench_name: str) -> str:
    """What the judge sees (§4 "At test time"): the question, the extracted gold and the answer;
    DROP adds the passage and its golds joined with "or", HotpotQA the context. The gold is shown
    to the judge only: the judge is a scorer, never an operator of the workflow."""
    gold = problem.gold
    extra = problem.extra or {}
    if bench_name == "drop":
        gold = " or ".join(g.strip() for g in gold.split("|") if g.strip())
        head = f"Passage:\n{extra.get('passage', '')}\n\n"
    elif bench_name == "hotpotqa":
        head = f"Context:\n{extra.get('context', '')}\n\n"
    else:
        head = ""
    return (f"{head}Question:\n{problem.question}\n\nCorrect answer:\n{gold}\n\nAnswer to grade:\n{answer}\n\n"
            "Is the answer to grade correct, that is, equivalent to the correct answer? "
            "Reply with 1 if it is and 0 if it is not: one digit, nothing else.")


def judge_verdict(reply: str) -> float:
    """1.0 for a reply "1", 0.0 for "0" and for anything else (§3: anything else counts as 0)."""
    return 1.0 if reply.strip().rstrip(".") == "1" else 0.0


async def judge(problem, answer: str, client, bench_name: str, *,
                options: OperatorOptions | None = None) -> float:
    """One executor call that scores a test answer 0 or 1 (MATH, DROP, HotpotQA; `--judge llm`).
    HotpotQA's length rule comes first: an answer 10x longer or shorter than the gold scores 0
    without a call (§4)."""
    if bench_name not in JUDGED:
        raise ValueError(f"judge: bench {bench_name!r} is scored by its rule; the judge covers {JUDGED}")
    if bench_name == "hotpotqa":
        ratio = len(answer) / max(len(problem.gold), 1)
        if ratio >= HOTPOTQA_RATIO or ratio <= 1 / HOTPOTQA_RATIO:
            return 0.0
    o = options or OperatorOptions(stage="judge")
    result = await asyncio.to_thread(client.chat, [{"role": "user", "content": judge_prompt(problem, answer,
                                                                                            bench_name)}],
                                     temperature=0.0, max_tokens=min(o.max_tokens, 8), seed=o.seed,
                                     sample=o.sample, stage="judge", tag="judge")
    return judge_verdict(result.text)

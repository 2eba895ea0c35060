"""operators.py: the operator library, workflow extraction, validation and safe execution.

SCOREFLOW.md §3 (operators, per-benchmark sets, extractor), §2.1 (the Workflow class contract),
§2.3 (the runnable check), §4 "At test time" (the judge). A workflow is Python written by the
generator model; operators run Python written by the executor model. Neither runs unchecked: a
workflow passes an AST whitelist, then runs in this process under a wall-clock limit, an
operator-call cap and a statement/size guard inserted into its code; model-written programs
(Programmer, Test) run in executor.run_python's OS sandbox. Not covered: the size guard reads the
locals between statements, so one statement can build far more than MAX_CHARS in this process
(`[s + s for c in s]`, list.extend chained with `or`, a long separator's str.join).

`problem` is any object with `.input` (text, or for code a dict with "prompt" and "entry_point")
and `.extra`. Operators see problem.input and the public extras (entry_point, public_tests), never
gold or a "hidden_*" extra (bench/__init__.py's rule). Executor calls are `client.chat`
(executor.ChatClient) in a thread. No operator catches an ExecutorError: run_workflow reports it as
"infra_error" (SCOREFLOW.md §10.7: no evidence about the workflow), and lets BudgetExceeded and
EndpointDown through: the stage in flight records nothing and the run stops resumably.
Non-goals: the generator prompt (scoreflow.py builds it from TEMPLATES, class_header and
operator_menu) and running workflows that use Python beyond the whitelist.
"""
from __future__ import annotations

import ast
import asyncio
import builtins
import contextlib
import difflib
import inspect
import json
import re
import secrets
import textwrap
import time
import types
from dataclasses import dataclass

import executor

# --- operator sets, templates, menu (SCOREFLOW.md §3, §2.2) -------------------------------------

OPERATOR_SETS = {  # SCOREFLOW.md §3 "operators offered"; there is no separate Revise or Format
    "math": ("Custom", "Programmer", "ScEnsemble", "Review"),
    "qa": ("Custom", "AnswerGenerate", "ScEnsemble", "Review"),
    "code": ("CustomCodeGenerate", "ScEnsemble", "Test"),
}
_MENU = {  # purpose, exact signature, one-line example (§2.2 item 3)
    "Custom": ("Sends your instruction together with the problem to the executor model and returns "
               "its reply.", "custom(instruction: str) -> str", 'steps = await self.custom('
               'instruction="Break the problem into small steps and solve each one.")'),
    "AnswerGenerate": ("Asks the executor model to think step by step about the question and give "
                       "a short final answer; returns the reasoning followed by the answer.",
                       "answer_generate() -> str", "answer = await self.answer_generate()"),
    "Programmer": ("Has the executor model write a Python function solve() for the problem (using "
                   "your analysis), runs it in a sandbox, fixes errors up to 3 times, and returns "
                   "the code and its output.", "programmer(analysis: str = 'None') -> str",
                   "result = await self.programmer(analysis=steps)"),
    "ScEnsemble": ("Shows several candidate solutions to the executor model and returns the one "
                   "most consistent with the others, unchanged.", "sc_ensemble(solutions: "
                   "list[str]) -> str", "best = await self.sc_ensemble(solutions=[first, second, "
                   "third])"),
    "Review": ("Checks a solution for wrong logic, arithmetic slips, misread questions and missing "
               "details; returns it unchanged if it is right, otherwise a corrected solution.",
               "review(pre_solution: str) -> str",
               "checked = await self.review(pre_solution=best)"),
    "CustomCodeGenerate": ("Sends your instruction with the coding task and its function name to "
                           "the executor model and returns the Python code it writes.",
                           "code_generate(instruction: str) -> str", 'code = await self.code_'
                           'generate(instruction="Write a simple, correct solution.")'),
    "Test": ("Runs a code solution against the task's example tests in a sandbox; if it fails, "
             "asks for a fix (several rounds) and returns the best code.",
             "test(solution: str) -> str", "final = await self.test(solution=code)"),
}
ATTRIBUTE = {op: call.split("(")[0] for op, (_, call, _) in _MENU.items()}  # self.<attribute>

# §2.3 step 3: a workflow whose run_workflow body is this similar to the template's is a copy. Keys
# are benchmark names (the math set serves MATH and GSM8K with different thresholds); None = off.
SIMILARITY_THRESHOLDS = {"math": 0.75, "mathgen": 0.75, "gsm8k": 0.80, "drop": 0.75,
                         "hotpotqa": 0.75, "humaneval": None, "mbpp": None}
SET_THRESHOLDS = {"math": 0.75, "qa": 0.75, "code": None}  # when only the operator set is known
TRIAL_TIMEOUTS = {"math": 60.0, "qa": 60.0, "code": 120.0}  # §2.3 step 5, seconds


def _operator_names(set_name):
    if set_name not in OPERATOR_SETS:
        raise ValueError(f"operator set {set_name!r}: expected one of {', '.join(OPERATOR_SETS)}")
    return OPERATOR_SETS[set_name]


def class_header(set_name: str) -> str:
    """The part of every workflow the harness writes (SCOREFLOW.md §2.1): the class line and an
    __init__ that creates each operator of the set."""
    return "class Workflow:\n    def __init__(self, config, problem):\n" + "".join(
        f"        self.{ATTRIBUTE[op]} = {op}(config)\n" for op in _operator_names(set_name))


# The paper's templates (§2.2 item 2): every operator of the set is created, one call is made.
TEMPLATES = {name: f"{class_header(name)}\n    async def run_workflow(self):\n        {call}\n"
                   f"        return {call.split()[0]}\n" for name, call in {
    "math": 'solution = await self.custom(instruction="Solve the problem step by step. Put the '
            'final answer in \\\\boxed{}.")',
    "qa": "answer = await self.answer_generate()",
    "code": 'solution = await self.code_generate(instruction="Write a correct Python function for '
            'the task, thinking about edge cases.")'}.items()}


def operator_menu(set_name: str) -> str:
    """The operator menu the generator prompt shows for one set (§2.2 item 3)."""
    return "\n".join(f"- {op}: {_MENU[op][0]}\n  Create: self.{ATTRIBUTE[op]} = {op}(config)\n"
                     f"  Call: await self.{_MENU[op][1]}\n  Example: {_MENU[op][2]}"
                     for op in _operator_names(set_name))


# --- code in model text: <graph>, code blocks, sanitizing, similarity (§2.3 steps 1-3, §3) ------

_GRAPH = re.compile(r"<graph>(.*?)</graph>", re.S)
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:\n?```|$)", re.S)  # the close may be cut off


def extract_graph(text: str) -> str | None:
    """The program between <graph> and </graph>; sampling stops at </graph> and drops it, so it is
    appended first (§2.3 step 1). A ``` fence around it is removed. None when there is no tag."""
    m = _GRAPH.search(text + "</graph>")
    if m is None:
        return None
    code = m.group(1).strip("\n")
    return code_block(code) if code.lstrip().startswith("```") else code


def code_block(text: str, defines: str = "") -> str:
    """The code of a model reply: its longest ``` block, among those that define the function
    `defines` when any do; the text itself when it has no block."""
    blocks = _FENCE.findall(text)
    if defines:
        blocks = [b for b in blocks if re.search(rf"def\s+{re.escape(defines)}\s*\(", b)] or blocks
    return max(blocks, key=len) if blocks else text


def parsing_prefix(code: str) -> tuple[str, ast.Module | None]:
    """The longest prefix of whole lines that parses, with its tree (§3 "the longest valid span":
    a reply cut off by max_tokens keeps its complete definitions); (code, None) if none parses."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        with contextlib.suppress(SyntaxError):
            return "\n".join(lines[:end]), ast.parse("\n".join(lines[:end]))
    return code, None


def sanitize_code(text: str, entry_point: str) -> str:
    """Code from a model reply (SCOREFLOW.md §3: "the longest valid span, plus the imports and
    definitions reachable from the entry point"): code_block's block cut to its parsing_prefix;
    then only imports and the top-level definitions the entry point reaches (all definitions when
    the entry point is "" or not defined)."""
    code, tree = parsing_prefix(code_block(text, entry_point))
    if tree is None:
        return code.strip()
    definition = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    defs = {n.name: n for n in tree.body if isinstance(n, definition)}
    assigned = {t.id: n for n in tree.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    reach, todo = set(), [entry_point] if entry_point in defs else []
    while todo:  # the names the entry point reaches, through definitions and assignments
        name = todo.pop()
        node = defs.get(name) or assigned.get(name)
        if name not in reach and node is not None:
            todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
        reach.add(name)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or (isinstance(n, (ast.Assign, *definition)) and not reach)  # no entry point: all
            or getattr(n, "name", None) in reach or (isinstance(n, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in reach for t in n.targets))]
    lines = code.splitlines()
    return "\n\n".join("\n".join(lines[min([n.lineno] + [d.lineno for d in getattr(
        n, "decorator_list", [])]) - 1:n.end_lineno]) for n in keep).strip()


def runnable_program(reply: str) -> str:
    """The program Programmer runs from a reply: with a solve() that needs no arguments, the
    sanitized solve() and `print(solve())`; otherwise the reply's code block as a whole program
    (its longest parsing prefix), plus a print of the last argument-free function it defines and
    never calls (small models often define main() and stop)."""
    def free(fn):  # a function that takes no arguments
        return isinstance(fn, ast.FunctionDef) and not (
            fn.args.args or fn.args.posonlyargs or fn.args.kwonlyargs)
    code = sanitize_code(reply, "solve")
    with contextlib.suppress(SyntaxError):
        tree = ast.parse(code)
        solves = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "solve"]
        if solves and free(solves[-1]):
            return code + "\n\nprint(solve())\n"
    program, tree = parsing_prefix(code_block(reply))
    if tree is None:
        return code
    called = {n.func.id for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    uncalled = [n.name for n in tree.body if free(n) and n.name not in called]
    return program + (f"\n\nprint({uncalled[-1]}())\n" if uncalled else "")


def template_similarity(code: str, set_name: str) -> float:
    """difflib.SequenceMatcher ratio between run_workflow's stripped body and the template's
    (§2.3 step 3); 0.0 when the code has no run_workflow. The body is found by the syntax tree,
    not by the official cut at the first 'return' substring, which a docstring's "returns" ends
    early (SCOREFLOW.md §10.11)."""
    def body(code):
        with contextlib.suppress(SyntaxError):
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.AsyncFunctionDef) and node.name == "run_workflow":
                    lines = code.splitlines()[node.body[0].lineno - 1:node.end_lineno]
                    return "\n".join(lines).strip()
    mine, template = body(code), body(TEMPLATES[set_name])
    return 0.0 if mine is None else difflib.SequenceMatcher(None, mine, template).ratio()


# --- the AST whitelist (§2.3 step 2) ------------------------------------------------------------
# A workflow is one class Workflow: __init__(self, config, problem) only binds operators
# (self.name = Op(config)) or self.problem; `async def run_workflow(self)` holds only the node
# types of the table _ALLOWED, each passing the table's test, under the few structural rules of
# _check_run (local names not starting with "_"; calls of operators, awaited, of safe builtins and
# of str/list methods only; bounded loops). So no imports, attributes, while, try, with, lambda,
# def, class, global, del or raise. An inserted guard bounds steps, sizes and time at run time.

SAFE_BUILTINS = ("len", "range", "enumerate", "zip", "min", "max", "sorted", "reversed", "str",
                 "int", "float", "bool", "list", "abs", "round", "sum", "any", "all")
STR_METHODS = ("strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "join", "lower",
               "upper", "title", "capitalize", "startswith", "endswith", "find", "rfind", "count",
               "isdigit", "isalpha", "isnumeric", "isspace")  # no replace/center/format: output
LIST_METHODS = ("append", "extend", "insert", "pop", "index", "reverse", "sort", "copy")  # can grow
MAX_RANGE = 10          # range() bounds in loops and comprehensions are int literals up to this
MAX_LOOP_DEPTH = 2      # nested for loops
MAX_STEPS = 2000        # statements a run may execute (inserted guard)
MAX_CHARS = 1_000_000   # characters held in run_workflow's locals at any statement (inserted guard)
MAX_CODE_CHARS = 20_000  # the workflow's source

_ALLOWED = {  # the node types run_workflow may hold -> (test, why it fails) or None: no test
    **dict.fromkeys((ast.Assign, ast.If, ast.For, ast.Return, ast.Pass, ast.Break, ast.Continue,
                     ast.Name, ast.Await, ast.Call, ast.List, ast.Tuple, ast.BinOp, ast.UnaryOp,
                     ast.BoolOp, ast.Compare, ast.IfExp, ast.Subscript, ast.Slice, ast.JoinedStr,
                     ast.ListComp, ast.Starred, ast.Load, ast.Store, ast.Add, ast.Sub, ast.UAdd,
                     ast.USub, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE,
                     ast.Gt, ast.GtE, ast.Is, ast.IsNot, ast.In, ast.NotIn)),  # no *, **, /, %
    ast.Constant: (lambda n: not isinstance(n.value, (bytes, complex)) and n.value is not ...,
                   "{n.value.__class__.__name__} literals are not allowed"),
    ast.FormattedValue: (lambda n: n.format_spec is None,  # f"{x:>999999999}" is 1 GB
                         "format specs in f-strings are not allowed"),
    ast.Expr: (lambda n: isinstance(n.value, (ast.Await, ast.Call)) or _is_docstring(n),
               "a bare expression does nothing here"),
    ast.AugAssign: (lambda n: isinstance(n.target, ast.Name)
                    and isinstance(n.op, (ast.Add, ast.Sub)),
                    "only `name += value` and `name -= value` are allowed"),
}
_REFUSED = {  # reasons clearer than "<Node> statements/expressions are not allowed"
    ast.While: f"while loops are not allowed (unbounded): use `for i in range(n <= {MAX_RANGE})`",
    ast.Import: "imports are not allowed", ast.ImportFrom: "imports are not allowed",
    ast.AnnAssign: "annotations are not allowed", ast.AsyncFor: "async for is not allowed",
    ast.Attribute: "attribute access .{n.attr}: only operators and str/list methods may be called",
}


class WorkflowError(RuntimeError):
    """The workflow's own fault: rejected by the whitelist, or stopped by a cap or the guard."""


class SandboxFailure(RuntimeError):
    """run_python reported "internal": the sandbox failed, not the code (infrastructure)."""


def validate_workflow(code: str, set_name: str) -> tuple[bool, str]:
    """(True, "") if `code` passes the whitelist for `set_name`, else (False, reason)."""
    try:
        _check_workflow(code, set_name)
        return True, ""
    except WorkflowError as e:
        return False, str(e)


def _need(ok, why, node=None):
    """Unless ok, raise WorkflowError(why) with node's line. `why` is built before the test, so it
    may use only what the node has either way."""
    if not ok:
        raise WorkflowError(f"line {node.lineno}: {why}" if node else why)


def _check_workflow(code, set_name):
    """The whitelist; raises WorkflowError naming the line and what is wrong. Returns the tree,
    run_workflow's node and the operators __init__ creates ({attribute: operator name})."""
    ops = _operator_names(set_name)
    _need(isinstance(code, str) and code.strip(), "empty workflow")
    _need(len(code) <= MAX_CODE_CHARS,
          f"the workflow has {len(code)} characters, more than {MAX_CODE_CHARS}")
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise WorkflowError(f"syntax error at line {e.lineno}: {e.msg}") from None
    body = _statements(tree)
    _need(len(body) == 1 and isinstance(body[0], ast.ClassDef) and body[0].name == "Workflow",
          "the program must be exactly one `class Workflow:` (no imports or other code)")
    cls, methods, attrs = body[0], {}, {}
    _need(not (cls.bases or cls.keywords or cls.decorator_list),
          "class Workflow takes no bases or decorators", cls)
    for fn in _statements(cls):
        _need(isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              and fn.name in ("__init__", "run_workflow"),
              "class Workflow may hold only __init__ and run_workflow", fn)
        _need(fn.name not in methods, f"{fn.name} defined twice", fn)
        _need(not (fn.decorator_list or fn.returns),
              f"{fn.name} takes no decorators or annotations", fn)
        methods[fn.name] = fn
    init, run = methods.get("__init__"), methods.get("run_workflow")
    _need(isinstance(init, ast.FunctionDef) and _arg_names(init) == ["self", "config", "problem"],
          "Workflow needs `def __init__(self, config, problem):`")
    _need(isinstance(run, ast.AsyncFunctionDef) and _arg_names(run) == ["self"],
          "Workflow needs `async def run_workflow(self):`")
    for stmt in _statements(init):
        _need(isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and _attr_of(stmt.targets[0], "self"),
              "__init__ may only bind operators: self.name = Operator(config)", stmt)
        name, value = stmt.targets[0].attr, stmt.value
        if name == "problem" and isinstance(value, ast.Name) and value.id == "problem":
            continue
        _need(isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
              and not value.keywords and len(value.args) == 1
              and getattr(value.args[0], "id", None) == "config",
              f"expected self.{name} = Operator(config)", stmt)
        _need(value.func.id in ops, f"{value.func.id} is not an operator of the {set_name} set "
                                    f"(offered: {', '.join(ops)})", stmt)
        _need(not name.startswith("_") and name != "problem",
              f"bad operator attribute name {name!r}", stmt)
        attrs[name] = value.func.id
    _need(attrs, "__init__ creates no operators")
    _check_run(attrs, run)
    return tree, run, attrs


def _statements(node):  # node.body without docstrings
    return [s for s in node.body if not _is_docstring(s)]


def _is_docstring(node):
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def _arg_names(fn):  # the plain parameters' names; None when there are others (*a, defaults, ...)
    a = fn.args
    return (None if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.posonlyargs
            else [x.arg for x in a.args])


def _attr_of(node, name):  # node is `name.attribute`
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == name)


def _check_run(attrs, fn):
    """run_workflow, top-down: each node's type is in _ALLOWED and passes its test, then the
    structural rules below apply. `loops` counts the enclosing for loops; `awaited` marks a node
    whose value is awaited (the await's call, asyncio.gather's arguments, and through
    *[... for ...] the comprehension's element): the only places an operator call may stand."""
    local = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for name in sorted(local):  # ("_x", self and asyncio fail below as names)
        _need(name not in SAFE_BUILTINS, f"run_workflow: cannot assign to {name!r}")
    _need(_statements(fn), "run_workflow is empty", fn)

    def need(ok, node, why):  # operator and context nodes have no line: run_workflow's then
        _need(ok, why, node if hasattr(node, "lineno") else fn)

    def builtin_call(node, *names):  # name(...) without keywords, for one of `names`
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in names and not node.keywords)

    def small_int(node):  # an int literal from -MAX_RANGE to MAX_RANGE: range() over it is bounded
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            node = node.operand
        return (isinstance(node, ast.Constant) and type(node.value) is int
                and 0 <= node.value <= MAX_RANGE)

    def visit(n, loops=0, awaited=False):
        kind, children = type(n), ast.iter_child_nodes(n)  # children: at this depth, not awaited
        if kind not in _ALLOWED:
            what = ("operator {} is" if isinstance(n, (ast.operator, ast.unaryop)) else
                    "{} statements are" if isinstance(n, ast.stmt) else "{} expressions are")
            need(False, n, _REFUSED.get(kind, what.format(kind.__name__) + " not allowed")
                 .format(n=n))
        if _ALLOWED[kind]:
            need(_ALLOWED[kind][0](n), n, _ALLOWED[kind][1].format(n=n))
        if kind is ast.Name:
            need(not n.id.startswith("_") or n.id == "_", n,
                 f"names starting with '_' are not allowed ({n.id!r})")
            need(n.id not in ("self", "asyncio"), n, f"{n.id} may only be used to call operators")
            need(n.id in local or n.id in SAFE_BUILTINS, n, f"unknown or forbidden name {n.id!r}")
        elif kind is ast.Assign:
            for t in n.targets:
                target(t)
        elif kind is ast.For:
            need(loops < MAX_LOOP_DEPTH, n, f"loops nest deeper than {MAX_LOOP_DEPTH}")
            need(not n.orelse, n, "for ... else is not allowed")
            target(n.target)
            for child in (n.target, *bounded(n.iter)):
                visit(child, loops)
            loops, children = loops + 1, n.body
        elif kind is ast.Await:
            f = getattr(n.value, "func", None)
            need(isinstance(n.value, ast.Call) and (operator(f) or gather(f)), n,
                 "await only operator calls (self.op(...)) or asyncio.gather(...)")
            return visit(n.value, loops, awaited=True)
        elif kind is ast.Starred:
            need(awaited, n, "*unpacking is allowed only in asyncio.gather(*[...])")
            return visit(n.value, loops, awaited=True)
        elif kind is ast.ListComp:
            g = n.generators[0]
            need(len(n.generators) == 1 and not g.is_async, n,
                 "a list comprehension may have one `for` (not async)")
            target(g.target)
            for child in (g.target, *bounded(g.iter), *g.ifs):
                visit(child, loops)
            return visit(n.elt, loops, awaited)
        elif kind is ast.Call:
            children = call(n, loops, awaited)
        for child in children:
            visit(child, loops)

    def operator(f):
        return _attr_of(f, "self") and f.attr in attrs

    def gather(f):
        return _attr_of(f, "asyncio") and f.attr == "gather"

    def target(t):  # assignments go to local names, items of a local (x[i] = ...), or tuples
        for e in t.elts if isinstance(t, (ast.Tuple, ast.List)) else ():
            target(e)
        need(isinstance(t, (ast.Name, ast.Tuple, ast.List))
             or isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name), t,
             "you may assign only to local names (not to attributes)")

    def bounded(it):
        """Loops and comprehensions go over range(literals <= MAX_RANGE or len(name)), a local
        list, a list literal, or enumerate/zip/reversed/sorted of those. Returns the parts to
        check."""
        if builtin_call(it, "range") and 1 <= len(it.args) <= 3:
            need(all(small_int(a) or (builtin_call(a, "len") and len(a.args) == 1
                                       and isinstance(a.args[0], ast.Name)) for a in it.args), it,
                 f"range() arguments must be ints from 0 to {MAX_RANGE} or len(name)")
            return it.args
        if builtin_call(it, "enumerate", "zip", "reversed", "sorted") and it.args:
            return [part for a in it.args for part in bounded(a)]
        need(isinstance(it, (ast.Name, ast.List, ast.Tuple)), it,
             "a loop may go over range(n), a list, or enumerate/zip of lists")
        return [it]

    def call(c, loops, awaited):
        """Operator calls (awaited), asyncio.gather of operator calls (awaited), the safe builtins
        (range bounded) and str/list methods. Returns the parts to check next."""
        f, args = c.func, c.args + [kw.value for kw in c.keywords]
        need(all(kw.arg for kw in c.keywords), c, "**kwargs are not allowed")
        if operator(f):
            need(awaited, c, f"operator call self.{f.attr}(...) must be awaited")
            return args
        if gather(f):
            need(awaited and not c.keywords, c,
                 "use `await asyncio.gather(self.op(...), ...)` with no keywords")
            for a in c.args:
                need((isinstance(a, ast.Call) and operator(a.func))
                     or (isinstance(a, ast.Starred) and isinstance(a.value, ast.ListComp)), c,
                     "asyncio.gather takes operator calls, or *[self.op(...) for i in range(n)]")
                visit(a, loops, awaited=True)
            return ()
        if isinstance(f, ast.Name):
            need(f.id in SAFE_BUILTINS, c, f"calling {f.id!r} is not allowed (allowed: operators, "
                                           f"{', '.join(SAFE_BUILTINS)})")
            need(f.id != "range" or all(map(small_int, c.args)), c,
                 f"range() arguments must be integers from 0 to {MAX_RANGE}")
            return args
        need(isinstance(f, ast.Attribute), c,
             "only operators, safe builtins and str/list methods may be called")
        need(f.attr in STR_METHODS + LIST_METHODS, c, f"method .{f.attr}() is not allowed "
             f"(allowed: operators and {', '.join(STR_METHODS + LIST_METHODS)})")
        return [f.value, *args]  # self.x.strip() or asyncio.x.strip(): self/asyncio as names fail

    for s in fn.body:
        visit(s)
    _need(any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(fn)),
          "run_workflow never returns an answer", fn)


# --- running a workflow (SCOREFLOW.md §2.1, §4 "Timeouts") -------------------------------------

@dataclass
class OperatorOptions:
    """Sampling and sandbox settings shared by the operators of one run."""
    temperature: float = 0.0     # executor sampling (paper: GPT-4o-mini at 0)
    max_tokens: int = 1024       # per operator call (official code: 4096)
    seed: int | None = None      # executor seed (the execute stage: 1000 * --seed + run)
    sample: int = 0              # cache key: the k-th repeat of the same request
    stage: str = "execute"       # ChatClient accounting labels
    tag: str = ""
    program_timeout: float = 30.0   # seconds per Programmer/Test sandbox run (official: 30)
    programmer_attempts: int = 3    # Programmer: write, run, feed the error back (official: 3)
    test_rounds: int = 3            # Test: repair rounds (official: 10 HumanEval, 6 MBPP)
    programmer_examples: int = 2    # Programmer: worked example turns first (paper: 0)
    keep_prompts: bool = True       # WorkflowRun.calls keeps each prompt and reply text
    attempt: int = 0                # which attempt of this run (a retry asks the executor anew)
    programmer_call_attempts: int = 1   # Programmer's whole call, when it raises (paper: 3, §3)
    programmer_call_delay: float = 2.0  # seconds between those attempts (paper: 2)


@dataclass
class WorkflowRun:
    """One execution of one workflow on one problem."""
    answer: str          # the workflow's return value ("" unless status == "ok")
    status: str          # "ok" | "workflow_error" (its own fault: scores 0) | "infra_error"
    reason: str          # why not ok, one line
    n_calls: int         # operator calls made
    seconds: float
    calls: list          # per executor call: operator, prompt, reply, finish_reason
    notes: list          # fallbacks taken (bad ensemble letter, ...)
    error: BaseException | None  # the ExecutorError / SandboxFailure of infra_error
    raised: bool         # workflow_error by raising or timing out (a retry may help, §4)
    executor_seconds: float  # with an executor call queued or in flight (not timed out)
    tokens: int          # executor prompt + completion tokens of its calls (replays count)


class _Context:
    """What the generated code receives as `config`: the client, the problem, the caps, the log,
    and the run's clock of `timeout` seconds of the workflow's own work (SCOREFLOW.md §4
    "Timeouts", §10.7): while an executor call is queued or in flight (client, thread pool,
    endpoint) the clock stands still, so a slow or serial endpoint cannot time a workflow out."""

    def __init__(self, client, problem, options, max_calls, timeout):
        self.client, self.problem, self.options = client, problem, options
        self.max_calls, self.timeout = max_calls, timeout
        self.n_calls, self.steps, self.tokens, self.calls, self.notes = 0, 0, 0, [], []
        self.t0, self.seen = time.monotonic(), {}  # seen: request -> times this run made it
        # `waiting` executor calls outstanding since `wait_since`; executor_seconds: past intervals
        self.waiting, self.wait_since, self.executor_seconds = 0, 0.0, 0.0

    def waited_seconds(self):
        return self.executor_seconds + (time.monotonic() - self.wait_since if self.waiting else 0.0)

    def own_seconds(self):
        return time.monotonic() - self.t0 - self.waited_seconds()

    async def chat(self, operator, prompt, examples=()):
        """One executor call: the user message `prompt`, after (user, assistant) example turns.
        ExecutorError propagates untouched."""
        o = self.options
        messages = [{"role": role, "content": text} for pair in examples
                    for role, text in zip(("user", "assistant"), pair)]
        messages.append({"role": "user", "content": prompt})
        sampling = dict(temperature=o.temperature, max_tokens=o.max_tokens, seed=o.seed)
        # The occurrence: 0 the first time this run makes this request, 1 the second, ...: repeated
        # identical calls are distinct (a loop of three Custom calls asks three times), and a
        # resumed run replays each one. Counted before the await: gather's order is fixed.
        key = json.dumps([messages, sampling], sort_keys=True, ensure_ascii=False)
        self.seen[key] = occurrence = self.seen.get(key, -1) + 1
        # a repeat or a retried run is asked anew, so at temperature > 0 sampled anew: its own seed
        if o.seed is not None and (occurrence or o.attempt):
            sampling["seed"] = o.seed + 7919 * occurrence + 104729 * o.attempt
        if self.waiting == 0:  # the clock stops while calls are outstanding (gathered ones overlap)
            self.wait_since = time.monotonic()
        self.waiting += 1
        try:
            result = await asyncio.to_thread(
                self.client.chat, messages, **sampling, sample=o.sample, attempt=o.attempt,
                occurrence=occurrence, stage=o.stage, tag=o.tag or operator)
        finally:
            self.waiting -= 1
            if self.waiting == 0:
                self.executor_seconds += time.monotonic() - self.wait_since
        self.tokens += result.prompt_tokens + result.completion_tokens
        self.calls.append({"operator": operator,
                           "prompt": prompt if o.keep_prompts else len(prompt),
                           "reply": result.text if o.keep_prompts else len(result.text),
                           "finish_reason": result.finish_reason})
        return result.text

    def tick(self, frame_locals):
        """The guard inserted before each statement of run_workflow: deadline, steps, sizes."""
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise WorkflowError(f"more than {MAX_STEPS} statements executed")
        if self.own_seconds() > self.timeout:
            raise WorkflowError(f"time limit reached: {self.timeout:g} s of the workflow's work")
        if sum(_chars(v) for k, v in frame_locals.items() if k != "self") > MAX_CHARS:
            raise WorkflowError(f"run_workflow's variables hold more than {MAX_CHARS} characters")


def _chars(v, depth=0):  # strings by length, lists/tuples by items and contents, else 1
    if isinstance(v, str):
        return len(v)
    if isinstance(v, (list, tuple)) and depth < 3:
        return len(v) + sum(_chars(x, depth + 1) for x in v)
    return 1


def _guarded(stmts):
    """`_sf_tick(locals())` before every statement, in for and if blocks too (inserted after
    validation: model code may not use names starting with '_', so it cannot touch the guard)."""
    out = []
    for s in stmts:
        if isinstance(s, (ast.For, ast.If)):
            s.body, s.orelse = _guarded(s.body), _guarded(s.orelse)
        out += [ast.copy_location(ast.parse("_sf_tick(locals())").body[0], s), s]
    return out


# The generated code's builtins: the safe ones, `locals` for the guard and __build_class__ for
# `class Workflow` (model code cannot name either: not whitelisted); its asyncio holds gather alone.
_BUILTINS = {name: getattr(builtins, name)
             for name in (*SAFE_BUILTINS, "locals", "__build_class__")}
_ASYNCIO = types.SimpleNamespace(gather=asyncio.gather)


class _OutOfTime(Exception):
    """The workflow's own time is spent."""


async def run_workflow(code: str, problem, client, set_name: str, *, timeout: float = 120.0,
                       max_calls: int = 20, options: OperatorOptions | None = None) -> WorkflowRun:
    """Validate, then run one workflow on one problem (SCOREFLOW.md §2.1; §4 "Timeouts": the paper
    gives 120 s for math/QA, 240 s for code), `timeout` counting its own work only (_Context).
    max_calls 0 = no operator-call cap (the paper has none). Never raises for the workflow's faults
    or the infrastructure's (a too slow executor call is the client's timeout: infra_error, §10.7):
    the status says which. BudgetExceeded and EndpointDown propagate: they stop the stage."""
    t0 = time.monotonic()
    ctx = _Context(client, problem, options or OperatorOptions(), max_calls, timeout)

    def result(answer, status, reason, error=None, raised=False):
        return WorkflowRun(answer, status, reason, ctx.n_calls, time.monotonic() - t0, ctx.calls,
                           ctx.notes, error, raised, round(ctx.waited_seconds(), 3), ctx.tokens)

    try:
        tree, run, _ = _check_workflow(code, set_name)
    except WorkflowError as e:
        return result("", "workflow_error", f"rejected: {e}")
    run.body = _guarded(run.body)
    names = {"__builtins__": _BUILTINS, "__name__": "workflow", "_sf_tick": ctx.tick,
             "asyncio": _ASYNCIO, **{op: _OPERATORS[op] for op in OPERATOR_SETS[set_name]}}
    try:
        exec(compile(ast.fix_missing_locations(tree), "<workflow>", "exec"), names)
        answer = await _within_own_time(names["Workflow"](ctx, problem).run_workflow(), ctx)
    except (executor.BudgetExceeded, executor.EndpointDown):
        raise
    except (executor.ExecutorError, SandboxFailure) as e:
        return result("", "infra_error", f"{type(e).__name__} ({getattr(e, 'kind', 'sandbox')}): "
                                         f"{e}", e)
    except _OutOfTime:
        return result("", "workflow_error", f"timed out after {timeout:g} s of its own work",
                      raised=True)
    except Exception as e:  # the workflow's own fault: it raised
        return result("", "workflow_error", f"{type(e).__name__}: {e}"[:500], raised=True)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        return result("", "workflow_error", f"run_workflow returned {type(answer).__name__}, "
                                            "expected str")
    if not answer.strip():
        return result("", "workflow_error", "run_workflow returned an empty answer")
    return result(answer, "ok", "")


async def _within_own_time(coro, ctx):
    """Await coro while ctx.own_seconds() < ctx.timeout; then cancel it and raise _OutOfTime. The
    clock stands still during executor calls, so the wait is re-armed until the own time is spent
    (polled every 50 ms to 1 s). This catches time spent awaiting (a sandbox run); the guard's
    tick catches it in statements between awaits, which a watcher on the same loop cannot stop."""
    task = asyncio.ensure_future(coro)
    try:
        while (left := ctx.timeout - ctx.own_seconds()) > 0 or task.done():
            if (await asyncio.wait({task}, timeout=min(max(left, 0.05), 1.0)))[0]:
                return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _OutOfTime()
    finally:
        task.cancel()  # a no-op when it is done


# --- operators (SCOREFLOW.md §3) ----------------------------------------------------------------
# Each operator is bound to the run's context (the generated code's `config`); calling it is one or
# more executor calls. Structured replies come in <field>...</field> tags; a missing field is "".

def _field(text, name):
    m = re.search(rf"<{name}>(.*?)(?:</{name}>|$)", text, re.S | re.I)
    return m.group(1).strip() if m else ""


def _problem_text(problem):
    """What operators see of the problem: its input; a code task as §3 words it."""
    inp = problem.input
    return "You have the following task:\n" + str(inp.get("prompt", "")) if isinstance(
        inp, dict) else str(inp)


def _entry_point(problem):
    inp = problem.input if isinstance(problem.input, dict) else {}
    return inp.get("entry_point") or (problem.extra or {}).get("entry_point") or ""


async def _run_python(code, timeout):
    """executor.run_python in a thread; a failure of the sandbox itself raises SandboxFailure."""
    run = await asyncio.to_thread(executor.run_python, code, timeout=timeout)
    if run.status == "internal":
        raise SandboxFailure(run.reason)
    return run


class _Operator:
    """What every operator shares: built from `config` (the run's _Context), each call counted
    against the run's cap, executor calls and notes logged under the operator's class name."""
    retried = False  # Programmer: options.programmer_call_attempts for a call that raises

    def __init__(self, config):  # the whitelist allows only Operator(config): config is _Context
        self.ctx, self.task = config, _problem_text(config.problem)

    async def __call__(self, *args, **kwargs):
        """One operator call, counted against the cap. A retried operator's call that raises by
        its own fault gets options.programmer_call_attempts attempts, programmer_call_delay s
        apart (SCOREFLOW.md §3: 3, 2 s); its repeated requests are new occurrences (see chat)."""
        ctx = self.ctx
        if ctx.max_calls and ctx.n_calls >= ctx.max_calls:  # max_calls 0: no cap (paper: none)
            raise WorkflowError(f"operator call cap reached: {ctx.max_calls} calls")
        ctx.n_calls += 1
        attempts = max(1, ctx.options.programmer_call_attempts) if self.retried else 1
        for attempt in range(1, attempts + 1):
            try:
                return await self.run(*args, **kwargs)
            except (executor.ExecutorError, SandboxFailure, WorkflowError):
                raise  # the run reports these: infrastructure, or a cap
            except Exception as e:
                if attempt == attempts:
                    raise
                self.note(f"call attempt {attempt} raised {type(e).__name__}: {str(e)[:120]}")
                await asyncio.sleep(ctx.options.programmer_call_delay)

    async def chat(self, prompt, examples=()):
        return await self.ctx.chat(type(self).__name__, prompt, examples)

    def note(self, text):  # a fallback taken, kept in WorkflowRun.notes
        self.ctx.notes.append(f"{type(self).__name__}: {text}")


class Custom(_Operator):
    """custom(instruction) -> the executor's reply to instruction + problem."""

    async def run(self, instruction: str = ""):
        return await self.chat(f"{instruction}\n\n{self.task}")


class AnswerGenerate(_Operator):
    """answer_generate() -> step-by-step thought, then a short answer (joined)."""

    async def run(self):
        reply = await self.chat(
            f"{self.task}\n\n"
            "Think it through step by step, then give the final answer as briefly as possible.\n"
            "Reply in this form:\n<thought>your reasoning</thought>\n"
            "<answer>the short answer</answer>")
        thought, answer = _field(reply, "thought"), _field(reply, "answer")
        if not answer:
            self.note("no <answer> field; kept the whole reply")
            return reply.strip()
        return f"{thought}\n\nAnswer: {answer}" if thought else answer


class ScEnsemble(_Operator):
    """sc_ensemble(solutions) -> the candidate most consistent with the others, verbatim. A bad
    letter does not fail the run (the official code's accident, SCOREFLOW.md §10.11): we fall back
    to the most frequent candidate (the first on ties) and record a note."""

    async def run(self, solutions: list | None = None):
        if not isinstance(solutions, (list, tuple)) or not solutions:
            raise WorkflowError("sc_ensemble(solutions=...) needs a non-empty list of solutions")
        solutions = [str(s) for s in solutions][:26]
        letters = [chr(ord("A") + i) for i in range(len(solutions))]
        listing = "\n\n".join(f"{k}:\n{s}" for k, s in zip(letters, solutions))
        reply = await self.chat(
            f"{self.task}\n\nHere are candidate solutions:\n\n{listing}\n\n"
            "Compare them and find the one whose result agrees with most of the others.\n"
            "Reply in this form:\n<thought>your comparison</thought>\n"
            f"<solution_letter>one letter from {letters[0]} to {letters[-1]}</solution_letter>")
        letter = _field(reply, "solution_letter").strip().strip(".:()").upper()[:1]
        if letter in letters:
            return solutions[letters.index(letter)]
        counts = [sum(s.strip() == t.strip() for t in solutions) for s in solutions]
        best = max(range(len(solutions)), key=lambda i: (counts[i], -i))
        self.note(f"bad letter {letter or reply[:40]!r}; fell back to the most frequent "
                  f"candidate {letters[best]}")
        return solutions[best]


class Review(_Operator):
    """review(pre_solution) -> the solution unchanged if judged right, else a corrected one."""

    async def run(self, pre_solution: str = ""):
        reply = await self.chat(
            f"{self.task}\n\nProposed solution:\n{pre_solution}\n\n"
            "Check it carefully: the logic, every calculation, whether the question was read "
            "correctly, and whether any detail is missing.\nReply in this form:\n<review>what you "
            "checked and found</review>\n<verdict>correct or wrong</verdict>\n"
            "<solution>if wrong, the complete corrected solution</solution>")
        verdict, revised = _field(reply, "verdict").lower(), _field(reply, "solution")
        if "wrong" in verdict and revised:
            return revised
        if not verdict:
            self.note("no <verdict> field; kept the solution")
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
            + (f"Your previous code failed:\n```python\n{code}\n```\nError:\n{error}\n\n"
               if error else "")
            + "Write a short Python program that computes the final answer: a function solve() "
              "taking no arguments and returning it, or code that prints it. Use only the standard "
              "library. Reply with one ```python code block.")


class Programmer(_Operator):
    """programmer(analysis) -> code and its output, run in the sandbox, errors fed back. The model
    may write a solve() returning the answer or a program printing it (small executors rarely
    follow the solve() contract); see runnable_program."""
    retried = True

    async def run(self, analysis: str = "None"):
        o, error, code, output = self.ctx.options, "", "", ""
        examples = [(programmer_prompt(q, a), reply)
                    for q, a, reply in PROGRAMMER_EXAMPLES[:o.programmer_examples]]
        for attempt in range(o.programmer_attempts):
            prompt = programmer_prompt(self.task, analysis, code, error)
            code = runnable_program(await self.chat(prompt, examples))
            run = await _run_python(code, o.program_timeout)
            if run.status == "ok" and run.stdout.strip():
                output = run.stdout.strip()[:2000]
                break
            error = (run.stderr.strip()[-1000:] or run.reason or "the program printed nothing")
            self.note(f"attempt {attempt + 1} {run.status}: {error[:120]}")
        else:
            output = f"(no successful run; last error: {error[-300:]})"
        return f"```python\n{code}\n```\nOutput: {output}"


class CustomCodeGenerate(_Operator):
    """code_generate(instruction) -> sanitized code for the task's entry point."""

    async def run(self, instruction: str = ""):
        ep = _entry_point(self.ctx.problem)
        return sanitize_code(await self.chat(
            f"{instruction}\n\n{self.task}\n\nWrite the complete function `{ep}` in Python, with "
            "any imports it needs. Think about edge cases (empty inputs, zero, negative numbers, "
            "duplicates). Reply with one ```python code block."), ep)


class Test(_Operator):
    """test(solution) -> the solution if it passes the task's PUBLIC tests (problem.extra
    ["public_tests"], asserts on `candidate`), else a repaired one: up to options.test_rounds
    rounds of reflection + fix, then a fresh code_generate if it still fails. Hidden tests are
    never read here."""

    async def run(self, solution: str = ""):
        ep, rounds = _entry_point(self.ctx.problem), self.ctx.options.test_rounds
        tests = [t for t in (self.ctx.problem.extra or {}).get("public_tests", [])
                 if str(t).strip()]
        code = sanitize_code(str(solution), ep)
        if not tests:
            self.note("the task has no public tests; solution returned as is")
            return code
        for round_ in range(rounds + 1):
            failure = await self.failure(code, ep, tests)
            if failure is None:
                return code
            if round_ < rounds:
                code = sanitize_code(await self.chat(
                    f"{self.task}\n\nThis solution fails a test:\n```python\n{code}\n```\n"
                    f"Failure:\n{failure}\n\nExplain the mistake briefly in <reflection>..."
                    f"</reflection>, then give the complete fixed function `{ep}` in one "
                    "```python code block."), ep)
        self.note(f"still failing after {rounds} repairs; wrote a fresh solution")
        return await CustomCodeGenerate(self.ctx).run("Write a correct solution from scratch.")

    async def failure(self, code, ep, tests):
        """None if every public assert passes, else the first failure's description."""
        done = "all-public-tests-ran-" + secrets.token_hex(8)  # an early exit(0) cannot fake a pass
        checks = "".join(
            f"try:\n{textwrap.indent(t.strip(), '    ')}\nexcept Exception as e:\n"
            f"    print('FAILED: ' + {t.strip()!r} + ' -> ' + type(e).__name__ + ': ' + "
            "str(e)[:200])\n    raise SystemExit(1)\n" for t in tests)
        program = f"{code}\n\ncandidate = {ep}\n{checks}print({done!r})\n"
        run = await _run_python(program, self.ctx.options.program_timeout)
        if run.status == "ok" and done in run.stdout:
            return None
        failed = [line[8:] for line in run.stdout.splitlines() if line.startswith("FAILED: ")]
        return failed[0] if failed else f"{run.status}: {run.stderr.strip()[-600:] or run.reason}"


_OPERATORS = {op.__name__: op for op in (Custom, AnswerGenerate, Programmer, ScEnsemble, Review,
                                         CustomCodeGenerate, Test)}


# --- the runnable check (SCOREFLOW.md §2.3) ------------------------------------------------------

TOY_PROBLEMS = {  # §2.3 step 5: a tiny problem per set; the output is not checked
    name: types.SimpleNamespace(input=input, extra=extra, gold="", id="toy")
    for name, input, extra in (
        ("math", "A is 1 and B is 2. What is A + B?", {}),
        ("qa", "Question: How many legs do two cats have in total?", {}),
        ("code", {"task_id": "toy/add", "entry_point": "add_two",
                  "prompt": 'def add_two(a, b):\n    """Return the sum of a and b.\n'
                            '    >>> add_two(2, 3)\n    5\n    """\n'},
         {"entry_point": "add_two", "public_tests": ["assert candidate(2, 3) == 5"]}))}


def forbidden_usage(code: str) -> str:
    """§2.3 step 4 on whitelisted code, by meaning, not by substring (SCOREFLOW.md §10.11: `int(`
    also matched `print(`): a call to int(...) or a .split(' ') call. "" if neither occurs."""
    for n in ast.walk(ast.parse(code)):
        f = getattr(n, "func", None)  # n is a call
        if isinstance(f, ast.Name) and f.id == "int":
            return (f"line {n.lineno}: int(...) is not allowed (model outputs rarely parse as "
                    "integers)")
        if isinstance(f, ast.Attribute) and f.attr == "split" and [
                getattr(a, "value", None) for a in n.args] == [" "]:
            return f"line {n.lineno}: .split(' ') is not allowed"
    return ""


def straight_line(code: str, set_name: str, max_calls: int = 20) -> bool:
    """True when a whitelisted workflow provably cannot raise by its own fault, so §2.3's trial run
    could fail only through the infrastructure or the executor's text: run_workflow is lines
    `name = await self.op(...)`, then `return name` or `return await self.op(...)`, at most
    max_calls calls (0: no cap); each call's arguments bind to the operator's parameters and are
    str literals or names bound above (sc_ensemble: a non-empty list of those). Every operator
    returns a str, so each name holds one. Anything else gets the trial run."""
    try:
        _, run, attrs = _check_workflow(code, set_name)
    except WorkflowError:
        return False
    *assigns, last = _statements(run)
    bound = set()

    def text(a):  # a str for certain: a str literal or a name bound above
        return (isinstance(a, ast.Constant) and isinstance(a.value, str)
                or isinstance(a, ast.Name) and a.id in bound)

    def safe_call(e):  # `await self.op(...)` with arguments that bind and are text
        c = e.value if isinstance(e, ast.Await) else None
        if not (c and _attr_of(c.func, "self") and c.func.attr in attrs):
            return False
        op = attrs[c.func.attr]
        try:  # TypeError: too many, unknown or twice-given arguments
            given = inspect.signature(_OPERATORS[op].run).bind(
                None, *c.args, **{k.arg: k.value for k in c.keywords}).arguments
        except TypeError:
            return False
        args = [a for name, a in given.items() if name != "self"]
        if op == "ScEnsemble":  # sc_ensemble needs a non-empty list
            if not (args and isinstance(args[0], ast.List) and args[0].elts):
                return False
            args = args[0].elts
        return all(map(text, args))

    for stmt in assigns:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name) and safe_call(stmt.value)):
            return False
        bound.add(stmt.targets[0].id)
    value = last.value if isinstance(last, ast.Return) else None
    calls = len(assigns) + safe_call(value)  # `return await self.op(...)` is one call more
    returns_text = safe_call(value) or isinstance(value, ast.Name) and value.id in bound
    return returns_text and (not max_calls or calls <= max_calls)


async def runnable_check(code: str, set_name: str, client, *, threshold: float | None = -1.0,
                         options: OperatorOptions | None = None, max_calls: int = 20,
                         trial: bool = True) -> tuple[bool, str]:
    """§2.3 steps 2-5 on an extracted graph: the whitelist, not a near copy of the template
    (ratio below threshold; -1 = SET_THRESHOLDS' value, None = off), no forbidden usage, and (if
    trial) one run on the set's toy problem that must not fail within TRIAL_TIMEOUTS. A trial's
    infra_error gives the reason "infra: ...": the caller should retry rather than regenerate."""
    ok, reason = validate_workflow(code, set_name)
    if not ok:
        return False, f"rejected: {reason}"
    threshold = SET_THRESHOLDS[set_name] if threshold == -1.0 else threshold
    if threshold is not None and (ratio := template_similarity(code, set_name)) >= threshold:
        return False, f"too close to the template (similarity {ratio:.2f} >= {threshold})"
    if why := forbidden_usage(code):
        return False, f"forbidden: {why}"
    if not trial:
        return True, ""
    run = await run_workflow(code, TOY_PROBLEMS[set_name], client, set_name, max_calls=max_calls,
                             timeout=TRIAL_TIMEOUTS[set_name], options=options)
    if run.status == "infra_error":
        return False, f"infra: {run.reason}"
    if run.status != "ok":
        return False, f"trial run failed: {run.reason}"
    return True, ""


# --- after the workflow: the answer extractor and the judge (§3 "Not offered", §4) --------------

async def extract_answer(output: str, problem, client, set_name: str, *,
                         options: OperatorOptions) -> str:
    """One executor call after a math or QA workflow (training and test): keeps only the final
    answer (\\boxed{x} for math, a short phrase for QA). Code outputs are returned unchanged."""
    if set_name == "code":
        return output
    form = ("the final answer only, written as \\boxed{answer}" if set_name == "math"
            else "the final answer only, as a short phrase or number")
    prompt = (f"Question:\n{_problem_text(problem)}\n\nA solution:\n{output}\n\n"
              f"Give {form}. Reply in this form: <answer>...</answer>")
    result = await asyncio.to_thread(
        client.chat, [{"role": "user", "content": prompt}], temperature=options.temperature,
        max_tokens=min(options.max_tokens, 256), seed=options.seed, sample=options.sample,
        attempt=options.attempt, stage=options.stage, tag="extract")
    answer = _field(result.text, "answer") or result.text.strip()
    if set_name == "math" and "\\boxed" not in answer and answer:
        answer = f"\\boxed{{{answer}}}"
    return answer


# The test-time judge (SCOREFLOW.md §4 "At test time", §3 "Not offered: Judge").
JUDGED = ("math", "drop", "hotpotqa")  # the benchmarks the official code judges at test time
HOTPOTQA_RATIO = 10.0  # §4: 0 without judging when len(out)/len(gold) >= 10 or <= 1/10


def judge_prompt(problem, answer: str, bench_name: str) -> str:
    """What the judge sees (§4 "At test time"): the question, the extracted gold and the answer;
    DROP adds the passage and its golds joined with "or", HotpotQA the context. The gold is shown
    to the judge only: the judge is a scorer, never an operator of the workflow."""
    gold, extra, head = problem.gold, problem.extra or {}, ""
    if bench_name == "drop":
        gold = " or ".join(g.strip() for g in gold.split("|") if g.strip())
        head = f"Passage:\n{extra.get('passage', '')}\n\n"
    elif bench_name == "hotpotqa":
        head = f"Context:\n{extra.get('context', '')}\n\n"
    return (f"{head}Question:\n{problem.question}\n\nCorrect answer:\n{gold}\n\nAnswer to grade:\n"
            f"{answer}\n\nIs the answer to grade correct, that is, equivalent to the correct "
            "answer? Reply with 1 if it is and 0 if it is not: one digit, nothing else.")


def judge_verdict(reply: str) -> float:
    """1.0 for a reply "1", 0.0 for "0" and for anything else (§3: anything else counts as 0)."""
    return 1.0 if reply.strip().rstrip(".") == "1" else 0.0


async def judge(problem, answer: str, client, bench_name: str, *,
                options: OperatorOptions | None = None) -> float:
    """One executor call that scores a test answer 0 or 1 (`--judge llm` on the JUDGED benchmarks).
    HotpotQA's length rule comes first: an answer 10x longer or shorter than the gold scores 0
    without a call (§4)."""
    if bench_name == "hotpotqa":
        ratio = len(answer) / max(len(problem.gold), 1)
        if ratio >= HOTPOTQA_RATIO or ratio <= 1 / HOTPOTQA_RATIO:
            return 0.0
    o = options or OperatorOptions(stage="judge")
    result = await asyncio.to_thread(
        client.chat, [{"role": "user", "content": judge_prompt(problem, answer, bench_name)}],
        temperature=0.0, max_tokens=min(o.max_tokens, 8), seed=o.seed, sample=o.sample,
        stage="judge", tag="judge")
    return judge_verdict(result.text)

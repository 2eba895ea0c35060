"""executor.py: how ScoreFlow talks to the executor LLM and runs model-written code.

(Module docstring to be completed: scope, SCOREFLOW.md sections, non-goals.)
"""

# --- HTTP chat client, call cache, budget (issue 4) -------------------------------------------

# --- local OpenAI-compatible server (issue 4) -------------------------------------------------

# --- subprocess sandbox (issue 5) --------------------------------------------------------------

"""Shared fixtures: the real embedded model, loaded once per test session."""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
DATASETS = os.path.join(SHARED, "datasets", "scoreflow")
sys.path.insert(0, ROOT)


def run_cli(args, timeout=600, **kw):
    """`python scoreflow.py ARGS` -> CompletedProcess (text). Past `timeout` the run is asked for
    every thread's stack (SIGUSR1: scoreflow.main registers faulthandler), then killed, and the test
    fails with what it printed: a hang in CI says where it hangs."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scoreflow.py")] + list(args),
                            cwd=kw.pop("cwd", ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"scoreflow.py {' '.join(map(str, args))} still running after {timeout} s; "
                    f"its stderr, ending with every thread's stack:\n{err[-12000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) for the embedded SmolLM2-135M-Instruct GGUF, fp32 on CPU."""
    import torch
    import model
    return model.load(None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def local_server(smol):
    """A real executor.LocalServer on 127.0.0.1 (a free port) over the `smol` model, stopped at the end."""
    import executor
    model, tokenizer = smol
    server = executor.start_local_server(model=model, tokenizer=tokenizer)
    yield server
    server.stop()

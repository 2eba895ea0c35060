"""Shared fixtures: the real embedded model, loaded once per test session."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
DATASETS = os.path.join(SHARED, "datasets", "scoreflow")
sys.path.insert(0, ROOT)


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

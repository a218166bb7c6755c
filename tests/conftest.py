"""Shared fixtures: a tiny byte-level tokenizer and the real embedded teacher.

`smollm2` loads the embedded SmolLM2-135M-Instruct through `load_teacher`, so the first test session on a
machine de-quantises the GGUF into the teacher cache (about 20 s); later sessions load it in under a
second. Set LINEARIZE_CACHE to keep that cache somewhere else.

`@pytest.mark.cuda` marks a test that needs a CUDA GPU: `pytest -m cuda` selects them (bench/gpu.sh runs them
on a GPU), and without a GPU each is skipped, saying so.

transformers is imported inside the fixtures, so test modules that do not use them collect quickly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from helpers import make_byte_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, the cores shared out,
        import torch  # and so for the processes a test starts (torchrun, the command line)

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none here (on one: `pytest -m cuda`, or bench/gpu.sh)")
        for item in cuda_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """(model, tokenizer) of the embedded default teacher, fp32, frozen, in eval mode."""
    from linearize.teacher import DEFAULT_TEACHER, load_teacher

    return load_teacher(DEFAULT_TEACHER)

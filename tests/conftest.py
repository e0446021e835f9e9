"""Shared pytest setup: tests marked `gpu` are skipped cleanly when CUDA is not available; the
root logger is restored after every test; the `single_rank` fixture (a one-process gloo group
for building Megatron models in-process)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """Importing nemo_run (the launch tests) runs logging.basicConfig with a rich handler bound
    to that test's captured stderr; a later test's log records would go to that closed stream
    and print a 'Logging error' traceback. Each test gets back the root logger it started with."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def single_rank() -> Iterator[Any]:
    """parallel.init for one process (TP = PP = DP = 1), destroyed after the test."""
    from rpg_megatron.config import ParallelConfig
    from rpg_megatron.megatron import parallel

    ctx = parallel.init(ParallelConfig())
    try:
        yield ctx
    finally:
        parallel.destroy()

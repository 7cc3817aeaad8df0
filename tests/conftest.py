"""Shared fixtures: tiny checkpoints and running stacks (real processes on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, start_stack

SEED = 0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.checkpoint import make_checkpoint

    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "internvl3_5-tiny", preset="tiny", seed=SEED
    )


@pytest.fixture(scope="session")
def tiny_checkpoint_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvd.checkpoint import make_checkpoint

    return make_checkpoint(
        tmp_path_factory.mktemp("ckpt-hf") / "internvl3_5-tiny-hf",
        preset="tiny",
        layout="hf",
        seed=SEED,
    )


@pytest.fixture(scope="session")
def qwen3vl_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One qwen3vl-tiny checkpoint for every test that only reads it."""
    from dvd.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("qwen3vl") / "qwen3vl-tiny", "qwen3vl-tiny")


@pytest.fixture(scope="session")
def dvd_stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tiny_checkpoint, tmp_path_factory.mktemp("dvd-stack"))
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def coupled_stack(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start_stack(tiny_checkpoint, tmp_path_factory.mktemp("coupled-stack"), "--coupled")
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def shm_stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tiny_checkpoint, tmp_path_factory.mktemp("shm-stack"), "--transport", "shm")
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def tcp_stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tiny_checkpoint, tmp_path_factory.mktemp("tcp-stack"), "--transport", "tcp")
    yield stack
    stack.stop()


STACK_OF_TRANSPORT = {"grpc": "dvd_stack", "shm": "shm_stack", "tcp": "tcp_stack"}


@pytest.fixture(params=list(STACK_OF_TRANSPORT))
def any_dvd_stack(request: pytest.FixtureRequest) -> Stack:
    """The DvD stack over each feature transport this machine has (rdma needs a NIC)."""
    return request.getfixturevalue(STACK_OF_TRANSPORT[request.param])  # type: ignore[no-any-return]

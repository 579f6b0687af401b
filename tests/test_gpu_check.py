"""benchmarks/gpu_check.py's own plumbing on CPU: the dry run builds its plan and launch commands, and a real run
without CUDA stops at once with exit status 2 (the checks themselves need a GPU and are not run here)."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_builds_the_plan(capsys):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [step["check"] for step in report["plan"]] == [
        "setup",
        "qpissa_4bit",
        "train_step_bf16",
        "streaming_init",
        "fsdp2_launch",
        "zero3_launch",
    ]
    assert sum(step["timeout_s"] for step in report["plan"]) > 0
    for kind, config in (("fsdp2", "fsdp.yaml"), ("zero3", "deepspeed_zero3.yaml")):
        command = report["commands"][kind]
        assert "launch" in command and command[command.index("--num_processes") + 1] == "1"
        assert command[command.index("--config_file") + 1].endswith(config)
        assert command[command.index("--max_steps") + 1] == "5"
        assert command[command.index("--config") + 1].endswith(os.path.join("configs", "pissa.yaml"))


def test_without_cuda_the_run_exits_2(capsys, monkeypatch):
    import torch

    gpu_check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_dry_run_with_a_gguf_copy_finds_the_stand_in_package(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))  # the stand-in's folder is put first on sys.path
    monkeypatch.setenv("GPU_CHECK_SMOLLM2_GGUF", "unset")  # restored afterwards (main sets it from --gguf)
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run", "--gguf", str(gguf)]) == 0
    assert json.loads(capsys.readouterr().out)["gguf"] == str(gguf)
    monkeypatch.setenv("GPU_CHECK_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    try:
        gpu_check.main(["--dry-run"])
    except FileNotFoundError as error:
        assert "missing.gguf" in str(error)
    else:
        raise AssertionError("a missing GGUF file passed the dry run")

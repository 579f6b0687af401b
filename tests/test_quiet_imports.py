"""``import subspace_peft`` on a fresh machine: no Hub request unless the user asked for one, and nothing printed.

Whatever this machine's CPU is, each child process is told what bitsandbytes should believe about it
(tests/cpu_features.py): on a CPU with AVX512-BF16, bitsandbytes >= 0.50 asks the Hub for a CPU kernel when peft
imports it. The Hub here is the loopback fake Hub (tests/fake_hub.py); one that never answers shows a wait as a hang.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cpu_features import pretend_avx512_bf16
from fake_hub import FakeHub

TESTS = os.path.dirname(os.path.abspath(__file__))
KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
FAILED_LINE = "Failed to load CPU gemm_4bit_forward"


def import_in_child(hub: FakeHub, avx512_bf16: bool, offline: bool, tmp_path) -> subprocess.CompletedProcess:
    code = (
        pretend_avx512_bf16(avx512_bf16)
        + "import subspace_peft, builtins\nprint('KERNELS', builtins.KERNEL_REQUESTS)\n"
    )
    env = hub.env({**os.environ, "PYTHONPATH": TESTS, "HF_HOME": str(tmp_path / "hf")})
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


# a process each (~9 s): the AVX512-BF16 case in the default run, the others in the slow suite
@pytest.mark.parametrize(
    "avx512_bf16", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain CPU", "AVX512-BF16 CPU"]
)
def test_the_import_is_silent_and_makes_no_request_with_the_hub_off(tmp_path, avx512_bf16):
    with FakeHub(answer=False) as hub:  # a request would hang: the timeout fails the test
        proc = import_in_child(hub, avx512_bf16, offline=True, tmp_path=tmp_path)
        connections = hub.connections
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert connections == 0
    assert proc.stderr == "", proc.stderr  # not one line: no bitsandbytes kernel warning, no other warning
    # bitsandbytes did ask for its kernel on the AVX512-BF16 CPU (served from the local cache only, here: none)
    assert f"KERNELS {[KERNEL_REPO] if avx512_bf16 else []}" in proc.stdout


@pytest.mark.slow
def test_our_import_makes_no_request_with_the_hub_on_a_plain_cpu(tmp_path):
    with FakeHub(answer=False) as hub:
        proc = import_in_child(hub, avx512_bf16=False, offline=False, tmp_path=tmp_path)
        connections = hub.connections
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert connections == 0, "import subspace_peft asked the Hub for something"
    assert proc.stderr == "", proc.stderr


@pytest.mark.slow
def test_online_on_an_avx512_bf16_cpu_the_kernel_request_and_its_warning_are_bitsandbytes_own(tmp_path):
    """What the README tells a CPU user they will see without HF_HUB_OFFLINE=1: one request to the Hub at import
    (here answered 404) and bitsandbytes' one warning line; the filter hides nothing when the Hub is on."""
    with FakeHub() as hub:
        proc = import_in_child(hub, avx512_bf16=True, offline=False, tmp_path=tmp_path)
        connections = hub.connections
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert connections >= 1
    assert f"KERNELS {[KERNEL_REPO]}" in proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        line for line in proc.stderr.splitlines() if FAILED_LINE in line
    ]
    assert FAILED_LINE in proc.stderr


def test_tests_run_with_the_hub_off_and_cannot_reach_the_network():
    import socket

    import huggingface_hub.constants

    from conftest import NetworkRefused

    assert huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(NetworkRefused, match="tests may not reach the network"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(NetworkRefused):
        socket.socket().connect(("192.0.2.1", 80))
    assert os.environ["HF_HOME"].startswith(os.environ["SUBSPACE_PEFT_TEST_SCRATCH"])

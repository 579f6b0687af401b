"""push_adapter against the loopback fake Hub when the Hub does not answer: every request has a timeout and a bounded
retry budget (huggingface_hub's internal retries included), and the failure is one line naming the endpoint and the
fix. Each test has a hard time bound."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time

import pytest
from huggingface_hub import get_session
from peft import LoraConfig, get_peft_model

from subspace_peft.hub import HubUnreachableError, push_adapter

from cpu_features import pretend_avx512_bf16
from fake_hub import FakeHub, hub_online
from tiny_models import build

TOKEN = "hf_fake_token_for_tests"


@pytest.fixture(scope="module")
def model():
    return get_peft_model(build("mlp"), LoraConfig(r=2, target_modules=["lin0", "lin1"]))


def refused(hub_or_endpoint, model, **kwargs) -> tuple[str, float]:
    endpoint = getattr(hub_or_endpoint, "endpoint", hub_or_endpoint)
    start = time.monotonic()
    with hub_online(), pytest.raises(HubUnreachableError) as error:
        push_adapter(model, "user/tiny", token=TOKEN, endpoint=endpoint, **kwargs)
    elapsed = time.monotonic() - start
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "\n" not in message
    assert f"the Hub at {endpoint}" in message and "HF_ENDPOINT" in message
    assert "push_adapter(timeout=..., max_retries=...)" in message and "Check the network" in message
    return message, elapsed


def client_has_no_push_timeout() -> bool:
    """After a push, huggingface_hub's shared client comes from the factory that was installed before it."""
    return get_session().timeout.read is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_retries", [0, 1])
def test_a_hub_that_accepts_and_never_answers_fails_within_the_budget(model, max_retries):
    with FakeHub(answer=False) as hub:
        message, elapsed = refused(hub, model, timeout=0.5, max_retries=max_retries)
        assert hub.connections == max_retries + 1
    assert "did not answer create_repo('user/tiny') within timeout=0.5s" in message
    assert f"{max_retries + 1} attempt(s), max_retries={max_retries}" in message
    assert elapsed < 10, elapsed  # 0.5 s per attempt and 1 s between them
    assert client_has_no_push_timeout()


@pytest.mark.slow  # each waits out huggingface_hub's own retries (~5 s)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("stalled", ["/preupload/", "/commit/"])
def test_huggingface_hubs_own_retries_count_against_the_budget(model, stalled):
    # the pre-upload and the commit go through huggingface_hub's http_backoff (5 retries of its own, the commit in
    # a worker thread): the budget stops them after 1 + max_retries attempts as well
    with FakeHub(stall=stalled) as hub:
        message, elapsed = refused(hub, model, timeout=0.5, max_retries=1)
        assert hub.stalled == 2
    assert "did not answer upload_folder('user/tiny') within timeout=0.5s" in message and stalled in message
    assert elapsed < 15, elapsed
    assert client_has_no_push_timeout()


@pytest.mark.timeout(60)
def test_nothing_listening_fails_fast(model):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    message, elapsed = refused(endpoint, model, timeout=5, max_retries=1)
    assert "could not be reached for create_repo('user/tiny')" in message and "ConnectError" in message
    assert elapsed < 10, elapsed


@pytest.mark.timeout(60)
def test_a_hub_that_answers_gets_the_adapter_and_the_client_is_restored(model):
    with FakeHub() as hub:
        url = push_adapter(model, "user/tiny", token=TOKEN, endpoint=hub.endpoint, timeout=5, max_retries=1)
        assert url.startswith(f"{hub.endpoint}/user/tiny/commit/")
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(hub.repos.files["user/tiny"])
    assert client_has_no_push_timeout()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"timeout": math.nan}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"max_retries": math.inf}, "max_retries"),
    ],
)
def test_timeout_and_retries_are_checked_before_any_request(model, kwargs, name):
    with FakeHub(answer=False) as hub:
        with pytest.raises(ValueError, match=f"push_adapter: {name} must be") as error:
            push_adapter(model, "user/tiny", token=TOKEN, endpoint=hub.endpoint, **kwargs)
        assert "pass e.g." in str(error.value)
        assert hub.connections == 0


@pytest.mark.timeout(60)
def test_a_bad_repo_id_is_refused_before_any_request(model):
    with FakeHub(answer=False) as hub:
        with pytest.raises(ValueError, match="Repo id"):
            push_adapter(model, "user/two/slashes", token=TOKEN, endpoint=hub.endpoint)
        assert hub.connections == 0


# a plain CPU for bitsandbytes (tests/cpu_features.py): on an AVX512-BF16 CPU its import-time kernel request would go
# to this never-answering Hub too, and hang before the push this test is about
CHILD = (
    pretend_avx512_bf16(False)
    + """
import torch
from peft import LoraConfig, get_peft_model
from subspace_peft import push_adapter
from tiny_models import build
model = get_peft_model(build("mlp"), LoraConfig(r=2, target_modules=["lin0"]))
try:
    push_adapter(model, "user/tiny", timeout=0.5, max_retries=0)
except ValueError as error:
    print("REFUSED", error)
"""
)


@pytest.mark.slow  # a second process
@pytest.mark.timeout(240)
def test_the_message_names_hf_endpoint_of_the_environment():
    # the endpoint comes from HF_ENDPOINT, which huggingface_hub reads at import: a fresh process
    tests = os.path.dirname(os.path.abspath(__file__))
    with FakeHub(answer=False) as hub:
        env = hub.env({**os.environ, "PYTHONPATH": tests})
        proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=200, env=env)
        assert hub.connections == 1
    line = next((out for out in proc.stdout.splitlines() if out.startswith("REFUSED ")), None)
    assert line is not None, proc.stderr[-3000:]
    assert f"the Hub at {hub.endpoint} did not answer create_repo('user/tiny') within timeout=0.5s" in line
    assert f"HF_ENDPOINT (now {hub.endpoint})" in line


def test_with_the_hub_turned_off_the_push_is_refused_before_anything_is_sent(model):
    with FakeHub(answer=False) as hub:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True  # as HF_HUB_OFFLINE=1 at start-up (the FakeHub restores it on exit)
        with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE=1.*fix: unset HF_HUB_OFFLINE"):
            push_adapter(model, "user/tiny", token=TOKEN, endpoint=hub.endpoint)
        assert hub.connections == 0

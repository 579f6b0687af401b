"""Every test runs with the Hub off and without the network, whatever the machine has cached or can reach.

- ``HF_HUB_OFFLINE=1`` is set before anything imports huggingface_hub, so this process and every child process it
  starts make no Hub request (bitsandbytes' import-time kernel download on AVX512-BF16 CPUs included). A test that
  talks to the loopback fake Hub (``tests/fake_hub.py``) goes online for that Hub only while it runs: ``FakeHub``
  switches huggingface_hub's offline flag off and back on, and ``hub.env`` gives child processes ``HF_HUB_OFFLINE=0``.
- Connections and name lookups to anything but loopback raise at once (:func:`refuse_the_network`), so a test that
  would wait on the network fails in milliseconds with a message naming the host.
- Nothing a developer machine has cached is read: the Hub cache (``HF_HOME``: models, and the CPU kernels that
  bitsandbytes would take from it) and our SVD cache (``SUBSPACE_PEFT_CACHE``) are empty folders of this run. The one
  thing shared across runs is the packaged SmolLM2 converted to safetensors (``models/`` of the user's cache, linked
  in): it is derived from the installed package alone, the same on every machine, and a fresh one converts it once.
"""

import atexit
import os
import shutil
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def isolate_caches() -> None:
    # subspace_peft.linalg.cache.cache_root(), read before anything imports huggingface_hub (which reads HF_HOME once)
    user_cache = os.environ.get("SUBSPACE_PEFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "subspace_peft"
    )
    models = os.path.join(user_cache, "models")
    os.makedirs(models, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="subspace-peft-tests-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.makedirs(os.path.join(scratch, "cache"))
    os.symlink(models, os.path.join(scratch, "cache", "models"))
    os.environ["SUBSPACE_PEFT_CACHE"] = os.path.join(scratch, "cache")
    os.environ["HF_HOME"] = os.path.join(scratch, "hf")
    os.environ["SUBSPACE_PEFT_TEST_SCRATCH"] = scratch


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
if os.environ.get("SUBSPACE_PEFT_TEST_SCRATCH") is None:  # once per run (pytest-xdist workers inherit it)
    isolate_caches()

_LOCAL_NAMES = {"localhost", "::1", "0.0.0.0", ""}


def is_local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    return host is None or host in _LOCAL_NAMES or str(host).startswith("127.")


class NetworkRefused(OSError):
    """A test reached for a host other than loopback."""


def refuse_the_network() -> None:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address):
        if isinstance(address, tuple) and not is_local(address[0]):
            raise NetworkRefused(f"tests may not reach the network (tests/conftest.py): {address[0]}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        check((host,))
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo


refuse_the_network()

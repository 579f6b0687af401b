"""Every test runs with the Hub off and without the network, whatever the machine has cached or can reach.

- ``HF_HUB_OFFLINE=1`` is set before anything imports huggingface_hub, so this process and every child process it
  starts make no Hub request (bitsandbytes' import-time kernel download on AVX512-BF16 CPUs included). A test that
  talks to the loopback fake Hub (``tests/fake_hub.py``) goes online for that Hub only while it runs: ``FakeHub``
  switches huggingface_hub's offline flag off and back on, and ``hub.env`` gives child processes ``HF_HUB_OFFLINE=0``.
- Connections and name lookups to anything but loopback raise at once (:func:`refuse_the_network`), so a test that
  would wait on the network fails in milliseconds with a message naming the host.
- ``SUBSPACE_PEFT_CACHE`` is left as it is: the converted packaged SmolLM2 lives there (converted once from the
  installed package, identical on every machine); tests that use the SVD cache give it their own folder.
"""

import os
import socket
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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

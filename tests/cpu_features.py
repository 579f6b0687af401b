"""Child-process code that fixes what bitsandbytes believes about the CPU, so that a test of what happens at
``import peft`` does not depend on the machine's instruction set.

bitsandbytes >= 0.50 decides at import (``bitsandbytes.backends.cpu.ops``) whether the CPU has AVX512-BF16, and on
such CPUs asks the Hub for a kernel. ``pretend_avx512_bf16(True)`` is source to run first in a child process: it makes
``bitsandbytes.functional.has_avx512bf16`` answer True (or False) as soon as that module is loaded, and records every
``kernels.get_kernel`` call in ``KERNEL_REQUESTS`` (a list in ``builtins``) so the test can see the download was tried.
"""

from __future__ import annotations


def pretend_avx512_bf16(value: bool) -> str:
    return f"""
import builtins, importlib.abc, importlib.util, sys
builtins.KERNEL_REQUESTS = []

class _PretendCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "kernels":
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            sys.meta_path.insert(0, self)
            if spec is not None:
                self._wrap(spec, lambda module: self._record(module))
            return spec
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        self._wrap(spec, lambda module: setattr(module, "has_avx512bf16", lambda: {bool(value)!r}))
        return spec

    @staticmethod
    def _wrap(spec, after):
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            after(module)
        spec.loader.exec_module = exec_module

    @staticmethod
    def _record(module):
        real = module.get_kernel
        def get_kernel(repo_id, *args, **kwargs):
            builtins.KERNEL_REQUESTS.append(repo_id)
            return real(repo_id, *args, **kwargs)
        module.get_kernel = get_kernel

sys.meta_path.insert(0, _PretendCpu())
"""

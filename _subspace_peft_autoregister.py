"""subspace-peft's methods registered with peft in every Python process, without ``import subspace_peft``.

subspace-peft installs ``subspace_peft-autoregister.pth`` into site-packages (setup.py); Python runs its one line at
start-up, which imports this module (any failure there is swallowed, so a broken install never breaks start-up). This
module imports nothing (``os`` and ``sys`` are loaded before site-packages are read): it puts a finder on
``sys.meta_path`` that waits for ``peft``. When a process imports peft (lm-eval, transformers' adapter loading, a
pipeline, a colleague's script), the finder lets peft's own module run, then imports ``subspace_peft``, which adds
PISSA, SVFIT, FLORA and EFFORT to peft's registry. A failure to do so (a partial install) is one warning; ``import
peft`` itself always completes. ``SUBSPACE_PEFT_AUTOREGISTER=0`` (read at start-up) turns the hook off.
"""

import os
import sys

ENV_VAR = "SUBSPACE_PEFT_AUTOREGISTER"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> None:
    """Import subspace_peft (which registers its methods with peft) unless it is already being imported."""
    if "subspace_peft" in sys.modules:  # `import subspace_peft` imported peft: it registers itself when it finishes
        return
    try:
        import subspace_peft  # noqa: F401
    except Exception as error:  # a broken or partial install: say so, leave peft usable
        import warnings

        warnings.warn(
            f"subspace-peft is installed but could not register its methods with peft ({type(error).__name__}: "
            f"{error}); adapters of type PISSA, SVFIT, FLORA and EFFORT will not load in this process. Fix: reinstall "
            f"subspace-peft, or set {ENV_VAR}=0 to stop this attempt",
            RuntimeWarning,
            stacklevel=2,
        )


class RegisterAfterPeft:
    """A meta-path finder that hands back peft's own spec, with its module's execution followed by :func:`register`.

    It stays on ``sys.meta_path`` until peft's module runs: a bare look-up (``importlib.util.find_spec("peft")``, as
    transformers' ``is_peft_available()`` does before any ``AutoModel*.from_pretrained``) asks it too and throws the
    spec away, so the import that follows must find it again."""

    def __init__(self):
        self.looking = False

    def find_spec(self, name, path=None, target=None):
        if name != "peft" or self.looking:
            return None
        from importlib.util import find_spec

        self.looking = True  # the look-up below reaches this finder again: it answers None, the finders after it peft
        try:
            spec = find_spec(name)
        finally:
            self.looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_peft = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            run_peft(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if enabled() and "peft" not in sys.modules and not any(isinstance(f, RegisterAfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterPeft())


install()

"""Packages whose ``__init__`` runs only when something asks it for a name: diffusers' model families,
transformers' model registry, and scipy.stats, scipy.integrate and scipy.optimize.

Importing ``diffusers.models.autoencoders.autoencoder_kl_wan`` first runs ``diffusers/models/autoencoders/
__init__.py``, which imports every autoencoder diffusers ships (~40); one of them imports
``diffusers.models.unets``, whose ``__init__`` imports every UNet, and through them ``diffusers.models.transformers``,
whose ``__init__`` imports every transformer model (and, through one of them, ``diffusers.hooks`` and peft where it
is installed). The Wan classes need none of that.

``defer(name)`` puts the package ``name`` into ``sys.modules`` as a module that has its ``__path__`` (so its
submodules import as usual) but has not run its ``__init__`` yet: the first lookup of a name the module does not
hold (``from diffusers.models.autoencoders import AutoencoderKL``, ``pkg.AutoencoderKL``, ``from pkg import *``)
runs it, once, and then answers as the package always would. A submodule imported before that is set on the
package as Python sets it, and the ``__init__``'s own imports of it find it in ``sys.modules``.

``transformers.models``' ``__init__`` builds transformers' registry of every model it ships by reading each
model's source files; the UMT5 encoder and its tokenizer import their own
packages without it. That ``__init__`` puts a lazy module in ``sys.modules`` in its own place: once it has run, the
deferred module answers through that one.

``scipy.stats`` and ``scipy.integrate``, where scipy is installed, come in through the same classes: their
single-file loader imports eight of diffusers' schedulers; several of those ``import scipy.stats`` for their beta
sigmas (``scipy.stats.beta.ppf``, called when a scheduler is configured with ``use_beta_sigmas``), and the LMS
scheduler takes ``from scipy import integrate`` for its coefficients (``integrate.quad`` in a step). scipy.stats
alone took 0.34 s of an eager import on the CPU machine (``benchmarks/probes/imports-cpu.json``); deferred, a
scheduler that uses one runs it then. scipy.optimize comes in through transformers' losses, which take one of its
functions by name at import (``STAND_INS``): it gets a stand-in that runs the ``__init__`` at its first call (or
scipy.stats runs it, which imports it). Left eager, it took 0.24 s more of ``import_libraries()`` on the CPU
machine (medians 2.90 against 2.67 s, five fresh processes each, ``benchmarks/probes/imports-cpu-optimize.json``).

``defer_packages()`` does this for ``DEFERRED_PACKAGES`` before diffusers' model classes are first imported
(``timeline.import_libraries``); ``ARTIFEX_LAZY_IMPORTS=off`` turns it off. A package already imported, one that
is not installed, or one that is not a plain source package here, is left as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

from artifex.env import switch

DIFFUSERS_PACKAGES = ("diffusers.models.autoencoders", "diffusers.models.unets", "diffusers.models.transformers")
DEFERRED_PACKAGES = (*DIFFUSERS_PACKAGES, "transformers.models", "scipy.stats", "scipy.integrate", "scipy.optimize")
# Functions a deferred package hands out without running its ``__init__``: a stand-in that runs it at its first call
# and calls the real one. transformers' model-loading module imports every loss it ships, and six object-detection
# losses take ``from scipy.optimize import linear_sum_assignment`` at import (for training only); scipy.optimize's
# __init__ brings scipy.linalg and scipy.sparse with it.
STAND_INS = {"scipy.optimize": ("linear_sum_assignment",)}


class _Deferred:
    """The state of one deferred package: its spec, whether its ``__init__`` ran, the lock its first run holds."""

    def __init__(self, module: types.ModuleType, spec):
        self.module, self.spec = module, spec
        self.lock = threading.RLock()  # another thread asking while the __init__ runs waits for it to end
        self.started = self.ran = False
        self.replacement: types.ModuleType | None = None  # what the __init__ put in sys.modules in its place

    def getattr(self, attr: str):
        if not self.ran:
            with self.lock:
                if not self.started:  # else: this thread's own __init__ asking: what it has defined so far
                    self.started = True
                    try:
                        self.spec.loader.exec_module(self.module)
                    finally:
                        self.ran = True
                        self._follow_replacement()
                        # kept where a replacement answers: the module itself may still be held (``import a.b``
                        # bound before the __init__ ran); else gone, unless the __init__ set one
                        if self.replacement is None and self.module.__dict__.get("__getattr__") == self.getattr:
                            del self.module.__dict__["__getattr__"]
        if self.replacement is not None:
            return getattr(self.replacement, attr)
        try:
            return self.module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {self.module.__name__!r} has no attribute {attr!r}") from None

    def stand_in(self, attr: str):
        """A function for the package's ``attr`` that runs the ``__init__`` (if nobody has) at its first call and
        from then on calls what the package defines under that name."""
        name = self.module.__name__

        def call(*args, **kwargs):
            real = self.getattr(attr)
            if real is call:
                raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            return real(*args, **kwargs)

        call.__name__ = call.__qualname__ = attr
        call.__module__ = name
        call.__doc__ = f"{name}.{attr}, its package imported at the first call (artifex.lazy_packages)"
        return call

    def _follow_replacement(self) -> None:
        """An ``__init__`` that replaces its module in ``sys.modules`` (transformers' lazy modules do) answers
        through the replacement from now on, and the parent package holds the replacement too."""
        name = self.module.__name__
        current = sys.modules.get(name)
        if current is None or current is self.module:
            return
        self.replacement = current
        parent, _, child = name.rpartition(".")
        if parent and parent in sys.modules:
            setattr(sys.modules[parent], child, current)


def is_deferred(name: str) -> bool:
    """Whether ``name`` is in ``sys.modules`` as a deferred package whose ``__init__`` has not run yet."""
    state = getattr(sys.modules.get(name), "__artifex_deferred__", None)
    return state is not None and not state.ran


def defer(name: str) -> bool:
    """Make package ``name`` deferred (module docstring). False (nothing changed) where it is imported already,
    cannot be found, or is not a package of source files with a loader that can run its ``__init__``."""
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)  # imports the parent packages
    except (ImportError, ValueError):
        return False
    if (spec is None or spec.submodule_search_locations is None or spec.loader is None
            or not hasattr(spec.loader, "exec_module") or name in sys.modules):
        return False
    module = importlib.util.module_from_spec(spec)
    state = _Deferred(module, spec)
    module.__artifex_deferred__ = state
    module.__getattr__ = state.getattr  # module-level __getattr__ (PEP 562): only for names not in the module
    for attr in STAND_INS.get(name, ()):
        setattr(module, attr, state.stand_in(attr))  # the __init__ binds the real one over it when it runs
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return True


def defer_packages() -> list[str]:
    """Defer ``DEFERRED_PACKAGES`` (unless ``ARTIFEX_LAZY_IMPORTS=off``): the ones now deferred."""
    if not switch("ARTIFEX_LAZY_IMPORTS"):
        return []
    return [name for name in DEFERRED_PACKAGES if defer(name)]


__all__ = ["DEFERRED_PACKAGES", "DIFFUSERS_PACKAGES", "STAND_INS", "defer", "defer_packages", "is_deferred"]

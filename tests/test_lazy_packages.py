"""Deferred package __init__s (artifex.lazy_packages): diffusers' model families, transformers' model registry and
three of scipy's packages import only what is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest

from artifex import lazy_packages


def _package(root, name: str, monkeypatch) -> list:
    """A package on the path whose __init__ counts its runs (the list returned, kept in builtins) and imports its
    submodule ``sub``; neither imported yet."""
    import builtins

    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        import builtins, time
        builtins.RUNS_{name}.append(1)
        time.sleep(0.05)  # long enough for a second thread to ask meanwhile
        from .sub import VALUE
        DOUBLE = VALUE * 2
        __all__ = ["DOUBLE", "VALUE"]
    """))
    (pkg / "sub.py").write_text("VALUE = 21\n")
    monkeypatch.syspath_prepend(str(root))
    runs: list = []
    monkeypatch.setattr(builtins, f"RUNS_{name}", runs, raising=False)
    for module in (name, f"{name}.sub"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return runs


def test_a_deferred_package_runs_its_init_once_on_the_first_name_asked(tmp_path, monkeypatch):
    runs = _package(tmp_path, "lzpkg_a", monkeypatch)
    assert lazy_packages.defer("lzpkg_a")
    assert lazy_packages.is_deferred("lzpkg_a")
    from lzpkg_a.sub import VALUE  # a submodule imports without the __init__

    assert VALUE == 21 and runs == []
    got = []
    threads = [threading.Thread(target=lambda: got.append(sys.modules["lzpkg_a"].DOUBLE)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [42] * 4 and runs == [1]  # four threads, one run
    assert not lazy_packages.is_deferred("lzpkg_a")
    import lzpkg_a

    assert lzpkg_a.sub.VALUE == 21 and lzpkg_a.__all__ == ["DOUBLE", "VALUE"]
    with pytest.raises(AttributeError, match="lzpkg_a.*no attribute 'MISSING'"):
        lzpkg_a.MISSING  # noqa: B018


def test_star_import_and_missing_names_run_the_init(tmp_path, monkeypatch):
    runs = _package(tmp_path, "lzpkg_b", monkeypatch)
    assert lazy_packages.defer("lzpkg_b")
    scope: dict = {}
    exec("from lzpkg_b import *", scope)
    assert scope["DOUBLE"] == 42 and runs == [1]


def test_a_stand_in_function_runs_the_init_at_its_first_call_and_calls_the_real_one(tmp_path, monkeypatch):
    runs = _package(tmp_path, "lzpkg_s", monkeypatch)
    (tmp_path / "lzpkg_s" / "__init__.py").write_text(
        "import builtins\nbuiltins.RUNS_lzpkg_s.append(1)\ndef double(x):\n    return 2 * x\n")
    monkeypatch.setitem(lazy_packages.STAND_INS, "lzpkg_s", ("double", "missing"))
    assert lazy_packages.defer("lzpkg_s")
    from lzpkg_s import double, missing  # as a module-level ``from pkg import f``: nothing runs yet

    assert runs == [] and lazy_packages.is_deferred("lzpkg_s")
    assert double(21) == 42 and runs == [1]
    assert double(5) == 10 and runs == [1]
    import lzpkg_s

    assert lzpkg_s.double is not double and lzpkg_s.double(4) == 8  # the package's own function now
    with pytest.raises(AttributeError, match="lzpkg_s.*no attribute 'missing'"):
        missing()


def test_a_package_that_replaces_itself_answers_through_its_replacement(tmp_path, monkeypatch):
    """transformers' package __init__s put a lazy module in sys.modules in their own place."""
    pkg = tmp_path / "lzpkg_r"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import sys, types
        class Lazy(types.ModuleType):
            def __getattr__(self, name):
                if name == "sub":
                    import importlib
                    return importlib.import_module(".sub", __name__)
                if name == "GREETING":
                    return "hello"
                raise AttributeError(name)
        lazy = Lazy(__name__)
        lazy.__path__ = __path__
        sys.modules[__name__] = lazy
    """))
    (pkg / "sub.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("lzpkg_r", "lzpkg_r.sub"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    assert lazy_packages.defer("lzpkg_r")
    deferred = sys.modules["lzpkg_r"]
    assert deferred.GREETING == "hello"  # the __init__ ran and its replacement answered
    replacement = sys.modules["lzpkg_r"]
    assert replacement is not deferred and type(replacement).__name__ == "Lazy"
    assert deferred.sub.VALUE == 7 and not lazy_packages.is_deferred("lzpkg_r")
    with pytest.raises(AttributeError):
        deferred.MISSING  # noqa: B018


def test_imported_missing_and_plain_modules_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "lzmod_plain.py").write_text("X = 1\n")
    assert not lazy_packages.defer("json")  # imported already
    assert not lazy_packages.defer("no_such_package_here")
    assert not lazy_packages.defer("lzmod_plain")  # a module, not a package
    assert "lzmod_plain" not in sys.modules and not lazy_packages.is_deferred("json")


CHILD = """
import json, sys
from artifex import timeline
timeline.import_libraries()
from artifex.lazy_packages import is_deferred
# a real checkpoint's text encoder and tokenizer, as the loader reads them: transformers' model registry
# (transformers.models' __init__, which reads every model's source files) is not needed for them
from artifex.models.loader import load_components
from artifex.models.registry import get_model
from pathlib import Path
components = load_components(get_model("tiny-ti2v"), Path(sys.argv[1]), "fp32")
out = {"transformers_models": is_deferred("transformers.models"),
       "encoder": type(components.text_encoder).__name__}
# before scipy.stats runs (it imports scipy.optimize)
out["optimize_deferred"] = is_deferred("scipy.optimize")
from transformers.loss import loss_for_object_detection as od  # its module-level linear_sum_assignment
rows, cols = od.linear_sum_assignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
out["assignment"] = [rows.tolist(), cols.tolist()]
out["optimize_after"] = is_deferred("scipy.optimize")
from transformers.models import bert  # a name asked of it: the __init__ runs and its lazy module answers
import transformers
out["bert"] = bert.BertModel is transformers.BertModel
out["transformers_models_after"] = is_deferred("transformers.models")
out["deferred"] = is_deferred("diffusers.models.autoencoders")
out["others_imported"] = "diffusers.models.autoencoders.autoencoder_kl" in sys.modules
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders import AutoencoderKL, AutoencoderKLWan as Wan  # runs the package's __init__
from diffusers.models.transformers import WanTransformer3DModel
import diffusers
out["same_class"] = Wan is AutoencoderKLWan and WanTransformer3DModel is diffusers.WanTransformer3DModel
out["after"] = is_deferred("diffusers.models.autoencoders")
out["kl"] = AutoencoderKL.__module__
out["scipy_deferred"] = [is_deferred("scipy.stats"), is_deferred("scipy.integrate")]
from diffusers import FlowMatchEulerDiscreteScheduler  # beta sigmas: scipy.stats.beta.ppf
sched = FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
sched.set_timesteps(4)
out["beta_sigmas"] = [round(float(s), 6) for s in sched.sigmas]
from diffusers.schedulers import scheduling_lms_discrete as lms  # ``from scipy import integrate``
out["quad"] = lms.integrate.quad(lambda x: x * x, 0.0, 1.0)[0]
out["scipy_after"] = [is_deferred("scipy.stats"), is_deferred("scipy.integrate")]
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["on", "off"])
def test_diffusers_model_families_import_only_what_is_asked_for(switch, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("ARTIFEX_LAZY_IMPORTS", switch)
    p = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint("tiny-ti2v"))], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    # transformers.models' __init__ waits through a whole load of the text encoder and tokenizer
    assert out["transformers_models"] is (switch == "on") and out["encoder"] == "UMT5EncoderModel"
    assert out["bert"] and out["transformers_models_after"] is False
    assert out["deferred"] is (switch == "on")
    assert out["others_imported"] is (switch == "off")  # on: the Wan VAE came without diffusers' other autoencoders
    assert out["same_class"] and out["after"] is False
    assert out["kl"] == "diffusers.models.autoencoders.autoencoder_kl"
    # scipy.stats and scipy.integrate (scipy is a test dependency: the GPU image has it) wait for the first
    # scheduler that uses them, which then gets what the eager import gives
    assert out["scipy_deferred"] == [switch == "on"] * 2 and out["scipy_after"] == [False, False]
    assert out["quad"] == pytest.approx(1 / 3)
    # scipy.optimize, which transformers' losses take a function of at import, waits for that function's first call
    assert out["optimize_deferred"] is (switch == "on") and out["optimize_after"] is False
    assert out["assignment"] == [[0, 1, 2], [1, 0, 2]]
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    sched.set_timesteps(4)
    assert out["beta_sigmas"] == [round(float(s), 6) for s in sched.sigmas]

"""Every name a subpackage advertises resolves (the lazy re-exports stay in sync with the modules)."""

import importlib

import pytest

import gradcond


@pytest.mark.parametrize("pkg", ["gradcond.probes", "gradcond.teleport", "gradcond.graph", "gradcond.zoo", "gradcond.data",
                                 "gradcond.train", "gradcond.monitor", "gradcond.experiments", "gradcond.report"])
def test_all_names_resolve(pkg):
    mod = importlib.import_module(pkg)
    for name in getattr(mod, "__all__", []):
        assert getattr(mod, name) is not None, f"{pkg}.{name}"


def test_version():
    assert isinstance(gradcond.__version__, str) and gradcond.__version__.count(".") == 2

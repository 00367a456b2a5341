"""Each module says what it offers: its public functions and classes are its ``__all__``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import mergesmith

MODULES = sorted(info.name for info in pkgutil.walk_packages(mergesmith.__path__, "mergesmith."))


@pytest.mark.parametrize("name", MODULES)
def test_public_names_are_the_modules_all(name: str) -> None:
    module = importlib.import_module(name)
    defined = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(v) or inspect.isclass(v))
        and getattr(v, "__module__", None) == name
    }
    listed = getattr(module, "__all__", None)
    if listed is None:
        assert not defined, f"{name} defines {sorted(defined)} but has no __all__"
        return
    assert defined <= set(listed), f"{name}: not in __all__: {sorted(defined - set(listed))}"
    assert all(hasattr(module, n) for n in listed), f"{name}: __all__ names what it lacks"

"""Light imports stay light: the package and the secure-aggregation protocol load without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["privfl", "privfl.errors", "privfl.protocols.secagg", "privfl.cli"])
def test_module_loads_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'opacus' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["False", "False"]


def test_public_names_resolve_on_first_use():
    import privfl

    for name in privfl.__all__:
        assert getattr(privfl, name) is not None
    assert privfl.Federation.__module__ == "privfl.federation"
    with pytest.raises(AttributeError):
        privfl.no_such_name  # noqa: B018

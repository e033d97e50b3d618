"""The layout of the mergescope.groups package: its public names and the layering of its modules."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

import mergescope.groups as groups

# Bottom to top: a module may import only from modules before it.
LAYERS = ("model", "ops", "values", "state", "handlers", "analyzer", "trace", "permute", "fold", "linear", "apply")
THIRD_PARTY = {"torch", "numpy", "xarray", "attrs"}
PACKAGE = pathlib.Path(groups.__file__).parent


def test_the_package_has_exactly_the_layered_modules():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted((*LAYERS, "__init__"))


def test_public_names_are_re_exported():
    # Every name of the former single module that core/, the plugins and the tests import.
    used = {"_eval_mode", "ROLES", "SUPPORTED", "group_layers", "example_input", "UnsupportedLayerError"}
    for name in (*groups.__all__, *used):
        assert hasattr(groups, name), name
    assert groups.__all__[:4] == ["Axis", "ChannelGroup", "UnsupportedLayerError", "EquivalenceError"]
    assert groups.align_to_reference.__module__ == "mergescope.groups.apply"
    from mergescope import activations

    assert activations._groups is groups


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_only_from_below_and_from_the_core_beneath(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    assert ast.get_docstring(tree), f"{module} has no module docstring"
    below = set(LAYERS[: LAYERS.index(module)])
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            assert node.module in below, f"{module} imports .{node.module}, which is not below it"
        elif isinstance(node, ast.ImportFrom) and node.level == 2:
            # Outside the package only the layers beneath groups (see docs/architecture.md).
            assert node.module in ("errors", "values"), f"{module} imports ..{node.module}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top = node.module.split(".")[0]
            assert top in THIRD_PARTY or top in sys.stdlib_module_names or top == "__future__", node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                assert top in THIRD_PARTY or top in sys.stdlib_module_names, alias.name


@pytest.mark.parametrize("module", ["values", "state", "handlers", "analyzer"])
def test_every_function_of_the_analyzer_says_what_it_does(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    missing = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not ast.get_docstring(node)
    ]
    assert missing == []

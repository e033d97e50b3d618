"""The documentation matches the code: every hook, kind, bundled component and command is documented."""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import pytest

from mergescope import hookspecs
from mergescope.cli import _parser
from mergescope.kinds import KINDS
from mergescope.testing import check_component

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PLUGINS_MD = (DOCS / "plugins.md").read_text(encoding="utf-8")
USER_GUIDE = (DOCS / "user-guide.md").read_text(encoding="utf-8")
ACTIVATIONS_MD = (DOCS / "activations.md").read_text(encoding="utf-8")

HOOKS = {
    name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")
}


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _sections(text: str) -> dict[str, str]:
    """``## `` heading text -> the section's body (up to the next ``## `` heading)."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {heading.strip(): body for heading, body in zip(parts[1::2], parts[2::2])}


SECTIONS = _sections(PLUGINS_MD)


def _hook_section(hook: str) -> str:
    matches = [body for heading, body in SECTIONS.items() if heading.startswith(f"{hook}(")]
    assert len(matches) == 1, f"docs/plugins.md needs exactly one '## {hook}(...)' heading, found {len(matches)}"
    return matches[0]


def _rendered_signature(kind) -> str:
    """``def name(self, a: T, ...) -> R`` as written in the protocol (annotations are strings)."""
    fn = getattr(kind.protocol, kind.method)
    sig = inspect.signature(fn)
    params = []
    for p in sig.parameters.values():
        text = p.name
        if p.annotation is not inspect.Parameter.empty:
            text += f": {p.annotation}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        params.append(text)
    out = f"def {kind.method}({', '.join(params)})"
    if sig.return_annotation is not inspect.Signature.empty:
        out += f" -> {sig.return_annotation}"
    return out


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("( ", "(").replace(" )", ")")).strip().rstrip(":").strip()


# (a) ------------------------------------------------------------------- hooks


def test_there_are_hooks():
    assert set(HOOKS) == {k.hook for k in KINDS.values()}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_a_heading_with_its_signature(hook):
    params = ", ".join(inspect.signature(HOOKS[hook]).parameters)
    headings = re.findall(rf"^## {hook}\((.*)\)\s*$", PLUGINS_MD, flags=re.M)
    assert headings, f"docs/plugins.md has no '## {hook}({params})' heading"
    assert headings == [params], f"docs/plugins.md documents {hook}({headings}), the hook is {hook}({params})"


def test_no_heading_documents_a_hook_that_does_not_exist():
    documented = re.findall(r"^## (register_\w+)\(", PLUGINS_MD, flags=re.M)
    assert sorted(documented) == sorted(HOOKS)


# (b) ------------------------------------------------------------ kind methods


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_documents_its_method_signature_under_its_hook(kind):
    spec = KINDS[kind]
    section = _hook_section(spec.hook)
    expected = _rendered_signature(spec)
    found = [_normalise(m) for m in re.findall(rf"def {spec.method}\((?:[^()]|\([^()]*\))*\)[^:\n]*", section)]
    assert found, f"the {spec.hook} section does not show def {spec.method}(...)"
    # The first one shown (before the example) is the protocol's signature, verbatim.
    assert found[0] == _normalise(expected), (
        f"the {spec.hook} section must first show the protocol's signature\n  {expected}\nfound\n  {found[0]}"
    )
    # At least the method and its parameter names, whatever the formatting.
    params = list(inspect.signature(getattr(spec.protocol, spec.method)).parameters)
    assert all(re.search(rf"\b{p}\b", found[0]) for p in params)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_hook_example_registers_a_conforming_component(kind):
    spec = KINDS[kind]
    blocks = [b for b in _python_blocks(_hook_section(spec.hook)) if "@hookimpl" in b]
    assert len(blocks) == 1, f"the {spec.hook} section needs one complete example with @hookimpl"
    namespace: dict = {"__name__": f"docs_example_{kind}"}
    # dont_inherit: the example must not pick up this file's `from __future__ import annotations`.
    exec(compile(blocks[0], f"docs/plugins.md ({spec.hook})", "exec", dont_inherit=True), namespace)
    registered: list = []
    namespace[spec.hook](register=registered.append)
    assert registered, f"the {spec.hook} example registers nothing"
    for cls in registered:
        assert callable(getattr(cls, spec.method, None))
        check_component(cls)


# (c) ------------------------------------------------------- bundled components


def test_every_bundled_component_is_in_the_user_guide():
    catalogue = tomllib.loads((ROOT / "registry.toml").read_text(encoding="utf-8"))["component"]
    assert catalogue
    missing = [c["name"] for c in catalogue if f"`{c['name']}`" not in USER_GUIDE]
    assert not missing, f"docs/user-guide.md does not mention the bundled components {missing}"


# (d) --------------------------------------------------------------------- CLI


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_there_are_subcommands():
    assert {"run", "demo", "plugins", "registry"} <= set(_subcommands())


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_subcommand_and_its_options_are_in_the_user_guide(command):
    assert f"mergescope {command}" in USER_GUIDE, f"docs/user-guide.md does not document `mergescope {command}`"
    options = [o for a in _subcommands()[command]._actions for o in a.option_strings if o.startswith("--")]
    missing = [o for o in options if o != "--help" and not re.search(rf"(?<![\w-]){o}\b", USER_GUIDE)]
    assert not missing, f"docs/user-guide.md does not document {missing} of `mergescope {command}`"


def test_global_flags_are_in_the_user_guide():
    flags = [o for a in _parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert flags
    missing = [f for f in flags if f"`{f}`" not in USER_GUIDE]
    assert not missing, f"docs/user-guide.md does not document {missing}"


# (e) ------------------------------------------------------------ activations


ACTIVATION_BLOCKS = _python_blocks(ACTIVATIONS_MD)


def test_activations_page_has_an_example():
    assert ACTIVATION_BLOCKS


@pytest.mark.parametrize("index", range(len(ACTIVATION_BLOCKS)))
def test_activations_code_blocks_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(ACTIVATION_BLOCKS[index], f"docs/activations.md block {index + 1}", "exec", dont_inherit=True)
    exec(code, {"__name__": f"docs_activations_{index}"})

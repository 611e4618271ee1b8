"""python/predprey_rs/_core.pyi must stay true: the same public names as the extension, the
same PackedMatrix members (properties as properties, methods as methods), the same parameter
names as the Rust signatures, and the same exception bases."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import predprey_rs
from predprey_rs import _core

STUB = Path(predprey_rs.__file__).with_name("_core.pyi")


def _public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


@pytest.fixture(scope="module")
def stub() -> ast.Module:
    assert STUB.is_file(), f"{STUB} is missing (is it included in the wheel?)"
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _top_level(tree: ast.Module) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            assert node.name not in out, f"{node.name} is defined twice in _core.pyi"
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
    return out


def test_py_typed_marker_exists():
    assert STUB.with_name("py.typed").is_file()


def test_stub_names_match_the_extension(stub):
    in_stub = _public(_top_level(stub))
    in_core = _public(dir(_core))
    assert in_stub - in_core == set(), "names in _core.pyi that the extension does not have"
    assert in_core - in_stub == set(), "extension names missing from _core.pyi"
    assert "__version__" in _top_level(stub)
    # __all__ spelled out in the stub equals the extension's.
    node = _top_level(stub)["__all__"]
    assert isinstance(node, ast.Assign)
    assert ast.literal_eval(node.value) == list(_core.__all__)


def test_stub_constants_have_the_runtime_types(stub):
    kinds = {"int": int, "str": str, "list": list}
    for name, node in _top_level(stub).items():
        if not isinstance(node, ast.AnnAssign):
            continue
        ann = ast.unparse(node.annotation)  # e.g. "Final[list[int]]"
        inner = ann.removeprefix("Final[").removesuffix("]").split("[")[0]
        assert isinstance(getattr(_core, name), kinds[inner]), f"{name}: stub says {ann}"


def test_stub_packed_matrix_members_match(stub):
    cls = _top_level(stub)["PackedMatrix"]
    assert isinstance(cls, ast.ClassDef)
    stub_props, stub_methods = set(), set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            if any(ast.unparse(d) == "property" for d in node.decorator_list):
                stub_props.add(node.name)
            else:
                stub_methods.add(node.name)
    rt = _core.PackedMatrix
    rt_props = {n for n in _public(dir(rt)) if inspect.isdatadescriptor(inspect.getattr_static(rt, n))}
    rt_methods = {n for n in _public(dir(rt)) if callable(inspect.getattr_static(rt, n))}
    assert _public(stub_props) == rt_props
    assert _public(stub_methods) == rt_methods


def _stub_params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def test_stub_signatures_match_the_extension(stub):
    checked = 0
    for name, node in _top_level(stub).items():
        if isinstance(node, ast.FunctionDef):
            sig = inspect.signature(getattr(_core, name))
            assert _stub_params(node) == list(sig.parameters), f"{name}{sig}"
            # Defaults: the same parameters have them.
            n_def = len(node.args.defaults)
            rt_def = [p for p in sig.parameters.values() if p.default is not inspect.Parameter.empty]
            assert n_def == len(rt_def), f"{name}: defaults differ from {sig}"
            checked += 1
    cls = _top_level(stub)["PackedMatrix"]
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and not node.decorator_list:
            sig = inspect.signature(getattr(_core.PackedMatrix, node.name))
            assert _stub_params(node) == list(sig.parameters), f"PackedMatrix.{node.name}{sig}"
            checked += 1
    assert checked >= 10


def test_stub_exception_bases_match(stub):
    for name, node in _top_level(stub).items():
        if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
            rt = getattr(_core, name)
            bases = [ast.unparse(b) for b in node.bases]
            assert bases == [b.__name__ for b in rt.__bases__], f"{name}: stub {bases}, runtime {rt.__bases__}"
            # The package re-exports the very same classes.
            assert getattr(predprey_rs, name) is rt


def test_every_stub_item_is_documented(stub):
    missing = []
    for name, node in _top_level(stub).items():
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is None:
            missing.append(name)
    cls = _top_level(stub)["PackedMatrix"]
    missing += [f"PackedMatrix.{n.name}" for n in cls.body if isinstance(n, ast.FunctionDef) and ast.get_docstring(n) is None]
    assert missing == []

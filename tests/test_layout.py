"""The test suite's own layout: test modules share code only through support modules, fixtures only
through tests/conftest.py.

A test module (tests/test_*.py) may import the support modules (tests/helpers.py, fakes.py,
builders.py, schemas.py, mqtt_broker.py, onnx_models.py) but never another test module, and never
a fixture: pytest hands fixtures to a test by name from conftest.py, so an import of one is dead
code kept alive with ``noqa``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(module: str) -> bool:
    """``tests.test_x``, or ``test_x`` (a relative or bare import of a sibling test module)."""
    return module.removeprefix("tests.").startswith("test_") and "." not in module.removeprefix("tests.")


def _imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement reads: ``from tests import test_a`` reads tests.test_a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level == 0 and base != "tests":
        return [base]
    # "from tests import x" and "from . import x" may name modules; "from .x import y" reads x
    return [base] if base and base != "tests" else [alias.name for alias in node.names]


def fixture_names(source: str) -> set[str]:
    """Functions in ``source`` decorated with pytest's fixture decorator (in any of its spellings)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in {"pytest.fixture", "fixture"}:
                    names.add(node.name)
    return names


def layout_problems(name: str, source: str, support: dict[str, str]) -> list[str]:
    """What is wrong with the imports of test module ``name``; ``support`` maps support module names
    (``tests.helpers``) to their source, to find fixtures imported from them."""
    problems = []
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        where = f"{name}:{node.lineno}"
        for module in _imported_modules(node):
            if _is_test_module(module):
                problems.append(f"{where}: imports the test module {module}; move what it shares to a support module")
            if module.removeprefix("tests.") == "conftest":
                problems.append(f"{where}: imports conftest; ask for its fixtures by name")
        if isinstance(node, ast.ImportFrom) and node.module in support:
            fixtures = fixture_names(support[node.module]) & {alias.name for alias in node.names}
            problems += [f"{where}: imports the fixture {f} from {node.module}; fixtures live in conftest.py"
                         for f in sorted(fixtures)]
        statement = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
        if any("noqa" in line for line in statement):
            problems.append(f"{where}: an import with noqa (a fixture import?); fixtures live in conftest.py")
    return problems


def _support_modules() -> dict[str, str]:
    return {f"tests.{path.stem}": path.read_text() for path in sorted(TESTS.glob("*.py"))
            if not path.name.startswith("test_") and path.name != "__init__.py"}


def test_no_test_module_imports_another_or_a_fixture() -> None:
    support = _support_modules()
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 20, modules  # the glob found the suite
    problems = [p for path in modules for p in layout_problems(path.name, path.read_text(), support)]
    assert problems == []


def test_fixtures_are_defined_only_in_conftest_or_the_module_using_them() -> None:
    """A support module defines no fixtures: shared ones are in conftest.py, others stay in their test module."""
    defined = {name: sorted(fixture_names(source)) for name, source in _support_modules().items()
               if name != "tests.conftest"}
    assert {name: fixtures for name, fixtures in defined.items() if fixtures} == {}
    assert {"pki", "broker"} <= fixture_names((TESTS / "conftest.py").read_text())


def test_the_scan_catches_each_kind_of_offence() -> None:
    """The scanner itself, on made-up modules."""
    support = {"tests.mqtt_broker": "import pytest\n\n@pytest.fixture(name='pki')\ndef pki_fixture():\n    pass\n",
               "tests.helpers": "def wait_for():\n    pass\n"}
    offending = (
        "from tests.test_gate import SPEED\n"
        "import tests.test_schemas\n"
        "from tests import test_commands\n"
        "from .test_sync import agent_config\n"
        "from tests.conftest import broker\n"
        "from tests.mqtt_broker import pki_fixture\n"
        "from tests.other import thing  # noqa: F401\n"
        "from tests.helpers import (  # noqa: F401\n    wait_for,\n)\n"
    )
    problems = layout_problems("test_x.py", offending, support)
    assert [p.split(": ", 1)[0] for p in problems] == [
        "test_x.py:1", "test_x.py:2", "test_x.py:3", "test_x.py:4", "test_x.py:5", "test_x.py:6", "test_x.py:7",
        "test_x.py:8"], problems
    assert "imports the fixture pki_fixture from tests.mqtt_broker" in problems[5]
    fine = "from tests.helpers import wait_for\nfrom tests import builders\nimport tests.mqtt_broker as mqtt_broker\n"
    assert layout_problems("test_y.py", fine, support) == []

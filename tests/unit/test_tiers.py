"""The tiers say what they are: tests/conftest.py marks every test under tests/integration (and nothing else)
``integration`` where pytest reads it, so ``-m "not integration"`` and ``-m integration`` split the suite by path.
Run on a small tree of its own with the real tests/conftest.py; ``make tiers`` checks the real tree."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

TREE = {
    "unit/test_u.py": "def test_u():\n    pass\n",
    "deploy/test_d.py": "def test_d():\n    pass\n",
    "integration/test_i.py": "def test_i1():\n    pass\n\ndef test_i2():\n    pass\n",
    "integration/deeper/test_deep.py": "def test_deep():\n    pass\n",
    "integrations_not/test_near.py": "def test_near():\n    pass\n",  # a name that only starts the same
}
INTEGRATION = {"integration/test_i.py::test_i1", "integration/test_i.py::test_i2",
               "integration/deeper/test_deep.py::test_deep"}
OTHERS = {"unit/test_u.py::test_u", "deploy/test_d.py::test_d", "integrations_not/test_near.py::test_near"}


def selected(pytester: pytest.Pytester, *args: str) -> set[str]:
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider", *args)
    return {line for line in result.outlines if "::" in line}


@pytest.fixture
def tree(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n"
                     "markers =\n    integration: the real CLI against the real broker\n")
    for path, text in TREE.items():
        target = pytester.path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return pytester


def test_not_integration_selects_everything_outside_tests_integration_and_nothing_in_it(tree: pytest.Pytester) -> None:
    assert selected(tree, "-m", "not integration") == OTHERS


def test_integration_selects_exactly_the_tests_under_tests_integration(tree: pytest.Pytester) -> None:
    assert selected(tree, "-m", "integration") == INTEGRATION


def test_without_a_marker_expression_every_test_is_collected(tree: pytest.Pytester) -> None:
    assert selected(tree) == INTEGRATION | OTHERS

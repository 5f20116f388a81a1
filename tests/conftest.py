"""The test tiers, set where pytest reads them, and what every tier's process shares.

Every test under tests/integration gets the ``integration`` marker here, at collection, by its path (a
``pytestmark`` in a conftest.py is not read by pytest). ``make unit`` runs ``-m "not integration"`` (tests/unit and
tests/deploy), ``make integration`` runs ``-m integration``; tests/unit/test_tiers.py checks both selections.

Hypothesis profiles: ``ci`` (the default: ``make test``, ``make integration``) keeps the example counts written
on each property; ``fast`` (``make unit`` sets ``HYPOTHESIS_PROFILE=fast``) runs at most ``FAST_EXAMPLES`` of the
same properties with the same assertions (``examples(n)`` for a property that names its own count).

Trust store: the tests talk HTTP and Kafka on loopback only. An HTTP client parses a whole CA bundle when it is
made (about 40 ms of CPU, and the unit tier makes some 240 of them); the tests trust the system's CA directory
instead (``SSL_CERT_DIR``: the same certificates, looked up when a handshake needs one). Relays, sandboxes and
tools started by the tests inherit it. A test that checks TLS brings its own CA, as the product's settings do."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from hypothesis import settings

pytest_plugins = ("pytester",)  # tests/unit/test_tiers.py runs pytest on a tree of its own

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
FAST_EXAMPLES = 25

os.environ.pop("SSL_CERT_FILE", None)
os.environ["SSL_CERT_DIR"] = ssl.get_default_verify_paths().openssl_capath


settings.register_profile("ci", settings.get_profile("default"))
settings.register_profile("fast", max_examples=FAST_EXAMPLES)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """A property's own example count (``@settings(max_examples=examples(n))``), capped in the fast profile: a
    test's explicit ``max_examples`` would otherwise win over the profile."""
    return min(n, FAST_EXAMPLES) if PROFILE == "fast" else n


def is_integration(path: Path) -> bool:
    """Whether a test file belongs to the integration tier: anything under tests/integration."""
    return path.resolve().is_relative_to(INTEGRATION_DIR)


@pytest.hookimpl(tryfirst=True)  # before the -m selection of pytest's own hook
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if is_integration(item.path):
            item.add_marker(pytest.mark.integration)

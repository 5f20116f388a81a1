"""The schema registry refusing the relay (Confluent Cloud's shape: HTTPS with an API key and secret) is named
by its cause, never taken for an answer about the schema id."""

from __future__ import annotations

import ssl
from typing import Any

import httpx
import pytest
from confluent_kafka.schema_registry.error import SchemaRegistryError

from processor.codec import _ask_registry
from processor.errors import RegistryUnavailable


def failing(exc: BaseException) -> Any:
    def call(*args: Any) -> Any:
        raise exc
    return call


@pytest.mark.parametrize(("status", "named"), [
    (401, "refused the credentials: schema_registry.client basic.auth.user.info"),
    (403, "may not read schemas"),
])
def test_a_refused_credential_is_named_not_a_missing_schema(status, named):
    with pytest.raises(RegistryUnavailable) as caught:
        _ask_registry(failing(SchemaRegistryError(status, status, "Unauthorized")), 7, 7)
    assert f"HTTP {status}" in str(caught.value) and named in str(caught.value)


def wrapped(cause: BaseException) -> httpx.ConnectError:
    """httpx's ConnectError as the registry client raises it, the ssl error a level down."""
    try:
        try:
            raise cause
        except ssl.SSLError as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as outer:
        return outer


def test_an_untrusted_registry_certificate_is_named_with_the_setting_that_fixes_it():
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    with pytest.raises(RegistryUnavailable) as caught:
        _ask_registry(failing(wrapped(verify)), 7, 7)
    assert "not signed by a CA the client trusts" in str(caught.value)
    assert "unable to get local issuer certificate" in str(caught.value) and "ssl.ca.location" in str(caught.value)


def test_other_transport_failures_keep_their_type():
    with pytest.raises(RegistryUnavailable) as caught:
        _ask_registry(failing(httpx.ConnectError("Connection refused")), 7, 7)
    assert str(caught.value) == "ConnectError fetching schema id 7"
    with pytest.raises(RegistryUnavailable) as caught:
        _ask_registry(failing(wrapped(ssl.SSLError(1, "WRONG_VERSION_NUMBER"))), 7, 7)
    assert "TLS handshake with the registry failed" in str(caught.value)

"""Codes vendors document as codes: ISO 4217 currencies, ISO 3166-1 alpha-2 countries, IETF (BCP 47)
language tags. Each normaliser returns the canonical form (``EUR``, ``GB``, ``en-GB``) or None when the
value is not such a code; what a vendor does with None (a default, a rejection naming the field, leaving
an optional field out) is the adapter's decision.

On the hot path an adapter first asks whether a value is in the module's set of canonical codes seen
so far (``CURRENCIES``, ``COUNTRIES``, ``LANGUAGES``): one ``in`` test, and the value goes out as it is.
Any other value goes through the normaliser, which remembers each spelling it has seen (so a lower-case
code costs one dict lookup after the first time). Sets and memories hold valid codes only and stop
growing at ``SEEN_MAX`` entries each (garbage is never cached). Only the form is checked, not membership
in the current ISO lists (which change).
"""

from __future__ import annotations

import re
from typing import Any

SEEN_MAX = 4096
CURRENCIES: set[str] = set()  # canonical codes seen so far: the hot path's one test
COUNTRIES: set[str] = set()
LANGUAGES: set[str] = set()
_CURRENCY_SPELLINGS: dict[Any, str] = {}  # any spelling seen -> its canonical code
_COUNTRY_SPELLINGS: dict[Any, str] = {}
_LANGUAGE_SPELLINGS: dict[Any, str] = {}

_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*\Z")


def _letters(value: Any, n: int) -> str | None:
    if not isinstance(value, str):
        return None
    code = value.strip()
    if len(code) == n and code.isascii() and code.isalpha():
        return code.upper()
    return None


def _remember(spellings: dict[Any, str], canonical: set[str], value: Any, code: str | None) -> str | None:
    if code is not None and len(spellings) < SEEN_MAX:
        spellings[value] = code
        canonical.add(code)
    return code


def currency(value: Any) -> str | None:
    """An ISO 4217 code upper case (``eur`` -> ``EUR``), or None."""
    code = _CURRENCY_SPELLINGS.get(value)
    return code if code is not None else _remember(_CURRENCY_SPELLINGS, CURRENCIES, value, _letters(value, 3))


def country(value: Any) -> str | None:
    """An ISO 3166-1 alpha-2 code upper case (``gb`` -> ``GB``), or None."""
    code = _COUNTRY_SPELLINGS.get(value)
    return code if code is not None else _remember(_COUNTRY_SPELLINGS, COUNTRIES, value, _letters(value, 2))


def _language(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    tag = value.strip().replace("_", "-")
    if not _LANGUAGE_TAG.match(tag):
        return None
    # RFC 5646 2.1.1 casing: language lower, script title, region upper; from a singleton on, lower
    parts = tag.split("-")
    out = [parts[0].lower()]
    plain = True
    for part in parts[1:]:
        if len(part) == 1:
            plain = False
        if plain and len(part) == 2 and part.isalpha():
            out.append(part.upper())
        elif plain and len(part) == 4 and part.isalpha():
            out.append(part.title())
        else:
            out.append(part.lower())
    return "-".join(out)


def language(value: Any) -> str | None:
    """An IETF language tag in its conventional case (``en_gb`` -> ``en-GB``), or None."""
    code = _LANGUAGE_SPELLINGS.get(value)
    return code if code is not None else _remember(_LANGUAGE_SPELLINGS, LANGUAGES, value, _language(value))

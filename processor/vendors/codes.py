"""Codes vendors document as codes: ISO 4217 currencies, ISO 3166-1 alpha-2 countries, IETF (BCP 47)
language tags. Each normaliser returns the canonical form (``EUR``, ``GB``, ``en-GB``) or None when the
value is not such a code; what a vendor does with None (a default, a rejection naming the field, leaving
an optional field out) is the adapter's decision.

On the hot path an adapter looks a value up in the module's dicts first: a code already seen (in any
spelling) costs one dict lookup, and the canonical spelling is in the dict as soon as it has been seen.
The dicts only hold valid codes and stop growing at ``SEEN_MAX`` entries each (garbage is never cached).
Only the form is checked, not membership in the current ISO lists (which change).
"""

from __future__ import annotations

import re
from typing import Any

SEEN_MAX = 4096
CURRENCIES: dict[Any, str] = {}
COUNTRIES: dict[Any, str] = {}
LANGUAGES: dict[Any, str] = {}

_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*\Z")


def _letters(value: Any, n: int) -> str | None:
    if not isinstance(value, str):
        return None
    code = value.strip()
    if len(code) == n and code.isascii() and code.isalpha():
        return code.upper()
    return None


def _remember(seen: dict[Any, str], value: Any, code: str | None) -> str | None:
    if code is not None and len(seen) < SEEN_MAX:
        seen[value] = code
        seen[code] = code
    return code


def currency(value: Any) -> str | None:
    """An ISO 4217 code upper case (``eur`` -> ``EUR``), or None."""
    code = CURRENCIES.get(value)
    return code if code is not None else _remember(CURRENCIES, value, _letters(value, 3))


def country(value: Any) -> str | None:
    """An ISO 3166-1 alpha-2 code upper case (``gb`` -> ``GB``), or None."""
    code = COUNTRIES.get(value)
    return code if code is not None else _remember(COUNTRIES, value, _letters(value, 2))


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
    code = LANGUAGES.get(value)
    return code if code is not None else _remember(LANGUAGES, value, _language(value))

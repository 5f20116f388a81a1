"""Vendor adapters: one module per vendor, one line each in REGISTRY."""

from __future__ import annotations

import importlib
from typing import Any

from processor.vendors.base import Adapter

# name -> "module:Class"; imported only when configured, so a vendor costs nothing unless used.
REGISTRY: dict[str, str] = {
    "qubit": "processor.vendors.qubit:QubitAdapter",
    "quicklizard": "processor.vendors.quicklizard:QuickLizardAdapter",
    "convert": "processor.vendors.convert:ConvertAdapter",
    "tracardi": "processor.vendors.tracardi:TracardiAdapter",
    "convead": "processor.vendors.convead:ConveadAdapter",
}


def adapter_class(name: str) -> type[Adapter[Any, Any]]:
    try:
        module_name, _, attr = REGISTRY[name].partition(":")
    except KeyError:
        raise KeyError(f"unknown vendor {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]


__all__ = ["REGISTRY", "Adapter", "adapter_class"]

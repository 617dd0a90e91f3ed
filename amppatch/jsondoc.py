"""Helpers of the typed results (`AbTestResult`, `Learned`) that read and write JSON documents: each keeps
the keys it was read with, in their order, so a document read and written again is the same document."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null (tuples become lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def rest_of(doc: Mapping[str, Any], typed: tuple[str, ...]) -> dict[str, Any]:
    """The keys of `doc` that no typed field holds, in the document's order."""
    return {k: v for k, v in doc.items() if k not in typed}


def ordered(order: tuple[str, ...], typed: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """The object with the keys it was read with, in that order (typed values replace the read ones); a
    value built without a document (`order` empty) lists the typed keys, then the rest."""
    values = {**rest, **typed}
    order = order or tuple(values)
    return {k: values[k] for k in order if k in values}

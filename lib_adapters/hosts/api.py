"""REST routes: the builtin's `/sdapi/v1/loras` and `refresh-loras` (only when it is disabled) and our
`/sdapi/v1/adapters`, `/adapters/refresh`, `/adapters/inspect` (host-contract §9)."""

from __future__ import annotations

import os

from ..errors import AdapterError
from ..files import json_value
from .network import builtin_enabled
from .runtime import RUNTIME


def _http_error(status: int, detail: str):
    try:
        from fastapi import HTTPException
    except ImportError:
        return LookupError(detail)
    return HTTPException(status_code=status, detail=detail)


def list_items() -> list[dict]:
    """The builtin's /sdapi/v1/loras items (name, alias, path, metadata) plus type, rank and family."""
    from .. import cards

    RUNTIME.library.refresh()
    out = []
    for path in RUNTIME.library.paths():
        item = {"name": os.path.splitext(os.path.basename(path))[0], "alias": RUNTIME.library.alias(path),
                "path": path, "metadata": {}, "type": None, "rank": None, "family": "unknown"}
        meta = RUNTIME.library.metadata(path)
        item["metadata"] = {k: (_json_or_text(v)) for k, v in meta.items()}
        try:
            card = cards.read_card(path)
            item.update(type=card.type_label, rank=card.rank, family=card.family)
            if card.error:
                item["error"] = f"{path}: {card.error}"
        except (AdapterError, OSError) as e:
            item["error"] = str(e)
        out.append(item)
    return out


def _json_or_text(v):
    """A JSON-object metadata value parsed (bounded depth, finite numbers), anything else as its text."""
    if isinstance(v, str) and v[:1] == "{":
        try:
            return json_value(v)
        except ValueError:
            return v
    return v


def inspect(name: str) -> dict:
    try:
        path = RUNTIME.library.find(name)
        return RUNTIME.cache.get(path).summary()
    except AdapterError as e:
        raise _http_error(404, str(e)) from None


def add_routes(app) -> None:
    """Our routes on the host's FastAPI app."""
    def get_loras():
        return list_items()

    def post_refresh():
        RUNTIME.refresh()
        return None

    def get_inspect(name: str):
        return inspect(name)

    if not builtin_enabled():
        app.get("/sdapi/v1/loras")(get_loras)
        app.post("/sdapi/v1/refresh-loras")(post_refresh)
    app.get("/sdapi/v1/adapters")(get_loras)
    app.post("/sdapi/v1/adapters/refresh")(post_refresh)
    app.get("/sdapi/v1/adapters/inspect")(get_inspect)

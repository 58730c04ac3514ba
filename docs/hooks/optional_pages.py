"""MkDocs hook: nav entries listed in ``extra.optional_pages`` are dropped when their file is absent.

Pages that other work adds in its own time (e.g. ``limits.md``) can be in the nav before they exist without
breaking the strict build; any other nav entry whose file is missing still fails it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.optional_pages")


def _prune(items: list[Any], missing: set[str]) -> list[Any]:
    kept = []
    for item in items:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = _prune(value, missing)
                if not value:
                    continue
            elif isinstance(value, str) and value in missing:
                log.info("optional page %s is absent: left out of the nav", value)
                continue
            kept.append({title: value})
        elif isinstance(item, str) and item in missing:
            log.info("optional page %s is absent: left out of the nav", item)
        else:
            kept.append(item)
    return kept


def on_config(config: Any) -> Any:
    optional = config.extra.get("optional_pages", [])
    missing = {page for page in optional if not (Path(config.docs_dir) / page).is_file()}
    if missing and config.nav:
        config.nav = _prune(config.nav, missing)
    return config

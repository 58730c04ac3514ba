"""MkDocs hook: the API reference pages, generated at build time from the three services' own OpenAPI schemas.

For each service (aggregator, site, audit) the hook builds its FastAPI app with throwaway settings (nothing is
started: ``app.openapi()`` needs no lifespan), renders the schema as Markdown (every path and method with its
credential scope, parameters, request body, responses, then every component schema with its fields) and adds it
to the site as ``reference/api/<service>.md``, with the raw document as ``reference/api/<service>.openapi.json``.
Nothing generated is written into ``docs/``: the pages exist only in the built site, so they cannot drift from
the code. Offline: no CDN, no JavaScript renderer.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.openapi")

#: Service -> (title, what it is, the credential scope its main API needs).
SERVICES: dict[str, tuple[str, str, str]] = {
    "aggregator": ("Aggregator API", "the job API an operator calls: training jobs, their status, inference",
                   "operator"),
    "site": ("Site API", "what a hospital's site service answers: the aggregator's training calls (scope "
             "`aggregator`) and the audit service's calls (scope `audit`)", "aggregator"),
    "audit": ("Audit API", "the audit service an operator calls: audits of recorded runs, findings, reports",
              "operator"),
}
_ERROR_STATUSES_NOTE = "Every error answer is an `ErrorBody` `{code, message, detail}`."


def _apps(root: Path) -> dict[str, Any]:
    """The three FastAPI apps, built (not started) with settings over empty temporary folders."""
    from services.aggregator.app import create_app as aggregator_app
    from services.aggregator.settings import AggregatorSettings
    from services.audit.app import create_app as audit_app
    from services.audit.settings import AuditSettings
    from services.client_site.app import create_app as site_app
    from services.client_site.settings import SiteSettings

    token = "docs-build-token-0123456789abcdef"
    (root / "data").mkdir()
    (root / "site-token").write_text(token + "\n")
    registry = root / "sites.json"
    registry.write_text(json.dumps({"sites": [{"name": "t1", "url": "http://t1.invalid",
                                               "token_file": str(root / "site-token")}]}))
    return {
        "aggregator": aggregator_app(AggregatorSettings(data_dir=root / "data", state_dir=root / "agg",
                                                        sites=registry, auth_token=token)),
        "site": site_app(SiteSettings(site_id="t1", modalities="t1", data_dir=root / "data",
                                      state_dir=root / "site", auth_token=token)),
        "audit": audit_app(AuditSettings(transcripts_dir=root / "transcripts", auth_token=token)),
    }


def openapi_documents() -> dict[str, tuple[dict[str, Any], dict[tuple[str, str], str | None]]]:
    """``{service: (openapi document, {(METHOD, path): credential scope or None for public})}``; the scopes are
    the gate's own table (the ``routes`` the app's :class:`~splitunet.service.gate.GateMiddleware` enforces)."""
    from splitunet.service.gate import GateMiddleware

    with tempfile.TemporaryDirectory() as tmp:
        apps = _apps(Path(tmp))
        documents = {}
        for name, app in apps.items():
            gate = next(m for m in app.user_middleware if m.cls is GateMiddleware)
            scopes: dict[tuple[str, str], str | None] = {}
            for entry in gate.kwargs["routes"]:
                scope = None if entry.public or entry.scope is None else str(entry.scope.value)
                for method in getattr(entry.route, "methods", None) or ():
                    scopes[(method, entry.route.path)] = scope
            documents[name] = (app.openapi(), scopes)
    return documents


# ------------------------------------------------------------------------------------------------- rendering
def _anchor(schema: str) -> str:
    return "schema-" + schema.lower()


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict[str, Any]) -> str:
    """A short Markdown rendering of a JSON-schema type (links to component schemas)."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[`{name}`](#{_anchor(name)})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            parts = [_type(s) for s in schema[key]]
            return " or ".join(dict.fromkeys(parts))
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(_type(s) for s in schema["prefixItems"]) + "]"
        return f"array of {_type(schema.get('items', {}))}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"object of {_type(extra)}" if isinstance(extra, dict) and extra else "object"
    if kind is None:
        return "any"
    fmt = f" ({schema['format']})" if "format" in schema else ""
    return f"{kind}{fmt}"


def _constraints(schema: dict[str, Any]) -> str:
    names = {"minimum": "≥", "maximum": "≤", "exclusiveMinimum": ">", "exclusiveMaximum": "<",
             "minLength": "length ≥", "maxLength": "length ≤", "minItems": "items ≥", "maxItems": "items ≤",
             "pattern": "pattern"}
    found = [f"{label} `{schema[key]}`" for key, label in names.items() if key in schema]
    for option in schema.get("anyOf", []):
        found += [f"{label} `{option[key]}`" for key, label in names.items() if key in option]
    return ", ".join(found)


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(schema: dict[str, Any]) -> str:
    if "default" not in schema:
        return ""
    return f"`{json.dumps(schema['default'])}`"


def render(name: str, document: dict[str, Any], scopes: dict[tuple[str, str], str | None]) -> str:
    """The Markdown page of one service's OpenAPI ``document``."""
    title, what, _ = SERVICES[name]
    info = document.get("info", {})
    lines = [
        f"# {title}",
        "",
        f"Generated at build time from `{info.get('title')}` {info.get('version')}'s own OpenAPI schema "
        f"([{name}.openapi.json]({name}.openapi.json)): {what}. Do not edit: change the routes and schemas.",
        "",
        "Every call needs `Authorization: Bearer <token>` of the scope named below (public routes need none). "
        + _ERROR_STATUSES_NOTE,
        "",
        "## Endpoints",
        "",
    ]
    for path, operations in document.get("paths", {}).items():
        for method, op in operations.items():
            if method.upper() not in {"GET", "POST", "PUT", "DELETE", "PATCH"}:
                continue
            key = (method.upper(), path)
            if key not in scopes:  # the gate's table and the schema disagree: fail the (strict) build
                log.warning("%s: %s %s is in the OpenAPI schema but not in the gate's routes", name, *key)
            lines += _operation(method.upper(), path, op, scopes.get(key, "unknown"))
    schemas = document.get("components", {}).get("schemas", {})
    lines += ["## Schemas", ""]
    for schema_name in sorted(schemas):
        lines += _schema(schema_name, schemas[schema_name])
    return "\n".join(lines) + "\n"


def _operation(method: str, path: str, op: dict[str, Any], scope: str | None) -> list[str]:
    lines = [f"### `{method} {path}`", ""]
    summary = op.get("summary")
    description = op.get("description")
    lines += [f"*{summary}.* {' '.join((description or '').split())}".rstrip(), ""]
    lines += ["Credential: " + ("none (public)" if scope is None else f"scope `{scope}`"), ""]
    params = op.get("parameters", [])
    if params:
        lines += ["| parameter | in | type | required | constraints |", "|---|---|---|---|---|"]
        for p in params:
            schema = p.get("schema", {})
            required = "yes" if p.get("required") else "no"
            lines.append(f"| `{p['name']}` | {p['in']} | {_cell(_type(schema))} | {required} "
                         f"| {_cell(_constraints(schema))} |")
        lines.append("")
    body = op.get("requestBody")
    if body:
        for media, content in body.get("content", {}).items():
            lines += [f"Request body (`{media}`): {_type(content.get('schema', {}))}", ""]
    ok, errors = [], []
    for status, response in op.get("responses", {}).items():
        (ok if status.startswith("2") else errors).append((status, response))
    if ok:
        lines += ["| status | answer | body |", "|---|---|---|"]
        for status, response in ok:
            bodies = [f"`{media}`" + (f": {_type(c['schema'])}" if c.get("schema") else "")
                      for media, c in response.get("content", {}).items()]
            lines.append(f"| {status} | {_cell(response.get('description', ''))} | {_cell('; '.join(bodies))} |")
        lines.append("")
    if errors:
        described = "; ".join(f"{s} {_cell(r.get('description', ''))}" for s, r in errors)
        lines += [f"Errors: {described}.", ""]
    return lines


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name} {{#{_anchor(name)}}}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    if "enum" in schema:
        lines += ["Values: " + ", ".join(f"`{v}`" for v in schema["enum"]), ""]
        return lines
    properties = schema.get("properties", {})
    if not properties:
        lines += [f"Type: {_type(schema)}", ""]
        return lines
    required = set(schema.get("required", []))
    lines += ["| field | type | required | default | constraints | description |", "|---|---|---|---|---|---|"]
    for field, spec in properties.items():
        lines.append(f"| `{field}` | {_cell(_type(spec))} | {'yes' if field in required else ''} | "
                     f"{_cell(_default(spec))} | {_cell(_constraints(spec))} | {_cell(spec.get('description', ''))} |")
    if schema.get("additionalProperties") is False:
        lines += ["", "Other fields are refused (422)."]
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------- the hook
def on_files(files: Files, config: Any) -> Files:
    """Add the generated reference pages and the raw OpenAPI documents to the site's files."""
    for name, (document, scopes) in openapi_documents().items():
        files.append(File.generated(config, f"reference/api/{name}.md", content=render(name, document, scopes)))
        files.append(File.generated(config, f"reference/api/{name}.openapi.json",
                                    content=json.dumps(document, indent=2)))
        log.info("generated reference/api/%s.md from its OpenAPI schema (%d paths)", name,
                 len(document.get("paths", {})))
    return files

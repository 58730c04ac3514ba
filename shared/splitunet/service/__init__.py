"""The service kit: what the site, aggregator and audit services share, written once.

- ``settings``    :class:`ServiceSettings` base (host/port, log level, bearer tokens and secret files, body limit,
                  TLS / mutual TLS) and ``uvicorn_kwargs()``
- ``app``         ``create_service_app(...)``: lifespan-built runtime, auth on service routes, error bodies,
                  health, metrics, body-size limit, request logging
- ``errors``      the typed error body ``{code, message, detail}`` and ``install_error_handlers``
- ``auth``        bearer-token verification (constant-time, several tokens, token file re-read on change)
- ``metrics``     per-app Prometheus registry, standard HTTP metrics, ``/metrics``
- ``middleware``  pure ASGI middleware: body-size limit, request id + metrics + access log
- ``health``      ``/healthz`` and ``/readyz``
- ``deps``        ``Annotated`` dependency aliases (settings, runtime, metrics, bundle bodies)
- ``client``      :class:`PeerClient`, one reusable ``httpx.Client`` per peer service
- ``device``      the torch device a service runs on

Import the submodules directly (``from splitunet.service.app import create_service_app``); this package
imports nothing at import time.
"""

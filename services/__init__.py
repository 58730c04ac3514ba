"""Split-U-Net services: client_site, aggregator, audit (each a FastAPI app factory)."""

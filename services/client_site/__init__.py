"""The site service: one hospital's images (its modalities) and its encoder part of the Split-U-Net.

Run with ``uvicorn --factory services.client_site.app:create_app`` or ``splitunet serve site``; configure with
``SITE_...`` environment variables (see :class:`services.client_site.settings.SiteSettings`).
"""

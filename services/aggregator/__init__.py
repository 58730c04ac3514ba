"""The aggregator service: the labels, the server decoder and the job API that drives split training.

Run with ``uvicorn --factory services.aggregator.app:create_app`` or ``splitunet serve aggregator``; configure
with ``AGG_...`` environment variables (see :class:`services.aggregator.settings.AggregatorSettings`).
"""

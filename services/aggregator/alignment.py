"""Patient alignment before training: a private set intersection with every site, then the aligned list.

The aggregator runs one PSI session (:mod:`splitunet.psi`) with each site over its labelled case ids; the aligned
cohort is the intersection over all sites. Each site then receives the aligned list (a subset of its own ids)
and serves only those cases. No raw id outside the intersection crosses the network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from services.aggregator.site_client import SiteClient
from splitunet.psi import PsiClient

logger = logging.getLogger(__name__)


def psi_align(clients: Mapping[str, SiteClient], label_ids: Sequence[str]) -> list[str]:
    """Align ``label_ids`` with every site; return the aligned ids (sorted) after telling each site."""
    aligned = set(label_ids)
    sessions: dict[str, str] = {}
    for name, client in clients.items():
        session = PsiClient(label_ids)
        shared = session.intersect(client.psi(session.request()))
        logger.info("PSI with site %s: %d of %d labelled cases shared", name, len(shared), len(label_ids))
        aligned &= set(shared)
        sessions[name] = session.session
    result = sorted(aligned)
    if result:
        for name, client in clients.items():  # each alignment names that site's PSI session (the site checks it)
            client.set_alignment(result, sessions[name])
    return result

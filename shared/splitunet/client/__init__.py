"""The operator's typed Python client of a deployed federation: jobs on the aggregator, audits on the audit service.

    from splitunet.client import Federation

    with Federation.from_profile() as fed:           # ~/.config/splitunet/profiles.toml, or SPLITUNET_* variables
        job = fed.jobs.submit({"sites": ["t1", "flair"], "steps": 100})   # a dict or a FederationSpec
        print(job.wait().state)

Modules: :mod:`~splitunet.client.federation` (``Federation``), :mod:`~splitunet.client.jobs` (``Jobs``, ``Job``),
:mod:`~splitunet.client.audits` (``Audits``, ``Audit``), :mod:`~splitunet.client.profiles` (profiles and the
environment), :mod:`~splitunet.client.http` (the connection: timeouts, retries, TLS) and
:mod:`~splitunet.client.errors` (what a call raises). The ``splitunet jobs`` and ``splitunet audits`` commands are
built on it.
"""

from __future__ import annotations

from splitunet.client.errors import ServiceUnreachableError
from splitunet.client.federation import Federation
from splitunet.client.jobs import Job, Jobs
from splitunet.client.profiles import Profile, load_profile, resolve_profile

__all__ = ["Federation", "Job", "Jobs", "Profile", "ServiceUnreachableError", "load_profile", "resolve_profile"]

"""The security ledger: what the security tests tried against the services, summed up at the end of ``make test``.

Tests take the ``security`` fixture and record each hostile call with :meth:`SecurityLedger.refused` (which also
asserts that it *was* refused with a 4xx), and schemathesis runs with :meth:`SecurityLedger.fuzzed`; every
in-process service app the service tests start is read at its end (:meth:`SecurityLedger.observe_app`: its own
request counter by status), so "5xx seen" covers every response those apps gave. The numbers printed come only
from what ran in this session.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest


@dataclass
class SecurityLedger:
    """Counts per kind of hostile call (``unauthenticated``, ``wrong_scope``, ``bad_input``, ...)."""

    refused_by_kind: Counter = field(default_factory=Counter)
    fuzz_examples: int = 0
    fuzz_operations: int = 0
    server_errors: int = 0
    responses_observed: int = 0
    #: ``(service, credential) -> [examples, operations, 5xx]`` of the fuzzing
    fuzz_by: dict = field(default_factory=dict)

    def refused(self, kind: str, status: int, *, expected: int | tuple[int, ...] | None = None) -> None:
        """Record a hostile call answered with ``status``; assert it was refused (4xx, or ``expected``)."""
        if status >= 500:
            self.server_errors += 1
        wanted = (expected,) if isinstance(expected, int) else expected
        assert (status in wanted) if wanted else 400 <= status < 500, f"{kind}: answered {status}, want {wanted}"
        self.refused_by_kind[kind] += 1

    def blocked(self, kind: str) -> None:
        """Record a hostile action stopped without an HTTP answer of ours (a TLS handshake refused, a job that
        failed safely); the test asserts how."""
        self.refused_by_kind[kind] += 1

    def observe_app(self, app) -> None:
        """Add an app's responses (and its 5xx, but a ``/readyz`` 503 while starting) from its own metrics."""
        metrics = getattr(app.state, "metrics", None)
        if metrics is None:
            return
        for family in metrics.registry.collect():
            for sample in family.samples:
                if not sample.name.endswith("http_requests_total"):
                    continue
                status, route = int(sample.labels.get("status", 0)), sample.labels.get("route")
                self.responses_observed += int(sample.value)
                if status >= 500 and not (status == 503 and route == "/readyz"):
                    self.server_errors += int(sample.value)

    def fuzzed(self, examples: int, operations: int, server_errors: int, *, service: str = "?",
               credential: str = "?") -> None:
        self.fuzz_examples += examples
        self.fuzz_operations += operations
        self.server_errors += server_errors
        row = self.fuzz_by.setdefault((service, credential), [0, 0, 0])
        row[0] += examples
        row[1] += operations
        row[2] += server_errors


_KEY = pytest.StashKey[SecurityLedger]()
#: Kinds counted as unauthenticated / wrongly scoped calls in the summary; every other kind is a bad input.
UNAUTHENTICATED = frozenset({"unauthenticated", "revoked_token", "foreign_client_certificate",
                             "missing_client_certificate"})
WRONG_SCOPE = frozenset({"wrong_scope"})


def ledger_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = SecurityLedger()


@pytest.fixture
def security(request: pytest.FixtureRequest) -> SecurityLedger:
    """The session's :class:`SecurityLedger`."""
    return request.config.stash[_KEY]


def ledger_summary(terminalreporter, config: pytest.Config) -> None:
    ledger = config.stash.get(_KEY, None)
    if ledger is None or not (ledger.refused_by_kind or ledger.fuzz_examples):
        return
    kinds = ledger.refused_by_kind
    groups = {"unauthenticated calls refused": UNAUTHENTICATED, "wrongly scoped calls refused": WRONG_SCOPE}
    grouped = {title: sum(kinds[k] for k in members) for title, members in groups.items()}
    bad = {k: n for k, n in kinds.items() if k not in UNAUTHENTICATED | WRONG_SCOPE}
    write = terminalreporter.write_line
    terminalreporter.section("security summary")
    for title, count in grouped.items():
        write(f"{title + ':':<40} {count}")
    write(f"{'bad inputs / policy violations refused:':<40} {sum(bad.values())}")
    for kind, count in sorted(bad.items()):
        write(f"    {kind:<36} {count}")
    write(f"{'schemathesis examples run:':<40} {ledger.fuzz_examples} ({ledger.fuzz_operations} operations)")
    for (service, credential), (examples, operations, errors) in sorted(ledger.fuzz_by.items()):
        ops = f", {operations} operations" if operations else ""
        write(f"    {service:<11} {credential:<24} {examples:>6} examples{ops}, {errors} 5xx")
    write(f"{'5xx responses seen:':<40} {ledger.server_errors} "
          f"(of {ledger.responses_observed} responses of in-process services, and the fuzzing)")

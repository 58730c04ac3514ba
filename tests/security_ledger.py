"""The security ledger: what the security tests tried against the services, summed up at the end of ``make test``.

Tests take the ``security`` fixture and record each hostile call with :meth:`SecurityLedger.refused` (which also
asserts that it *was* refused with a 4xx), and schemathesis runs with :meth:`SecurityLedger.fuzzed`. Every
response recorded is also checked for 5xx. The numbers printed come only from what ran in this session.
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

    def refused(self, kind: str, status: int, *, expected: int | tuple[int, ...] | None = None) -> None:
        """Record a hostile call answered with ``status``; assert it was refused (4xx, or ``expected``)."""
        if status >= 500:
            self.server_errors += 1
        wanted = (expected,) if isinstance(expected, int) else expected
        assert (status in wanted) if wanted else 400 <= status < 500, f"{kind}: answered {status}, want {wanted}"
        self.refused_by_kind[kind] += 1

    def fuzzed(self, examples: int, operations: int, server_errors: int) -> None:
        self.fuzz_examples += examples
        self.fuzz_operations += operations
        self.server_errors += server_errors


_KEY = pytest.StashKey[SecurityLedger]()


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
    terminalreporter.section("security summary")
    terminalreporter.write_line(f"hostile calls refused: {sum(kinds.values())}")
    for kind, count in sorted(kinds.items()):
        terminalreporter.write_line(f"  {kind:<28} {count}")
    terminalreporter.write_line(
        f"schemathesis: {ledger.fuzz_examples} examples over {ledger.fuzz_operations} operations"
    )
    terminalreporter.write_line(f"5xx responses seen: {ledger.server_errors}")

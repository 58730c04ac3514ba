"""Privacy accounting of the DP defenses with Opacus's accountants (not hand-written).

Three figures are kept:

- **subsampled** epsilon: the Opacus accountant (RDP or PRV) over the training releases, each a Gaussian
  mechanism with noise multiplier ``z`` on a batch the aggregator's plan draws with sampling rate ``q``.
  Assumption: batches are treated as Poisson subsamples with ``q = P(a patient is in a batch)``; the plan
  actually draws ``B`` cases uniformly with replacement from ``N`` training cases, so ``q = 1 - (1 - 1/N)^B``
  (``~B/N``) and per-patient clipping bounds a patient's contribution by ``C`` however often it is drawn.
  Amplification holds against a party that does not know which patients a batch holds.
- **worst-patient** epsilon: the accountant with ``q = 1`` over the releases of the most released patient
  (training and evaluation), add/remove adjacency (sensitivity ``C``).
- **aggregator** epsilon: the same under replace-one adjacency (one patient's data swapped for another's:
  sensitivity ``2C``, so the accountant sees noise multiplier ``z / 2``). This is the figure against the
  aggregator, who plans the batches (no amplification) and sees every release, evaluation included.

Scope of every figure: **per release, given a fixed encoder**. It bounds what the noised releases reveal about a
patient given the function that produced them; it does not bound what that function (an encoder trained on raw
data, unless the site trains it with DP-SGD, :mod:`splitunet.defenses.dpsgd`) reveals. Several mechanisms that
release the same patient compose in one accountant: :func:`per_patient_epsilon`.

The state (Opacus history and release counts per patient) can be kept in a JSON file so a restart does not
reset the budget.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from splitunet.defenses.config import AccountantKind, Adjacency

logger = logging.getLogger(__name__)


def make_accountant(kind: AccountantKind):
    """A fresh Opacus accountant of ``kind`` (imported lazily: Opacus takes seconds to import)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if kind == AccountantKind.RDP else PRVAccountant()


def accountant_epsilon(kind: AccountantKind, history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of an Opacus accountant whose history is ``[(noise_multiplier, sample_rate, steps), ...]``."""
    history = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if not history:
        return 0.0
    accountant = make_accountant(kind)
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))


def sensitivity_factor(adjacency: Adjacency) -> float:
    """L2 sensitivity of a release clipped to ``C``, in units of ``C``: 1 (add/remove) or 2 (replace-one)."""
    return 2.0 if adjacency == Adjacency.REPLACE_ONE else 1.0


def per_patient_epsilon(
    kind: AccountantKind, mechanisms: Iterable[tuple[float, int]], delta: float, adjacency: Adjacency
) -> float:
    """Epsilon of one patient released by Gaussian mechanisms without subsampling (``q = 1``), composed in one
    Opacus accountant.

    ``mechanisms`` is ``[(noise_multiplier, releases), ...]``: ``releases`` times a release clipped to L2 norm
    ``C`` with noise std ``noise_multiplier * C`` (each mechanism its own ``C``). Under replace-one adjacency the
    sensitivity is ``2C``, which the accountant sees as the noise multiplier halved.
    """
    factor = sensitivity_factor(adjacency)
    return accountant_epsilon(kind, [(z / factor, 1.0, n) for z, n in mechanisms], delta)


class PrivacyLedger:
    """Releases of one DP defense and the epsilon they spent (thread-safe).

    Args:
        kind: the Opacus accountant.
        noise_multiplier: ``z`` of every release.
        delta: the target delta.
        path: optional JSON file that keeps the ledger across restarts. A ledger reloaded with another ``z`` keeps
            the earlier releases under their own ``z`` (``earlier``): a patient's epsilon composes both.
    """

    def __init__(self, kind: AccountantKind, noise_multiplier: float, delta: float, path: Path | None = None) -> None:
        self.kind = kind
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.path = path
        self.history: list[tuple[float, float, int]] = []
        self.releases: Counter[str] = Counter()
        self.earlier: dict[float, Counter[str]] = {}  # releases made with another noise multiplier
        self._per_profile: dict[tuple[tuple[tuple[float, int], ...], Adjacency], float] = {}
        self._cached: tuple[tuple, float] | None = None  # (history, epsilon)
        self._lock = threading.Lock()
        if path is not None and path.is_file():
            state = json.loads(path.read_text())
            self.history = [tuple(h) for h in state["history"]]
            self.earlier = {float(z): Counter(c) for z, c in (state.get("earlier") or {}).items()}
            stored_z = float(state.get("noise_multiplier", noise_multiplier))
            if stored_z == noise_multiplier:
                self.releases = Counter(state["releases"])
            else:
                self.earlier.setdefault(stored_z, Counter()).update(state["releases"])
            self.releases.update(self.earlier.pop(noise_multiplier, Counter()))
            logger.info("privacy ledger %s: %d training steps so far", path, self.steps)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def _with_step(self, q: float) -> list[tuple[float, float, int]]:
        history = list(self.history)
        if history and history[-1][:2] == (self.noise_multiplier, q):
            history[-1] = (self.noise_multiplier, q, history[-1][2] + 1)
        else:
            history.append((self.noise_multiplier, q, 1))
        return history

    def epsilon(self) -> float:
        """Subsampled epsilon of the training releases so far."""
        with self._lock:
            key = tuple(self.history)
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, accountant_epsilon(self.kind, self.history, self.delta))
            return self._cached[1]

    def profile_epsilon(self, profile: tuple[tuple[float, int], ...],
                        adjacency: Adjacency = Adjacency.ADD_REMOVE) -> float:
        """Epsilon of one patient released ``n`` times with noise multiplier ``z`` for each ``(z, n)`` of
        ``profile``, unsubsampled (cached)."""
        key = (profile, adjacency)
        if key not in self._per_profile:
            self._per_profile[key] = per_patient_epsilon(self.kind, profile, self.delta, adjacency)
        return self._per_profile[key]

    def epsilon_for_count(self, releases: int, adjacency: Adjacency = Adjacency.ADD_REMOVE) -> float:
        """Epsilon of ``releases`` unsubsampled releases of one patient at this ledger's ``z``."""
        return self.profile_epsilon(((self.noise_multiplier, releases),), adjacency)

    def profiles(self, extra: Iterable[str] = ()) -> dict[str, tuple[tuple[float, int], ...]]:
        """Every patient's ``((z, releases), ...)`` (earlier noise multipliers first); ``extra`` patients count one
        release more at this ledger's ``z`` (a preview)."""
        with self._lock:
            current = Counter(self.releases)
            earlier = {z: Counter(c) for z, c in self.earlier.items()}
        current.update(set(extra))
        patients = set(current).union(*earlier.values())
        return {p: tuple((z, c[p]) for z, c in sorted(earlier.items()) if c[p]) + ((self.noise_multiplier,
                                                                                    current[p]),)
                for p in patients}

    def most_releases(self) -> int:
        """Releases of the most released patient at this ledger's ``z`` (training and evaluation)."""
        with self._lock:
            return max(self.releases.values(), default=0)

    def counts(self) -> Counter[str]:
        """Releases per patient so far at this ledger's ``z`` (a copy)."""
        with self._lock:
            return Counter(self.releases)

    def worst_profile(self, adjacency: Adjacency = Adjacency.ADD_REMOVE,
                      extra: Iterable[str] = ()) -> tuple[tuple[tuple[float, int], ...], float]:
        """The releases ``((z, n), ...)`` of the patient with the largest epsilon, and that epsilon."""
        profiles = set(self.profiles(extra).values())
        if not profiles:
            return (), 0.0
        return max(((p, self.profile_epsilon(p, adjacency)) for p in profiles), key=lambda item: item[1])

    def worst_patient_epsilon(self, adjacency: Adjacency = Adjacency.ADD_REMOVE) -> float:
        return self.worst_profile(adjacency)[1]

    def preview(
        self, q: float | None, patients: Iterable[str], adjacency: Adjacency = Adjacency.ADD_REMOVE
    ) -> tuple[float, float]:
        """``(subsampled, worst-patient under adjacency)`` epsilon if a release of ``patients`` (training with rate
        ``q``, or evaluation when ``q`` is None) happened now; nothing is recorded."""
        with self._lock:
            history = self.history if q is None else self._with_step(q)
        return (accountant_epsilon(self.kind, history, self.delta),
                self.worst_profile(adjacency, extra=patients)[1])

    def record(self, q: float | None, patients: Iterable[str]) -> None:
        """Record one release (training with rate ``q``, or evaluation when ``q`` is None)."""
        with self._lock:
            if q is not None:
                self.history = self._with_step(q)
            self.releases.update(set(patients))
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"history": self.history, "releases": dict(self.releases),
                                           "noise_multiplier": self.noise_multiplier,
                                           "earlier": {str(z): dict(c) for z, c in self.earlier.items()}}))
                tmp.replace(self.path)

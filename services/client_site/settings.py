"""Settings of a site service: ``SITE_`` environment variables and mounted secret files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.client_site.policy import SitePolicy
from splitunet.config import MODALITIES, SplitUNetConfig
from splitunet.data.layout import OnBadCase, canonical_modality
from splitunet.defenses import SiteDefenseConfig
from splitunet.defenses.config import check_site_combination, load_defense_list
from splitunet.service.device import DeviceChoice
from splitunet.service.scopes import Scope
from splitunet.service.settings import ServiceSettings
from splitunet.signing import IdentityKey
from splitunet.transcript import TranscriptSettings
from splitunet.wire import DEFAULT_MAX_BYTES


class SiteTranscriptSettings(TranscriptSettings):
    """The site's own transcript: on unless the site turns it off (its audits and its gate read it)."""

    enabled: bool = True


class SiteSettings(ServiceSettings):
    """A site's configuration.

    Args:
        site_id: this site's name; the model configuration must contain a site of this name.
        modalities: the modalities this site holds (``t1,t1ce`` in the environment); its data folder must have them.
        data_dir: the site's BraTS-layout folder (only its modalities; other files are ignored).
        state_dir: where checkpoints are written.
        device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
        model: optional pinned model configuration (JSON in ``SITE_MODEL``); runs asking for another are refused.
        on_bad_case: ``raise`` (refuse to start on a bad case) or ``skip`` it (logged and counted).
        cache_cases: decoded cases kept in memory.
        torch_threads: intra-op threads of this process (``0``: torch's default).
        max_bundle_bytes: largest gradient bundle accepted and activation bundle produced.
        max_batch_voxels: most voxels (samples x spatial size) one forward may ask for (default 32 Mi voxels, e.g.
            4 patches of 128^3 or 256 slices of 240^2).
        max_forward_bytes: the memory bound of one forward, in bytes (default 4 GiB): voxels x the encoder's
            level-weighted channels x the measured bytes per voxel-channel, plus the weights
            (:mod:`splitunet.memory`); a forward, or a run's encoder, above it is refused (413 ``over_memory_bound``)
            before anything is allocated. docs/limits.md.
        audit_snapshot_every: keep the encoder weights of every n-th train step for the site's own audits (0: keep
            none; see :mod:`services.client_site.audit`); ``audit_keep_last``: also the last n train steps;
            ``audit_max_snapshots``: at most this many kept snapshots per run (oldest dropped).
        audit_grids: the site's own audits draw their reconstruction grids into ``state_dir/audit-grids`` (for the
            site's own eyes; lab mode collects them; nothing serves them).
        identity_key_file: the site's Ed25519 identity key (64 hex characters, a mounted secret): it signs the site's
            transcript heads and secure-sum key offers; its public key (``GET /v1/info``) is what peers and auditors
            pin. Default: ``state_dir/identity/ed25519.key``, created on first start.
        peer_keys: the identity keys of the sites this site accepts as secure-sum peers (``SITE_PEER_KEYS``: a
            YAML/JSON file ``keys: {t1: <64 hex>, ...}``, pinned out of band like the registry; read at each key
            agreement). Without it the site refuses secure sum: it could not tell a peer's key from the relay's.
        transcript: the site's own record of what it sent and received (``SITE_TRANSCRIPT__EVERY=10``, ...; on by
            default: the site's audits and the reconcile with the aggregator's record read it); a relative
            ``dir`` is under ``state_dir``.
        defenses: this site's defenses, applied in order to every forward (``SITE_DEFENSES``: a JSON list or the
            path of a YAML/JSON file; see :mod:`splitunet.defenses.config`).
        seed: ``SITE_SEED``: build encoders from this seed (reproducible tests and studies). Default: from the
            site's own secret randomness; the aggregator never chooses it (with the seed it could rebuild the
            encoder and invert the activations).
        policy: what the site accepts (``SITE_POLICY__MIN_CUT_LEVEL=1`` ...; see :mod:`services.client_site.policy`).
        run_idle_s: a run with no step for this long may make room for a new run; a run that is training is
            never evicted (the new run is refused with 409).
        checkpoint_budget_bytes: most bytes of checkpoints under ``state_dir``; a checkpoint beyond it is refused.
        require_secure_sum: refuse forwards of runs without secure-sum masking (see :mod:`splitunet.secure_sum`).
    """

    model_config = SettingsConfigDict(env_prefix="SITE_")
    #: The aggregator calls a site's API (its training endpoints); the audit routes take scope ``audit``.
    primary_scope: ClassVar[Scope] = Scope.AGGREGATOR

    port: int = Field(default=8101, ge=0, le=65535)
    site_id: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
    modalities: Annotated[tuple[str, ...], NoDecode]
    data_dir: Path
    state_dir: Path = Path("site-state")
    device: DeviceChoice = DeviceChoice.AUTO
    model: SplitUNetConfig | None = None
    on_bad_case: OnBadCase = OnBadCase.RAISE
    cache_cases: int = Field(default=64, ge=1)
    torch_threads: int = Field(default=0, ge=0)
    max_bundle_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)
    max_batch_voxels: int = Field(default=32 * 2**20, gt=0)
    max_forward_bytes: int = Field(default=4 * 2**30, ge=2**20)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    policy: SitePolicy = Field(default_factory=SitePolicy)
    run_idle_s: float = Field(default=600.0, gt=0)
    checkpoint_budget_bytes: int = Field(default=4 * 2**30, gt=0)

    def max_tensor_request_bytes(self) -> int:
        """Body limit of the tensor endpoint (backward): fp32 gradients of at most ``max_batch_voxels`` voxels at
        every level the policy lets the site send (``policy.max_width`` channels, a level's voxels shrinking at
        least 4x per level), plus framing; never above ``max_bundle_bytes``."""
        derived = 4 * self.max_batch_voxels * self.policy.max_width * 4 // 3 + 2**16
        return min(derived, self.max_bundle_bytes)
    defenses: Annotated[tuple[SiteDefenseConfig, ...], NoDecode] = ()
    require_secure_sum: bool = False

    @field_validator("defenses", mode="before")
    @classmethod
    def _load_defenses(cls, value: Any) -> Any:
        return load_defense_list(value)

    @field_validator("defenses")
    @classmethod
    def _defenses_hold_together(cls, value: Any) -> Any:
        return check_site_combination(value)
    audit_snapshot_every: int = Field(default=10, ge=0)
    audit_keep_last: int = Field(default=4, ge=1)
    audit_max_snapshots: int = Field(default=64, ge=1)
    audit_grids: bool = False
    identity_key_file: Path | None = None
    peer_keys: Path | None = None
    transcript: SiteTranscriptSettings = Field(default_factory=lambda: SiteTranscriptSettings())

    def identity(self) -> IdentityKey:
        """The site's identity key (created in the state folder on first use when no file is configured)."""
        if self.identity_key_file is not None:
            return IdentityKey.load(self.identity_key_file)
        return IdentityKey.load_or_create(self.state_dir / "identity" / "ed25519.key")

    def pinned_peers(self) -> dict[str, str]:
        """The pinned peer keys, read now (403 when none are configured: secure sum needs them)."""
        from splitunet.errors import PolicyError
        from splitunet.signing import load_pinned_keys

        if self.peer_keys is None:
            raise PolicyError(
                f"site {self.site_id} has no pinned peer keys (SITE_PEER_KEYS): it refuses secure sum, since it "
                "could not tell its peers' keys from keys the relay substituted",
                detail={"rule": "secure_sum_unpinned"})
        return load_pinned_keys(self.peer_keys)

    def transcript_settings(self) -> TranscriptSettings:
        """The transcript settings with ``dir`` resolved (a relative one is under ``state_dir``)."""
        folder = self.transcript.dir if self.transcript.dir.is_absolute() else self.state_dir / self.transcript.dir
        return self.transcript.model_copy(update={"dir": folder})

    @field_validator("modalities", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            mods = tuple(canonical_modality(v) for v in value)
        except ValueError as exc:
            raise ValueError(f"modalities: {exc}") from None
        if not mods:
            raise ValueError(f"modalities: a site must hold at least one of {list(MODALITIES)}")
        return mods

    @field_validator("data_dir")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"data_dir {str(value)!r} is not a folder; point SITE_DATA_DIR at the site's BraTS data")
        return value

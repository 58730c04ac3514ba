"""A party's Ed25519 identity key: it signs its transcript's chain heads and its secure-sum key offers.

Each party (a site, the aggregator) holds its own private key; its public key is pinned by whoever must recognise
it (the other sites for secure sum, an ethics board verifying transcripts) out of band, like the site registry.
Verifying needs only the public key (``cryptography``'s Ed25519; 32-byte keys written as 64 hex characters).

Key files: the private key file holds the 32-byte seed as 64 hex characters (a mounted secret, or created with
mode 0600 on first use by :meth:`IdentityKey.load_or_create`); a public key is its 64 hex characters, inline or
in a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from splitunet.errors import ConfigurationError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class IdentityKey:
    """A party's Ed25519 private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = private.public_key().public_bytes_raw().hex()

    @classmethod
    def generate(cls) -> IdentityKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_hex(cls, seed_hex: str) -> IdentityKey:
        seed_hex = seed_hex.strip().lower()
        if not _HEX64.match(seed_hex):
            raise ConfigurationError("an identity key file holds 64 hex characters (the Ed25519 seed)")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))

    @classmethod
    def load(cls, path: Path | str) -> IdentityKey:
        path = Path(path)
        if not path.is_file():
            raise ConfigurationError(f"no identity key file {str(path)!r}")
        return cls.from_hex(path.read_text())

    @classmethod
    def load_or_create(cls, path: Path | str) -> IdentityKey:
        """The key in ``path``; a new one written there (mode 0600) if the file does not exist."""
        path = Path(path)
        if path.is_file():
            return cls.load(path)
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.seed_hex() + "\n")
        return key

    def seed_hex(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption()).hex()

    def sign(self, message: bytes) -> str:
        """The Ed25519 signature of ``message`` (128 hex characters)."""
        return self._private.sign(message).hex()


def public_key(value: str | Path) -> str:
    """A public key given inline (64 hex characters) or as a file holding them; normalised to lower case."""
    text = str(value).strip()
    if not _HEX64.match(text.lower()) and Path(text).is_file():
        text = Path(text).read_text().strip()
    text = text.lower()
    if not _HEX64.match(text):
        raise ConfigurationError(f"a public key is 64 hex characters (or a file holding them); got {str(value)[:80]!r}")
    return text


def load_pinned_keys(path: Path | str, *, setting: str = "SITE_PEER_KEYS") -> dict[str, str]:
    """Pinned public keys from a YAML/JSON file: ``{"keys": {name: hex}}`` (or the mapping alone)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"{setting}: cannot read {str(path)!r}: {exc}") from None
    doc = doc.get("keys", doc) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items()):
        raise ConfigurationError(f"{setting}: {str(path)!r} must map names to public keys "
                                 "(keys: {t1: <64 hex>, ...})")
    return {name: public_key(value) for name, value in doc.items()}


def verify(public_hex: str, message: bytes, signature_hex: str) -> bool:
    """Whether ``signature_hex`` is ``public_hex``'s signature of ``message``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        return False
    return True

"""Domain exceptions of the Split-U-Net core, each with a stable machine-readable ``code``.

The service kit maps every :class:`SplitUNetError` to an HTTP error body ``{code, message, detail}`` in one
handler, using the class's ``status_code``; code outside the services just catches them.

Exception tree::

    SplitUNetError                 (500, "internal")
    ├── ConfigurationError         (422, "bad_configuration")   also a ValueError
    ├── DataError                  (422, "bad_data")            a BraTS case or file is unusable
    │   └── CaseNotFoundError      (404, "case_not_found")
    ├── WireFormatError            (400, "bad_bundle")          a tensor bundle fails decoding/validation
    │   └── BundleTooLargeError    (413, "bundle_too_large")
    ├── ResourceLimitError         (413, "over_memory_bound")   a request whose work would pass a memory bound
    ├── ProtocolError              (409, "out_of_order")        e.g. a backward without its forward
    ├── AuthError                  (401, "unauthorized")
    ├── PolicyError                (403, "policy_violation")    refused by the serving party's own policy
    ├── NotFoundError              (404, "not_found")
    ├── ConflictError              (409, "conflict")            e.g. a job is already running
    │   └── NotAlignedError        (409, "not_aligned")         a case outside the aligned cohort
    └── PeerError                  (502, "peer_failed")         a site or the aggregator failed to answer
"""

from __future__ import annotations

from typing import Any


class SplitUNetError(Exception):
    """Base class: a message for humans, a stable ``code`` and optional structured ``detail``."""

    code: str = "internal"
    status_code: int = 500

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_body(self) -> dict[str, Any]:
        """The typed error body ``{code, message, detail}`` sent by the services."""
        return {"code": self.code, "message": self.message, "detail": self.detail}


class ConfigurationError(SplitUNetError, ValueError):
    code = "bad_configuration"
    status_code = 422


class DataError(SplitUNetError):
    code = "bad_data"
    status_code = 422


class CaseNotFoundError(DataError):
    code = "case_not_found"
    status_code = 404


class WireFormatError(SplitUNetError):
    code = "bad_bundle"
    status_code = 400


class BundleTooLargeError(WireFormatError):
    code = "bundle_too_large"
    status_code = 413


class ResourceLimitError(SplitUNetError):
    """A request whose work would allocate more than the service's memory bound (:mod:`splitunet.memory`);
    refused before anything is allocated."""

    code = "over_memory_bound"
    status_code = 413


class ProtocolError(SplitUNetError):
    code = "out_of_order"
    status_code = 409


class AuthError(SplitUNetError):
    code = "unauthorized"
    status_code = 401


class PolicyError(SplitUNetError):
    """A request the serving party's policy refuses (a site's model, evaluation or privacy budget rules).

    ``detail`` names the rule (``{"rule": ..., ...}``) so the caller knows what to change.
    """

    code = "policy_violation"
    status_code = 403


class NotFoundError(SplitUNetError):
    code = "not_found"
    status_code = 404


class ConflictError(SplitUNetError):
    code = "conflict"
    status_code = 409


class NotAlignedError(ConflictError):
    code = "not_aligned"


class PeerError(SplitUNetError):
    code = "peer_failed"
    status_code = 502

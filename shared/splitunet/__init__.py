"""Split-U-Net: split learning on vertically partitioned multi-modal brain MRI.

Core package shared by the three services (site, aggregator, audit):

- ``splitunet.config``      model configuration (cut level, skip policy, fusion, widths)
- ``splitunet.networks``    the cuttable U-Net (site encoders, server decoder, fused model, baselines)
- ``splitunet.protocol``    the in-process step protocol that the REST services carry
- ``splitunet.planner``     per-cut bandwidth and parameter planner
- ``splitunet.training``    in-process training loop and validation
- ``splitunet.data``        BraTS loader, vertical partition, phantom cohort
- ``splitunet.psi``         private set intersection for patient alignment
- ``splitunet.wire``        the safetensors wire format for tensor bundles
- ``splitunet.service``     the service kit (app factory, settings, auth, errors, health, metrics)

Nothing heavy happens at import time.
"""

from __future__ import annotations

__version__ = "0.1.0"

"""Fusion of the sites' tensors of one level, when every site answered and when some did not.

A site is *absent* from a step or a prediction when the aggregator left it out (site dropout, a ``sites`` subset)
or it did not answer (``missing_site_policy: continue``, an inference timeout). Its tensors are then not there at
all; fusion of the ``n`` present sites out of ``K``, all ``B, C, *spatial``:

- ``mean``: the mean over the present sites (renormalised: ``sum / n``), so the fused scale does not depend on
  how many sites answered.
- ``sum``: the sum over the present sites times ``K / n`` (the same renormalisation: the decoder was built for the
  sum of ``K`` tensors). Secure sum refuses absent sites: its masks cancel only over the full set.
- ``concat``: ``B, K*C, *spatial`` with every site in its fixed slot; an absent site's slot holds its learned
  **absent embedding** (a ``C``-vector per site and level, broadcast over space, zero-initialised) when the
  decoder has one (``config.absent_embedding``), zeros otherwise.

Why an embedding rather than a presence mask for concatenation: a mask adds ``K`` input channels to the first
server convolution of every fused level, which changes the decoder's shapes whether or not a site is ever absent.
The embedding keeps every shape, so the full-set forward is exactly the model without it (tested against the fused
:class:`~splitunet.networks.SplitUNet`), a model trained without dropout still fuses an absent site (as zeros),
and each site's slot learns its own per-channel stand-in (HeMIS-style zero imputation is the special case of a
zero embedding, which is where training starts).

With every site present each rule is exactly today's fusion (``torch.cat``, ``sum``, ``mean`` in site order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from splitunet.config import Fusion


def absent_embeddings(sites: Sequence[str], levels: Mapping[int, int]) -> nn.ParameterDict:
    """Zero-initialised absent embeddings ``{"<site>__level<i>": (C_i,)}`` for ``levels = {level: C_i}``."""
    return nn.ParameterDict({
        embedding_key(site, level): nn.Parameter(torch.zeros(channels))
        for site in sites for level, channels in levels.items()
    })


def embedding_key(site: str, level: int) -> str:
    """Key of one site's absent embedding at ``level`` (``ParameterDict`` keys cannot contain dots)."""
    return f"{site}__level{level}"


def fuse_level(
    parts: Mapping[str, torch.Tensor],
    sites: Sequence[str],
    fusion: Fusion,
    *,
    level: int,
    embeddings: nn.ParameterDict | None = None,
) -> torch.Tensor:
    """Fuse the tensors ``parts`` (``{site: B, C, *spatial}``, a non-empty subset of ``sites``) of one level.

    ``sites`` is the model's full site list, in fusion order. Returns ``B, K*C, *spatial`` (concat) or
    ``B, C, *spatial`` (sum, mean). The caller checks that the present parts agree on their shape.
    """
    present = [s for s in sites if s in parts]
    if not present:
        raise ValueError("fusion needs at least one present site")
    if fusion == Fusion.CONCAT:
        reference = parts[present[0]]
        slots = [parts[s] if s in parts else _absent(reference, s, level, embeddings) for s in sites]
        return torch.cat(slots, dim=1)
    stacked = torch.stack([parts[s] for s in present], dim=0)
    if fusion == Fusion.MEAN:
        return stacked.mean(dim=0)
    total = stacked.sum(dim=0)
    return total if len(present) == len(sites) else total * (len(sites) / len(present))


def _absent(reference: torch.Tensor, site: str, level: int, embeddings: nn.ParameterDict | None) -> torch.Tensor:
    """The stand-in of an absent site: its embedding broadcast to ``reference``'s shape, or zeros."""
    if embeddings is None:
        return torch.zeros_like(reference)
    vector = embeddings[embedding_key(site, level)].to(reference.dtype)
    view = vector.view(1, -1, *([1] * (reference.ndim - 2)))
    return view.expand_as(reference)

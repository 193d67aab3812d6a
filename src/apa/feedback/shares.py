"""The report every simulated user gives on a batch of samples, in the oracle's vocabulary.

For k images: which user (if any) the classifier's top answer belongs to, and whether that
answer counts as confident (a recognisable image rather than noise). The shares are what the
alignment report plots: preferred, confident, and both.
"""

from __future__ import annotations

from typing import Sequence

import torch


def preference_report(preferred_user: torch.Tensor, confident: torch.Tensor, users: Sequence[str],
                      scores: torch.Tensor) -> dict:
    """preferred_user [k] int (−1: no user's), confident [k] bool, scores [k] -> JSON-ready shares.

    ``preferred_class_shares`` maps each user to its share among the preferred-and-confident
    images (all 0 when there are none), so a union user can see whether every member is served.
    """
    k = max(int(preferred_user.numel()), 1)
    preferred = preferred_user >= 0
    both = preferred & confident
    n_both = int(both.sum())
    return {"n": int(preferred_user.numel()), "users": list(users),
            "preferred_share": int(preferred.sum()) / k,
            "confident_share": int(confident.sum()) / k,
            "preferred_confident_share": n_both / k,
            "mean_score": float(scores.mean()) if scores.numel() else 0.0,
            "preferred_class_shares": {u: (int((preferred_user[both] == j).sum()) / n_both if n_both else 0.0)
                                       for j, u in enumerate(users)}}


def first_match(top: torch.Tensor, members: Sequence[Sequence[int]]) -> torch.Tensor:
    """For each top answer [k], the first user whose set holds it, else −1. -> [k] int64."""
    out = torch.full_like(top, -1)
    for j in reversed(range(len(members))):
        out[torch.isin(top, torch.as_tensor(list(members[j]), dtype=top.dtype))] = j
    return out

"""Projection heads mapping backbone features to the contrastive embedding."""

from torch import nn


def projection_head(
    in_dim: int, dim: int = 128, mlp: bool = True, hidden_dim: int | None = None
) -> nn.Module:
    """Linear head (MoCo v1) or Linear-ReLU-Linear (MoCo v2, hidden width defaults to in_dim).

    No L2 normalisation here: MoCo normalises, and the head stays a plain projection.
    """
    if not mlp:
        return nn.Linear(in_dim, dim)
    hidden = in_dim if hidden_dim is None else hidden_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

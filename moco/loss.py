"""InfoNCE: a (K+1)-way classification of the positive key among queued negatives."""

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(q: Tensor, k: Tensor, negatives: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Return (loss, logits) for queries q [N, C], positive keys k [N, C], negatives [C, K].

    The positive logit is column 0. Computed in float32 with autocast off: bf16 logits over a
    large queue lose the small differences the softmax at low temperature depends on.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, negatives = q.float(), k.float(), negatives.float()
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = q @ negatives
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels), logits

"""The MoCo dictionary: a FIFO queue of past keys, larger than any batch."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KeyQueue(nn.Module):
    """Fixed-size ring buffer of L2-normalised keys, stored as columns of `keys` [dim, K].

    Both the keys and the write pointer are buffers, so a checkpoint resumes the same dictionary.
    Keys are kept in float32 whatever precision produced them.
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(dim, size), dim=0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Overwrite the oldest keys with `keys` [B, dim], wrapping around the end of the queue."""
        batch = keys.shape[0]
        if batch > self.size:
            raise ValueError(
                f"cannot enqueue {batch} keys into a queue of size {self.size}: "
                "the queue must hold at least one (all-gathered) batch"
            )
        ptr = int(self.ptr)
        cols = keys.detach().to(self.keys.dtype).T
        head = min(batch, self.size - ptr)
        self.keys[:, ptr : ptr + head] = cols[:, :head]
        self.keys[:, : batch - head] = cols[:, head:]  # empty unless we wrapped
        self.ptr.fill_((ptr + batch) % self.size)

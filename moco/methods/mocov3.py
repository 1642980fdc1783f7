"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"), following facebookresearch/moco-v3's builder.py.

No queue: the negatives are the other keys of the global batch, gathered from every rank.
Per step, with f_q = predictor(projector(backbone)) and f_k its momentum copy without predictor:

    q1, q2 = f_q(x1), f_q(x2)
    k1, k2 = f_k(x1), f_k(x2)                    # no gradient; f_k <- EMA of f_q first
    loss = ctr(q1, k2) + ctr(q2, k1)
    ctr(q, k) = CE(norm(q) @ gather(norm(k)).T / T, arange(N) + N * rank) * 2T
"""

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moco.backbones import VIT_ARCHS, BackboneSpec
from moco.distributed import concat_all_gather, is_distributed, unwrap
from moco.lars import LARS, lars_param_groups
from moco.methods.base import Method, StepOutput
from moco.momentum import cosine_momentum, momentum_update


@dataclass(frozen=True)
class MoCoV3Config:
    """MoCo v3's own settings. The paper's ImageNet runs use mlp_dim 4096; the small default
    keeps CPU runs cheap. moco-v3 trains ResNets at temperature 1.0 and ViTs at 0.2."""

    temperature: float = 0.2
    momentum: float = 0.99  # at progress 0; rises to 1 on a half cosine
    dim: int = 256
    mlp_dim: int = 512
    optimizer: Literal["auto", "lars", "adamw"] = "auto"  # auto: LARS for ResNet, AdamW for ViT
    adamw_betas: tuple[float, float] = (0.9, 0.999)  # moco-v3 uses torch's AdamW defaults

    def __post_init__(self) -> None:
        if self.optimizer not in ("auto", "lars", "adamw"):
            raise ValueError(f"mocov3 optimizer: auto, lars or adamw, not {self.optimizer!r}")


def mlp(layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """moco-v3's MLP: bias-free Linear layers, BN + ReLU after each hidden one, and (last_bn)
    a BN without affine parameters on the output (SimCLR's design, gamma removed)."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == layers - 1 else hidden_dim
        blocks.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            blocks += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            blocks.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*blocks)


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, logits, labels): each local query against every rank's keys; its positive is its
    own key, at row offset N * rank of the gathered keys. Scaled by 2T as in the paper, which
    makes the gradient's size independent of T. Float32 with autocast off, like info_nce."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = concat_all_gather(F.normalize(k.float(), dim=1))
        logits = q @ k.T / temperature
        rank = dist.get_rank() if is_distributed() else 0
        n = q.shape[0]
        labels = torch.arange(n, device=q.device) + n * rank
        return F.cross_entropy(logits, labels) * (2 * temperature), logits, labels


class MoCoV3(Method):
    """Query encoder `backbone -> projector -> predictor` (encoder_q), momentum encoder
    `backbone -> projector` (encoder_k, EMA only). Projector: 3 layers for ViT, 2 for ResNet;
    predictor: 2 layers, its output BN only for ViT (as moco-v3's builder)."""

    name: ClassVar[str] = "mocov3"

    def __init__(self, spec: BackboneSpec, cfg: MoCoV3Config, *, world_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.world_size = world_size
        self.vit = spec.name in VIT_ARCHS
        backbone, feat_dim = spec.build()
        projector = mlp(3 if self.vit else 2, feat_dim, cfg.mlp_dim, cfg.dim, last_bn=True)
        predictor = mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim, last_bn=self.vit)
        self.encoder_q: nn.Module = nn.Sequential(
            OrderedDict(backbone=backbone, projector=projector, predictor=predictor)
        )
        self.encoder_k = nn.Sequential(
            OrderedDict(backbone=copy.deepcopy(backbone), projector=copy.deepcopy(projector))
        ).requires_grad_(False)
        self.momentum = cfg.momentum

    def on_step(self, progress: float) -> None:
        """m = 1 - (1 - m0) * (1 + cos(pi * progress)) / 2: m0 at the start, 1 at the end."""
        self.momentum = cosine_momentum(self.cfg.momentum, progress, 1)

    def epoch_metrics(self) -> dict[str, float]:
        return {"momentum": self.momentum}

    def momentum_update(self) -> None:
        """encoder_k <- m * encoder_k + (1 - m) * (query backbone + projector), parameters only:
        BN running statistics are each encoder's own, as in moco-v3."""
        q = unwrap(self.encoder_q)
        query = [*q.backbone.parameters(), *q.projector.parameters()]
        momentum_update(list(self.encoder_k.parameters()), query, self.momentum)

    def forward(self, view1: Tensor, view2: Tensor) -> StepOutput:
        """Symmetrised loss; updates the momentum encoder first (before this step's keys)."""
        q1, q2 = self.encoder_q(view1), self.encoder_q(view2)
        with torch.no_grad():
            self.momentum_update()
            k1, k2 = self.encoder_k(view1), self.encoder_k(view2)
        loss_12, logits, labels = contrastive_loss(q1, k2, self.cfg.temperature)
        loss_21, _, _ = contrastive_loss(q2, k1, self.cfg.temperature)
        return StepOutput(loss_12 + loss_21, logits, labels)

    def ddp_wrap(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Wrap the query encoder, the only part with gradients. On several GPUs BN becomes
        SyncBatchNorm first (both encoders, as moco-v3's main): the key encoder needs no shuffle
        BN when statistics span the global batch. CPU (gloo) has no SyncBatchNorm: BN stays
        per rank there. Converted once, whatever is wrapped later (torch.compile after DDP)."""
        on_cpu = next(self.parameters()).device.type == "cpu"
        synced = any(isinstance(m, nn.SyncBatchNorm) for m in self.modules())
        if self.world_size > 1 and not on_cpu and not synced:
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self.encoder_q = wrap(self.encoder_q)

    def optimizer(
        self, lr: float, weight_decay: float, sgd_momentum: float
    ) -> torch.optim.Optimizer:
        """LARS (ResNet) or AdamW (ViT) over the parameters that get gradients: neither the key
        encoder nor the frozen patch projection."""
        params = [p for p in self.parameters() if p.requires_grad]
        kind = self.cfg.optimizer
        if kind == "auto":
            kind = "adamw" if self.vit else "lars"
        if kind == "adamw":
            return torch.optim.AdamW(
                params, lr=lr, weight_decay=weight_decay, betas=self.cfg.adamw_betas
            )
        return LARS(
            lars_param_groups(params), lr=lr, weight_decay=weight_decay, momentum=sgd_momentum
        )

    def extra_state(self) -> dict[str, Tensor]:
        """Nothing: the momentum encoder is in state_dict(), the momentum is set per step."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"MoCo v3 keeps no extra state, the checkpoint has {sorted(state)}")

    def export_encoder(self) -> nn.Module:
        """A standalone copy of the query backbone (no heads, no DDP), in eval mode."""
        return copy.deepcopy(unwrap(self.encoder_q).backbone).eval()

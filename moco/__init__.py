"""MoCo v1/v2 core: encoders, key queue, InfoNCE, momentum update, shuffle BN, kNN monitor."""

from moco.augment import TwoCropsTransform, eval_transform, moco_v1_transform, moco_v2_transform
from moco.backbones import build_backbone
from moco.distributed import (
    SplitBatchNorm,
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    broadcast_module,
    concat_all_gather,
)
from moco.heads import projection_head
from moco.knn import extract_features, knn_accuracy, knn_predict
from moco.loss import info_nce
from moco.model import MoCo, MoCoOutput, unwrap
from moco.momentum import cosine_momentum, momentum_update
from moco.queue import KeyQueue
from moco.schedules import cosine_with_warmup, step_schedule

__all__ = [
    "KeyQueue",
    "MoCo",
    "MoCoOutput",
    "SplitBatchNorm",
    "TwoCropsTransform",
    "batch_shuffle_ddp",
    "batch_shuffle_single",
    "batch_unshuffle_ddp",
    "batch_unshuffle_single",
    "broadcast_module",
    "build_backbone",
    "concat_all_gather",
    "cosine_momentum",
    "cosine_with_warmup",
    "eval_transform",
    "extract_features",
    "info_nce",
    "knn_accuracy",
    "knn_predict",
    "moco_v1_transform",
    "moco_v2_transform",
    "momentum_update",
    "projection_head",
    "step_schedule",
    "unwrap",
]

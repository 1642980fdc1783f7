"""Self-supervised methods (moco.methods) and their common blocks: backbones, key queue, InfoNCE,
momentum update, shuffle BN, augmentations, kNN, lr schedules."""

from moco.augment import TwoCropsTransform, eval_transform, moco_v1_transform, moco_v2_transform
from moco.backbones import BackboneSpec, build_backbone
from moco.distributed import (
    SplitBatchNorm,
    batch_shuffle_ddp,
    batch_shuffle_single,
    batch_unshuffle_ddp,
    batch_unshuffle_single,
    broadcast_module,
    concat_all_gather,
    plain_state_dict,
    unwrap,
)
from moco.heads import projection_head
from moco.knn import extract_features, knn_accuracy, knn_predict, knn_predict_many, knn_top1
from moco.loss import info_nce
from moco.methods import METHODS, Method, MoCoV2, MoCoV2Config, StepOutput, build_method
from moco.momentum import cosine_momentum, momentum_update
from moco.queue import KeyQueue
from moco.schedules import cosine_with_warmup, step_schedule

__all__ = [
    "METHODS",
    "BackboneSpec",
    "KeyQueue",
    "Method",
    "MoCoV2",
    "MoCoV2Config",
    "SplitBatchNorm",
    "StepOutput",
    "TwoCropsTransform",
    "batch_shuffle_ddp",
    "batch_shuffle_single",
    "batch_unshuffle_ddp",
    "batch_unshuffle_single",
    "broadcast_module",
    "build_backbone",
    "build_method",
    "concat_all_gather",
    "cosine_momentum",
    "cosine_with_warmup",
    "eval_transform",
    "extract_features",
    "info_nce",
    "knn_accuracy",
    "knn_predict",
    "knn_predict_many",
    "knn_top1",
    "moco_v1_transform",
    "moco_v2_transform",
    "momentum_update",
    "plain_state_dict",
    "projection_head",
    "step_schedule",
    "unwrap",
]

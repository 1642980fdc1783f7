"""The one config: `params.yaml` loaded into typed, validated objects.

Every stage takes a `Params` object. Validation happens here, once, before any work starts,
so a bad value is refused with one line naming the key instead of failing an hour into a run.
DVC reads the same file for its stage `params:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")
SPACE_PREFIX = "tune.space."
EXTENDS_KEY = "extends"  # an overlay file: `extends: params.yaml`, then only what differs


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(_Section):
    source: str = "fashion-mnist"  # fashion-mnist | digits | a folder of images
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    shards_dir: str = "data/shards"
    shard_max_count: int = Field(10_000, ge=1)
    shard_max_bytes: int = Field(100_000_000, ge=1024)
    train_limit: int = Field(0, ge=0)  # 0 = every image; >0 caps a split (tests, demos)
    test_limit: int = Field(0, ge=0)
    max_pixels: int = Field(89_478_485, ge=1)  # decompression-bomb guard (PIL's default)
    min_shards: int = Field(8, ge=1)  # per split, so 2 ranks x 2 loader workers all get shards
    image_mode: Literal["auto", "L", "RGB"] = "auto"  # auto: grayscale sets stay 1-channel
    # A folder source is unlabelled unless asked: folder names are dates and cameras, not classes.
    labels: Literal["none", "folders"] = "none"  # folders = one class per first-level folder
    holdout_percent: float = Field(5.0, ge=0.0, lt=100.0)  # of a folder source, never trained on


class ModelParams(_Section):
    # ResNets (width, small_stem, stem_stride apply) or MoCo v3's ViTs (patch_size applies)
    backbone: Literal["resnet10", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"] = (
        "resnet18"
    )
    width: int = Field(16, ge=4)
    small_stem: bool = True  # 3x3 first conv, no max-pool (false: ImageNet's 7x7 stride 2 + pool)
    stem_stride: Literal[1, 2] = 1  # of the small stem; 2 halves the maps (28 -> 14 px), 4x cheaper
    in_channels: Literal[1, 3] = 1
    image_size: int = Field(28, ge=8)
    patch_size: int = Field(16, ge=1)  # ViT only: /16 on 224 px; 4 or 7 fits 28 px
    mean: list[float] = [0.286]
    std: list[float] = [0.353]

    @model_validator(mode="after")
    def _stats_match_channels(self) -> ModelParams:
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(
                f"model.mean: mean and std need {self.in_channels} value(s) each for "
                f"in_channels={self.in_channels}"
            )
        return self

    @model_validator(mode="after")
    def _patches_tile_the_image(self) -> ModelParams:
        if self.backbone.startswith("vit") and self.image_size % self.patch_size:
            raise ValueError(
                f"model.patch_size: {self.patch_size} px patches do not tile "
                f"model.image_size={self.image_size}; pick a divisor (e.g. 4 or 7 for 28 px)"
            )
        return self

    @model_validator(mode="after")
    def _stride_needs_small_stem(self) -> ModelParams:
        if self.stem_stride == 2 and not self.small_stem:
            raise ValueError(
                "model.stem_stride: 2 applies to the small stem only (small_stem: false is the "
                "ImageNet stem, always 7x7 stride 2 + max-pool)"
            )
        return self


class AugmentParams(_Section):
    """The two views every method trains on (and evaluate's alignment is measured on)."""

    recipe: Literal["v1", "v2"] = "v2"  # MoCo v1's or v2's augmentation
    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0)  # RandomResizedCrop's lower area bound


class MocoV2Params(_Section):
    """MoCo v2 (moco/methods/mocov2.py): a queue of negatives, shuffle BN, an MLP head."""

    name: Literal["mocov2"] = "mocov2"
    queue_size: int = Field(4096, ge=1)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    temperature: float = Field(0.1, gt=0.0)
    symmetric: bool = False
    bn_splits: int = Field(2, ge=1)  # single-process shuffle BN emulation (official CIFAR demo)
    dim: int = Field(128, ge=2)  # embedding size of the projection head
    mlp: bool = True  # v2's MLP head (false: v1's linear head)

    def keys_per_step(self, global_batch: int) -> int:
        """Keys enqueued per optimizer step, all ranks together (both views when symmetric)."""
        return global_batch * (2 if self.symmetric else 1)

    def check(self, train: TrainParams) -> None:
        keys = self.keys_per_step(train.global_batch)
        if self.queue_size < keys:
            raise ValueError(
                f"method.queue_size: {self.queue_size} is smaller than the keys enqueued per step "
                f"({keys} = train.batch_size x train.num_workers"
                f"{' x 2 (symmetric)' if self.symmetric else ''}); raise the queue or lower "
                "the batch"
            )


class MocoV3Params(_Section):
    """MoCo v3 (moco/methods/mocov3.py): no queue, the global batch's keys as negatives, a
    predictor MLP; LARS for ResNets, AdamW for ViTs."""

    name: Literal["mocov3"] = "mocov3"
    temperature: float = Field(0.2, gt=0.0)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)  # at the start; rises to 1 on a half cosine
    dim: int = Field(256, ge=2)
    mlp_dim: int = Field(512, ge=2)  # hidden width of projector and predictor (paper: 4096)
    optimizer: Literal["auto", "lars", "adamw"] = "auto"  # auto: LARS for ResNet, AdamW for ViT

    def check(self, train: TrainParams) -> None:
        """Nothing depends on the batch beyond what training itself checks."""


MethodParams = Annotated[MocoV2Params | MocoV3Params, Field(discriminator="name")]
METHOD_PARAMS: dict[str, type[MocoV2Params | MocoV3Params]] = {
    cls.model_fields["name"].default: cls for cls in (MocoV2Params, MocoV3Params)
}
# Where the keys of the old `moco:` section (and the head settings of `model:`) went.
_MOVED = {
    **{f"moco.{k}": f"method.{k}" for k in MocoV2Params.model_fields if k != "name"},
    "moco.augmentation": "augment.recipe",
    "moco.crop_min_scale": "augment.crop_min_scale",
    "model.dim": "method.dim",
    "model.mlp": "method.mlp",
}


def method_settings(method: MocoV2Params | MocoV3Params) -> dict[str, Any]:
    """The method's settings as its config dataclass takes them (moco.methods.build_method)."""
    return method.model_dump(exclude={"name"})


class TrainParams(_Section):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=2)  # per Ray worker
    lr: float = Field(0.06, gt=0.0)  # for a global batch of 256; scaled linearly
    weight_decay: float = Field(5e-4, ge=0.0)
    sgd_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    # auto: bf16 where the worker's CUDA device or CPU has it and a short probe of this model
    # finds it faster, else fp32 (pipeline/precision.py); fp32 | bf16 force it
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    num_workers: int = Field(2, ge=1)  # Ray Train workers (DDP ranks)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    use_gpu: bool = False
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per Ray worker
    # With loader_workers 0: each shard's images read from its stored decoded array (small
    # images, pipeline/shard.py) or decoded once, then kept in the worker up to this many MB
    # (0 = off: every epoch decodes the tars' PNGs). 28-px Fashion-MNIST: 24 MB a worker.
    decoded_cache_mb: int = Field(2048, ge=0)
    # On CUDA workers: the loader only reads each JPEG's bytes and the batch's JPEGs are decoded
    # on the GPU (nvJPEG), taking JPEG decoding, the loader's main cost at 224 px, off the CPUs
    # (other formats are still decoded by the loader, and decoded_cache_mb is off with it: leave
    # it false for small PNG shards). No effect on CPU workers.
    gpu_decode: bool = False
    system_metrics_seconds: float = Field(10.0, ge=0.0)  # MLflow system/node<k>/... (0 = off)
    shuffle_buffer: int = Field(2000, ge=0)
    checkpoint_every: int = Field(1, ge=1)  # epochs
    # Mid-epoch checkpoints (0 = off), so a lost worker costs minutes, not the epoch: every N
    # optimizer steps and/or every M minutes of training (rank 0's clock decides for all ranks).
    checkpoint_every_steps: int = Field(0, ge=0)
    checkpoint_every_minutes: float = Field(1.0, ge=0.0)
    max_failures: int = Field(1, ge=0)  # worker losses survived (each resumes from a checkpoint)
    storage_path: str = "runs/ray"  # Ray Train checkpoints (on a cluster: a shared mount)
    output_dir: str = "models/encoder"  # the final encoder + run.json (a DVC output)
    init_from: str = ""  # warm start: a checkpoint file or models:/moco-encoder@production
    seed: int = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers


class EvalParams(_Section):
    """The evaluate stage's suite (pipeline/evaluation/); every budget knob is here.

    Defaults keep the stage within ~3-4 minutes on 2 CPUs for Fashion-MNIST at width 16: the
    expensive protocols (supervised baselines, attacks, corruptions, t-SNE) run on fixed subsets.
    Empty lists and 0 turn a protocol off."""

    # The labelled set the labelled protocols run on, kept apart from the training stream:
    # "" = the source's own labelled train/test splits; fashion-mnist | digits | a folder with
    # train/ and test/ class folders. Sharded once into benchmark_dir and versioned there.
    benchmark: str = ""
    benchmark_dir: str = "data/benchmark"
    benchmark_train_limit: int = Field(0, ge=0)  # 0 = every image (built-in benchmarks)
    benchmark_test_limit: int = Field(0, ge=0)
    # Label-free metrics (RankMe, alignment, uniformity, agreement with production) on the first
    # N images of the held-out split (a folder's `holdout`, else `test`); 0 = off.
    label_free_samples: int = Field(2000, ge=0)
    agreement_k: int = Field(10, ge=1)  # neighbours compared with production's
    drift_samples: int = Field(500, ge=0)  # per side: data production saw vs new (0 = off)
    drift_permutations: int = Field(200, ge=1)  # for the MMD p-value
    knn_k: int = Field(200, ge=1)
    knn_t: float = Field(0.1, gt=0.0)
    knn_extra_k: list[Annotated[int, Field(ge=1)]] = [20]  # also reported as knn<k>_top1
    batch_size: int = Field(512, ge=1)
    monitor_bank: int = Field(5000, ge=0)  # per-epoch kNN monitor: train images as the bank
    monitor_queries: int = Field(1000, ge=0)  # ... and test images as queries (0 = off)
    metrics_file: str = "metrics.json"
    plots_dir: str = "eval_plots"
    features_dir: str = "runs/features"  # feature cache by model and data version ("" = off)
    seed: int = 0  # random-init reference, subsets, label noise, episodes, corruption noise
    probe_iters: int = Field(50, ge=1)  # full-batch L-BFGS iterations of the linear probe
    probe_weight_decay: float = Field(1e-4, ge=0.0)
    low_label_fractions: list[Annotated[float, Field(gt=0.0, le=1.0)]] = [0.01, 0.1]
    fewshot_ways: int = Field(5, ge=2)
    fewshot_shots: list[Annotated[int, Field(ge=1)]] = [1, 5]
    fewshot_queries: int = Field(15, ge=1)  # per class and episode
    fewshot_episodes: int = Field(200, ge=0)
    transfer_source: str = "digits"  # linear probe on another dataset ("" = off)
    transfer_shards_dir: str = "runs/shards-digits"  # sharded there on first use
    noise_rates: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = [0.2, 0.4]
    supervised_steps: int = Field(100, ge=0)  # supervised baseline budget (0 = no baseline)
    supervised_batch_size: int = Field(64, ge=2)
    supervised_lr: float = Field(2e-3, gt=0.0)  # Adam
    # noise rates the baseline is also trained at (each costs one more baseline)
    supervised_noise_rates: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = [0.4]
    robustness_subset: int = Field(300, ge=0)  # test images attacked / corrupted (0 = off)
    corruptions: list[Literal["gaussian_noise", "gaussian_blur", "contrast"]] = [
        "gaussian_noise",
        "gaussian_blur",
        "contrast",
    ]
    corruption_severities: list[Annotated[int, Field(ge=1, le=5)]] = [1, 3, 5]
    attack_eps: list[Annotated[float, Field(gt=0.0, le=1.0)]] = [0.01, 0.03, 0.1]
    pgd_steps: int = Field(5, ge=1)
    tsne_points: int = Field(1000, ge=0)  # test points in the t-SNE plot (0 = no plot)

    @model_validator(mode="after")
    def _fewshot_fits(self) -> EvalParams:
        if self.fewshot_episodes == 1:
            raise ValueError("eval.fewshot_episodes: a confidence interval needs 0 or >= 2")
        return self


class TrackingParams(_Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI, when set, wins
    experiment: str = "moco-pretrain"
    artifact_location: str = "mlartifacts"  # for local stores; a server uses its own


class RegistryParams(_Section):
    model_name: str = "moco-encoder"
    # Any encoder metric of the evaluate stage; label-free ones (rankme, alignment, uniformity)
    # gate a team with no labels. Lower-is-better metrics are judged so (keys.lower_is_better).
    primary_metric: str = "knn_top1"
    min_gain: float = Field(0.0, ge=0.0)
    # metric -> largest drop vs production that still passes, e.g. {linear_top1: 0.01}
    guards: dict[str, Annotated[float, Field(ge=0.0)]] = {}
    lock_timeout_s: float = Field(300.0, gt=0.0)  # wait for a concurrent promotion/rollback
    # false: a retrain whose data, benchmark, settings and code equal production's (or the last
    # candidate's) ends without training (pipeline/freshness.py); true: it always trains
    retrain_unchanged: bool = False


class AlertsParams(_Section):
    """Operating a schedule unattended (pipeline/automations.py): heartbeats, the automation
    that marks a run whose heartbeats stop Crashed, and where notifications go."""

    heartbeat_seconds: int = Field(60, ge=30)  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY; Prefect's floor
    crashed_after_heartbeats: int = Field(3, ge=2)  # missed periods before a run is marked Crashed
    webhook_url: str = ""  # JSON POST {subject, body, text} via a Prefect custom-webhook block
    slack_webhook_url: str = ""  # a Slack incoming webhook (Prefect's Slack Webhook block)
    block: str = ""  # an existing notification block, "<block-type-slug>/<name>"
    drift_p_value_below: float = Field(0.01, ge=0.0, le=1.0)  # drift alarm (0 = never)

    @model_validator(mode="after")
    def _targets_are_urls(self) -> AlertsParams:
        for key in ("webhook_url", "slack_webhook_url"):
            url = getattr(self, key)
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"alerts.{key}: {url!r} is not an http(s) URL")
        if self.block and self.block.count("/") != 1:
            raise ValueError(
                f"alerts.block: {self.block!r} should be <block-type-slug>/<name>, "
                "e.g. slack-webhook/team-alerts (see `prefect block ls`)"
            )
        return self


class RetentionParams(_Section):
    """What `mocopipe gc` and the end of every retrain delete (pipeline/gc.py): a year of daily
    retrains must not keep a year of checkpoints, feature caches and model files. Nothing that
    serves, served, or can be resumed is ever deleted."""

    enabled: bool = True  # the retrain flow applies the policy at its end (`mocopipe gc` anyway)
    # Ray Train runs under train.storage_path that keep their final checkpoint; the latest run
    # (latest-pretrain.json, what `pretrain --resume` continues) keeps all of its checkpoints
    checkpoint_runs: int = Field(3, ge=1)
    # feature caches under eval.features_dir kept besides production's, most recently used first
    # (the random-init reference's is used by every evaluation, so it stays)
    feature_caches: int = Field(3, ge=1)
    # a model version that never held @production/@previous loses its logged model files (and is
    # tagged `archived`) once this many newer versions exist; its run, metrics and tags stay
    unpromoted_versions: int = Field(5, ge=1)
    # `dvc gc` of the cache keeping the workspace and the dvc.lock of every promoted version ...
    dvc_cache: bool = True
    dvc_remote: bool = True  # ... and the same on the default DVC remote (`dvc gc --cloud`)


class Choice(_Section):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)

    def bounds(self) -> list[Any]:
        return self.values


class Range(_Section):
    """A continuous (uniform, loguniform) or integer (randint, lograndint; high exclusive) range."""

    type: Literal["uniform", "loguniform", "randint", "lograndint"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type.startswith("log") and self.low <= 0:
            raise ValueError(f"{self.type} needs low > 0 (got {self.low})")
        return self

    def bounds(self) -> list[Any]:
        if self.type.endswith("randint"):
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


Distribution = Annotated[Choice | Range, Field(discriminator="type")]


class TuneParams(_Section):
    """A Ray Tune sweep (pipeline/tune.py): each trial is a Ray Train run of `train` with the
    sampled values, stopped early by ASHA on the per-epoch metric."""

    name: str = ""  # folder under storage_path ("" = sweep-<date>-<time>); --resume continues it
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    search: Literal["random", "optuna"] = "random"
    metric: Literal["knn_top1", "loss"] = "knn_top1"  # per-epoch report; knn needs labels
    epochs: int = Field(2, ge=1)  # per trial (ASHA's max_t); the best config keeps train.epochs
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1.0)
    workers_per_trial: int = Field(2, ge=1)  # Ray Train workers (DDP ranks) in each trial
    cpus_per_worker: float = Field(0.9, gt=0.0)
    gpus_per_worker: Literal[0, 1] = 0
    trial_cpus: float = Field(0.1, gt=0.0)  # the trial's own driver (it fits a TorchTrainer)
    storage_path: str = "runs/tune"
    best_params_file: str = "tune/best.yaml"
    seed: int = 0
    space: dict[str, Distribution] = {
        "method.temperature": Range(type="loguniform", low=0.05, high=0.5),
        "method.momentum": Choice(type="choice", values=[0.99, 0.995, 0.999]),
        "method.queue_size": Choice(type="choice", values=[1024, 4096, 16384]),
        "train.lr": Range(type="loguniform", low=0.01, high=0.2),
    }

    @model_validator(mode="after")
    def _grace_within_epochs(self) -> TuneParams:
        if self.grace_period > self.epochs:
            raise ValueError(
                f"tune.grace_period: {self.grace_period} epochs is more than a trial runs "
                f"(tune.epochs={self.epochs}); lower it"
            )
        return self

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric == "loss" else "max"

    def trial_overrides(self) -> dict[str, Any]:
        """What every trial changes besides the sampled values: its schedule and resources."""
        return {
            "train.epochs": self.epochs,
            "train.num_workers": self.workers_per_trial,
            "train.cpus_per_worker": self.cpus_per_worker,
            "train.use_gpu": self.gpus_per_worker > 0,
        }


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    method: MethodParams = MocoV2Params()
    augment: AugmentParams = AugmentParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    registry: RegistryParams = RegistryParams()
    tune: TuneParams = TuneParams()
    alerts: AlertsParams = AlertsParams()
    retention: RetentionParams = RetentionParams()

    @model_validator(mode="before")
    @classmethod
    def _old_keys_moved(cls, data: Any) -> Any:
        """Refuse the pre-seam `moco:` section (and model.dim / model.mlp) with where each key
        went; a `method:` without a name is MoCo v2's."""
        if not isinstance(data, dict):
            return data
        old = [f"moco.{k}" for k in data.get("moco") or {}] if "moco" in data else []
        old += [f"model.{k}" for k in ("dim", "mlp") if k in (data.get("model") or {})]
        if old:
            moved = ", ".join(f"{k} -> {_MOVED.get(k, 'gone')}" for k in old) or "it is empty"
            section = "moco" if "moco" in data else old[0]
            raise ValueError(
                f"{section}: moved to the method: section: {moved} (with method.name: mocov2); "
                "rename the keys (see params.yaml)"
            )
        if isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = data | {"method": {"name": "mocov2", **data["method"]}}
        return data

    @model_validator(mode="after")
    def _method_fits_training(self) -> Params:
        self.method.check(self.train)
        return self

    @model_validator(mode="after")
    def _space_is_valid(self) -> Params:
        """Every bound of the sweep must make a valid trial config, so a sweep cannot fail
        on its 7th sample: each key names a setting and each extreme passes validation."""
        for key, distribution in self.tune.space.items():
            for value in distribution.bounds():
                for names in _space_methods(self.tune.space, key, self.method.name):
                    try:
                        with_overrides(self, self.tune.trial_overrides() | names | {key: value})
                    except ConfigError as error:
                        raise ValueError(
                            f"tune.space.{key}: the bound {value!r} makes an invalid trial "
                            f"({error})"
                        ) from None
        return self

    def to_flat_dict(self) -> dict[str, Any]:
        """Dotted keys, for MLflow params and readable logs."""
        return dict(_flatten(self.model_dump()))


def _space_methods(space: dict[str, Any], key: str, current: str) -> list[dict[str, str]]:
    """The method choices a sweep key is checked under: each swept method that has the key
    (the base's method when method.name is not swept). None for a key of other methods only:
    no trial applies it (so `--set method.name=mocov3` keeps a v2 sweep space valid)."""
    if not key.startswith("method.") or key == "method.name":
        return [{}]
    names = space["method.name"].bounds() if "method.name" in space else [current]
    leaf = key.removeprefix("method.")
    if not any(leaf in c.model_fields for c in METHOD_PARAMS.values()):
        raise ValueError(
            f"tune.space.{key}: names no setting of any method {sorted(METHOD_PARAMS)}"
        )
    return [
        {"method.name": n}
        for n in names
        if n in METHOD_PARAMS and leaf in METHOD_PARAMS[n].model_fields
    ]


def applicable(values: dict[str, Any], method: str) -> dict[str, Any]:
    """`values` without the method.* keys that belong to other methods than `method` (a sweep
    over methods samples every method's keys; each trial takes only its own method's)."""
    others = set().union(*(c.model_fields for c in METHOD_PARAMS.values()))
    own = METHOD_PARAMS[method].model_fields if method in METHOD_PARAMS else {}
    return {
        k: v
        for k, v in values.items()
        if not k.startswith("method.")
        or (leaf := k.removeprefix("method.")) in own
        or leaf not in others
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{name}."))
        else:
            items.append((name, value))
    return items


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(
            f"--set {assignment!r}: expected KEY=VALUE, e.g. --set method.temperature=0.2"
        )
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if key.startswith(SPACE_PREFIX):  # sweep keys are dotted setting names themselves
        parents, leaf = SPACE_PREFIX.strip(".").split("."), key.removeprefix(SPACE_PREFIX)
    else:
        *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    node[leaf] = yaml.safe_load(raw)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHOD_PARAMS:
        del loc[1]  # the discriminated union's tag: method.queue_size, not method.mocov2.queue_size
    key = ".".join(loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and ": " in message:  # a cross-field check names its key
        key, message = message.split(": ", 1)
        return f"{source}: {key}: {message}"
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling against params.yaml)"
    got = f" (got {first['input']!r})" if first["type"] != "extra_forbidden" and key else ""
    if len(got) > 80:
        got = ""
    return f"{source}: {key}: {message}{got}; fix it in the file or with --set {key}=..."


def _read_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The file's mapping, with an `extends: <base file>` (relative to the file) resolved: the
    base's tree overlaid by this file's keys (see _overlay)."""
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    if EXTENDS_KEY not in loaded:
        return loaded
    base = path.parent / str(loaded.pop(EXTENDS_KEY))
    if not base.is_file():
        raise ConfigError(
            f"{path}: extends: {base} does not exist; name the base params file relative to "
            f"{path.parent}"
        )
    if base.resolve() in seen:
        raise ConfigError(f"{path}: extends: {base} extends {path} again (a cycle)")
    return _overlay(_read_tree(base, (*seen, path.resolve())), loaded)


def _overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overlay`'s keys winning, section by section and key by key. Two mappings
    are replaced whole, not merged: `tune.space` (a sweep is the overlay's own) and a `method`
    of another name (the base's keys are another method's)."""
    merged = dict(base)
    for key, value in overlay.items():
        old = merged.get(key)
        whole = key == "space" or (
            key == "method"
            and isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("name", "mocov2") != old.get("name", "mocov2")
        )
        if isinstance(value, dict) and isinstance(old, dict) and not whole:
            merged[key] = _overlay(old, value)
        else:
            merged[key] = value
    return merged


def _switch_method(tree: dict[str, Any], overrides: list[str]) -> None:
    """`--set method.name=X` for another method than the file's: the file's method keys are
    another method's, so X starts from its own defaults (plus the other --set method.* keys)."""
    names = [a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0].strip() == "method.name"]
    section = tree.get("method")
    current = section.get("name", "mocov2") if isinstance(section, dict) else "mocov2"
    if names and yaml.safe_load(names[-1]) != current:
        tree["method"] = {}


def load_params(
    path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None
) -> Params:
    """Read params.yaml (if it exists), apply `--set a.b=value` overrides, validate once."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.exists():
            tree = _read_tree(path, ())
        elif path != DEFAULT_PARAMS:
            raise ConfigError(f"{path}: no such params file; pass --params with an existing file")
    _switch_method(tree, overrides or [])
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def with_overrides(params: Params, values: dict[str, Any], keep_space: bool = False) -> Params:
    """A copy of `params` with dotted keys set (a sweep trial, the best config of a sweep).

    A trial config is not itself a sweep: its `tune.space` is emptied unless `keep_space`."""
    tree = params.model_dump()
    if not keep_space:
        tree["tune"]["space"] = {}
    method = values.get("method.name", params.method.name)
    if method != params.method.name:  # another method: from its defaults
        if method not in METHOD_PARAMS:
            raise ConfigError(f"method.name: {method!r} is not one of {sorted(METHOD_PARAMS)}")
        tree["method"] = METHOD_PARAMS[method]().model_dump()
    for key, value in applicable(values, method).items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                raise ConfigError(f"names no setting (no section {part!r})")
        if leaf not in node:
            raise ConfigError(f"names no setting (no {leaf!r} in {'.'.join(parents) or 'params'})")
        node[leaf] = value
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, "override")) from None


def dump_params(params: Params, path: str | Path) -> None:
    """Write params in params.yaml's shape (e.g. the best config of a sweep)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))

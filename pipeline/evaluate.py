"""The evaluate stage: a frozen encoder through the evaluation suite, next to references.

Every protocol (pipeline/evaluation/) runs for the encoder and, by the same code path, for two
references: raw pixels and a randomly initialised encoder of the same shape (seeded). A random
ResNet already scores ~79% kNN on Fashion-MNIST, so a number without them says little. Protocols
that train on labels (label noise, robustness) are also run for a supervised baseline: the same
backbone trained from scratch on a small fixed budget (it has no pixel or random version).

The labelled splits are decoded once and held in memory; features are extracted once per
network and cached by model and data version (pipeline/evaluation/features.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient
from rich.progress import Progress
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from moco.knn import knn_top1
from pipeline import metrics_files
from pipeline.benchmark import benchmark, shard_reference
from pipeline.config import Params
from pipeline.dataset import data_version
from pipeline.encoder import EncoderSpec, load_encoder
from pipeline.evaluation import keys
from pipeline.evaluation.data import (
    Slice,
    drift_sides,
    heldout_slice,
    labelled_dir,
    require_evaluable,
    versions,
)
from pipeline.evaluation.drift import mmd_drift
from pipeline.evaluation.features import (
    LabelledSplit,
    cached,
    extract,
    feature_net,
    load_images,
    load_split,
    model_fingerprint,
)
from pipeline.evaluation.fewshot import fewshot_accuracy
from pipeline.evaluation.label_free import alignment, neighbourhood_agreement, rankme, uniformity
from pipeline.evaluation.plots import PlotInputs, write_plots
from pipeline.evaluation.probes import (
    ProbeRecipe,
    balanced_subset,
    fit_probe,
    predict,
    symmetric_noise,
    top1,
)
from pipeline.evaluation.robustness import robustness_metrics
from pipeline.evaluation.supervised import SupervisedBudget, train_supervised
from pipeline.method import build_augment
from pipeline.registry import production_model
from pipeline.tracking import (
    exported_run,
    log_dataset,
    log_eval_metrics,
    run_id_of,
    setup_mlflow,
)

REFERENCES = keys.REFERENCES


@dataclass
class EvalReport:
    model: str
    data_version: str  # the training stream's
    metrics: dict[str, float] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # evaluation.data.versions

    @property
    def eval_version(self) -> str:
        """What the scores were measured on: equal eval versions, comparable scores."""
        return self.versions.get("eval_version", self.data_version)

    def render(self) -> str:
        benchmark = self.versions.get("benchmark_version")
        on = f"; benchmark {benchmark}" if benchmark else ""
        lines = [f"evaluate: {self.model} on data {self.data_version}{on}"]
        own = [name for name in self.metrics if not name.startswith(REFERENCES)]
        width = max((len(name) for name in own), default=0)
        for name in own:
            refs = "  ".join(
                f"{ref} {self.metrics[f'{ref}_{name}']:.4f}"
                for ref in REFERENCES
                if f"{ref}_{name}" in self.metrics
            )
            tail = f"   references: {refs}" if refs else ""
            lines.append(f"  {name:<{width}} {self.metrics[name]:.4f}{tail}")
        if self.plots:
            lines.append(f"  plots: {', '.join(str(p) for p in self.plots)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Subject:
    """A network whose features are evaluated: images in [0, 1] -> L2-normalised features."""

    name: str  # keys.ENCODER or a reference
    net: nn.Module
    fingerprint: str | None  # feature-cache key; None: cheaper to recompute than to store
    bf16: bool = False


@dataclass(frozen=True)
class _Labelled:
    """The labelled protocols' data: a benchmark's or the source's own train/test splits."""

    train: LabelledSplit
    test: LabelledSplit
    version: str
    robust_index: Tensor  # the fixed test subset that is corrupted and attacked
    transfer: tuple[LabelledSplit, LabelledSplit] | None = None
    transfer_version: str = ""


@dataclass(frozen=True)
class _Data:
    labelled: _Labelled | None  # None: an unlabelled stream and no benchmark
    heldout: Tensor | None  # uint8 images of the held-out slice (label-free metrics)
    versions: dict[str, str]


@dataclass
class _Assessment:
    versions: dict[str, str]
    metrics: dict[str, float]
    plot_inputs: PlotInputs | None = None


def evaluate(params: Params, model: str) -> EvalReport:
    """Score the encoder at `model` (folder, runs:/ or models:/ URI): metrics.json, plots, and
    both logged to the model's MLflow run when it has one."""
    # an untracked folder (no MLflow run) is scored alone: nothing to compare it with or record
    tracked = _is_uri(model) or bool(exported_run(model))
    assessment = _assess(params, model, references=True, versus_production=tracked)
    versions = assessment.versions
    report = EvalReport(model, versions["data_version"], assessment.metrics, versions=versions)
    if assessment.plot_inputs is not None:
        e = params.eval
        report.plots = write_plots(
            e.plots_dir,
            report.metrics,
            assessment.plot_inputs,
            fewshot_names=[keys.fewshot(e.fewshot_ways, s) for s in e.fewshot_shots],
            eps=e.attack_eps,
            corruptions=list(e.corruptions),
            severities=e.corruption_severities,
            tsne_points=e.tsne_points,
            seed=e.seed,
        )
    _record(params, model, report)
    return report


def score(params: Params, model: str, *, references: bool = True) -> dict[str, float]:
    """The metrics alone, recording nothing: promote re-scores production with it so both
    models are judged on the same data (`references=False` skips the pixel/random passes and
    the supervised baseline, which do not depend on the model)."""
    return _assess(params, model, references=references).metrics


def _assess(
    params: Params, model: str, *, references: bool, versus_production: bool = False
) -> _Assessment:
    torch.set_num_threads(os.cpu_count() or 1)
    if _is_uri(model):
        setup_mlflow(params)  # models:/ and runs:/ resolve through the tracking store
    encoder, spec = load_encoder(model)
    require_evaluable(params)
    e = params.eval
    # Only a forced bf16 evaluates in bf16; `auto` scores in fp32 on every machine, so recorded
    # metrics stay comparable wherever production was evaluated.
    bf16 = params.train.precision == "bf16"
    fingerprint = model_fingerprint(encoder, spec=spec.to_dict(), bf16=bf16)
    subjects = [_Subject(keys.ENCODER, feature_net(encoder), fingerprint, bf16)]
    if references:
        torch.manual_seed(e.seed)
        random_encoder, _ = spec.build()
        subjects.append(_Subject("pixels", feature_net(None), None))
        random_print = model_fingerprint(random_encoder, spec=spec.to_dict(), bf16=bf16)
        subjects.append(_Subject("random", feature_net(random_encoder), random_print, bf16))
    names = [s.name for s in subjects] + ([keys.SUPERVISED] if references else [])
    metrics: dict[str, float] = {}
    plot_inputs = None
    with Progress(transient=True) as progress:
        data = _load_data(params, spec, progress)
        labelled = data.labelled
        for subject in subjects:
            found: dict[str, float] = {}
            if labelled is not None:
                found, test_features, predictions = _protocols(params, subject, labelled, progress)
                if subject.name == keys.ENCODER:
                    test = labelled.test
                    plot_inputs = PlotInputs(
                        test_features, test.labels, predictions, test.classes, names
                    )
            if data.heldout is not None:
                found.update(_label_free(params, subject, data.heldout))
            metrics.update({keys.for_subject(subject.name, k): v for k, v in found.items()})
        if references and labelled is not None and e.supervised_steps > 0:
            metrics.update(_supervised(params, spec, labelled, progress))
        if versus_production:
            metrics.update(_versus_production(params, subjects[0], data, spec, progress))
    return _Assessment(data.versions, metrics, plot_inputs)


def _is_uri(model: str) -> bool:
    return "://" in model or model.startswith(("runs:/", "models:/"))


# --- data -------------------------------------------------------------------------------------


def _load_data(params: Params, spec: EncoderSpec, progress: Progress) -> _Data:
    """Shard the benchmark if it is new, then decode each evaluation split once."""
    benchmark(params)
    labelled_root = labelled_dir(params)
    heldout = heldout_slice(params)
    images = None if heldout is None else _images(heldout, spec, params, progress, "held-out")
    labelled = None if labelled_root is None else _labelled(params, labelled_root, spec, progress)
    return _Data(labelled, images, versions(params))


def _images(
    piece: Slice, spec: EncoderSpec, params: Params, progress: Progress, what: str
) -> Tensor:
    return load_images(
        piece.urls,
        image_size=spec.image_size,
        channels=spec.in_channels,
        batch_size=params.eval.batch_size,
        limit=piece.samples,
        progress=progress,
        what=f"load {what} images",
    )


def _labelled(params: Params, root: str, spec: EncoderSpec, progress: Progress) -> _Labelled:
    e = params.eval
    train, test = (_split(root, name, spec, e.batch_size, progress) for name in ("train", "test"))
    generator = torch.Generator().manual_seed(e.seed)
    robust_index = torch.randperm(len(test), generator=generator)[: e.robustness_subset]
    data = _Labelled(train, test, data_version(root), robust_index.sort().values)
    if not e.transfer_source:
        return data
    shard_reference(params, e.transfer_source, e.transfer_shards_dir)
    shards_dir = e.transfer_shards_dir
    transfer = tuple(
        _split(shards_dir, name, spec, e.batch_size, progress) for name in ("train", "test")
    )
    return replace(data, transfer=transfer, transfer_version=data_version(shards_dir))


def _split(
    shards_dir: str, name: str, spec: EncoderSpec, batch: int, progress: Progress
) -> LabelledSplit:
    return load_split(
        shards_dir,
        name,
        image_size=spec.image_size,
        channels=spec.in_channels,
        batch_size=batch,
        progress=progress,
    )


# --- protocols --------------------------------------------------------------------------------


def _features(
    params: Params,
    subject: _Subject,
    split: LabelledSplit,
    name: str,
    version: str,
    progress: Progress,
) -> Tensor:
    folder = None
    if params.eval.features_dir and subject.fingerprint:
        folder = Path(params.eval.features_dir) / f"{subject.fingerprint}-{version}"
    return cached(
        folder,
        name,
        lambda: extract(
            subject.net,
            split,
            batch_size=params.eval.batch_size,
            bf16=subject.bf16,
            progress=progress,
            what=f"features {subject.name}: {name}",
        ),
        rows=len(split),
    )


def _protocols(
    params: Params, subject: _Subject, data: _Labelled, progress: Progress
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Every feature protocol for one subject: (metrics under encoder names, test features,
    linear-probe test predictions)."""
    e = params.eval
    train_f = _features(params, subject, data.train, "train", data.version, progress)
    test_f = _features(params, subject, data.test, "test", data.version, progress)
    train_y, test_y, classes = data.train.labels, data.test.labels, data.train.num_classes
    recipe = ProbeRecipe(e.probe_iters, e.probe_weight_decay)

    def probe_top1(index: Tensor | None = None, labels: Tensor = train_y) -> float:
        features = train_f if index is None else train_f[index]
        targets = labels if index is None else labels[index]
        return top1(fit_probe(features, targets, classes, recipe), test_f, test_y)

    ks = list(dict.fromkeys([e.knn_k, *e.knn_extra_k]))
    found = {
        keys.knn(k, e.knn_k): acc
        for k, acc in knn_top1(train_f, train_y, test_f, test_y, classes, ks, e.knn_t).items()
    }
    probe = fit_probe(train_f, train_y, classes, recipe)
    predictions = predict(probe, test_f)
    found["linear_top1"] = (predictions == test_y).float().mean().item()
    for fraction in e.low_label_fractions:
        found[keys.low_label(fraction)] = probe_top1(balanced_subset(train_y, fraction, e.seed))
    for shots in e.fewshot_shots:
        result = fewshot_accuracy(
            test_f,
            test_y,
            ways=e.fewshot_ways,
            shots=shots,
            queries=e.fewshot_queries,
            episodes=e.fewshot_episodes,
            seed=e.seed,
        )
        if result is not None:
            name = keys.fewshot(e.fewshot_ways, shots)
            found[name], found[f"{name}_ci95"] = result.mean, result.ci95
    for rate in e.noise_rates:
        found[keys.noise(rate)] = probe_top1(labels=symmetric_noise(train_y, rate, classes, e.seed))
    if data.transfer is not None:
        found[keys.transfer(e.transfer_source)] = _transfer_top1(
            params, subject, data.transfer, data.transfer_version, recipe, progress
        )
    if len(data.robust_index):
        found.update(
            _robustness(
                params, nn.Sequential(subject.net, probe).eval(), data, progress, subject.name
            )
        )
    return found, test_f, predictions


def _transfer_top1(
    params: Params,
    subject: _Subject,
    splits: tuple[LabelledSplit, LabelledSplit],
    version: str,
    recipe: ProbeRecipe,
    progress: Progress,
) -> float:
    """Linear probe on the other dataset's train split, scored on its test split."""
    train, test = splits
    train_f = _features(params, subject, train, "train", version, progress)
    test_f = _features(params, subject, test, "test", version, progress)
    num_classes = max(train.num_classes, int(train.labels.max()) + 1)
    return top1(fit_probe(train_f, train.labels, num_classes, recipe), test_f, test.labels)


def _robustness(
    params: Params, classifier: nn.Module, data: _Labelled, progress: Progress, what: str
) -> dict[str, float]:
    e = params.eval
    index = data.robust_index
    return robustness_metrics(
        classifier,
        data.test.floats(index),
        data.test.labels[index],
        corruptions=list(e.corruptions),
        severities=e.corruption_severities,
        eps=e.attack_eps,
        pgd_steps=e.pgd_steps,
        seed=e.seed,
        progress=progress,
        what=f"robustness {what}",
    )


def _supervised(
    params: Params, spec: EncoderSpec, data: _Labelled, progress: Progress
) -> dict[str, float]:
    """The supervised baseline on clean labels (accuracy, robustness) and on each noise rate."""
    e = params.eval
    budget = SupervisedBudget(e.supervised_steps, e.supervised_batch_size, e.supervised_lr)
    test_images = data.test.floats()
    found: dict[str, float] = {}
    for rate in dict.fromkeys([0.0, *e.supervised_noise_rates]):
        labels = symmetric_noise(data.train.labels, rate, data.train.num_classes, e.seed)
        net = train_supervised(
            spec,
            data.train,
            labels,
            budget,
            seed=e.seed,
            progress=progress,
            what=f"supervised baseline, noise {rate:g}",
        )
        accuracy = top1(net, test_images, data.test.labels)
        if rate in e.supervised_noise_rates:
            found[keys.noise(rate)] = accuracy
        if rate == 0.0:
            found["linear_top1"] = accuracy
            if len(data.robust_index):
                found.update(_robustness(params, net, data, progress, keys.SUPERVISED))
    found = {keys.for_subject(keys.SUPERVISED, k): v for k, v in found.items()}
    # Its budget beside its scores (the retrain summary lists every metric): a cheap floor,
    # a fraction of an epoch by default, not a tuned supervised result.
    found[keys.SUPERVISED_EPOCHS] = budget.steps * budget.batch_size / len(data.train)
    return found


def _label_free(params: Params, subject: _Subject, images: Tensor) -> dict[str, float]:
    """RankMe and uniformity of the held-out slice's features, alignment of two augmented
    views of it (seeded: every model sees the same views)."""
    size = params.eval.batch_size
    features = _embed(subject, images, size)
    augment = build_augment(params, images.shape[-1])  # the encoder's own size
    generator = torch.Generator().manual_seed(params.eval.seed)
    views = [_embed(subject, images, size, partial(augment, generator=generator)) for _ in "ab"]
    return {
        keys.RANKME: rankme(features),
        keys.ALIGNMENT: alignment(*views),
        keys.UNIFORMITY: uniformity(features),
    }


@torch.no_grad()
def _embed(
    subject: _Subject,
    images: Tensor,
    batch_size: int,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Features of uint8 images [N, C, S, S]: as they are (scaled to [0, 1]) or through
    `transform` (uint8 batch -> float views), a batch at a time."""
    subject.net.eval()
    out = []
    for chunk in images.split(batch_size):
        floats = (
            TF.to_dtype(chunk, torch.float32, scale=True) if transform is None else transform(chunk)
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=subject.bf16):
            out.append(subject.net(floats).float())
    return torch.cat(out)


def _versus_production(
    params: Params, candidate: _Subject, data: _Data, spec: EncoderSpec, progress: Progress
) -> dict[str, float]:
    """How far the new data is from what production was trained on (MMD in production's
    embedding space) and how far the candidate moved from production (shared neighbours on
    the held-out slice). Empty when there is no production model yet."""
    setup_mlflow(params)
    found = production_model(MlflowClient(), params.registry.model_name)
    if found is None:
        return {}
    uri, trained_on = found
    production, production_spec = load_encoder(uri)
    subject = _Subject("production", feature_net(production), None, candidate.bf16)
    shape = (spec.in_channels, spec.image_size)
    same_input = (production_spec.in_channels, production_spec.image_size) == shape
    metrics: dict[str, float] = {}
    if data.heldout is not None and same_input:  # another width or stem is fine; not a new input
        size = params.eval.batch_size
        mine, theirs = (_embed(s, data.heldout, size) for s in (candidate, subject))
        metrics[keys.AGREEMENT] = neighbourhood_agreement(mine, theirs, params.eval.agreement_k)
    sides = drift_sides(params, trained_on) if trained_on else None
    if sides is not None:
        old, new = (
            _embed(
                subject,
                _images(side, production_spec, params, progress, "drift"),
                params.eval.batch_size,
            )
            for side in sides
        )
        drift = mmd_drift(
            old, new, permutations=params.eval.drift_permutations, seed=params.eval.seed
        )
        metrics |= {
            keys.DRIFT_MMD: drift.mmd2,
            keys.DRIFT_P: drift.p_value,
            "drift_old_samples": drift.old,
            "drift_new_samples": drift.new,
        }
    return metrics


# --- recording --------------------------------------------------------------------------------


def _record(params: Params, model: str, report: EvalReport) -> None:
    """The metrics files for DVC, and the same numbers and the plots on the model's MLflow run."""
    metrics_files.write(params, report.versions, report.metrics)
    if _is_uri(model):
        setup_mlflow(params)
    run_id = run_id_of(model)
    if run_id is None:
        return  # a bare folder with no run.json: nothing to attach the numbers to
    setup_mlflow(params)
    client = MlflowClient()
    log_eval_metrics(client, run_id, report.metrics)
    _log_eval_datasets(params, run_id, report.versions)
    for path in report.plots:
        client.log_artifact(run_id, str(path), artifact_path="eval_plots")


def _log_eval_datasets(params: Params, run_id: str, found: dict[str, str]) -> None:
    """The benchmark and the held-out slice as the run's evaluation datasets (lineage in the
    MLflow UI, next to the training stream that pretrain recorded)."""
    labelled = labelled_dir(params)
    with mlflow.start_run(run_id=run_id):
        if labelled is not None and found.get("benchmark_version"):
            name = params.eval.benchmark or "labelled-splits"
            log_dataset(labelled, name, found["benchmark_version"], "evaluation")
        if found.get("heldout_version"):
            log_dataset(
                params.data.shards_dir, "heldout-slice", found["heldout_version"], "evaluation"
            )

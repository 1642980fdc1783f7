"""The flat metric names of the report, in one place (metrics.json, MLflow, plots, README).

Encoder metrics have bare names; the references prefix theirs (`pixels_knn_top1`), and the
supervised baseline, which only exists for protocols that train on labels, puts `supervised`
before the `_top1` (`noise40_supervised_top1`, `fgsm_eps0.03_supervised_top1`).
"""

from __future__ import annotations

ENCODER = "encoder"
REFERENCES = ("pixels", "random")
SUPERVISED = "supervised"
SUPERVISED_EPOCHS = "supervised_train_epochs"  # the baseline's budget: passes over the train split


def for_subject(subject: str, key: str) -> str:
    """The report name of metric `key` (an encoder name) for encoder, reference or baseline."""
    if subject == ENCODER:
        return key
    if subject == SUPERVISED:
        if key == "linear_top1":  # its own clean accuracy: the counterpart of the probe's
            return "supervised_top1"
        return key.removesuffix("_top1").removesuffix("_linear") + "_supervised_top1"
    return f"{subject}_{key}"


def knn(k: int, default_k: int) -> str:
    return "knn_top1" if k == default_k else f"knn{k}_top1"


def low_label(fraction: float) -> str:
    return f"linear_{100 * fraction:g}pct_top1"


def fewshot(ways: int, shots: int) -> str:
    return f"fewshot_{ways}w{shots}s"


def noise(rate: float) -> str:
    return f"noise{100 * rate:g}_linear_top1"


def transfer(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1].replace("-", "_").replace(".", "_")
    return f"transfer_{name}_linear_top1"


def corruption(name: str, severity: int) -> str:
    return f"corruption_{name}_s{severity}_top1"


def attack(kind: str, eps: float) -> str:
    return f"{kind}_eps{eps:g}_top1"


# Label-free metrics (pipeline/evaluation/label_free.py) and the run-level comparisons with
# production, which have no reference versions: drift is about the data, agreement about two
# models, and neither says which model is better, so neither can gate a promotion.
RANKME, ALIGNMENT, UNIFORMITY = "rankme", "alignment", "uniformity"
LABEL_FREE = (RANKME, ALIGNMENT, UNIFORMITY)
AGREEMENT = "agreement_production"
DRIFT_MMD, DRIFT_P = "drift_mmd2", "drift_p_value"
NOT_GATEABLE = (AGREEMENT, DRIFT_MMD, DRIFT_P, "drift_old_samples", "drift_new_samples")
_LOWER_IS_BETTER = (ALIGNMENT, UNIFORMITY)


def lower_is_better(metric: str) -> bool:
    """Alignment and uniformity fall as an encoder improves; every accuracy and rank rises."""
    return metric.removeprefix("pixels_").removeprefix("random_") in _LOWER_IS_BETTER


def needs_labels(metric: str) -> bool:
    """Whether the evaluate stage can only report `metric` with a labelled benchmark."""
    return metric not in LABEL_FREE and metric not in NOT_GATEABLE

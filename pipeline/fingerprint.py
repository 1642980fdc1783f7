"""What a trained model is a function of: data, benchmark, settings and code, as short hashes.

Promotion records them on every model version; a retrain compares the current ones with
production's (pipeline/freshness.py) to tell whether training again could give anything new.
The eval protocol hash also tells the gate whether two evaluations are comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import Params

NOT_SCORING = {  # eval keys that never change a metric's value
    "batch_size",
    "monitor_bank",
    "monitor_queries",
    "metrics_file",
    "plots_dir",
    "features_dir",
    "transfer_shards_dir",
    "tsne_points",
    "benchmark_dir",
    "agreement_k",
    "drift_samples",
    "drift_permutations",
}
# train keys that change where and how safely a run goes, not the model it gives. init_from is
# here too: a warm start is from the registry's production, which the freshness check compares.
NOT_TRAINING = {
    "storage_path",
    "output_dir",
    "checkpoint_every",
    "checkpoint_every_steps",
    "checkpoint_every_minutes",
    "max_failures",
    "cpus_per_worker",
    "init_from",
}
CODE_PACKAGES = ("moco", "pipeline")  # the code a model depends on (flows only orchestrate)


def short_hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def config_hash(params: Params) -> str:
    """A stable hash of the whole config: equal hashes, equal settings."""
    return short_hash(params.model_dump())


def eval_protocol(params: Params) -> str:
    """A hash of the evaluation settings that can change a score. Everything in `eval` counts
    except the keys listed as presentation or caching, so a new knob errs on the safe side:
    production is re-scored rather than compared on numbers from another protocol."""
    settings = params.eval.model_dump(exclude=NOT_SCORING)
    return short_hash({**settings, "precision": params.train.precision})


def settings_hash(params: Params) -> str:
    """A hash of the settings a retrain's outcome depends on: the model, method, augmentation
    and training settings (less NOT_TRAINING) and the eval protocol. The data settings are left
    to the data version, which changes when they change what is sharded."""
    return short_hash(
        {
            "model": params.model.model_dump(),
            "method": params.method.model_dump(),
            "augment": params.augment.model_dump(),
            "train": params.train.model_dump(exclude=NOT_TRAINING),
            "eval_protocol": eval_protocol(params),
        }
    )


def code_version(root: Path | None = None) -> str:
    """A hash of the Python sources of moco/ and pipeline/ as they are on disk: an edited,
    uncommitted file changes it (a git commit alone would not), a README edit does not."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Fingerprint:
    """The inputs of a retrain; equal fingerprints, nothing new to learn. The field names are
    the model version tags they are recorded as."""

    data_version: str
    benchmark_version: str
    settings_hash: str
    code_version: str

    @classmethod
    def of(cls, params: Params, versions: dict[str, str]) -> Fingerprint:
        """The current fingerprint; `versions` as `evaluation.data.versions` gives them."""
        return cls(
            versions.get("data_version", ""),
            versions.get("benchmark_version", ""),
            settings_hash(params),
            code_version(),
        )

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Fingerprint | None:
        """What a model version recorded, or None when it predates the record."""
        fields = [tags.get(name) for name in cls.__dataclass_fields__]
        return None if any(f is None for f in fields) else cls(*fields)

    def as_tags(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        benchmark = f", benchmark {self.benchmark_version}" if self.benchmark_version else ""
        return (
            f"data {self.data_version}{benchmark}, config {self.settings_hash}, "
            f"code {self.code_version}"
        )

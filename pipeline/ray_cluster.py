"""Connecting to Ray: a local instance by default, an existing cluster when RAY_ADDRESS or
--address names one (checked to answer first)."""

from __future__ import annotations

import os

import ray

from pipeline.preflight import check_ray_address

# A worker group that cannot be placed fails fast instead of hanging (stack notes: a Tune +
# Train placement-group leak once made trial 2 wait forever).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# The controller polls its workers this often (Ray's default 2 s): it hears the last report and
# the end of training within a poll each: 0.5 s saves ~1.3 s of every run (bench/RESULTS.md)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
JOB_ENV = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")


def ensure_ray(address: str | None = None) -> dict[str, float]:
    """Start or join Ray once per process; returns the cluster's resources.

    Without an address this starts its own instance (`address="local"`): a plain ray.init()
    would join whatever /tmp/ray/ray_current_cluster names, even a head that died without
    `ray stop`, and hang on it. The dashboard is on (bound to 127.0.0.1): without it, Tune +
    Train leaked placement groups on this machine.
    """
    if not ray.is_initialized():
        if target := check_ray_address(address):
            # the Train controllers run on the cluster's nodes, which do not see this process's
            # environment: the job's runtime_env carries these settings to them
            timeout = {name: os.environ[name] for name in JOB_ENV}
            ray.init(address=target, log_to_driver=True, runtime_env={"env_vars": timeout})
        else:
            ray.init(
                address="local",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=True,
            )
    return ray.cluster_resources()


def check_resources(resources: dict[str, float], workers: int, cpus: float, gpu: bool) -> None:
    """Refuse a run the cluster cannot place, before any worker starts."""
    need_cpu = workers * cpus
    if resources.get("CPU", 0) < need_cpu:
        raise ValueError(
            f"train.num_workers x train.cpus_per_worker needs {need_cpu:g} CPUs but the Ray "
            f"cluster has {resources.get('CPU', 0):g}; lower them or point RAY_ADDRESS at a "
            "bigger cluster"
        )
    if gpu and resources.get("GPU", 0) < workers:
        raise ValueError(
            f"train.use_gpu with {workers} workers needs {workers} GPUs but the Ray cluster has "
            f"{resources.get('GPU', 0):g}; set train.use_gpu=false or add GPU nodes"
        )

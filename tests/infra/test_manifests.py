"""The KubeRay manifests keep secrets in Secrets and share an object store, not a volume: every
Ray container gets the AWS settings and Ray's token from a Secret, none holds a literal."""

from pathlib import Path

import pytest
import yaml

MANIFESTS = sorted((Path(__file__).resolve().parents[2] / "infra/ray").glob("kuberay-*.yaml"))
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN")


def _containers(node: object) -> list[dict]:
    """Every container spec anywhere in the manifest."""
    if isinstance(node, dict):
        found = [c for c in node.get("containers", []) if isinstance(c, dict)]
        return found + [c for value in node.values() for c in _containers(value)]
    if isinstance(node, list):
        return [c for item in node for c in _containers(item)]
    return []


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.name for m in MANIFESTS])
def test_ray_pods_take_s3_and_the_token_from_secrets(manifest: Path) -> None:
    text = manifest.read_text()
    ray = [c for c in _containers(yaml.safe_load(text)) if c["name"].startswith("ray-")]
    assert ray, f"{manifest.name}: no Ray containers"
    for container in ray:
        env = {item["name"]: item for item in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        if container["name"] != "ray-job-submitter":
            sources = [s["secretRef"]["name"] for s in container.get("envFrom", [])]
            assert "moco-s3" in sources, f"{manifest.name}: {container['name']} has no S3 env"
        for name in SECRET_NAMES:
            assert "value" not in env.get(name, {}), f"{manifest.name}: literal {name}"
    assert "persistentVolumeClaim" not in text  # the object store, not a shared mount


def test_both_manifests_are_checked() -> None:
    assert [m.name for m in MANIFESTS] == ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]

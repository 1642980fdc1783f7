"""Preflight: every remote endpoint a stage will use must answer before any work starts.

Without it, an MLflow server that is down costs minutes of MLflow's HTTP retry back-off (after
Ray has started), and a dead Ray cluster minutes of "Failed to connect to GCS". Here each
endpoint gets one short probe and a refusal is one line naming the setting and the endpoint
(never a credential). MLflow keeps its own retries for transient faults during the run.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from pipeline.config import Params
from pipeline.errors import StageError

CONNECT_TIMEOUT_S = 3.0  # a live endpoint on a LAN or in a cloud region answers far sooner
ANSWER_TIMEOUT_S = 10.0  # a connected server may be slow to answer on a loaded machine
DEFAULT_PORTS = {
    "http": 80,
    "https": 443,
    "ray": 10001,  # the Ray Client server
    "postgresql": 5432,
    "mysql": 3306,
    "mssql": 1433,
}
RAY_GCS_PORT = 6379  # `ray start --head`'s default, for an address given without a port
S3_PATHS = ("data.shards_dir", "train.storage_path", "tune.storage_path")
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # botocore's precedence
CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN"
S3_CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


def check_endpoints(params: Params, *, ray: bool = False, address: str | None = None) -> None:
    """Refuse the stage now if its tracking store, object store or (with `ray`) Ray cluster
    does not answer."""
    check_tracking(params)
    check_object_store(params)
    if ray:
        check_ray_address(address)


def shown(url: str) -> str:
    """A URL safe to print: no user, password or query string (they may hold credentials)."""
    parts = urlsplit(url)
    if not parts.netloc:
        return url
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _host_port(url: str, default_port: int | None) -> tuple[str, int] | None:
    """Host and port of a URL or a bare host:port; None when there is no network endpoint.
    A port that is not a number raises ValueError."""
    parts = urlsplit(url if "://" in url else f"//{url}")
    scheme = parts.scheme.split("+")[0]  # SQLAlchemy: postgresql+psycopg2://...
    port = parts.port or DEFAULT_PORTS.get(scheme, default_port)
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def unreachable_reason(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing answers at host:port (one TCP connect), or None when something does."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror:
        return f"host {host} not found"
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as error:
        return (error.strerror or type(error).__name__).lower()


def require_answer(named: str, url: str, fix: str, default_port: int | None = None) -> None:
    """Refuse in one line (`named`: the setting and its value) when `url` does not accept a
    connection."""
    try:
        endpoint = _host_port(url, default_port)
    except ValueError:
        raise StageError(f"{named}: not a valid address (expected host:port)") from None
    if endpoint is None:
        return
    if reason := unreachable_reason(*endpoint):
        host, port = endpoint
        raise StageError(f"{named}: nothing answers at {host}:{port} ({reason}); {fix}")


def tracking_setting(params: Params) -> tuple[str, str]:
    """(setting name, URI) of the MLflow tracking store: the environment wins."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI", uri
    return "tracking.uri", params.tracking.uri


def check_tracking(params: Params) -> None:
    """A remote tracking store must accept a connection; an MLflow server must also accept
    our credentials and speak MLflow's API. Local stores (sqlite, file) need nothing."""
    setting, uri = tracking_setting(params)
    require_answer(f"{setting}={shown(uri)}", uri, f"start the server or fix {setting}")
    if urlsplit(uri).scheme in ("http", "https"):
        _check_mlflow_api(setting, uri)


def _check_mlflow_api(setting: str, uri: str) -> None:
    """One request through MLflow's own client code (same credentials, same TLS settings),
    without its retries."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    endpoint = "/api/2.0/mlflow/experiments/search"
    try:
        response = http_request(
            get_default_host_creds(uri),
            endpoint,
            "GET",
            max_retries=0,
            timeout=(CONNECT_TIMEOUT_S, ANSWER_TIMEOUT_S),
            raise_on_status=False,
            params={"max_results": 1},
        )
    except MlflowException:
        raise StageError(
            f"{setting}={shown(uri)}: the server accepted a connection but did not answer an "
            f"MLflow request within {ANSWER_TIMEOUT_S:g} s; check the server"
        ) from None
    if response.status_code in (401, 403):
        raise StageError(
            f"{setting}={shown(uri)}: the server refused our credentials (HTTP "
            f"{response.status_code}); fix {CREDENTIAL_VARS}"
        )
    if response.status_code == 404:
        raise StageError(
            f"{setting}={shown(uri)}: not an MLflow tracking server (HTTP 404 on {endpoint}); "
            f"fix {setting}"
        )


def check_object_store(params: Params) -> None:
    """Each s3:// path's bucket must exist and accept our credentials. A custom endpoint
    (MinIO, moto, Ceph) gets a TCP probe first; AWS's own endpoints are only asked about the
    bucket."""
    flat = params.to_flat_dict()
    s3_paths = {key: str(flat[key]) for key in S3_PATHS if str(flat[key]).startswith("s3://")}
    if not s3_paths:
        return
    endpoint_var = next((name for name in S3_ENDPOINT_VARS if os.environ.get(name)), None)
    endpoint = "AWS S3"
    if endpoint_var is not None:
        url = os.environ[endpoint_var]
        endpoint = f"{endpoint_var}={shown(url)}"
        fix = f"start the object store or fix {endpoint_var} (used by {', '.join(s3_paths)})"
        require_answer(endpoint, url, fix)
    for setting, path in s3_paths.items():
        _check_bucket(setting, path, endpoint)


def _check_bucket(setting: str, path: str, endpoint: str) -> None:
    """One listing of the path's first key through boto3 (the standard AWS environment),
    without retries: it needs the credentials, the bucket and the read permission a stage
    needs (a HEAD of the bucket is not authorised by every S3-compatible store)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    parts = urlsplit(path)
    bucket = parts.netloc
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=ANSWER_TIMEOUT_S,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    named = f"{setting}={path} ({endpoint})"
    try:
        client = boto3.session.Session().client("s3", config=config)  # today's environment
        client.list_objects_v2(Bucket=bucket, Prefix=parts.path.lstrip("/"), MaxKeys=1)
    except NoCredentialsError:
        raise StageError(f"{named}: no AWS credentials found; set {S3_CREDENTIAL_VARS}") from None
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            raise StageError(
                f"{named}: bucket {bucket} does not exist; create it or fix {setting}"
            ) from None
        if status in (400, 401, 403):
            raise StageError(
                f"{named}: the object store refused our credentials for bucket {bucket} (HTTP "
                f"{status}); fix {S3_CREDENTIAL_VARS} or the bucket's policy"
            ) from None
        raise StageError(f"{named}: bucket {bucket} not usable (HTTP {status})") from None
    except BotoCoreError as error:
        raise StageError(f"{named}: {type(error).__name__}; check the endpoint") from None


def ray_target(address: str | None) -> tuple[str, str] | None:
    """(setting, address) of the Ray cluster to join: --address wins over RAY_ADDRESS. None
    means start a local instance (never the cluster /tmp/ray/ray_current_cluster names)."""
    if address:
        return "--address", address
    if env := os.environ.get("RAY_ADDRESS"):
        return "RAY_ADDRESS", env
    return None


def check_ray_address(address: str | None) -> str | None:
    """The address to pass to ray.init, checked to answer (ray.init would retry a dead GCS
    for minutes); None when a local instance should be started."""
    target = ray_target(address)
    if target is None or target[1] == "local":
        return None
    setting, address = target
    resolved = _resolved(setting, address)
    named = f"{setting}={shown(address)}" + (f" ({resolved})" if resolved != address else "")
    fix = f"start the cluster, fix {setting}, or unset it to run a local Ray"
    require_answer(named, resolved, fix, default_port=RAY_GCS_PORT)
    return address


def _resolved(setting: str, address: str) -> str:
    """`auto` as Ray itself resolves it (RAY_ADDRESS, then the latest `ray start` on this
    machine); any other address as given."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise StageError(
            f"{setting}=auto: no running Ray cluster found on this machine; start one with "
            f"`ray start --head`, name it in {setting}, or unset it to run a local Ray"
        ) from None

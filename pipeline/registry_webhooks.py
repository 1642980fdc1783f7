"""MLflow 3's registry webhooks: the tracking server itself tells the team's receiver when an
alias of the model moves, whoever moved it (a promotion, a rollback, a person in the UI).

MLflow sends them from `mlflow server` only (a SQL backend store), signed with HMAC-SHA256 when
a secret is given (MOCO_WEBHOOK_SECRET: never in params.yaml). A server refuses plain-http or
private-address URLs unless started with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and
MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true.
"""

from __future__ import annotations

import os

from pipeline.config import Params
from pipeline.tracking import tracking_uri

NAME = "moco-pipeline-alias-changes"
EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]
SECRET_ENV = "MOCO_WEBHOOK_SECRET"


def ensure_registry_webhook(params: Params) -> str:
    """Create or update (by name) the webhook to `alerts.webhook_url`; one line saying what
    was done, or why it was skipped (no URL, no tracking server, refused by the server)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    url, uri = params.alerts.webhook_url, tracking_uri(params)
    if not url:
        return "MLflow registry webhook: none (alerts.webhook_url is empty)"
    if not uri.startswith(("http://", "https://")):
        return f"MLflow registry webhook skipped: {uri} is not a tracking server (`mlflow server`)"
    client, secret = MlflowClient(uri), os.environ.get(SECRET_ENV) or None
    try:
        found = [hook for hook in client.list_webhooks(max_results=1000) if hook.name == NAME]
        if found:
            client.update_webhook(found[0].webhook_id, url=url, events=EVENTS, secret=secret)
            return f"MLflow registry webhook updated: {NAME} -> {url}"
        client.create_webhook(
            NAME, url, EVENTS, description="moco-pipeline: alias changes", secret=secret
        )
        return f"MLflow registry webhook created: {NAME} -> {url}"
    except MlflowException as error:
        detail = str(error.message).splitlines()[0]
        return f"MLflow registry webhook skipped: {uri} refused it ({detail})"

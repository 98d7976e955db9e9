"""Ray Serve application builder: `cluster.app:build_app` is the import_path of serveConfigV2.

`args` is the normalised APAR config (`cluster.config.to_serve_deploy_dict` puts it there), so
`serve deploy`, KubeRay and `apar serve` all build the same application from the same file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.config import INGRESS_DEPLOYMENT, WORKER_DEPLOYMENT, deployment_options, load_config_dict
from cluster.ingress import AparIngress
from cluster.worker import AparWorker


def build_app(args: dict[str, Any]) -> Application:
    """Ingress bound to the worker deployment, both with options from the config."""
    cfg = load_config_dict(args)
    config = cfg.to_dict()
    opts = deployment_options(cfg)
    worker = AparWorker.options(**opts[WORKER_DEPLOYMENT]).bind(config)
    return AparIngress.options(**opts[INGRESS_DEPLOYMENT]).bind(worker, config)

"""Render a Helm chart with the real Helm library and capture what it would apply.

No `helm` binary can be installed in CI, but `helm-sdkpy` bundles Helm's Go library. Its
`Install` renders the chart and sends every manifest to a Kubernetes API, so the stand-in API
server of tests/kube_standin.py records exactly the objects Helm would create. Where a `helm`
binary is on PATH, `helm template` / `helm lint` are used instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kube_standin import KUBE_VERSION, StandInKubeAPI

__all__ = [
    "KUBE_VERSION",
    "RenderError",
    "helm_binary",
    "install_then_upgrade",
    "lint",
    "render",
    "render_many",
]

# ---- Helm calls -----------------------------------------------------------------------------------
#
# Helm's Go library reads its environment once, when the process starts, and stores release records
# as protobuf Secrets unless HELM_DRIVER=memory. So every Helm call runs in a short child Python
# process started with HELM_DRIVER=memory; the stand-in API server stays in this process.


def helm_binary() -> str | None:
    return shutil.which("helm")


class RenderError(Exception):
    """Helm refused to render/install the chart (its message is kept verbatim)."""


def _run_helm(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run Helm jobs in one child process: per job {"results": [...]} or {"error": message}.

    A job is {"kubeconfig", "namespace", "ops": [{"verb": install|upgrade|lint, ...}]}; its ops run
    in order on one Helm Configuration (so an upgrade sees the release its install made).
    """
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HELM_DRIVER": "memory"},
    )
    try:
        replies = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(
            f"helm child process failed (rc {proc.returncode}): {proc.stderr[-2000:]}"
        ) from None
    return replies


def _child_main() -> None:
    """Child side of `_run_helm`: prints one JSON line with a reply per job."""
    import helm_sdkpy

    replies = []
    for job in json.load(sys.stdin):
        config = helm_sdkpy.Configuration(namespace=job["namespace"], kubeconfig=job["kubeconfig"])
        results: list[Any] = []
        try:
            for op in job["ops"]:
                if op["verb"] == "lint":
                    results.append(asyncio.run(helm_sdkpy.Lint(config).run(op["chart"])))
                    continue
                action = helm_sdkpy.Install if op["verb"] == "install" else helm_sdkpy.Upgrade
                rel = asyncio.run(
                    action(config).run(
                        op["release"], op["chart"], values=op["values"] or None, wait=False, timeout=60
                    )
                )
                hooks = [h.get("manifest", "") for h in rel.get("hooks") or []]
                results.append({"manifest": rel.get("manifest", ""), "hooks": hooks})
                if op.get("checkpoint"):  # tell the stand-in server to snapshot what exists now
                    urllib.request.urlopen(op["checkpoint"], timeout=10).read()
            replies.append({"results": results})
        except helm_sdkpy.HelmError as exc:
            replies.append({"error": str(exc)})
        finally:
            del config
    print(json.dumps(replies))


def render_many(
    chart: Path, value_sets: list[dict[str, Any]], release: str = "apar", namespace: str = "apar"
) -> list[list[dict] | RenderError]:
    """`render` for several value sets at once (one Helm process, one stand-in API per set)."""
    if helm_binary():
        out: list[list[dict] | RenderError] = []
        for values in value_sets:
            try:
                out.append(_render_with_binary(chart, values, release, namespace))
            except RenderError as exc:
                out.append(exc)
        return out
    apis = [StandInKubeAPI() for _ in value_sets]
    for api in apis:
        api.__enter__()
    try:
        jobs = [
            {
                "kubeconfig": api.kubeconfig(namespace),
                "namespace": namespace,
                "ops": [{"verb": "install", "release": release, "chart": str(chart), "values": values}],
            }
            for api, values in zip(apis, value_sets, strict=True)
        ]
        out: list[list[dict] | RenderError] = []
        for api, reply in zip(apis, _run_helm(jobs), strict=True):
            if "error" in reply:
                out.append(RenderError(reply["error"]))
                continue
            created = api.created()
            _check_manifest(reply["results"][0]["manifest"], created)
            out.append(created + _hook_objects(reply["results"][0]["hooks"], namespace))
        return out
    finally:
        for api in apis:
            api.__exit__(None, None, None)


def _hook_objects(manifests: list[str], namespace: str) -> list[dict]:
    """Helm hooks (e.g. `helm test` pods) are not applied on install; `helm template` lists them."""
    objs = [o for m in manifests for o in yaml.safe_load_all(m) if o]
    for o in objs:
        o.setdefault("metadata", {}).setdefault("namespace", namespace)
    return objs


def _check_manifest(manifest: str, created: list[dict]) -> None:
    """What the stand-in received is exactly the release manifest Helm reports (nothing lost)."""

    def key(o: dict) -> tuple[str, str, str]:
        return (o["apiVersion"], o["kind"], o["metadata"]["name"])

    rendered = sorted(key(o) for o in yaml.safe_load_all(manifest) if o)
    if rendered != sorted(key(o) for o in created):
        raise RuntimeError(
            f"stand-in API captured {sorted(map(key, created))}, Helm's manifest has {rendered}"
        )


def render(chart: Path, values: dict[str, Any], release: str = "apar", namespace: str = "apar") -> list[dict]:
    """Render `chart` with `values` through real Helm: the objects it would apply, then its hooks.

    Raises `RenderError` with Helm's message when Helm refuses (e.g. values.schema.json).
    """
    (result,) = render_many(chart, [values], release, namespace)
    if isinstance(result, RenderError):
        raise result
    return result


def install_then_upgrade(
    chart: Path,
    values: dict[str, Any],
    new_values: dict[str, Any],
    release: str = "apar",
    namespace: str = "apar",
) -> tuple[list[dict], list[dict]]:
    """`helm install` then `helm upgrade` (new values) against one stand-in API: objects after each."""
    with StandInKubeAPI() as api:
        ops = [
            {"verb": "install", "release": release, "chart": str(chart), "values": values},
            {"verb": "upgrade", "release": release, "chart": str(chart), "values": new_values},
        ]
        ops[0]["checkpoint"] = f"{api.url}/_standin/checkpoint"
        (reply,) = _run_helm([{"kubeconfig": api.kubeconfig(namespace), "namespace": namespace, "ops": ops}])
        if "error" in reply:
            raise RenderError(reply["error"])
        return api.checkpoints[0], api.created()


def _render_with_binary(chart: Path, values: dict[str, Any], release: str, namespace: str) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(values, f)
        f.flush()
        proc = subprocess.run(
            ["helm", "template", release, str(chart), "-n", namespace, "-f", f.name],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if proc.returncode != 0:
        raise RenderError(proc.stderr.strip())
    objs = [o for o in yaml.safe_load_all(proc.stdout) if o]
    for o in objs:
        o.setdefault("metadata", {}).setdefault("namespace", namespace)
    return objs


def lint(chart: Path) -> dict[str, Any]:
    """`helm lint` the chart with its default values (offline): Helm's lint result."""
    if helm_binary():
        proc = subprocess.run(["helm", "lint", str(chart)], capture_output=True, text=True, timeout=120)
        return {"ok": proc.returncode == 0, "output": proc.stdout + proc.stderr}
    (reply,) = _run_helm(
        [{"kubeconfig": None, "namespace": "default", "ops": [{"verb": "lint", "chart": str(chart)}]}]
    )
    if "error" in reply:
        raise RenderError(reply["error"])
    return reply["results"][0]


if __name__ == "__main__":
    _child_main()

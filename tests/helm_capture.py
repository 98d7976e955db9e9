"""Render a Helm chart with the real Helm library and capture what it would apply.

No `helm` binary can be installed in CI, but `helm-sdkpy` bundles Helm's Go library. Its
`Install` renders the chart and sends every manifest to a Kubernetes API, so a small stand-in
API server on 127.0.0.1 (discovery + create/get/list/update/patch/delete on an in-memory
store) records exactly the objects Helm would create. Where a `helm` binary is on PATH,
`helm template` is used instead.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

KUBE_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}


@dataclass(frozen=True)
class Resource:
    """One API resource the stand-in server serves (what discovery advertises)."""

    group_version: str  # "v1" for the core group
    plural: str
    kind: str
    namespaced: bool = True


RESOURCES: tuple[Resource, ...] = (
    Resource("v1", "namespaces", "Namespace", namespaced=False),
    Resource("v1", "secrets", "Secret"),
    Resource("v1", "configmaps", "ConfigMap"),
    Resource("v1", "services", "Service"),
    Resource("v1", "serviceaccounts", "ServiceAccount"),
    Resource("v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    Resource("v1", "pods", "Pod"),
    Resource("apps/v1", "statefulsets", "StatefulSet"),
    Resource("apps/v1", "deployments", "Deployment"),
    Resource("batch/v1", "jobs", "Job"),
    Resource("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget"),
    Resource("networking.k8s.io/v1", "networkpolicies", "NetworkPolicy"),
    Resource("rbac.authorization.k8s.io/v1", "roles", "Role"),
    Resource("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
    Resource("ray.io/v1", "rayservices", "RayService"),
    Resource("ray.io/v1", "rayclusters", "RayCluster"),
    Resource("monitoring.coreos.com/v1", "servicemonitors", "ServiceMonitor"),
    Resource("monitoring.coreos.com/v1", "podmonitors", "PodMonitor"),
)

_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _split_selector(selector: str) -> list[str]:
    """Split a label selector on the commas that are not inside `in (...)` sets."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (=, ==, !=, in, notin, exists, !exists)."""
    for term in _split_selector(selector):
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", term)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            inside = key in labels and labels[key] in vals
            if inside != (op == "in"):
                return False
        elif "!=" in term:
            key, val = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == val:
                return False
        elif "=" in term:
            key, val = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != val:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (close enough to strategic merge for what Helm sends)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, val in patch.items():
        if val is None:
            out.pop(key, None)
        else:
            out[key] = _merge_patch(out.get(key), val)
    return out


class StandInKubeAPI:
    """An in-memory Kubernetes API server on 127.0.0.1, served from a daemon thread."""

    def __init__(self, resources: Iterable[Resource] = RESOURCES) -> None:
        self.resources = list(resources)
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (gv, plural, ns, name)
        self.requests: list[tuple[str, str]] = []
        self.checkpoints: list[list[dict[str, Any]]] = []  # created() at each GET /_standin/checkpoint
        self._lock = threading.Lock()
        self._rv = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandInKubeAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def kubeconfig(self, namespace: str = "default") -> str:
        """A kubeconfig (YAML text) that points a client at this server over plain HTTP."""
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                "users": [{"name": "standin", "user": {"token": "standin"}}],
                "contexts": [
                    {
                        "name": "standin",
                        "context": {"cluster": "standin", "user": "standin", "namespace": namespace},
                    }
                ],
                "current-context": "standin",
            }
        )

    def created(self) -> list[dict[str, Any]]:
        """Every stored object except Helm's own release records."""
        with self._lock:
            objs = [json.loads(json.dumps(o)) for o in self.objects.values()]
        return [o for o in objs if not str(o.get("type", "")).startswith("helm.sh/release")]

    # ---- request handling -------------------------------------------------------------------

    def _discovery(self, path: str) -> dict[str, Any] | None:
        groups: dict[str, list[Resource]] = {}
        for r in self.resources:
            groups.setdefault(r.group_version, []).append(r)
        if path == "/version":
            return KUBE_VERSION
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            items = []
            for gv in groups:
                if "/" in gv:
                    g, v = gv.split("/")
                    ver = {"groupVersion": gv, "version": v}
                    items.append({"name": g, "versions": [ver], "preferredVersion": ver})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": items}
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if gv in groups and path in (f"/api/{gv}", f"/apis/{gv}"):
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": gv,
                "resources": [
                    {
                        "name": r.plural,
                        "singularName": r.kind.lower(),
                        "namespaced": r.namespaced,
                        "kind": r.kind,
                        "verbs": _VERBS,
                    }
                    for r in groups[gv]
                ],
            }
        return None

    def _route(self, path: str) -> tuple[Resource, str, str | None] | None:
        """Map a REST path to (resource, namespace, name)."""
        m = re.fullmatch(
            r"/(?:api/(?P<core>v1)|apis/(?P<gv>[^/]+/[^/]+))"
            r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/status)?",
            path,
        )
        if not m:
            return None
        gv = m.group("core") or m.group("gv")
        for r in self.resources:
            if r.group_version == gv and r.plural == m.group("plural"):
                return r, m.group("ns") or "", m.group("name")
        if m.group("plural") in ("namespaces",) or m.group("ns") is None:
            return None
        return None

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        path = url.path.rstrip("/") or "/"
        with self._lock:
            self.requests.append((method, raw_path))
        if path == "/_standin/checkpoint":
            self.checkpoints.append(self.created())
            return 200, {"checkpoints": len(self.checkpoints)}
        if method == "GET":
            found = self._discovery(path)
            if found is not None:
                return 200, found
        route = self._route(path)
        if route is None:
            return 404, _status(404, "NotFound", f"the server could not find the requested resource ({path})")
        res, ns, name = route
        dry_run = "dryRun" in query
        with self._lock:
            if method == "GET" and name is None:
                return 200, self._list(res, ns, query.get("labelSelector", [""])[0])
            if method == "POST" and name is None:
                return self._create(res, ns, json.loads(body or b"{}"), dry_run)
            key = (res.group_version, res.plural, ns, name or "")
            current = self.objects.get(key)
            if current is None and method != "PUT":
                return 404, _status(404, "NotFound", f'{res.plural} "{name}" not found')
            if method == "GET":
                return 200, current  # type: ignore[return-value]
            if method == "DELETE":
                if not dry_run:
                    del self.objects[key]
                return 200, current  # type: ignore[return-value]
            if method == "PUT":
                obj = json.loads(body or b"{}")
            elif method == "PATCH":
                obj = _merge_patch(current, json.loads(body or b"{}"))
            else:
                return 405, _status(405, "MethodNotAllowed", f"{method} is not supported")
            return self._store(res, ns, obj, dry_run, created=current is None)

    def _list(self, res: Resource, ns: str, selector: str) -> dict[str, Any]:
        items = [
            o
            for (gv, plural, ons, _), o in self.objects.items()
            if gv == res.group_version and plural == res.plural and (not ns or ons == ns)
            if label_selector_matches(selector, o.get("metadata", {}).get("labels") or {})
        ]
        return {
            "apiVersion": res.group_version,
            "kind": f"{res.kind}List",
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": items,
        }

    def _create(self, res: Resource, ns: str, obj: dict[str, Any], dry_run: bool) -> tuple[int, dict]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if (res.group_version, res.plural, ns, meta.get("name", "")) in self.objects:
            return 409, _status(409, "AlreadyExists", f'{res.plural} "{meta.get("name")}" already exists')
        return self._store(res, ns, obj, dry_run, created=True)

    def _store(self, res: Resource, ns: str, obj: dict, dry_run: bool, created: bool) -> tuple[int, dict]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            return 422, _status(422, "Invalid", f"{res.kind}: metadata.name is required")
        if res.namespaced:
            meta["namespace"] = ns
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["resourceVersion"] = str(next(self._rv))
        obj.setdefault("apiVersion", res.group_version)
        obj.setdefault("kind", res.kind)
        if not dry_run:
            self.objects[(res.group_version, res.plural, ns, meta["name"])] = obj
        return (201 if created else 200), obj

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                code, payload = api.handle(self.command, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        return Handler


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
                results.append({"manifest": rel.get("manifest", "")})
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
            out.append(created)
        return out
    finally:
        for api in apis:
            api.__exit__(None, None, None)


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
    """Render `chart` with `values` through real Helm and return the objects it would apply.

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

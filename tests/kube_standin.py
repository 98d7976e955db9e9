"""A stand-in Kubernetes API server on 127.0.0.1 that records what a client applies.

Enough of the API for Helm to install and upgrade a release: discovery (/version, /api, /apis and
the resource lists), and create/get/list/update/patch/delete on an in-memory store, JSON only.
Tests point Helm at it (tests/helm_capture.py) to capture exactly the objects Helm would apply.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
        if body and not body.lstrip().startswith(b"{"):
            return 415, _status(
                415, "UnsupportedMediaType", "the stand-in API server accepts JSON bodies only"
            )
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

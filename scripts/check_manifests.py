#!/usr/bin/env python3
"""Consistency checks on a set of gatecast Kubernetes manifests.

    check_manifests.py [--split-crds OUT] FILE...

The files together form one deployment (a rendered chart, or the files of
k8s/). Besides what a schema can check, it verifies that:
  - Services, the PDB, the NetworkPolicy, topology spread constraints and the
    ServiceMonitor select the gateway pods, and named ports exist;
  - the HPA targets the Deployment, which then leaves `replicas` unset;
  - referenced ConfigMaps, Secrets and ServiceAccounts exist in the set
    (a Secret the set does not create is reported as external, not an error);
  - the gateway container: probes /readyz (readiness) and /healthz (liveness)
    on the public port, a preStop sleep of 10s or more, memory request =
    limit, terminationGracePeriodSeconds above
    preStop + GATECAST_SHUTDOWN_GRACE, GATECAST_ADVERTISE_IP from
    status.podIPs (status.podIP is IPv6 on an IPv6-primary dual-stack
    cluster), and the restricted security context;
  - with GATECAST_REGISTER_LISTEN (GatewayWorker's Register), a named port
    `register` that matches it, kept inside the cluster like api and inner;
  - no ConfigMap holds a Redis URL with credentials (user:password@);
  - every object has a namespace other than "default".

ServiceMonitor (monitoring.coreos.com/v1) is a CRD that kubernetes-validate
has no schema for: it is checked here (selector, port, path) and, with
--split-crds OUT, every other document is written to OUT for
kubernetes-validate. Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

# Named container ports that must stay inside the cluster.
INTERNAL_PORTS = ("api", "inner", "register")

CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/")
# Seconds a cloud load balancer may take to stop sending to a deleted pod.
MIN_PRE_STOP = 10
errors: list[str] = []
notes: list[str] = []


def err(msg: str) -> None:
    errors.append(msg)


def ident(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def matches(selector: dict[str, str] | None, labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def duration_seconds(text: str) -> float:
    total = 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"unparsable duration {text!r}")
    for num, unit in parts:
        total += float(num) * units[unit]
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split-crds", metavar="OUT")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    docs: list[dict[str, Any]] = []
    for path in args.files:
        with open(path, encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                if doc:
                    docs.append(doc)

    if args.split_crds:
        plain = [d for d in docs if not str(d.get("apiVersion", "")).startswith(CRD_GROUPS)]
        with open(args.split_crds, "w", encoding="utf-8") as fh:
            yaml.safe_dump_all(plain, fh, sort_keys=False)

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind", "?"), []).append(d)
        ns = d.get("metadata", {}).get("namespace")
        if d.get("kind") != "Namespace" and (not ns or ns == "default"):
            err(f"{ident(d)}: metadata.namespace missing or 'default'")

    names = {k: {d["metadata"]["name"] for d in v} for k, v in by_kind.items()}

    deployments = [
        d for d in by_kind.get("Deployment", [])
        if any(c.get("name") == "gatecast" for c in d["spec"]["template"]["spec"]["containers"])
    ]
    if len(deployments) != 1:
        err(f"expected one gatecast Deployment, found {len(deployments)}")
        return report()
    dep = deployments[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    if not matches(dep["spec"]["selector"].get("matchLabels"), pod_labels):
        err("Deployment selector does not match its pod template labels")
    container = next(c for c in spec["containers"] if c["name"] == "gatecast")
    port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for required in ("http", "api"):
        if required not in port_names:
            err(f"gatecast container lacks the named port {required!r}")

    # Configuration as the container sees it.
    env: dict[str, Any] = {}
    for ref in container.get("envFrom", []):
        cm_name = ref.get("configMapRef", {}).get("name")
        if cm_name:
            cm = next((c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == cm_name), None)
            if cm is None:
                err(f"envFrom ConfigMap {cm_name!r} is not in the set")
            else:
                env.update(cm.get("data", {}))
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", e.get("valueFrom"))
        skr = (e.get("valueFrom") or {}).get("secretKeyRef")
        if skr and skr["name"] not in names.get("Secret", set()):
            notes.append(f"env {e['name']} reads Secret {skr['name']!r}, which the set does not create (external)")

    # The inner port (GatewayWorker) is served only when the set enables it:
    # then on 0.0.0.0 with a named port and a gateway secret key; else on
    # loopback (or gatecast's loopback default) with no port declared.
    inner = env.get("GATECAST_INNER_LISTEN")
    if "inner" in port_names or "register" in port_names:
        if "GATECAST_GATEWAY_SECRET_KEY" not in env:
            err("the inner/Register port is exposed without GATECAST_GATEWAY_SECRET_KEY "
                "(gatecast refuses to start; anyone reaching it would read every client)")
    elif inner is not None and not (isinstance(inner, str) and inner.startswith("127.0.0.1:")):
        err(f"GATECAST_INNER_LISTEN={inner!r} without a named port 'inner': keep it on loopback")
    listens = [("GATECAST_LISTEN", "http"), ("GATECAST_API_LISTEN", "api")]
    if "inner" in port_names:
        listens.append(("GATECAST_INNER_LISTEN", "inner"))
    for listen, port in listens:
        val = env.get(listen)
        if not isinstance(val, str) or not val.startswith("0.0.0.0:"):
            err(f"{listen} must listen on 0.0.0.0 in a pod, got {val!r}")
        elif port in port_names and int(val.rsplit(":", 1)[1]) != port_names[port]:
            err(f"{listen}={val} does not match containerPort {port}={port_names[port]}")

    register = env.get("GATECAST_REGISTER_LISTEN")
    if register is not None:
        if not isinstance(register, str) or not register.startswith("0.0.0.0:"):
            err(f"GATECAST_REGISTER_LISTEN must listen on 0.0.0.0 in a pod, got {register!r}")
        elif "register" not in port_names:
            err("GATECAST_REGISTER_LISTEN is set but the container lacks the named port 'register'")
        elif int(register.rsplit(":", 1)[1]) != port_names["register"]:
            err(f"GATECAST_REGISTER_LISTEN={register} does not match containerPort register={port_names['register']}")
    elif "register" in port_names:
        err("the container has a 'register' port but GATECAST_REGISTER_LISTEN is not set")

    for cm in by_kind.get("ConfigMap", []):
        url = str((cm.get("data") or {}).get("GATECAST_REDIS_URL", ""))
        if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
            err(f"{ident(cm)} holds a Redis URL with credentials: keep it in a Secret")

    adv = env.get("GATECAST_ADVERTISE_IP")
    if not (isinstance(adv, dict) and adv.get("fieldRef", {}).get("fieldPath") == "status.podIPs"):
        err("GATECAST_ADVERTISE_IP must come from the downward API (status.podIPs: gatecast takes "
            "the IPv4 address; status.podIP is IPv6 on IPv6-primary dual-stack clusters)")
    if "GATECAST_API_KEY" not in env:
        err("GATECAST_API_KEY is not set")

    image = str(container.get("image", ""))
    tagged = "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"))
    if tagged and container.get("imagePullPolicy") == "Always":
        err(f"imagePullPolicy Always on a fixed image ({image}): a registry outage blocks scale-out; use IfNotPresent")
    if dep["spec"].get("minReadySeconds", 0) < 5:
        err("Deployment minReadySeconds under 5: a pod that fails right after start takes the next one's clients")

    # Probes and drain.
    rp = container.get("readinessProbe", {}).get("httpGet", {})
    lp = container.get("livenessProbe", {}).get("httpGet", {})
    if rp.get("path") != "/readyz" or rp.get("port") not in ("http", port_names.get("http")):
        err(f"readinessProbe must GET /readyz on the public port, got {rp}")
    if lp.get("path") != "/healthz" or lp.get("port") not in ("http", port_names.get("http")):
        err(f"livenessProbe must GET /healthz on the public port, got {lp}")
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(cmd) != 2 or not cmd[0].endswith("sleep"):
        err(f"preStop must be a sleep, got {cmd}")
        pre_stop = 0.0
    else:
        pre_stop = float(cmd[1])
    if pre_stop < MIN_PRE_STOP:
        err(f"preStop sleep {pre_stop:g}s is shorter than a cloud load balancer takes to "
            f"deregister a target: at least {MIN_PRE_STOP}s")
    grace = duration_seconds(str(env.get("GATECAST_SHUTDOWN_GRACE", "20s")))
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    if tgps <= pre_stop + grace:
        err(f"terminationGracePeriodSeconds {tgps} must exceed preStop {pre_stop:g}s + shutdown grace {grace:g}s")

    # Security.
    psc = spec.get("securityContext", {})
    csc = container.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        err("runAsNonRoot is not set")
    if (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        err("seccompProfile RuntimeDefault is not set")
    if csc.get("allowPrivilegeEscalation") is not False:
        err("allowPrivilegeEscalation must be false")
    if csc.get("readOnlyRootFilesystem") is not True:
        err("readOnlyRootFilesystem must be true")
    if "ALL" not in (csc.get("capabilities", {}).get("drop") or []):
        err("capabilities must drop ALL")
    for field in ("cpu", "memory"):
        if field not in container.get("resources", {}).get("requests", {}):
            err(f"resources.requests.{field} missing")
    res = container.get("resources", {})
    mem_req, mem_lim = res.get("requests", {}).get("memory"), res.get("limits", {}).get("memory")
    if mem_lim is not None and str(mem_req) != str(mem_lim):
        err(f"memory request {mem_req} != limit {mem_lim}: a Burstable pod is evicted first "
            "under memory pressure (every client reconnects)")
    sa = spec.get("serviceAccountName")
    if sa and sa != "default" and sa not in names.get("ServiceAccount", set()):
        notes.append(f"ServiceAccount {sa!r} is not in the set (external)")
    for tsc in spec.get("topologySpreadConstraints", []):
        if not matches(tsc.get("labelSelector", {}).get("matchLabels"), pod_labels):
            err(f"topologySpreadConstraint on {tsc.get('topologyKey')} does not select the gateway pods")

    # Services.
    services = by_kind.get("Service", [])
    gateway_services = [s for s in services if matches(s["spec"].get("selector"), pod_labels)]
    served = set()
    for s in gateway_services:
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            if isinstance(tp, str) and tp not in port_names:
                err(f"{ident(s)} targets unknown port name {tp!r}")
            served.add(tp if isinstance(tp, str) else next((n for n, v in port_names.items() if v == tp), tp))
        if s["spec"].get("type") in ("LoadBalancer", "NodePort") and any(
            p.get("targetPort") in INTERNAL_PORTS for p in s["spec"]["ports"]
        ):
            err(f"{ident(s)} exposes the internal API, inner or Register port outside the cluster")
    for need in ("http", "api"):
        if need not in served:
            err(f"no Service serves the gateway port {need!r}")
    for s in services:
        if s not in gateway_services and not any(
            matches(s["spec"].get("selector"), d["spec"]["template"]["metadata"]["labels"])
            for d in by_kind.get("Deployment", [])
        ):
            err(f"{ident(s)} selects no pods of the set")

    # HPA / replicas.
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
            err(f"{ident(h)} does not target the gatecast Deployment")
        if h["spec"].get("minReplicas", 1) > h["spec"]["maxReplicas"]:
            err(f"{ident(h)}: minReplicas > maxReplicas")
        up = (h["spec"].get("behavior") or {}).get("scaleUp") or {}
        if up.get("stabilizationWindowSeconds", 0) < 60:
            err(f"{ident(h)}: scale-up stabilization under 60s: a scale-in's reconnect spike scales up again")
    if hpas and "replicas" in dep["spec"]:
        err("the Deployment sets replicas although an HPA owns the count")

    for p in by_kind.get("PodDisruptionBudget", []):
        if not matches(p["spec"]["selector"].get("matchLabels"), pod_labels):
            err(f"{ident(p)} does not select the gateway pods")
    for n in by_kind.get("NetworkPolicy", []):
        sel = n["spec"]["podSelector"].get("matchLabels")
        if matches(sel, pod_labels):
            allowed = {p.get("port") for rule in n["spec"].get("ingress", []) for p in rule.get("ports", [])}
            for name in ("http", *INTERNAL_PORTS):
                if name in port_names and port_names[name] not in allowed and name not in allowed:
                    err(f"{ident(n)} blocks the {name} port")
            internal = {port_names[k] for k in INTERNAL_PORTS if k in port_names} | set(INTERNAL_PORTS)
            for rule in n["spec"].get("ingress", []):
                if not {p.get("port") for p in rule.get("ports", [])} & internal:
                    continue
                peers = rule.get("from")
                if not peers or any(p.get("namespaceSelector") == {} and not p.get("podSelector")
                                    for p in peers):
                    err(f"{ident(n)} opens the internal ports to every namespace: "
                        "default to the release's namespace (podSelector: {})")
        elif not any(matches(sel, d["spec"]["template"]["metadata"]["labels"]) for d in by_kind.get("Deployment", [])) \
                and not any(matches(sel, p["metadata"].get("labels", {})) for p in by_kind.get("Pod", [])):
            err(f"{ident(n)} selects no pods of the set")

    for i in by_kind.get("Ingress", []):
        for rule in i["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                svc = path["backend"]["service"]
                target = next((s for s in services if s["metadata"]["name"] == svc["name"]), None)
                if target is None or target not in gateway_services:
                    err(f"{ident(i)} routes to {svc['name']!r}, not a gateway Service")
                elif svc["port"].get("name") not in {p.get("name") for p in target["spec"]["ports"]} and svc["port"].get("number") not in {p["port"] for p in target["spec"]["ports"]}:
                    err(f"{ident(i)} routes to a port {svc['port']} that {svc['name']} lacks")
                elif any(p.get("targetPort") in INTERNAL_PORTS for p in target["spec"]["ports"]):
                    err(f"{ident(i)} exposes the internal API")

    for route in by_kind.get("HTTPRoute", []):
        if not route["spec"].get("parentRefs"):
            err(f"{ident(route)} has no parentRefs")
        for rule in route["spec"].get("rules", []):
            for ref in rule.get("backendRefs", []):
                target = next((s for s in services if s["metadata"]["name"] == ref["name"]), None)
                port = next((p for p in (target or {}).get("spec", {}).get("ports", []) if p["port"] == ref.get("port")), None)
                if target is None or target not in gateway_services:
                    err(f"{ident(route)} routes to {ref['name']!r}, not a gateway Service")
                elif port is None:
                    err(f"{ident(route)} routes to port {ref.get('port')} that {ref['name']} lacks")
                elif port.get("targetPort") != "http":
                    err(f"{ident(route)} exposes a port other than the public one")
        notes.append(f"{ident(route)}: CRD, checked here instead of by kubernetes-validate")

    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"].get("selector", {}).get("matchLabels")
        targets = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
        if not targets:
            err(f"{ident(sm)} selects no Service")
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("path", "/metrics") != "/metrics":
                err(f"{ident(sm)} scrapes {ep.get('path')}, not /metrics")
            for t in targets:
                svc_ports = {p.get("name"): p.get("targetPort") for p in t["spec"]["ports"]}
                if ep.get("port") not in svc_ports:
                    err(f"{ident(sm)} endpoint port {ep.get('port')!r} not on {ident(t)}")
                elif svc_ports[ep["port"]] != "api":
                    err(f"{ident(sm)} does not scrape the API listener (metrics live there)")
        notes.append(f"{ident(sm)}: CRD, checked here instead of by kubernetes-validate")

    return report()


def report() -> int:
    for n in notes:
        print(f"  note: {n}")
    for e in errors:
        print(f"  FAIL: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

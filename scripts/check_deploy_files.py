#!/usr/bin/env python3
"""Checks of the deployment files that no off-the-shelf linter covers here.

    check_deploy_files.py dockerfile              Dockerfile + .dockerignore vs Cargo.toml
    check_deploy_files.py compose CONFIG.json     `docker-compose config --format json` output
    check_deploy_files.py nginx deploy/nginx.conf nginx syntax (crossplane) + WebSocket proxying
    check_deploy_files.py chart-readme CHART [--write]  the README's values table matches values.yaml
    check_deploy_files.py kustomization k8s OUT   resources listed, files present, image name;
                                                  configMapGenerator's ConfigMaps written to OUT

Run from the repository root. Exit status 1 on any problem.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

errors: list[str] = []


def err(msg: str) -> None:
    errors.append(msg)


def dockerfile() -> None:
    with open("Cargo.toml", "rb") as fh:
        cargo = tomllib.load(fh)
    package = cargo.get("package", {}).get("name")
    bins = [b["name"] for b in cargo.get("bin", []) if "name" in b]
    if not bins and package and os.path.exists("src/main.rs"):
        bins = [package]
    if "gatecast" not in bins:
        err(f"Cargo.toml builds no binary named gatecast (binaries: {bins})")
    if not os.path.exists("Cargo.lock"):
        err("Cargo.lock is missing: `cargo build --locked` in the Dockerfile would fail")

    with open("Dockerfile", encoding="utf-8") as fh:
        text = re.sub(r"\\\n", " ", fh.read())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    froms = [a for i, a in instr if i == "FROM"]
    if len(froms) < 2:
        err("Dockerfile is not multi-stage")
    else:
        if not re.match(r"rust:1\.95-bookworm\s+AS\s+(\w+)", froms[0], re.I):
            err(f"the build stage should be `FROM rust:1.95-bookworm AS ...`, got {froms[0]!r}")
        if not froms[-1].startswith("debian:bookworm-slim"):
            err(f"the runtime stage should be debian:bookworm-slim, got {froms[-1]!r}")
    # Dependencies compile in a layer of their own: a `cargo build` before
    # the sources are copied (after only the manifests and the lockfile).
    first_src = next((n for n, (i, a) in enumerate(instr)
                      if i == "COPY" and not a.startswith("--from") and
                      any(t in (".", "src", "src/", "./") for t in a.split()[:-1])), None)
    first_build = next((n for n, (i, a) in enumerate(instr) if i == "RUN" and "cargo build" in a), None)
    if first_build is None or first_src is None or first_build > first_src:
        err("the Dockerfile must compile the dependencies before copying the sources "
            "(a dependency-only stage from Cargo.toml + Cargo.lock), or every CI build recompiles them")
    else:
        pre = " ".join(a for i, a in instr[:first_build] if i == "COPY")
        for need in ("Cargo.toml", "Cargo.lock", "emitter/Cargo.toml", "bench/Cargo.toml"):
            if need not in pre:
                err(f"the dependency stage does not copy {need}")
    runs = " ".join(a for i, a in instr if i == "RUN")
    m = re.search(r"cargo build ([^&;]*)", runs)
    if not m or "--release" not in m.group(1) or "--locked" not in m.group(1):
        err("the build stage must run `cargo build --release --locked`")
    for b in re.findall(r"--bin\s+(\S+)", m.group(1) if m else ""):
        if b not in bins:
            err(f"Dockerfile builds --bin {b}, which Cargo.toml does not define")
    if "target/release/gatecast" not in runs and not any(
        i == "COPY" and "target/release/gatecast" in a for i, a in instr
    ):
        err("the Dockerfile does not take target/release/gatecast (the binary cargo builds)")
    runtime = instr[max(idx for idx, (i, _) in enumerate(instr) if i == "FROM"):]
    user = [a for i, a in runtime if i == "USER"]
    if not user or not re.match(r"^[1-9][0-9]*(:[0-9]+)?$", user[-1]):
        err("the runtime stage must switch to a numeric non-root USER (runAsNonRoot checks it)")
    env = " ".join(a for i, a in runtime if i == "ENV")
    for want in ("GATECAST_API_LISTEN=0.0.0.0:8081", "GATECAST_LOG_FORMAT=json"):
        if want not in env:
            err(f"the runtime image should set ENV {want}")
    exposed = set(" ".join(a for i, a in runtime if i == "EXPOSE").split())
    for port in ("8080", "8081"):
        if port not in exposed and f"{port}/tcp" not in exposed:
            err(f"EXPOSE lacks {port}")
    # GatewayWorker's ports are opt-in (they need --gateway-secret-key).
    for port in ("2900", "1236"):
        if port in exposed or f"{port}/tcp" in exposed:
            err(f"EXPOSE {port}: GatewayWorker's ports are opt-in, not exposed by default")
    hc = [a for i, a in runtime if i == "HEALTHCHECK"]
    if not hc or "http://127.0.0.1:8080/healthz" not in hc[-1]:
        err("HEALTHCHECK must probe http://127.0.0.1:8080/healthz")
    if hc and "curl" in hc[-1] and "curl" not in " ".join(a for i, a in runtime if i == "RUN"):
        err("HEALTHCHECK uses curl, which the runtime stage does not install")
    ep = [a for i, a in runtime if i == "ENTRYPOINT"]
    if not ep or "gatecast" not in ep[-1] or not ep[-1].lstrip().startswith("["):
        err("ENTRYPOINT must run the binary in exec form (so it gets SIGTERM)")

    with open(".dockerignore", encoding="utf-8") as fh:
        ignored = [l.strip() for l in fh if l.strip() and not l.startswith("#")]
    for needed in ("Cargo.toml", "Cargo.lock", "src", "src/main.rs"):
        for pat in ignored:
            if not pat.startswith("!") and fnmatch.fnmatch(needed, pat.strip("/")):
                err(f".dockerignore pattern {pat!r} drops {needed}, which the build needs")


def compose(config_json: str) -> None:
    with open(config_json, encoding="utf-8") as fh:
        cfg = json.load(fh)
    svcs = cfg.get("services", {})
    redis = [n for n, s in svcs.items() if str(s.get("image", "")).startswith("redis:")]
    if not redis:
        err("compose: no redis service")
    gw = {n: s for n, s in svcs.items() if s.get("build")}
    if not gw:
        err("compose: no gatecast service built from the Dockerfile")
    replicas = 0
    for name, s in gw.items():
        replicas += (s.get("deploy") or {}).get("replicas", 1) or 1
        env = s.get("environment") or {}
        if not str(env.get("GATECAST_REDIS_URL", "")).startswith(f"redis://{redis[0] if redis else 'redis'}:"):
            err(f"compose: {name} does not point GATECAST_REDIS_URL at the redis service")
        if "GATECAST_ADVERTISE_IP" in env:
            err(f"compose: {name} sets GATECAST_ADVERTISE_IP; each replica must advertise its own container IP")
        if s.get("ports"):
            err(f"compose: {name} publishes ports itself; only the load balancer should")
        nofile = (s.get("ulimits") or {}).get("nofile") or {}
        hard = nofile.get("hard", nofile) if isinstance(nofile, dict) else nofile
        if not isinstance(hard, int) or hard < 65536:
            err(f"compose: {name} needs ulimits nofile >= 65536 (one descriptor per WebSocket), got {nofile or 'none'}")
    if replicas != 3:
        err(f"compose: {replicas} gatecast replicas, expected 3")
    lbs = [s for s in svcs.values() if str(s.get("image", "")).startswith("nginx")]
    if not lbs:
        err("compose: no nginx load balancer")
    else:
        published = {(p.get("published"), p.get("host_ip", "")) for p in lbs[0].get("ports", [])}
        if ("8080", "") not in published:
            err(f"compose: the load balancer does not publish 8080 ({published})")
        if ("8081", "127.0.0.1") not in published:
            err(f"compose: the load balancer should publish the API on 127.0.0.1:8081 only ({published})")
        mounts = [v.get("source", "") for v in lbs[0].get("volumes", [])]
        if not any(m.endswith("deploy/nginx.conf") for m in mounts):
            err("compose: the load balancer does not mount deploy/nginx.conf")


def nginx(path: str) -> None:
    import crossplane

    loose = crossplane.parse(path, single=True)
    strict = crossplane.parse(path, single=True, strict=True)
    # crossplane mistakes the entries of a `map` block for unknown directives.
    map_lines: list[tuple[int, int]] = []

    def walk(block: list[dict]) -> int:
        last = 0
        for d in block:
            end = d["line"]
            if "block" in d:
                end = max(end, walk(d["block"]) + 1)
                if d["directive"] == "map":
                    map_lines.append((d["line"], end))
            last = max(last, end)
        return last

    for cfg in loose["config"]:
        walk(cfg.get("parsed", []))
    for e in strict["errors"]:
        if not any(a <= (e.get("line") or 0) <= b for a, b in map_lines):
            err(f"nginx: {e['error']}")
    text = open(path, encoding="utf-8").read()
    for need in ("proxy_set_header Upgrade $http_upgrade", "proxy_set_header Connection $connection_upgrade",
                 "proxy_http_version 1.1", "listen 8080", "listen 8081", "proxy_read_timeout"):
        if need not in text:
            err(f"nginx: missing `{need}`")
    m = re.search(r"proxy_read_timeout\s+(\d+)(s|m|h)?;", text)
    if m and int(m.group(1)) * {"s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)] < 300:
        err("nginx: proxy_read_timeout of the WebSocket location is too short for long-lived connections")


def parse_env_file(path: str) -> dict[str, str]:
    """A kustomize `envs` file: KEY=value lines, # comments, no quoting."""
    data: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
                err(f"{path}:{n}: not KEY=value: {line!r}")
                continue
            if value[:1] in ("'", '"'):
                err(f"{path}:{n}: kustomize keeps quotes in values: drop them")
            data[key] = value
    return data


def kustomization(directory: str, generated_out: str = "") -> None:
    import yaml

    with open(os.path.join(directory, "kustomization.yaml"), encoding="utf-8") as fh:
        k = yaml.safe_load(fh)
    resources = k.get("resources", [])
    for r in resources:
        if not os.path.exists(os.path.join(directory, r)):
            err(f"kustomization: resource {r} does not exist")
    top = {f for f in os.listdir(directory) if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml"}
    for f in sorted(top - set(resources)):
        err(f"kustomization: {f} is not listed in resources")
    # No Secret with values ships: applied as-is, a committed secret is public.
    for r in resources:
        with open(os.path.join(directory, r), encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                if doc and doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                    err(f"kustomization: {r} ships Secret values; use a secretGenerator from a git-ignored file")
    for gen in k.get("secretGenerator", []):
        sources = list(gen.get("envs", [])) + [f.split("=", 1)[-1] for f in gen.get("files", [])]
        if gen.get("literals"):
            err(f"kustomization: secretGenerator {gen.get('name')} has literals (values in git)")
        for src in sources:
            path = os.path.join(directory, src)
            ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path]).returncode == 0
            tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path],
                                     capture_output=True).returncode == 0
            if not ignored or tracked:
                err(f"kustomization: secretGenerator source {path} must be git-ignored and untracked")
            if not os.path.exists(path + ".example"):
                err(f"kustomization: {path}.example (how to create {src}) is missing")
    images = set()
    for r in resources:
        with open(os.path.join(directory, r), encoding="utf-8") as fh:
            images.update(re.findall(r"^\s*image:\s*\"?([^\s\"]+)", fh.read(), re.M))
    for i in k.get("images", []):
        if not any(img == i["name"] or img.startswith(i["name"] + ":") or img.startswith(i["name"] + "@") for img in images):
            err(f"kustomization: images entry {i['name']} matches no image ({images})")
    generated = []
    gens = k.get("configMapGenerator", [])
    if not gens:
        err("kustomization: no configMapGenerator: a ConfigMap change would not roll the pods")
    for gen in gens:
        data: dict[str, str] = {}
        for src in gen.get("envs", []):
            data.update(parse_env_file(os.path.join(directory, src)))
        if generated_out:
            cm = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": gen["name"], "namespace": gen.get("namespace", k.get("namespace")),
                               "labels": (gen.get("options") or {}).get("labels", {})},
                  "data": data}
            path = os.path.join(generated_out, f"generated-configmap-{gen['name']}.yaml")
            with open(path, "w", encoding="utf-8") as fh:
                yaml.safe_dump(cm, fh, sort_keys=False)
            generated.append(path)
    print(" ".join([os.path.join(directory, r) for r in resources] + generated))


README_BEGIN = "<!-- values-table: generated by scripts/check_deploy_files.py chart-readme --write -->"
README_END = "<!-- end of values-table -->"


def values_comments(path: str) -> dict[str, str]:
    """The comment block right above each key of values.yaml, by dotted path
    (commented-out YAML examples left out)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    for line in open(path, encoding="utf-8"):
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text and not re.match(r"^(- |[a-z][\w./-]*:(\s|$))", text):
                block.append(text)
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            block = []
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        if block:
            comments[".".join(k for _, k in stack)] = " ".join(block)
        block = []
    return comments


def values_rows(values: object, schema: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    """One row per leaf of values.yaml (maps recurse, lists and scalars are leaves)."""
    rows = []
    if isinstance(values, dict) and values and not (prefix and schema.get("additionalProperties") not in (False, None)):
        props = schema.get("properties", {})
        for key, value in values.items():
            path = f"{prefix}.{key}" if prefix else key
            rows += values_rows(value, props.get(key, {}), path)
    else:
        default = json.dumps(values) if values not in ("", None) else '""' if values == "" else "null"
        desc = str(schema.get("description", "")).replace("|", "\\|")
        rows.append((prefix, default.replace("|", "\\|"), desc))
    return rows


def parents(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def values_table(chart: str) -> str:
    import yaml

    with open(os.path.join(chart, "values.yaml"), encoding="utf-8") as fh:
        values = yaml.safe_load(fh)
    with open(os.path.join(chart, "values.schema.json"), encoding="utf-8") as fh:
        schema = json.load(fh)
    lines = ["| key | default | description |", "| --- | --- | --- |"]
    notes = values_comments(os.path.join(chart, "values.yaml"))
    for key, default, desc in values_rows(values, schema):
        # A key's own comment, else its parent's (for the first leaf only).
        text = notes.pop(key, "") or next((notes.pop(p) for p in parents(key) if p in notes), "") or desc
        lines.append(f"| `{key}` | `{default}` | {text.replace('|', '/')} |")
    return "\n".join(lines)


def chart_readme(chart: str, write: str = "") -> None:
    path = os.path.join(chart, "README.md")
    if not os.path.exists(path):
        err(f"{path} is missing")
        return
    text = open(path, encoding="utf-8").read()
    if README_BEGIN not in text or README_END not in text:
        err(f"{path}: no values table markers ({README_BEGIN} ... {README_END})")
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    want = f"{head}{README_BEGIN}\n{values_table(chart)}\n{README_END}{tail}"
    if write == "--write":
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(want)
    elif want != text:
        err(f"{path}: the values table is not values.yaml's: run "
            f"scripts/check_deploy_files.py chart-readme {chart} --write (in .venv-deploy)")


def main() -> int:
    cmd, *args = sys.argv[1:] or ["?"]
    {"dockerfile": dockerfile, "compose": compose, "nginx": nginx, "kustomization": kustomization,
     "chart-readme": chart_readme}[cmd](*args)
    for e in errors:
        print(f"  FAIL: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

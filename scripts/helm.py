#!/usr/bin/env python3
"""A small `helm lint` / `helm template` stand-in on helm-python-sdk.

helm-python-sdk (PyPI, `import helm_python`) is Helm v4's Go code compiled
into a shared library: no helm binary, no cluster, no network.

    helm.py lint CHART [-f VALUES]... [--set K=V]... [--strict]
    helm.py template CHART [-f VALUES]... [--set K=V]... [--name NAME] [--namespace NS]
                           [--output-dir DIR]

`template` validates the merged values against values.schema.json, renders
every template and prints the manifests as one multi-document YAML stream in
template-path order (NOTES.txt and partials excluded), like `helm template`.
With --output-dir it also writes one file per template. Exit status 1 on any
lint error, schema violation or render failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import helm_python as helm


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge values files left to right, like repeated `-f` (maps merge, the rest replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[str], sets: list[str] | None = None) -> dict[str, Any]:
    """Values files (-f) left to right, then --set expressions, like helm."""
    values: dict[str, Any] = {}
    for path in files:
        with open(path, encoding="utf-8") as fh:
            values = deep_merge(values, helm.values_from_yaml(fh.read()) or {})
    for expr in sets or []:
        values = deep_merge(values, helm.parse_set_string(expr))
    return values


SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def cmd_lint(args: argparse.Namespace) -> int:
    values = load_values(args.values, args.set)
    report = helm.lint(args.chart, values or None, strict=args.strict, namespace=args.namespace)
    failed = bool(report.get("errors"))
    for msg in report.get("messages") or []:
        sev = int(msg.get("severity", 0))
        if sev >= 3 or (args.strict and sev >= 2):
            failed = True
        print(f"[{SEVERITY.get(sev, sev)}] {msg.get('path', '')}: {msg.get('error', '')}")
    for err in report.get("errors") or []:
        print(f"[ERROR] {err}")
    linted = report.get("total_charts_linted", 0)
    if not linted:
        failed = True
    print(f"{linted} chart(s) linted, {'FAILED' if failed else 'no failures'}")
    return 1 if failed else 0


def cmd_template(args: argparse.Namespace) -> int:
    values = load_values(args.values, args.set)
    with helm.Chart.load(args.chart) as chart:
        # Helm checks the coalesced values (defaults + overrides) at install.
        chart.validate_schema(chart.merge_values(values))
        manifests = chart.render(
            values, name=args.name, namespace=args.namespace, is_install=True
        )
    docs = []
    for path in sorted(manifests):
        base = os.path.basename(path)
        if base == "NOTES.txt" or base.startswith("_"):
            continue
        body = manifests[path].strip()
        if not body:
            continue
        docs.append(f"# Source: {path}\n{body}\n")
        if args.output_dir:
            target = os.path.join(args.output_dir, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as fh:
                fh.write(body + "\n")
    sys.stdout.write("---\n".join(docs))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("lint", "template"):
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("-f", "--values", action="append", default=[], metavar="FILE")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--namespace", default="default")
        if name == "lint":
            p.add_argument("--strict", action="store_true", help="warnings fail too")
        else:
            p.add_argument("--name", default="release-name")
            p.add_argument("--output-dir")
    args = parser.parse_args()
    try:
        return cmd_lint(args) if args.command == "lint" else cmd_template(args)
    except helm.HelmError as exc:
        print(f"helm {args.command} failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

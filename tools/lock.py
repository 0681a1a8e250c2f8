#!/usr/bin/env python
"""Write the dependency locks (requirements/<extra>.lock) from the environment this runs in.

    python tools/lock.py            # after the suite passed in this environment (make test-latest)
    python tools/lock.py --check    # exit 1 if the committed locks differ from this environment

Each lock pins every package of one install set of pyproject.toml — the base dependencies plus an
extra (dev, cuda, ascend, eval) — and their transitive requirements, to the version installed
here, so a fresh machine installs exactly what the suite passed with. The closure is read from
the installed packages' own metadata (markers evaluated for this Python and platform), not
re-resolved against the registry.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = ("dev", "cuda", "ascend", "eval", "bnb")


def _installed() -> dict:
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}


def _applies(req: Requirement, extras) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate(dict(env, extra=e)) for e in (extras or {""}))


def closure(requirements, installed) -> dict:
    """name -> version of `requirements` and everything they need, as installed here."""
    out, todo = {}, [(Requirement(r), set()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name == "dualbooth":
            todo += [(Requirement(r), set()) for r in _project_requirements(req.extras)]
            continue
        dist = installed.get(name)
        if dist is None:
            sys.exit(f"error: {req.name} is required but not installed here; install the dev set first")
        if not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"error: installed {req.name} {dist.version} does not satisfy {req}")
        seen = out.get(name)
        extras = set(req.extras)
        if seen is not None and extras <= seen[1]:
            continue
        out[name] = (dist.version, (seen[1] if seen else set()) | extras)
        for r in dist.requires or []:
            sub = Requirement(r)
            if _applies(sub, extras):
                sub.marker = None
                todo.append((sub, set()))
    return {n: v for n, (v, _) in out.items()}


def _project_requirements(extras=()) -> list:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [r for r in reqs if _applies(Requirement(r), set())]


def render(extra: str, pins: dict) -> str:
    head = (f"# Lock for `pip install -e \".[{extra}]\"`: every package at the version the test suite passed\n"
            f"# with. Written by tools/lock.py (make test-latest moves it forward); do not edit by hand.\n")
    return head + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the committed locks instead of writing")
    p.add_argument("--out", default=os.path.join(ROOT, "requirements"), help="folder of the lock files")
    args = p.parse_args()
    installed = _installed()
    stale = []
    for extra in EXTRAS:
        text = render(extra, closure(_project_requirements((extra,)), installed))
        path = os.path.join(args.out, f"{extra}.lock")
        old = open(path).read() if os.path.isfile(path) else ""
        if args.check:
            if re.sub(r"^#.*\n", "", old, flags=re.M) != re.sub(r"^#.*\n", "", text, flags=re.M):
                stale.append(path)
            continue
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"{path}: {text.count('==')} packages")
    if stale:
        print(f"error: locks differ from this environment: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

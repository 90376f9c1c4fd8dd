"""Checks that the server crate's modules form no import cycle, and prints the graph.

Usage: python3 -m scripts.checks.module_graph [--crate crates/skyreels-server] [--print]

A unit is a module of the crate with its submodules (`api`, `engine`, `backend::memory`,
`backend::redis`, `contract`...): what a parent and its own children say of each other is
internal to a unit. Every path into another unit counts as an import (`use crate::x::...`,
`crate::x::f(...)` in code and doc links alike), test modules (`#[cfg(test)]`) excepted. The
crate root (lib.rs) only declares and re-exports. Exits 1 when the units' graph has a cycle
or a backend imports the other one; prints each unit's imports with --print. Stdlib only.
"""
import argparse
import os
import re
import sys

# the units: a path prefix under src/ (without .rs) -> the unit's name
NESTED = ("backend",)


def unit_of(rel):
    """The unit of a file (path relative to src/, without extension)."""
    parts = rel.split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts and parts[0] in NESTED and len(parts) > 1:
        return "::".join(parts[:2])
    return parts[0] if parts else "lib"


def strip_tests(text):
    """The file without its `#[cfg(test)]` modules (they may import anything)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def imports(text):
    """The `crate::a` / `crate::a::b` paths a file names (use lists expanded one level)."""
    found = set()
    for m in re.finditer(r"crate::(\w+)(?:::(\w+))?", text):
        found.add((m.group(1), m.group(2)))
    for m in re.finditer(r"crate::(\w+)::\{([^}]*)\}", text):
        for name in re.findall(r"\b(\w+)\b", m.group(2)):
            found.add((m.group(1), name))
    for m in re.finditer(r"crate::\{([^}]*)\}", text):
        for name in re.findall(r"^\s*(\w+)", m.group(1), re.M) + re.findall(r",\s*(\w+)", m.group(1)):
            found.add((name, None))
    return found


def main():
    ap = argparse.ArgumentParser()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    ap.add_argument("--crate", default=os.path.join(root, "crates", "skyreels-server"))
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    src = os.path.join(args.crate, "src")
    units, edges = set(), {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, f), src)[:-3]
            if rel == "lib":
                continue
            u = unit_of(rel)
            units.add(u)
            text = strip_tests(open(os.path.join(root, f)).read())
            for first, second in imports(text):
                target = f"{first}::{second}" if first in NESTED and second else first
                if target != u and not u.startswith(target + "::"):
                    edges.setdefault(u, set()).add(target)
    # only edges into known units (crate-root re-exports like crate::AppState name lib)
    for u in list(edges):
        edges[u] = {t for t in edges[u] if t in units or t == "lib"}
    bad = []
    for u, ts in sorted(edges.items()):
        if "lib" in ts:
            bad.append(f"{u} imports from the crate root (lib.rs): name the module instead")
    if "backend::redis" in edges.get("backend::memory", set()) or "backend::memory" in edges.get("backend::redis", set()):
        bad.append("the two backends import each other")
    # cycles: Tarjan's strongly connected components
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for u in sorted(units):
        if u not in index:
            visit(u)
    for c in sccs:
        bad.append("import cycle: " + " <-> ".join(c))
    if args.print:
        for u in sorted(units):
            print(f"{u:16} -> {', '.join(sorted(edges.get(u, ()))) or '(nothing)'}")
    for b in bad:
        print("error:", b, file=sys.stderr)
    if not bad:
        print(f"{len(units)} units, no import cycle")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Import circles among the files of src/ (issue 33's acceptance: "no import circle").

    python3 scripts/import-cycles.py [--inline] [SRC_DIR]

A file imports another when one of its `use crate::...` or `use super::...` lines (grouped
`{..}` lists expanded) names a module that the other file defines; with --inline, paths
written in code (`crate::telemetry::record(..)`, comments excluded) count too. Every strongly
connected component of more than one file is printed with its edges; the exit status is 1
when there is one. A module's file is its longest path prefix that is a file (`a/b.rs`, or
`a/b/mod.rs`); lib.rs and main.rs are the crate root.
"""
import os
import re
import sys

INLINE = "--inline" in sys.argv
args = [a for a in sys.argv[1:] if a != "--inline"]
root = args[0] if args else "src"

files = {}  # module path (tuple) -> file
for d, _, names in os.walk(root):
    for f in names:
        if f.endswith(".rs"):
            p = os.path.join(d, f)
            module = os.path.relpath(p, root)[:-3].split(os.sep)
            if module[-1] == "mod":
                module = module[:-1]
            if module in (["lib"], ["main"]):
                module = []
            files[tuple(module)] = p


def file_of(path):
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in files:
            return tuple(path[:n])


def expand(tree):
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    tree = tree.strip()
    m = re.match(r"^([\w:]*?)\{(.*)\}$", tree, re.S)
    if not m:
        return [tree]
    prefix, body = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    return [prefix + q for part in parts if part.strip() for q in expand(part)]


USE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+((?:crate|super)::[^;]*);", re.M)
edges = {m: set() for m in files}
for module, p in files.items():
    src = open(p).read()
    paths = [q for m in USE.finditer(src) for q in expand(m.group(1))]
    if INLINE:
        code = re.sub(r"//[^\n]*", "", src)
        paths += re.findall(r"(?<![\w:])crate(?:::\w+)+", code)
    for path in paths:
        segs = [s.strip() for s in path.split(" as ")[0].split("::") if s.strip()]
        if segs[0] == "crate":
            base, segs = [], segs[1:]
        else:  # `super` from a/b.rs or a/b/mod.rs is `a`
            ups = sum(1 for s in segs if s == "super")
            base, segs = list(module)[: len(module) - ups], [s for s in segs if s != "super"]
        target = file_of(base + segs)
        if target is not None and target != module:
            edges[module].add(target)

# Tarjan's strongly connected components.
sys.setrecursionlimit(10000)
index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on_stack:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on_stack.discard(w)
            comp.append(w)
            if w == v:
                break
        comps.append(comp)


for v in files:
    if v not in index:
        visit(v)
circles = [c for c in comps if len(c) > 1]
print(f"{len(files)} files, {sum(len(e) for e in edges.values())} import edges, {len(circles)} circles")
for comp in circles:
    print("circle:", ", ".join(sorted(files[m] for m in comp)))
    for a in comp:
        for b in sorted(edges[a]):
            if b in comp:
                print(f"  {files[a]} -> {files[b]}")
sys.exit(1 if circles else 0)

#!/usr/bin/env python3
"""Module dependency graph of src/, from the paths the code names.

Prints each module's dependencies at the top level (`config -> profile, reading`) and lists
import cycles at two levels: between top-level modules, and between the files of one folder.
A parent naming its own submodules (declaring, re-exporting) is containment, not a dependency.
Exit status 1 if there is a cycle, so CI can enforce the one-way layering.

    python3 .ci/modgraph.py [--files] [SRC_DIR]
"""
import os
import re
import sys

def module_files(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] == "mod" or rel == ["lib"] or rel == ["main"]:
                rel = rel[:-1]
            if "tests" in rel or "test_fixtures" in rel:
                continue  # test-only modules may reach anywhere
            mods.setdefault(tuple(rel), []).append(path)
    return mods

PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\b(crate|super|self)::((?:[A-Za-z_][A-Za-z0-9_]*::)*)\{([^}]*)\}", re.S)

def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())

def code_without_tests(text):
    # Tests may reach anywhere; the layering is about the product code.
    i = text.find("#[cfg(test)]")
    return text if i < 0 else text[:i]

def edges(src):
    mods = module_files(src)
    graph = {m: set() for m in mods}
    for mod, paths in mods.items():
        for p in paths:
            text = code_without_tests(strip_comments(open(p, encoding="utf-8").read()))
            refs = []
            for m in USE_GROUP.finditer(text):
                prefix = [s for s in m.group(2).split("::") if s]
                for item in m.group(3).split(","):
                    first = item.strip().split("::")[0].split(" ")[0]
                    if first and first != "self":
                        refs.append((m.group(1), prefix + [first]))
                    else:
                        refs.append((m.group(1), prefix))
            for m in PATH.finditer(text):
                refs.append((m.group(1), [s for s in m.group(2).split("::") if s]))
            for head, segs in refs:
                base = list(mod)
                if head == "crate":
                    base = []
                elif head == "super":
                    base = base[:-1]
                path = base + segs
                target = None
                for n in range(len(path), -1, -1):
                    if tuple(path[:n]) in mods:
                        target = tuple(path[:n])
                        break
                if target is None or target == mod or target[: len(mod)] == mod:
                    continue  # itself or its own submodule: containment
                graph[mod].add(target)
    return graph

def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out

def name(m):
    return "::".join(m) or "crate"

def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show_files = "--files" in sys.argv
    src = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "src")
    graph = edges(src)
    top = {}
    for m, deps in graph.items():
        if not m:
            continue
        t = m[0]
        top.setdefault(t, set())
        for d in deps:
            if d and d[0] != t:
                top[t].add(d[0])
    for t in sorted(top):
        print(f"{t} -> {', '.join(sorted(top[t])) or '-'}")
    if show_files:
        print()
        for m in sorted(graph):
            if graph[m]:
                print(f"{name(m)} -> {', '.join(sorted(name(d) for d in graph[m]))}")
    cycles = [("top-level", c) for c in sccs(top)]
    folders = {}
    for m, deps in graph.items():
        if len(m) < 2:
            continue
        parent = m[:-1]
        folders.setdefault(parent, {}).setdefault(m, set())
        for d in deps:
            if d[:-1] == parent and len(d) == len(m):
                folders[parent][m].add(d)
    for parent, g in sorted(folders.items()):
        cycles += [(name(parent) + "/", c) for c in sccs(g)]
    print()
    if not cycles:
        print("no import cycles")
        return 0
    for level, c in cycles:
        print(f"cycle ({level}): {' <-> '.join(name(m) if isinstance(m, tuple) else m for m in c)}")
    return 1

if __name__ == "__main__":
    sys.exit(main())

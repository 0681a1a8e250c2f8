"""The tree is the architecture: no import cycles anywhere, common's layers only import downwards,
and common imports no framework at module level (read from the source, nothing is imported)."""
import ast
import os

from conftest import ROOT

FRAMEWORKS = {"torch", "torchvision", "mindspore", "diffusers", "transformers", "peft", "accelerate",
              "open_clip", "timm"}
LAYERS = {"common": 0, "common.formats": 1, "common.diffusion": 2, "common.evaluation": 3, "common.training": 4}
PACKAGES = ("common", "backends", "tools", "benchmarks")


def _modules():
    out = {}
    for top in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _imports(path, module):
    """(imported module, at module level?) for every import in the file; relative ones resolved."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                yield (f"{base}.{a.name}" if base else a.name), id(node) in top_level


def _graph():
    mods = _modules()
    graph = {}
    for m, path in mods.items():
        targets = set()
        for name, _ in _imports(path, m):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m:
                targets.add(name)
        graph[m] = targets
    return mods, graph


def _layer(module):
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return None


def test_no_import_cycles():
    _, graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):                                   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                cycles.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_common_layers_import_downwards_only():
    _, graph = _graph()
    bad = []
    for m, targets in graph.items():
        if not m.startswith("common"):
            continue
        for t in targets:
            if not t.startswith("common"):
                bad.append(f"{m} -> {t} (common imports neither backends nor tools)")
            elif _layer(t) != _layer(m) and LAYERS[_layer(t)] > LAYERS[_layer(m)]:
                bad.append(f"{m} -> {t}")
    assert bad == []


def test_common_imports_no_framework_at_module_level():
    mods = _modules()
    bad = [(m, name) for m, path in mods.items() if m.startswith("common")
           for name, top in _imports(path, m) if top and name.split(".")[0] in FRAMEWORKS]
    assert bad == []


def test_tools_are_thin_and_public():
    names = [f for _, _, files in os.walk(os.path.join(ROOT, "tools", "eval")) for f in files]
    assert not [f for f in names if f.startswith("_")]

"""The layers of the tree (docs/how-it-works.md): imports point one way, and the
worker process loads nothing of the harness's report stack.

The import graph is read from the source (`ast`), with the imports inside functions,
so an import made late to dodge a cycle is still an edge."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer -> (its modules: name prefixes, the layers it may import). A module belongs to
# the layer of its longest matching prefix; a layer always may import itself (without
# a cycle). The worker's shared part (messages, dtypes, gradients, pinned config) is
# what the harness may import of the child process; the rest of the worker only the
# worker itself.
LAYERS = {
    "reference": (["reference"], []),
    "worker-shared": (["verify.worker", "verify.worker.messages", "verify.worker.dtypes",
                       "verify.worker.gradients", "verify.worker.pinned"], ["reference"]),
    "worker": (["verify.worker.run", "verify.worker.fit", "verify.worker.resume",
                "verify.worker.user_class", "verify.worker.__main__"],
               ["worker-shared", "reference"]),
    "core": (["verify.configurations", "verify.scenarios", "verify.compare", "verify.output",
              "verify.processes", "verify.runner", "verify.selection", "verify.own_modules",
              "verify.user_class"],
             ["worker-shared", "reference"]),
    "report": (["verify.report"], ["core", "worker-shared", "reference"]),
    "api": (["verify.api"], ["report", "core", "worker-shared", "reference"]),
    "cli": (["verify.cli", "verify.testing"], ["api", "report", "core", "worker-shared",
                                               "reference"]),
    # the subcommands (cli.SUBCOMMANDS names them by string); peers' and convergence's
    # own worker processes build their optimizers as the Keras worker does
    "commands": (["verify.commands", "verify.peers", "verify.convergence"],
                 ["cli", "api", "report", "core", "worker", "worker-shared", "reference"]),
}

# what the worker process must never load (the harness's report and console stack)
NOT_IN_WORKER = ("pandas", "tabulate", "matplotlib", "rich")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages=("verify", "reference")) -> dict:
    """module -> {modules of `packages` it imports}, anywhere in its body; an import
    of a module of `packages` that is not in the tree maps to "<missing X>"."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(files) | {module_name(d / "__init__.py", root) for pkg in packages
                          for d in [root / pkg, *(root / pkg).rglob("*")] if d.is_dir()}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                # a submodule where it is one, else the module (a namespace package,
                # without __init__.py, has nothing else to import from)
                named = [f"{module}.{a.name}" if f"{module}.{a.name}" in files
                         or module not in files else module for a in node.names]
            else:
                continue
            for target in named:
                if target.split(".")[0] not in packages:
                    continue
                targets.add(target if target in files else
                            _found(target, files) if target in known else f"<missing {target}>")
        graph[name] = targets - {name, None}
    return graph


def _found(target: str, files):
    """The module of `files` an import of `target` names (its longest known prefix)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in files:
            return ".".join(parts[:i])
    return None


def layer_of(module: str, layers: dict) -> str | None:
    best = None
    for layer, (prefixes, _) in layers.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (
                    best is None or len(p) > len(best[1])):
                best = (layer, p)
    return best and best[0]


def problems(graph: dict, layers: dict) -> list:
    """Every module outside the layers, every import across layers that a layer may
    not make, and every cycle (as the path of modules that closes it)."""
    out = [f"{a} imports {b[1:-1]}" for a in sorted(graph) for b in sorted(graph[a])
           if b.startswith("<missing ")]
    for a in sorted(graph):
        la = layer_of(a, layers)
        if la is None:
            out.append(f"{a} is in no layer")
            continue
        for b in sorted(graph[a]):
            lb = layer_of(b, layers)
            if lb is not None and lb != la and lb not in layers[la][1]:
                out.append(f"upward import: {a} ({la}) -> {b} ({lb})")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict) -> list:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(w for w in graph.get(v, ()) if w in graph):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_through(g, graph) for g in groups]


def _path_through(group: set, graph: dict) -> list:
    start = min(group)
    path, seen = [start], {start}
    while True:  # walk inside the group until a module repeats
        nxt = min(w for w in graph[path[-1]] if w in group)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


@pytest.mark.quick
def test_imports_point_one_way():
    graph = import_graph(ROOT)
    assert "verify.cli" in graph and "reference.base" in graph and len(graph) > 50
    assert problems(graph, LAYERS) == []


@pytest.mark.quick
def test_checker_reports_cycles_and_upward_imports(tmp_path):
    """The checker on a tree of its own: a cycle through a function-level import,
    an upward import across layers, a relative import, a module in no layer."""
    files = {
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from low import b\n",
        "low/b.py": "from .a import f\n",
        "low/c.py": "import high.top\nfrom stray import gone\n",
        "high/__init__.py": "",
        "high/top.py": "from low.c import x\n",
        "stray/x.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, packages=("low", "high", "stray"))
    assert graph["low.a"] == {"low.b"} and graph["low.b"] == {"low.a"}
    layers = {"low": (["low"], []), "high": (["high"], ["low"])}
    found = problems(graph, layers)
    assert "upward import: low.c (low) -> high.top (high)" in found
    assert "import cycle: low.a -> low.b -> low.a" in found
    assert "import cycle: high.top -> low.c -> high.top" in found
    assert "stray.x is in no layer" in found
    assert "low.c imports missing stray.gone" in found
    assert "upward import: high.top (high) -> low.c (low)" not in found  # downward
    # the same tree without the upward edge and the cycle: nothing to report
    (tmp_path / "low/a.py").write_text("")
    (tmp_path / "low/c.py").write_text("from low import a\nx = 1\n")
    assert problems(import_graph(tmp_path, packages=("low", "high")), layers) == []


def imported(log: Path) -> set:
    """The modules a process imported, from its stderr under PYTHONPROFILEIMPORTTIME."""
    lines = log.read_text().splitlines()
    return {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}


def started(tmp_path, module, arg) -> set:
    """What `python -m module arg` imports, started as the runner starts a worker
    (processes.start, in the pinned environment)."""
    from verify import processes

    env = processes.pinned_environment("torch", tmp_path / "home",
                                       extra={"PYTHONPROFILEIMPORTTIME": "1"})
    log_path = tmp_path / f"{module}.log"
    proc, log = processes.start(module, arg, log_path, env, sys.executable)
    proc.wait(timeout=300)
    processes.stop(proc)
    log.close()
    return imported(log_path)


def test_the_worker_loads_no_report_stack(tmp_path):
    """The worker with a job it cannot read stops right after its imports (keras comes
    with the job, and keras's own imports are not the harness's)."""
    loaded = started(tmp_path, "verify.worker", tmp_path / "no-job.json")
    assert "no-job.json" in (tmp_path / "verify.worker.log").read_text()  # it got that far
    assert {"verify.worker.run", "verify.worker.fit", "verify.worker.resume", "numpy"} <= loaded
    assert [m for m in loaded if m.split(".")[0] in NOT_IN_WORKER] == []
    assert [m for m in loaded if m.startswith("verify.") and layer_of(m, LAYERS)
            not in ("worker", "worker-shared")] == []


def test_the_worker_check_sees_a_report_import(tmp_path):
    """Sensitivity: the same look at a module that loads the report stack."""
    loaded = started(tmp_path, "verify.report.tables", "x")
    assert "pandas" in loaded and "tabulate" in loaded


def test_harness_does_not_load_the_worker(tmp_path):
    """The command line loads the worker's shared part only (the messages it reads)."""
    loaded = started(tmp_path, "verify.cli", "--help")
    assert "verify.api" in loaded and "verify.worker.messages" in loaded
    assert [m for m in loaded if layer_of(m, LAYERS) == "worker"] == []

"""The package's shape: imports flow one way between layers, no import cycles, a public API.

The import graph is read from the source with ``ast`` (every import statement, also those inside
functions), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MCFALINE, real_data

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vcell"
README = Path(__file__).resolve().parents[1] / "README.md"

#: Modules every layer may import.
FOUNDATION = {"vcell.errors", "vcell._version", "vcell._lazy", "vcell._heap", "vcell._numba_cache"}
#: Layer -> the layers it may import (besides itself and the foundation).
ALLOWED = {
    "data": set(),
    "eval": {"data"},
    "features": {"data"},
    "nn": {"data"},
    "train": {"nn", "features", "data"},
    "predictors": {"train", "nn", "features", "data"},
    "report": {"eval", "data"},
    "leaderboard": {"predictors", "train", "nn", "features", "eval", "report", "data"},
    "cli": {"leaderboard", "report", "predictors", "train", "nn", "features", "eval", "data"},
}
#: Modules over this many lines must be one cohesive algorithm, listed here with what it is.
MAX_LINES = 500
COHESIVE: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The vcell modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES)
    # a lazy re-export table names modules as strings
    found.update(m for m in _lazy_targets(name, path) if m in MODULES)
    return {m for m in found if m == "vcell" or m.startswith("vcell.")} - {name}


def _lazy_targets(name: str, path: Path) -> set[str]:
    if path.name != "__init__.py" or "lazy_exports" not in path.read_text():
        return set()
    targets = re.findall(r'"(\.?[A-Za-z_][\w.]*)":\s*[\[(]', path.read_text())
    return {f"{name}{t}" if t.startswith(".") else t for t in targets}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    if module == "vcell":
        return "facade"
    if module in FOUNDATION:
        return "foundation"
    return module.split(".")[1]


def test_every_module_is_in_a_known_layer():
    layers = {_layer(m) for m in MODULES} - {"facade", "foundation", "__main__"}
    assert layers <= set(ALLOWED), f"modules outside the layer table: {sorted(layers - set(ALLOWED))}"


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for module, targets in GRAPH.items():
        source = _layer(module)
        if source in ("facade", "__main__"):
            continue
        for target in targets:
            dest = _layer(target)
            if dest == "foundation" or dest == source and source != "facade":
                continue
            if source == "foundation" or dest not in ALLOWED.get(source, set()):
                bad.append(f"{module} ({source}) imports {target} ({dest})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_above_can_fail(tmp_path):
    """The layer check flags an upward import and the cycle search finds a planted cycle."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {**saved, "vcell.data.io": saved["vcell.data.io"] | {"vcell.predictors.st"}}
        with pytest.raises(AssertionError, match="vcell.data.io \\(data\\) imports vcell.predictors.st"):
            test_no_module_imports_from_a_layer_above_it()
        GRAPH = {**saved, "vcell.data.spec": saved["vcell.data.spec"] | {"vcell.data.dataset"}}
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        GRAPH = saved


def test_modules_stay_small():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(COHESIVE), f"modules over {MAX_LINES} lines: {long}"


def _public_members(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield name, obj
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(func) and not _inherits_doc(obj, attr):
                    yield f"{name}.{attr}", func


def _inherits_doc(cls, attr: str) -> bool:
    """A method that overrides a documented one of a base class (Lightning hooks, ``forward``, ...)."""
    return any(getattr(getattr(base, attr, None), "__doc__", None) for base in cls.__mro__[1:])


def test_every_public_function_has_a_docstring():
    missing = []
    for name in sorted(MODULES):
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        missing += [f"{name}.{member}" for member, obj in _public_members(module) if not (obj.__doc__ or "").strip()]
    assert not missing, "public functions without a docstring:\n" + "\n".join(missing)


def test_top_level_api():
    import vcell

    assert len(vcell.__all__) >= 12
    for name in vcell.__all__:
        obj = getattr(vcell, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"vcell.{name} has no docstring"
    text = _help_text()  # one interpreter: help(vcell) loads every lazy module (torch included)
    assert "evaluate(pred" in text  # help(vcell) shows the API, not just __version__
    for name in ("make_model", "predict_context", "load_dataset", "train_st"):
        assert f"{name}(" in text


def _help_text() -> str:
    proc = subprocess.run([sys.executable, "-c", "import vcell; help(vcell)"], capture_output=True, text=True,
                          env={"PAGER": "cat", "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_vcell_and_the_cli_stay_light():
    """``import vcell`` and the command line's start-up load neither torch, Lightning nor pandas
    (pandas alone took ~0.3 s of every command's start, `vcell --help` included)."""
    code = "import sys, vcell, vcell.cli; print(sorted(m for m in ('torch', 'lightning', 'pandas') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["vcell", "vcell.errors", "vcell.predictors.registry", "vcell.data.spec"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def readme_python_example() -> str:
    """The README's Python example (the first ```python block)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no Python example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python example, verbatim, on the shared McFaline file (or the repo's small copy)."""
    code = readme_python_example()
    path = real_data(MCFALINE)
    code = code.replace("../shared/data/mcfaline2023_norman2019.h5ad", str(path))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    agg = namespace["result"].agg.set_index("statistic")
    assert 0 <= agg.loc["mean", "overlap_at_N"] <= 1 and agg.loc["mean", "mae"] > 0
    pred, real = namespace["pred"], namespace["real"]
    assert list(pred.var_names) == list(real.var_names)
    assert set(pred.obs["perturbation"].astype(str)) == set(real.obs["perturbation"].astype(str))

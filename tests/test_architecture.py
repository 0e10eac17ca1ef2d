"""The package's shape: a library core and the experiment layer (``mupp.lab``) on top of it,
with imports going one way, every named choice defined once, and a documented public surface."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mupp
from mupp import choices

ROOT = Path(mupp.__file__).parent
LAB = ROOT / "lab"
# the old paths of modules that moved into the lab: each only re-exports its new module
MOVED = ("train", "sweep", "vectorized", "data", "analysis", "cli")
SHIMS = {ROOT / f"{name}.py" for name in MOVED}
ENTRY_POINTS = {ROOT / "__main__.py"}  # `python -m mupp` runs the command-line tool


def _modules(where: Path) -> list[Path]:
    return sorted(where.rglob("*.py"))


def _library_modules() -> list[Path]:
    return [p for p in _modules(ROOT) if LAB not in p.parents and p not in SHIMS | ENTRY_POINTS]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (also inside functions), with
    relative imports resolved."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_lab():
    offenders = {
        _module_name(p): sorted(
            n for n in _imported(p) if n == "mupp.lab" or n.startswith("mupp.lab.")
        )
        for p in _library_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules its import statements name (inside functions too): a
    name taken from a module is that module (``from . import x`` is ``x`` where ``x`` is a
    module, else the package that defines it)."""
    modules = {_module_name(p): p for p in _modules(ROOT)}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets.update(owner(f"{base}.{alias.name}") for alias in node.names)
        graph[name] = targets - {"", name}
    return graph


def test_no_two_modules_import_each_other_even_inside_a_function():
    """A deferred import hides a cycle from Python, not from a reader: every module stands
    above all it imports (``mupp/mup_interop.py`` holds plain data, ``shapes`` builds on it)."""
    graph = _import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert "mupp.mup_interop" in graph["mupp.shapes"]  # the scan resolves names to modules
    assert sorted(m for m in graph if m in reach(m)) == []


def test_the_import_scan_sees_the_labs_imports():
    # the scan above would pass vacuously if it resolved nothing: it must see the lab's own
    assert "mupp.lab.config" in _imported(LAB / "train.py")
    assert "mupp.optim.SAM" in _imported(LAB / "train.py")


@pytest.mark.parametrize(
    "code",
    [
        "import mupp",
        "import mupp, mupp.models, mupp.diagnostics, mupp.distributed, mupp.theory",
    ],
)
def test_the_library_loads_without_the_lab_and_its_dependencies(code):
    probe = "; ".join(
        [
            code,
            "import sys",
            "print(sorted(m for m in ('mupp.lab', 'optuna', 'matplotlib', 'scipy', 'yaml') "
            "if m in sys.modules))",
        ]
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", MOVED)
def test_old_module_paths_are_the_moved_modules(name):
    old = importlib.import_module(f"mupp.{name}")
    assert old is importlib.import_module(f"mupp.lab.{name}")
    assert getattr(mupp, name) is old  # `import mupp.train; mupp.train.train(...)` works


@pytest.mark.parametrize("name", MOVED)
def test_an_old_module_path_warns_naming_the_new_one_and_the_release_that_removes_it(name):
    probe = f"import mupp.{name}"
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", probe],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert (
        f"DeprecationWarning: mupp.{name} has moved to mupp.lab.{name}; import it from there "
        "(the old path is removed in mupp 0.3.0)"
    ) in proc.stderr


def test_subpackages_are_attributes_of_mupp_loaded_on_first_use():
    probe = (
        "import sys, mupp; before = 'mupp.models' in sys.modules; "
        "print(before, mupp.models.build.__module__, mupp.diagnostics.verify.__module__, "
        "'models' in dir(mupp))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "mupp.models", "mupp.diagnostics.verify", "True"]
    with pytest.raises(AttributeError, match="module 'mupp' has no attribute 'nosuch'"):
        mupp.nosuch  # noqa: B018


def test_old_import_forms_keep_working():
    from mupp.cli import main
    from mupp.sweep import load_results, run_sweep
    from mupp.train import TrainConfig, train

    assert main.__module__ == "mupp.lab.cli"
    assert callable(train) and callable(run_sweep) and callable(load_results)
    assert TrainConfig().model == "mlp"


def _literal_string_tuples(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Tuple):
            elts = node.value.elts
            if elts and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elts):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
                found.append((ast.unparse(target), tuple(e.value for e in elts)))
    return found


def test_every_named_choice_is_defined_once():
    defined = {
        name: set(value)
        for name, value in vars(choices).items()
        if name.isupper() and isinstance(value, tuple)
    }
    assert {"ROLES", "LAYER_ROLES", "VARIANTS", "THEORY_VARIANTS", "RULES"} <= set(defined)
    copies = [
        f"{p.relative_to(ROOT.parent)}: {target} = {value}"
        for p in _modules(ROOT)
        if p.name != "choices.py"
        for target, value in _literal_string_tuples(p)
        if set(value) in defined.values()
    ]
    assert copies == []


def test_every_public_function_and_class_has_a_docstring():
    missing = []
    for path in _modules(ROOT):
        for node in ast.parse(path.read_text()).body:
            defs = [node]
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                defs += [n for n in node.body if isinstance(n, ast.FunctionDef)]
            for d in defs:
                if (
                    isinstance(d, (ast.FunctionDef, ast.ClassDef))
                    and not d.name.startswith("_")
                    and not ast.get_docstring(d)
                ):
                    missing.append(f"{_module_name(path)}.{d.name}")
    assert missing == []


def _code_lines(fn: ast.FunctionDef) -> int:
    """The length of a function's body, its docstring aside (a long signature of keyword
    arguments is not logic)."""
    body = fn.body
    has_doc = ast.get_docstring(fn) is not None and len(body) > 1
    return fn.end_lineno - body[1 if has_doc else 0].lineno + 1


def test_no_function_in_the_package_runs_past_80_lines_of_code():
    """The cap covers the library and the lab alike (bodies, docstrings aside)."""
    long = [
        f"{_module_name(p)}.{n.name}: {_code_lines(n)} lines"
        for p in _modules(ROOT)
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.FunctionDef) and _code_lines(n) > 80
    ]
    assert long == []


def test_no_docstring_cites_a_file_outside_the_repository():
    cited = [str(p) for p in _modules(ROOT) if "SPEC" in p.read_text()]
    assert cited == []


def test_check_choice_names_the_argument_and_the_values():
    with pytest.raises(
        ValueError, match=r"rule must be one of \('LP', 'DP', 'LN', 'unnormalized'\); got 'lp'"
    ):
        choices.check_choice("rule", "lp", choices.RULES)
    with pytest.raises(ValueError, match="lr must be a non-negative finite number; got True"):
        choices.check_nonneg("lr", True)
    choices.check_nonneg("lr", 0)

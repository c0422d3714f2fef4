"""The import rules of docs/ARCHITECTURE.md, read from the sources (ast): the module map holds, or this fails."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from src.config import Config, InferConfig, leaves
from src.sweep import SWEEP_FIELDS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "infer", "folds", "report", "sweep")  # top-level scripts: src/ never imports them
MAP = REPO / "docs" / "ARCHITECTURE.md"


def module_map() -> dict[str, int]:
    """{module: floor} from the table between the module-map markers of docs/ARCHITECTURE.md."""
    text = MAP.read_text()
    table = text.split("<!-- module-map:start -->")[1].split("<!-- module-map:end -->")[0]
    rows = re.findall(r"^\| (\d+) [^|]*\| `(\w+)` \|", table, flags=re.M)
    return {name: int(floor) for floor, name in rows}


def python_files() -> list[Path]:
    return sorted(
        [
            *REPO.glob("*.py"),
            *(REPO / "src").glob("*.py"),
            *(REPO / "kernels").glob("*.py"),
            *(REPO / "bench").glob("*.py"),
        ]
    )


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a file; `from src import x` names src.x."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "src":
                    found.extend((f"src.{alias.name}", child.lineno, in_function) for alias in child.names)
                else:
                    found.append((child.module, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def src_graph(package: Path = REPO / "src") -> dict[str, set[str]]:
    """{src module: src modules it imports (top level or inside functions)}."""
    graph = {}
    for path in sorted(package.glob("*.py")):
        if path.stem == "__init__":
            continue
        graph[path.stem] = {m.split(".")[1] for m, _, _ in imports_of(path) if m.startswith("src.")} - {path.stem}
    return graph


def test_every_src_module_is_on_the_map_and_the_map_names_only_real_modules():
    floors, graph = module_map(), src_graph()
    assert len(floors) >= 25, "module map not found in docs/ARCHITECTURE.md"
    assert sorted(set(graph) - set(floors)) == [], "add a row for each new module to docs/ARCHITECTURE.md"
    assert sorted(set(floors) - set(graph)) == [], "the map names modules that do not exist"


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Every import that points to a higher floor than its importer's."""
    return [
        f"{a} (floor {floors[a]}) -> {b} (floor {floors[b]})"
        for a, deps in sorted(graph.items())
        for b in sorted(deps)
        if floors[b] > floors[a]
    ]


def test_imports_never_point_up_a_floor():
    assert upward_imports(src_graph(), module_map()) == []


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first walk, as the modules along it (first == last)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                dfs(dep, [*stack, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module, [module])
    return cycles


def test_no_import_cycle_in_src():
    assert import_cycles(src_graph()) == []


@pytest.mark.parametrize(
    "module,forbidden",
    [
        ("inference", {"training", "losses", "averaging", "feature_cache", "adapt", "sweep", "report", "submit"}),
        ("model", {"data", "dataset", "folds", "artifacts", "transforms", "training", "losses", "feature_cache"}),
        ("backbone", {"data", "dataset", "folds", "artifacts", "transforms", "training", "losses", "feature_cache"}),
    ],
)
def test_named_rules(module, forbidden):
    assert src_graph()[module] & forbidden == set()


def test_config_imports_only_schema_and_errors():
    assert src_graph()["config"] <= {"schema", "errors"}


def test_src_never_imports_the_top_level_scripts():
    hits = [
        f"{p.name}:{line} imports {m}"
        for p in (REPO / "src").glob("*.py")
        for m, line, _ in imports_of(p)
        if m.split(".")[0] in SCRIPTS
    ]
    assert hits == []


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
    """The real dependency graph is the top of each file: a function-level import of the repo's own code hides it."""
    problems = []
    for path in python_files():
        lines = path.read_text().splitlines()
        for module, line, in_function in imports_of(path):
            if not in_function:
                continue
            rel = path.relative_to(REPO).as_posix()
            text = lines[line - 1]
            if rel == "kernels/kernel_template.py" and "#" in text:  # the code dataset is found at run time
                continue
            if module.split(".")[0] in ("src", "bench", "kernels", *SCRIPTS) or "optional" not in text:
                problems.append(f"{rel}:{line}: {text.strip()}")
    assert problems == []


def test_the_rules_catch_what_they_should(tmp_path):
    """The checker itself: a function-level repo import, a cycle and an upward arrow are all seen."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\n\ndef f():\n    from src import training\n    import numpy  # optional\n    return training\n"
    )
    assert imports_of(bad) == [("os", 1, False), ("src.training", 4, True), ("numpy", 5, True)]
    floors = module_map()
    assert floors["inference"] == floors["training"] > floors["model"] > floors["data"] > floors["config"]
    # positive controls on a synthetic package: a cycle (low -> mid -> top -> low, one of its arrows inside a
    # function) and upward arrows are reported, and the clean part of the package is not
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "low.py").write_text("import os\n\ndef f():\n    from src import mid\n    return mid\n")
    (pkg / "mid.py").write_text("from src.top import x\nimport src.base\n")
    (pkg / "top.py").write_text("from src import low, base\nx = 1\n")
    (pkg / "base.py").write_text("import numpy\n")
    graph = src_graph(pkg)
    assert graph == {"low": {"mid"}, "mid": {"top", "base"}, "top": {"low", "base"}, "base": set()}
    assert import_cycles(graph) == [["low", "mid", "top", "low"]]
    assert import_cycles({**graph, "top": {"base"}}) == []  # break one arrow: no cycle left
    pkg_floors = {"base": 0, "low": 1, "mid": 2, "top": 3}
    assert upward_imports(graph, pkg_floors) == ["low (floor 1) -> mid (floor 2)", "mid (floor 2) -> top (floor 3)"]
    assert upward_imports({**graph, "low": set(), "mid": {"base"}}, pkg_floors) == []


def test_config_flags_are_declared_only_by_the_config():
    """No flag of Config or InferConfig is typed again by a script that resolves one of them."""
    flags = {leaf.flag for leaf in leaves(Config())} | {leaf.flag for leaf in leaves(InferConfig())}
    retyped = []
    for rel in ("train.py", "infer.py", "src/sweep.py", "kernels/build.py"):
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                literal = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                retyped += [f"{rel}: {flag}" for flag in literal if flag in flags]
    # on purpose: src/sweep.py re-declares the swept fields (several values each) under their config names, and
    # kernels/build.py's --out is the build folder it writes, not infer.py's submission path
    swept = {f"src/sweep.py: --{name.replace('_', '-')}" for name in SWEEP_FIELDS}
    assert [r for r in retyped if r not in swept and r != "kernels/build.py: --out"] == []

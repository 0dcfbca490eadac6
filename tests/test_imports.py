"""The import graph of the ``llama`` package has no cycle.

Every module of the package is parsed (not imported) and every import of a ``llama``
module is collected: at module level and inside functions and methods alike, since a
lazy import only hides a cycle until the function runs. ``if TYPE_CHECKING:`` blocks
are left out: they never run.

An edge ``a -> b`` means that module ``a`` imports module ``b``. ``from P import x``
points at the submodule ``P.x`` when it exists (``from . import distributed`` in
``llama/foo.py`` is ``llama.foo -> llama.distributed``), else at the package ``P``
itself, whose ``__init__.py`` counts as a module. The parent packages a module runs
implicitly when imported are not edges: otherwise every package would be in a cycle
with each module it imports.
"""

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = "llama"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

Graph = Dict[str, Set[str]]


def package_modules(package_dir: Path, package: str) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``__init__.py``: the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (any module alias)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST) -> List[ast.stmt]:
    """Every Import/ImportFrom statement of ``tree`` except those under ``if TYPE_CHECKING:``."""
    found: List[ast.stmt] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _existing(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """``name`` or its longest prefix that is a module of the package (None: not in the package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_targets(module: str, node: ast.stmt, modules: Dict[str, Path], package: str) -> Set[str]:
    """The package modules one import statement of ``module`` loads."""
    targets: Set[str] = set()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            # The package the relative import starts from: the module itself for an __init__.py.
            base = module.split(".") if modules[module].name == "__init__.py" else module.split(".")[:-1]
            if node.level - 1 >= len(base):
                raise ValueError(f"{module}: relative import beyond the top-level package (level {node.level})")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            names.append(submodule if submodule in modules else source)
    for name in names:
        if name == package or name.startswith(package + "."):
            target = _existing(name, modules)
            if target is not None:
                targets.add(target)
    return targets


def import_graph(package_dir: Path = PACKAGE_DIR, package: str = PACKAGE) -> Graph:
    """Module -> the package modules it imports (self-imports left out)."""
    modules = package_modules(package_dir, package)
    graph: Graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: Set[str] = set()
        for node in _runtime_imports(tree):
            edges |= import_targets(module, node, modules, package)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycles(graph: Graph) -> List[List[str]]:
    """One cycle (``[a, b, ..., a]``) for each strongly connected component with one.

    Tarjan's algorithm, then a shortest path back to the component's first module.
    """
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # Breadth-first within the component from start's successors back to start.
        paths = {w: [start, w] for w in sorted(graph[start] & members)}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v] & members):
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        cycles.append(paths[start])
    return cycles


def reaches(graph: Graph, source: str, target: str) -> bool:
    """Whether ``source`` imports ``target``, directly or through other modules."""
    seen, todo = {source}, [source]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w == target:
                return True
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return False


def test_llama_import_graph_has_no_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between llama modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_safety_does_not_import_the_generation_engine():
    """Generation calls the checker interface, so it must not depend on generation (``llama.guard`` may)."""
    graph = import_graph()
    modules = package_modules(PACKAGE_DIR, PACKAGE)
    engine = [
        m for m, path in modules.items()
        if any(isinstance(n, ast.ClassDef) and n.name == "Llama" for n in ast.parse(path.read_text()).body)
    ]
    assert engine, "no module defines the Llama class"
    assert not [m for m in engine if reaches(graph, "llama.safety", m)]
    assert not [c for c in find_cycles(graph) if "llama.safety" in c]


# ------------------------------------------------------------------------------------------
# The graph builder itself, on a package written here.


@pytest.fixture
def toy(tmp_path):
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "from . import b\nfrom .b import thing\nimport os\nA = 1\n",
        "b.py": (
            "from typing import TYPE_CHECKING\n"
            "import typing\n"
            "if TYPE_CHECKING:\n    from .a import A\nelse:\n    from . import c\n"
            "if typing.TYPE_CHECKING:\n    import toy.a\n"
            "from . import A, b\n"
        ),
        "c.py": "def f():\n    from .sub.d import x\n\nclass K:\n    def m(self):\n        import toy.sub\n",
        "sub/__init__.py": "from .. import c\nfrom . import d\n",
        "sub/d.py": "from ..sub import e\n",
        "sub/e.py": "import toy.sub.d as d\nimport toyota\n",
    }
    for name, text in files.items():
        path = tmp_path / "toy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "toy"


def test_graph_builder_resolves_every_kind_of_import(toy):
    graph = import_graph(toy, "toy")
    assert graph == {
        "toy": {"toy.a"},
        "toy.a": {"toy.b"},  # `from . import b` is the submodule; `from .b import thing` too
        "toy.b": {"toy.c", "toy"},  # TYPE_CHECKING left out, its else kept; `from . import A` is the package
        "toy.c": {"toy.sub.d", "toy.sub"},  # imports inside functions and methods count
        "toy.sub": {"toy.c", "toy.sub.d"},
        "toy.sub.d": {"toy.sub.e"},
        "toy.sub.e": {"toy.sub.d"},  # `import toyota` is another package
    }
    assert find_cycles(graph) == [
        ["toy", "toy.a", "toy.b", "toy"],
        ["toy.c", "toy.sub", "toy.c"],
        ["toy.sub.d", "toy.sub.e", "toy.sub.d"],
    ]
    assert reaches(graph, "toy", "toy.sub.e") and not reaches(graph, "toy.sub.d", "toy.a")


def test_find_cycles_reports_one_cycle_per_tangle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []

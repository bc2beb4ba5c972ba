"""The house's rules, read from the source with ast (nothing here imports the modules it checks):
the service, model and Kafka wings never import the lab; only the Kafka wing builds Kafka clients;
no import circle; agent modules stay short and import neither each other nor back from the app."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KAFKA_CLIENTS = frozenset(
    {
        "KafkaProducer",
        "KafkaConsumer",
        "KafkaAdminClient",
        "AIOKafkaProducer",
        "AIOKafkaConsumer",
        "AIOKafkaAdminClient",
    }
)
AGENT_MAX_LINES = 80
# The app's factory and the faust plumbing under the agents are not agents.
LONG_AGENT_FILES = frozenset({"agents/app.py", "agents/internals.py", "agents/supervision.py"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*tops: str) -> dict[str, Path]:
    """Module name -> file, for every module under the given top-level directories."""
    return {module_name(p): p for top in tops for p in sorted((ROOT / top).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, *, module_level: bool) -> Iterator[ast.AST]:
    """Every node below `node`, skipping `if TYPE_CHECKING:` bodies (never run) and, when
    `module_level`, function bodies (run later, not while the module is imported)."""
    for child in ast.iter_child_nodes(node):
        if module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _walk(other, module_level=module_level)
            continue
        yield child
        yield from _walk(child, module_level=module_level)


def imported(
    module: str, tree: ast.Module, known: set[str], *, module_level: bool, is_package: bool = False
) -> set[str]:
    """The modules `module` imports: `from a import b` names a.b when that is in `known` (a module),
    else a; relative imports resolved; `importlib.import_module("...")` with a literal counts."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _walk(tree, module_level=module_level):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add(node.args[0].value)
    return out


def _is_init(path: Path) -> bool:
    return path.name == "__init__.py"


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def lab_imports(modules: dict[str, Path]) -> list[str]:
    """'module imports target' for every import of streamrec.lab, at any depth."""
    known = set(modules)
    found = []
    for name, path in modules.items():
        for target in sorted(imported(name, parse(path), known, module_level=False, is_package=_is_init(path))):
            if target == "streamrec.lab" or target.startswith("streamrec.lab."):
                found.append(f"{name} imports {target}")
    return found


def client_names(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) wherever a Kafka client class is imported, named or called, type-only uses
    included (under TYPE_CHECKING too): the Kafka wing can export an alias for annotations."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.update((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.Name):
            found.add((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            found.add((node.lineno, node.attr))
    return sorted((line, name) for line, name in found if name in KAFKA_CLIENTS)


def client_uses(modules: dict[str, Path]) -> list[str]:
    return [f"{name}:{line} {n}" for name, path in modules.items() for line, n in client_names(parse(path))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    return {
        name: {
            t
            for t in imported(name, parse(path), known, module_level=True, is_package=_is_init(path))
            if t in known and t != name
        }
        for name, path in modules.items()
    }


def circle_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of modules that hold a circle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or v in graph.get(v, ()):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> ... -> a) per group of `circle_groups`."""
    return [_circle(graph, g) for g in circle_groups(graph)]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")  # a strongly connected group always has one


def long_agents() -> list[str]:
    found = []
    for path in sorted((ROOT / "agents").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if rel not in LONG_AGENT_FILES and lines > AGENT_MAX_LINES:
            found.append(f"{rel}: {lines} lines")
    return found


# ---- the rules ----------------------------------------------------------------------------------


def test_the_service_model_and_kafka_wings_never_import_the_lab() -> None:
    modules = {
        n: p for n, p in sources("streamrec", "agents").items() if not n.startswith(("streamrec.lab", "streamrec.cli"))
    }
    modules.pop("streamrec.__main__", None)  # the CLI's entry point
    assert "streamrec.model.blend" in modules and "streamrec.kafka" in modules and "agents.app" in modules
    found = lab_imports(modules)
    assert not found, "\n".join(found)


def test_only_the_kafka_wing_builds_kafka_clients() -> None:
    modules = {n: p for n, p in sources("streamrec", "agents").items() if not n.startswith("streamrec.kafka")}
    found = client_uses(modules)
    assert not found, "Kafka clients built outside streamrec/kafka/:\n" + "\n".join(found)


def test_no_import_circle() -> None:
    graph = import_graph(sources("streamrec", "agents"))
    found = [
        f"{' -> '.join(_circle(graph, g))} (the circle's group: {', '.join(sorted(g))})" for g in circle_groups(graph)
    ]
    assert not found, "import circles:\n" + "\n".join(found)


def test_the_app_imports_no_agent_and_no_agent_imports_another() -> None:
    # At any depth: the factory importing its agents inside a function was the old app <-> agent circle.
    modules = sources("agents")
    agents = {
        n
        for n, p in modules.items()
        if p.name != "__init__.py" and p.relative_to(ROOT).as_posix() not in LONG_AGENT_FILES
    }
    found = [
        f"{name} imports {target}"
        for name, path in modules.items()
        for target in sorted(imported(name, parse(path), set(modules), module_level=False, is_package=_is_init(path)))
        if target in agents and target != name and (name in agents or name == "agents.app")
    ]
    assert not found, "\n".join(found)


def test_agent_modules_stay_short() -> None:
    found = long_agents()
    assert not found, f"agent modules over {AGENT_MAX_LINES} lines:\n" + "\n".join(found)


# ---- the checks can fail --------------------------------------------------------------------------


def test_imports_are_found_in_functions_relative_and_by_name() -> None:
    tree = ast.parse(
        "from . import prequential\n"
        "from ..ranking import rank_metrics\n"
        "def later():\n"
        "    import streamrec.lab.replay\n"
        "    importlib.import_module('streamrec.lab.demo')\n"
        "if TYPE_CHECKING:\n"
        "    from streamrec.lab import offline\n"
    )
    known = {"streamrec.lab", "streamrec.lab.prequential", "streamrec.lab.replay", "streamrec.ranking"}
    got = imported("streamrec.lab.replay", tree, known, module_level=False)
    assert got == {"streamrec.lab.prequential", "streamrec.ranking", "streamrec.lab.replay", "streamrec.lab.demo"}
    assert imported("streamrec.lab.replay", tree, known, module_level=True) == {
        "streamrec.lab.prequential",
        "streamrec.ranking",
    }
    # In a package's __init__, "." is the package itself.
    inner = imported("streamrec.lab", ast.parse("from . import prequential"), known, module_level=True, is_package=True)
    assert inner == {"streamrec.lab.prequential"}


def test_a_kafka_client_is_found_however_it_is_named() -> None:
    for source in (
        "from aiokafka import AIOKafkaConsumer as C\n",
        "import kafka\nkafka.KafkaProducer(bootstrap_servers='x')\n",
        "def f(c: 'x') -> None:\n    if TYPE_CHECKING:\n        from kafka import KafkaAdminClient\n",
    ):
        assert client_names(ast.parse(source)), source
    assert client_names(ast.parse("from streamrec.kafka.clients import producer\nproducer(kafka)\n")) == []


def test_a_circle_is_reported_with_its_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []

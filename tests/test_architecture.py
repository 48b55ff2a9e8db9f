"""The package's import graph: layers that only import downwards, and no circles.

Read from the source with `ast`, counting imports inside functions too (they run, only later), and
leaving out those under `if TYPE_CHECKING:` (they never run). A new module must be given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "daemon"

# Top to bottom. A module may import modules of its own layer or below, never above.
LAYERS: list[set[str]] = [
    {"daemon.cli", "daemon.__main__"},
    {
        "daemon.service",
        "daemon.status",
        "daemon.manifest",
        "daemon.progress",
        "daemon.checks",
        "daemon.dryrun",
    },
    {"daemon.supervisor"},
    {
        "daemon.planning",
        "daemon.recording",
        "daemon.policy",
        "daemon.fleet",
        "daemon.conditions",
        "daemon.workqueue",
    },
    {"daemon.links", "daemon.ray_links", "daemon.preload"},
    {"daemon.worker"},
    {"daemon.backends"},
    {"daemon.cutter"},
    {"daemon.parts", "daemon.writers"},
    {"daemon.pictures", "daemon.cutting"},
    {
        "daemon.stages",
        "daemon.stages.resize",
        "daemon.stages.upscale",
        "daemon.stages.matte",
        "daemon.stages.composite",
        "daemon.models",
        "daemon.encode",
        "daemon.source",
        "daemon.walk",
        "daemon.timing",
        "daemon.download",
        "daemon.backpart",
        "daemon.arrival",
        "daemon.gpu.nvcodec",
        "daemon.gpu.color",
        "daemon.gpu.slots",
        "daemon.gpu.probe",
    },
    {
        "daemon",
        "daemon.gpu",
        "daemon.gpu.driver",
        "daemon.stages.base",
        "daemon.frames",
        "daemon.geometry",
        "daemon.colour",
        "daemon.messages",
        "daemon.failures",
        "daemon.events",
        "daemon.signals",
        "daemon.folders",
        "daemon.config",
        "daemon.budget",
        "daemon.lockslots",
        "daemon.partfile",
        "daemon.ledger",
        "daemon.ledger_view",
        "daemon.clips",
        "daemon.extras",
        "daemon.logs",
        "daemon.urls",
        "daemon.textfiles",
        "daemon.sites",
        "daemon.diskspace",
        "daemon.locking",
        "daemon.metrics",
        "daemon.workerserver",
    },
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports when it runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from daemon import logs` imports the module daemon.logs.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, known) - {name} for name, path in found.items()}


def layer_of(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"{name} has no layer in tests/test_architecture.py; give it one")


def test_every_module_has_a_layer() -> None:
    assert sorted(set(modules()) - set().union(*LAYERS)) == []
    assert sorted(set().union(*LAYERS) - set(modules())) == []  # no stale names either


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer_of(target) < layer_of(module)
    ]
    assert upward == []


def test_the_import_graph_has_no_cycles() -> None:
    edges = graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    """The rule itself: an import inside a function counts, one under TYPE_CHECKING does not."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from daemon.cli import main\n"
        "def f():\n    from daemon.supervisor import Supervisor\n",
        encoding="utf-8",
    )
    assert imports_of(source, {"daemon.cli", "daemon.supervisor"}) == {"daemon.supervisor"}


# --- rules of the house ------------------------------------------------------------------------

MOST_LINES = 500
# Modules over MOST_LINES: none. A module that grows past it is split by what it does.
OVER_MOST_LINES: set[str] = set()

# The modules that run the frame loop: they are given their parts (daemon.cutting.CutterParts,
# assembled by daemon.backends) and must not reach the settings, even through another module.
FRAME_LOOP = {
    "daemon.cutter",
    "daemon.writers",
    "daemon.parts",
    "daemon.pictures",
    "daemon.cutting",
    "daemon.walk",
    "daemon.timing",
}

# Writing a file atomically (fsync, rename) is daemon.partfile's alone.
PUBLISHING_CALLS = ("os.replace(", "os.fsync(", "mkstemp(")
PUBLISHES_ON_ITS_OWN = {"daemon.partfile"}


def source_text(name: str) -> str:
    return modules()[name].read_text(encoding="utf-8")


def test_no_module_is_over_500_lines() -> None:
    lengths = {name: len(source_text(name).splitlines()) for name in modules()}
    assert sorted(name for name, lines in lengths.items() if lines > MOST_LINES) == sorted(OVER_MOST_LINES)


def test_the_core_count_is_read_in_one_module() -> None:
    readers = [
        name
        for name in modules()
        if any(call in source_text(name) for call in ("sched_getaffinity", "cpu_count", "process_cpu_count"))
    ]
    assert readers == ["daemon.budget"]


def test_the_frame_loop_imports_no_settings() -> None:
    edges = graph()
    reached: set[str] = set()
    waiting = list(FRAME_LOOP)
    while waiting:
        module = waiting.pop()
        if module not in reached:
            reached.add(module)
            waiting.extend(edges[module])
    assert set(modules()) >= FRAME_LOOP
    assert "daemon.config" not in reached


def test_files_are_published_by_one_helper() -> None:
    publishers = {name for name in modules() if any(call in source_text(name) for call in PUBLISHING_CALLS)}
    assert publishers == PUBLISHES_ON_ITS_OWN

"""The shape of the package (docs/ARCHITECTURE.md): imports go one way, stage by stage, with no circle.

Read from the source with `ast` (nothing is imported), so a violation names the file and line.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tfcompress"

# Stages from the bottom up (docs/ARCHITECTURE.md). A module may import modules of its own stage or of a stage
# below, never one above. An exact name decides first, then the first matching prefix. The package itself is at
# the bottom: it holds `__version__` and imports its names only lazily (importlib inside __getattr__).
STAGES = [
    ("foundation", ["tfcompress", "tfcompress._files", "tfcompress._keras", "tfcompress.sizes", "tfcompress.metrics",
                    "tfcompress.robe_hash", "tfcompress.quantize", "tfcompress._watchdog"]),
    ("data", ["tfcompress.data"]),
    ("lookups", ["tfcompress.lookup", "tfcompress.fused_ops"]),
    ("layers", ["tfcompress.layers", "tfcompress.learn_hash.cluster", "tfcompress.learn_hash.mapping"]),
    ("models", ["tfcompress.plan", "tfcompress.model_rewrite", "tfcompress.model_compress", "tfcompress.models",
                "tfcompress.optimizers",
                "tfcompress.chunk_pruning"]),
    ("fit", ["tfcompress.pipeline", "tfcompress.multiworker", "tfcompress.train", "tfcompress.tune", "tfcompress.learn_hash"]),
    ("export", ["tfcompress.export"]),
    ("applications", ["tfcompress.reproduce", "tfcompress.cli"]),
]


def stage_of(module):
    for level, (_, names) in enumerate(STAGES):
        if module in names:
            return level
    for level, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if prefix != "tfcompress" and module.startswith(prefix + "."):
                return level
    raise AssertionError(f"{module} belongs to no stage of STAGES")


def _modules():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name, path, modules):
    """(imported module, line) for every tfcompress import of the module, wherever it stands in the file."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                yield target, node.lineno


def _graph():
    modules = _modules()
    return modules, {name: sorted(set(_imports(name, path, modules))) for name, path in modules.items()}


def test_every_module_has_a_stage():
    for name in _modules():
        stage_of(name)


def test_no_module_imports_a_stage_above_it():
    modules, graph = _graph()
    upward = [f"{modules[name].relative_to(PACKAGE.parent)}:{line}: {name} ({STAGES[stage_of(name)][0]}) imports "
              f"{target} ({STAGES[stage_of(target)][0]})"
              for name, edges in graph.items() for target, line in edges if stage_of(target) > stage_of(name)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    _, graph = _graph()
    edges = {name: {target for target, _ in targets} for name, targets in graph.items()}
    state = {}

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_import_tfcompress_is_light_and_reaches_every_subpackage():
    code = ("import sys, tfcompress\n"
            "assert 'tensorflow' not in sys.modules, 'import tfcompress imported TensorFlow'\n"
            "print(tfcompress.layers.RobeEmbedding.__name__, tfcompress.data.read.__module__,\n"
            "      tfcompress.export.export_saved_model.__name__, tfcompress.make_plan.__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TFCOMPRESS_CUSTOM_OPS": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["RobeEmbedding", "tfcompress.data.reader", "export_saved_model", "make_plan"]


def test_the_command_line_help_imports_no_tensorflow():
    code = ("import sys\n"
            "from tfcompress import cli\n"
            "parser = cli.build_parser()\n"
            "(commands,) = [a for a in parser._actions if a.dest == 'command']\n"
            "texts = [sub.format_help() for sub in commands.choices.values()]\n"
            "assert 'tensorflow' not in sys.modules, 'building the command line parser imported TensorFlow'\n"
            "print(len(texts))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) >= 9


def test_imports_inside_functions_say_why():
    """Imports inside a function defer a heavy or optional import; the comment on or above each says which."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        line, above = lines[inner.lineno - 1], lines[inner.lineno - 2].strip()
                        if "#" not in line and not above.startswith("#"):
                            silent.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}: {line.strip()}")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(silent)))


def test_contracts_are_cited_from_docs_in_the_repository():
    root = PACKAGE.parent
    citing = [str(path.relative_to(root)) for folder in ("tfcompress", "tests", "bench", "custom_ops", "examples")
              for path in (root / folder).rglob("*") if path.is_file() and path.suffix in (".py", ".h", ".cc", ".md")
              and path.name != Path(__file__).name and "DESIGN.md" in path.read_text(errors="ignore")]
    assert not citing, f"these cite DESIGN.md, which is not in the repository; cite docs/ instead: {citing}"
    for doc in ("ARCHITECTURE.md", "robe_z.md", "tfrecord_layout.md", "export_contract.md", "layers.md"):
        assert (root / "docs" / doc).is_file(), doc

"""The imports of genjax run one way, from the top layer down (docs: README "Layout"):

    cli, demo, sample                      (commands)
    train                                  (the training loop)
    tasks                                  (what is trained and sampled)
    models, diffusion, data, eval, convert (building blocks)
    io, parallel, errors, config           (the edges)

A module never imports one of a higher layer (function-level imports included), the folders
have no import cycle, and nothing that trains imports the generation command `genjax.sample`.
Checked on the source with `ast`, so it holds for every code path, not just the ones a test runs.
"""

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "genjax")
LAYERS = [
    ("genjax.cli", "genjax.demo", "genjax.sample"),
    ("genjax.train",),
    ("genjax.tasks",),
    ("genjax.models", "genjax.diffusion", "genjax.data", "genjax.eval", "genjax.convert"),
    ("genjax.io", "genjax.parallel", "genjax.errors", "genjax.config"),
]


def _modules():
    """{module name: path} of every .py file under genjax/."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path):
    """The genjax modules `path` imports anywhere (`from a import b` is `a.b` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("genjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genjax"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in MODULES else node.module)
    return out - {"genjax"}


def _layer(module):
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def _folder(module):
    """genjax.a.b -> genjax.a (a package) or the module itself (a top-level file)."""
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_layer():
    for module in MODULES:
        if module != "genjax":
            _layer(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "genjax"))
def test_imports_run_downwards(module):
    upward = [m for m in _imports(MODULES[module]) if _layer(m) < _layer(module)]
    assert not upward, f"{module} (layer {_layer(module)}) imports the higher layer(s) {upward}"


def test_no_cycle_between_folders():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for m in _imports(path):
            if _folder(m) != _folder(module):
                graph[_folder(module)].add(_folder(m))

    def visit(node, stack):
        assert node not in stack, f"import cycle between folders: {' -> '.join([*stack, node])}"
        for nxt in graph[node]:
            visit(nxt, [*stack, node])

    for node in list(graph):
        visit(node, [])


@pytest.mark.parametrize("module", ["genjax.demo"] + sorted(m for m in MODULES if m.startswith("genjax.train")))
def test_training_never_imports_the_sample_command(module):
    assert "genjax.sample" not in _imports(MODULES[module])


def test_the_check_sees_a_function_level_import(tmp_path):
    """The checker itself: an import inside a function is found (the test above can fail)."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from genjax import sample\n    from genjax.models import dit\n")
    assert _imports(str(path)) == {"genjax.sample", "genjax.models.dit"}

"""The package's layers, read from its imports: core <- optim <- integrations, and core <- analysis.

Nothing imports upward or sideways, no two modules import each other (directly or in a cycle), and every
module declares ``__all__``.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cmd_optim"
#: what each layer may import from the package
ALLOWED = {"core": {"core"}, "optim": {"core", "optim"}, "integrations": {"core", "optim", "integrations"},
           "analysis": {"core", "analysis"}, "": {"core", "optim", "analysis", ""}}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The cmd_optim modules ``path`` imports (relative imports resolved; the package root counts as ``cmd_optim``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cmd_optim"):
                found.add(target)
                # "from . import x" and "from .core import y": y may be a submodule
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").exists():
                        found.add(submodule)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cmd_optim"))
    return found - {name}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else ""


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_layer_imports_upward_or_sideways():
    bad = [(module, target) for module, targets in _graph().items() for target in targets
           if _layer(target) not in ALLOWED[_layer(module)]]
    assert not bad, bad


def test_the_core_needs_no_optional_dependency():
    optional = {"transformers", "accelerate", "peft", "torchvision", "matplotlib", "pydmd", "safetensors", "tqdm",
                "sklearn", "mnist1d", "triton"}
    for path in (PACKAGE / "core").rglob("*.py"):
        if path.name == "gpu.py":  # the Triton kernels: imported only when a GPU backend is asked for
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not {n.split(".")[0] for n in names} & optional, (path, names)


def test_there_is_no_import_cycle():
    graph = _graph()
    modules = {m: {t for t in targets if t in graph} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in modules[module]:
            if target == module.rsplit(".", 1)[0] and module.startswith(target + "."):
                continue  # a submodule reading its package's own __init__ exports is not a cycle of modules
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [module, target])}")
            if not state.get(target):
                visit(target, path + [module])
        state[module] = 2

    for module in modules:
        if not state.get(module):
            visit(module, [])


def test_every_module_declares_all():
    missing = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if path.name != "__main__.py" and not any(
                   isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
                   or isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "__all__"
                   for node in ast.parse(path.read_text()).body)]
    assert not missing, missing


def test_the_ddp_hook_and_the_optimizer_do_not_import_each_other():
    graph = _graph()
    assert not {m for m in graph["cmd_optim.integrations.ddp"] if m.startswith("cmd_optim.optim")}
    optim = [t for m, targets in graph.items() if _layer(m) == "optim" for t in targets]
    assert not [t for t in optim if t.startswith("cmd_optim.integrations")]


def test_the_architecture_doc_lists_every_module_of_each_layer():
    """docs/architecture.md's layer table names exactly the modules of each subpackage."""
    import re

    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for layer in ("core", "optim", "integrations", "analysis"):
        row = next(line for line in doc.splitlines() if line.startswith(f"| `cmd_optim.{layer}` |"))
        listed = set(re.findall(r"`(\w+)`", row.split("|")[2]))
        present = {p.stem for p in (PACKAGE / layer).glob("*.py") if p.stem != "__init__"}
        present |= {p.parent.name for p in (PACKAGE / layer).glob("*/__init__.py")}  # subpackages
        assert listed == present, (layer, sorted(listed - present), sorted(present - listed))

"""The package map holds: nodes -> {inversion, evaluation, guidance}, inversion -> guidance,
evaluation -> guidance, and nothing points back; node modules share only nodes/common.py."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ALLOWED = {"nodes": {"nodes", "methods", "inversion", "evaluation", "guidance"},
           "methods": {"methods", "inversion", "guidance"}, "inversion": {"inversion", "guidance"},
           "evaluation": {"evaluation", "guidance"}, "guidance": {"guidance"}}
SHARED_NODE_MODULES = {"common"}  # what one node module may import from another


def pack_imports(path: Path, root: Path = REPO):
    """(line, imported module as a tuple of package parts) for each relative import of a pack file."""
    parts = list(path.relative_to(root).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[: len(parts) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            names = [a.name for a in node.names] if not node.module else [None]
            for name in names:  # "from . import x" imports the module x
                yield node.lineno, tuple(base + ([name] if name else []))


def violations(root: Path = REPO) -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, target in pack_imports(path, root):
                where = f"{path.relative_to(root)}:{line} imports {'.'.join(target)}"
                if target and target[0] in ALLOWED and target[0] not in allowed:
                    found.append(where + f" ({package} may import only {sorted(allowed)})")
                if (package == "nodes" and len(target) > 1 and target[0] == "nodes" and path.stem != "__init__"
                        and target[1] not in SHARED_NODE_MODULES):
                    found.append(where + " (node modules share only nodes/common.py)")
    return found


def test_imports_follow_the_one_way_package_map():
    assert violations() == []


def test_the_checker_finds_a_backward_import_and_a_node_module_importing_another(tmp_path):
    for pkg in ALLOWED:
        (tmp_path / pkg).mkdir()
    (tmp_path / "guidance" / "bad.py").write_text("from ..inversion.key_e import KeyE\n")
    (tmp_path / "nodes" / "a_nodes.py").write_text("from .b_nodes import helper\nfrom .common import tip\n")
    (tmp_path / "evaluation" / "ok.py").write_text("from ..guidance.face import base\nfrom . import images\n")
    found = violations(tmp_path)
    assert len(found) == 2, found
    assert any(f.startswith("guidance/bad.py:1 imports inversion.key_e") for f in found), found
    assert any(f.startswith("nodes/a_nodes.py:1 imports nodes.b_nodes") for f in found), found


def test_ruff_finds_nothing():
    import subprocess
    import sys
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), f"ruff is not installed beside {sys.executable}: the test command installs it"
    run = subprocess.run([str(ruff), "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr

"""The engine stays plain Python: nothing under sleep_pipeline/ imports dagster."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "sleep_pipeline"
# Only the out-of-process training worker may talk to Dagster, and only through dagster_pipes.
ALLOWED = {"dagster_pipes"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_never_imports_dagster():
    offenders = {
        str(p.relative_to(ENGINE)): sorted(n for n in _imports(p) if n.startswith("dagster") and n not in ALLOWED)
        for p in ENGINE.rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"engine modules import dagster: {offenders}"


def test_boundary_check_sees_imports(tmp_path):
    # The scan itself must notice an import, or the test above could pass vacuously.
    probe = tmp_path / "probe.py"
    probe.write_text("import dagster as dg\nfrom dagster_pipes import open_dagster_pipes\n")
    assert _imports(probe) == {"dagster", "dagster_pipes"}

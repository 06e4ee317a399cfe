"""The layering of docs/architecture.md, enforced on the import statements of every file in posttrain/.

- the layers below the algorithms import only from their own layer or lower ones, and never from
  algorithms/, evaluation/ (but its pure ``stats``), feedback/, judges/, serving/ or the interface;
- no file in algorithms/ imports another algorithm file, except a variant preset extending the
  variant table it is a preset of (rloo and reinforce are GRPO variants);
- evaluation/, feedback/ and pipeline.py do not import cli.py;
- no Python file is longer than ~400 lines.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "posttrain"

# layer of each package / module below the algorithms (a module may import its own layer or lower)
LAYERS = {
    "errors": 0, "config": 0, "config_checks": 0, "config_io": 0, "config_view": 0, "losses": 0, "advantages": 0, "kl": 0, "masked": 0, "logprobs": 0,
    "evaluation.stats": 0,  # pure numpy statistics: the math of evaluation
    "data": 1, "tasks": 1,
    "models": 2,
    "engines": 3,
    "rewards": 4,
    "rollouts": 5,
}
VARIANT_PRESETS = {("rloo", "grpo"), ("reinforce", "grpo")}  # the one allowed algorithm -> algorithm import
MAX_LINES = 420


def _layer(module: str) -> int | None:
    parts = module.split(".")[1:]  # drop "posttrain"
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    return None


def _imports(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posttrain"):
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("posttrain")]
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    name = ".".join(rel.parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


FILES = sorted(ROOT.rglob("*.py"))


def test_lower_layers_import_only_downward():
    bad = []
    for path in FILES:
        mod = _module(path)
        own = _layer(mod)
        if own is None:
            continue
        for target, line in _imports(path):
            if target == "posttrain":
                continue
            t = _layer(target)
            if (t is None and _layer(target.rsplit(".", 1)[0]) is None) or (t is not None and t > own):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_algorithm_imports_another():
    algorithms = {p.stem for p in (ROOT / "algorithms").glob("*.py") if p.stem != "__init__"}
    bad = []
    for path in (ROOT / "algorithms").glob("*.py"):
        for target, line in _imports(path):
            parts = target.split(".")
            if parts[:2] == ["posttrain", "algorithms"] and len(parts) > 2 and parts[2] in algorithms:
                if parts[2] != path.stem and (path.stem, parts[2]) not in VARIANT_PRESETS:
                    bad.append(f"algorithms/{path.name}:{line} imports {target}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("where", ["evaluation", "feedback", "pipeline.py"])
def test_evaluation_feedback_and_pipeline_do_not_import_the_cli(where):
    paths = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    bad = [f"{p.relative_to(ROOT.parent)}:{line}" for p in paths for target, line in _imports(p)
           if target == "posttrain.cli" or target.startswith("posttrain.cli.")]
    assert not bad, bad


def test_no_file_is_much_longer_than_400_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in FILES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_checks_can_fail(tmp_path):
    """The import reader sees module-level and function-local imports alike."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from posttrain.algorithms.grpo import run\n")
    assert ("posttrain.algorithms.grpo", 2) in _imports(f)
    assert _layer("posttrain.models.forward") == 2 and _layer("posttrain.evaluation.stats") == 0
    assert _layer("posttrain.evaluation.report") is None

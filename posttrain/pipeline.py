"""``posttrain pipeline FILE.yaml``: run named stages in order in one run directory.

A pipeline file::

    run_dir: runs/my-pipeline
    stages:
      - name: sft
        command: sft
        config: {data: {train: builtin:sft}, train: {epochs: 3}}
      - name: reward
        command: reward
        config: {model: {name_or_path: "${sft.final}"}, data: {train: "${prefs.dir}/train.jsonl"}}

Each stage writes ``<run_dir>/<name>/``; ``${stage.dir}`` and ``${stage.final}`` name an earlier
stage's directory and its final model; ``${run_dir}`` the pipeline's directory. Every stage's config is built and validated before the first
stage runs. A finished stage leaves ``DONE`` (with its time) and is skipped when the pipeline runs
again, so an interrupted pipeline resumes; an unfinished training stage resumes from its newest
checkpoint.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from posttrain.commands import COMMANDS, load_command
from posttrain.config import build, opt, read_yaml, validate
from posttrain.errors import ConfigError

_REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)\.(dir|final)\}")
_RUN_DIR = "${run_dir}"


@dataclass
class PipelineConfig:
    file: str = opt("", "Pipeline YAML (name, run_dir, stages).")
    run_dir: str | None = opt(None, "Override the file's run_dir.")
    only: list[str] = opt([], "Run only these stages (their inputs must exist).")
    force: list[str] = opt([], "Re-run these stages even if DONE.")

    def validate(self) -> None:
        if not self.file:
            raise ConfigError("no pipeline file given", where="file", fix="posttrain pipeline FILE.yaml")


@dataclass
class Stage:
    name: str
    command: str
    tree: dict
    dir: Path


def _substitute(value: Any, dirs: dict[str, Path], stage: str, run_dir: Path) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, stage, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, stage, run_dir) for v in value]
    if isinstance(value, str):
        value = value.replace(_RUN_DIR, str(run_dir))

        def repl(m):
            if m.group(1) not in dirs:
                raise ConfigError(f"stage '{stage}' refers to '{m.group(1)}', which is not an earlier stage",
                                  where=f"stages.{stage}.config", fix=f"earlier stages: {sorted(dirs)}")
            d = dirs[m.group(1)]
            return str(d / "final") if m.group(2) == "final" else str(d)
        return _REF.sub(repl, value)
    return value


def _with_output(cls, tree: dict, out: Path) -> dict:
    tree = copy.deepcopy(tree)
    names = {f.name for f in fields(cls)}
    if "train" in names:
        tree.setdefault("train", {})["output_dir"] = str(out)
    elif "output_dir" in names:
        tree["output_dir"] = str(out)
    return tree


def load_stages(spec: dict, run_dir: Path, where: str) -> list[tuple[Stage, Any]]:
    """Build and validate every stage's config (nothing runs)."""
    stages_spec = spec.get("stages")
    if not isinstance(stages_spec, list) or not stages_spec:
        raise ConfigError("a pipeline needs a non-empty 'stages' list", where=where)
    dirs: dict[str, Path] = {}
    out = []
    for i, s in enumerate(stages_spec):
        if not isinstance(s, dict) or "name" not in s or "command" not in s:
            raise ConfigError(f"stage {i} needs 'name' and 'command'", where=f"{where}: stages[{i}]")
        name, command = str(s["name"]), s["command"]
        if command not in COMMANDS or command in ("pipeline", "demo"):
            raise ConfigError(f"stage '{name}': unknown command '{command}'", where=f"{where}: stages[{i}]",
                              fix=f"use one of {sorted(c for c in COMMANDS if c not in ('pipeline', 'demo'))}")
        if name in dirs:
            raise ConfigError(f"two stages are named '{name}'", where=where)
        stage_dir = run_dir / name
        tree = _substitute(s.get("config") or {}, dirs, name, run_dir)
        cls, _ = load_command(COMMANDS[command])
        tree = _with_output(cls, tree, stage_dir)
        try:
            cfg = build(cls, tree)
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"stage '{name}' ({command}): {e.what}", where=f"{where}: {e.where or ''}",
                              fix=e.fix) from None
        dirs[name] = stage_dir
        out.append((Stage(name, command, tree, stage_dir), cfg))
    return out


def run_spec(spec: dict, run_dir: Path, where: str, only=(), force=(), on_stage=None) -> dict:
    stages = load_stages(spec, run_dir, where)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(json.dumps(spec, indent=2))
    table = []
    for stage, cfg in stages:
        done = stage.dir / "DONE"
        if only and stage.name not in only:
            continue
        if done.exists() and stage.name not in force:
            info = json.loads(done.read_text())
            table.append({**info, "skipped": True})
            continue
        if stage.name in force and stage.dir.exists():
            shutil.rmtree(stage.dir)
        if stage.dir.exists() and hasattr(cfg, "train"):
            cfg.train.resume = True  # an interrupted training stage continues from its checkpoint
        if on_stage:
            on_stage(stage.name, stage.command)
        _, run = load_command(COMMANDS[stage.command])
        t0 = time.perf_counter()
        result = run(cfg)
        info = {"stage": stage.name, "command": stage.command, "seconds": round(time.perf_counter() - t0, 1),
                "dir": str(stage.dir), "summary": _jsonable(result)}
        stage.dir.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(info, indent=2))
        table.append(info)
        _write_table(run_dir, table)  # after every stage, so a report stage sees those before it
    return _write_table(run_dir, table)


def _write_table(run_dir: Path, table: list[dict]) -> dict:
    summary = {"run_dir": str(run_dir), "stages": table}
    (run_dir / "pipeline.json").write_text(json.dumps(summary, indent=2))
    return summary


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


def run(cfg: PipelineConfig) -> dict:
    spec = read_yaml(cfg.file)
    run_dir = Path(cfg.run_dir or spec.get("run_dir") or f"runs/{Path(cfg.file).stem}")
    return run_spec(spec, run_dir, cfg.file, cfg.only, cfg.force)

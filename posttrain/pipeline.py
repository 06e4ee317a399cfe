"""``posttrain pipeline FILE.yaml``: run named stages in order in one run directory (docs/pipeline.md).

Each stage writes ``<run_dir>/<name>/``; ``${stage.dir}`` and ``${stage.final}`` name an earlier
stage's directory and its final model, ``${run_dir}`` the pipeline's directory. Every stage's config is
built and validated before the first stage runs. A stage reading a path inside another stage's directory
depends on it; one reading the run directory itself (or anything else in it) depends on every earlier one.

A stage's fingerprint (``stage.json``) hashes its resolved config, the data files it names and the runs of
the stages it depends on. Before anything runs, one line per stage says what happens and why: a finished
stage (``DONE``) with an unchanged fingerprint is skipped; a changed one runs again from scratch, and so
does every stage depending on it; an interrupted training stage resumes from its newest checkpoint;
``force=[...]`` re-runs stages and their dependents.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from posttrain.commands import COMMANDS, load_command
from posttrain.config import build, opt, read_yaml, validate
from posttrain.errors import ConfigError, PosttrainError

_REF = re.compile(r"\$\{([A-Za-z0-9_\-]+)\.(dir|final)\}")
_RUN_DIR = "${run_dir}"
FILE_KEYS = ("name", "run_dir", "stages")
STAGE_KEYS = ("name", "command", "config")
STAGE_FILE = "stage.json"  # the stage's fingerprint and resolved config (written at start and at finish)
VOLATILE = ("train.resume", "train.progress")  # keys that do not change what a stage produces
SMALL_FILE = 1 << 20  # data files up to 1 MiB are fingerprinted by content, larger ones by size and mtime
MAX_FILES = 10_000  # files of a data folder listed (size, mtime) in its fingerprint


@dataclass
class PipelineConfig:
    file: str = opt("", "Pipeline YAML (name, run_dir, stages).")
    run_dir: str | None = opt(None, "Override the file's run_dir.")
    only: list[str] = opt([], "Run only these stages (their inputs must exist).")
    force: list[str] = opt([], "Re-run these stages, and every stage that depends on them, even if finished "
                                "and unchanged.")

    def validate(self) -> None:
        if not self.file:
            raise ConfigError("no pipeline file given", where="file", fix="posttrain pipeline FILE.yaml")


@dataclass
class Stage:
    name: str
    command: str
    tree: dict
    dir: Path
    deps: list[str] = field(default_factory=list)  # earlier stages whose outputs this one reads


@dataclass
class Decision:
    """What a stage will do: skip, run, resume, or keep (not selected by ``only``), as one console line."""
    action: str
    text: str
    fresh: bool = False  # remove the stage's directory before it runs


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


def _check_keys(got: dict, allowed: tuple[str, ...], what: str, where: str) -> None:
    for key in got:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            raise ConfigError(f"unknown key '{key}' in {what}", where=where,
                              fix=f"did you mean '{near[0]}'?" if near else f"the keys are {', '.join(allowed)}")


def load_stages(spec: dict, run_dir: Path, where: str) -> list[tuple[Stage, Any]]:
    """Build and validate every stage's config (nothing runs)."""
    _check_keys(spec, FILE_KEYS, "the pipeline file", where)
    stages_spec = spec.get("stages")
    if not isinstance(stages_spec, list) or not stages_spec:
        raise ConfigError("a pipeline needs a non-empty 'stages' list", where=where)
    dirs: dict[str, Path] = {}
    out = []
    for i, s in enumerate(stages_spec):
        if not isinstance(s, dict) or "name" not in s or "command" not in s:
            raise ConfigError(f"stage {i} needs 'name' and 'command'", where=f"{where}: stages[{i}]")
        name, command = str(s["name"]), s["command"]
        _check_keys(s, STAGE_KEYS, f"stage '{name}'", f"{where}: stages[{i}]")
        if command not in COMMANDS or command in ("pipeline", "demo", "recipes"):
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
        deps = _dependencies(resolved_config(cfg, run_dir), list(dirs), name, run_dir)
        dirs[name] = stage_dir
        out.append((Stage(name, command, tree, stage_dir, deps), cfg))
    return out


# ----------------------------------------------------------------------------- fingerprints


def _roots(run_dir: Path) -> re.Pattern:
    """The run directory (as written and absolute) where a path starts, not inside a longer name."""
    roots = sorted({str(run_dir), str(run_dir.resolve())}, key=len, reverse=True)
    return re.compile(r"(?<![\w.\-/~])(?:" + "|".join(map(re.escape, roots)) + r")(?=$|[/\s,;:'\"])")


def _strings(x: Any):
    if isinstance(x, str):
        yield x
    elif isinstance(x, (dict, list)):
        for v in x.values() if isinstance(x, dict) else x:
            yield from _strings(v)


def resolved_config(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """A stage's fully resolved config as {dotted key: JSON value}: paths into the run directory are
    written ``${run_dir}/...`` (a renamed run directory keeps its fingerprints), volatile keys left out."""
    pattern, out = _roots(run_dir), {}

    def walk(node: Any, prefix: str) -> None:
        for f in fields(node):
            value, key = getattr(node, f.name), prefix + f.name
            if is_dataclass(value):
                walk(value, key + ".")
            elif key not in VOLATILE:
                out[key] = _portable(value, pattern)
    walk(cfg, "")
    return out


def _portable(x: Any, pattern: re.Pattern) -> Any:
    """``x`` as JSON values, every path into the run directory written ``${run_dir}/...``."""
    return json.loads(pattern.sub(lambda m: _RUN_DIR, json.dumps(_jsonable(x))))


def _dependencies(resolved: dict[str, Any], earlier: list[str], own: str, run_dir: Path) -> list[str]:
    """Earlier stages this one reads: a path inside ``<run_dir>/<stage>/`` names that stage; the run
    directory itself, anything else in it, or a folder holding it names every earlier stage (the safe guess)."""
    deps, rd = set(), run_dir.resolve()
    for s in _strings(resolved):
        parts = [m.group(1) for m in re.finditer(re.escape(_RUN_DIR) + r"(?:/([^/\s,;:'\"]+))?", s)]
        parts += [q for p in _paths(s) if (q := _part_in(p, rd)) != ""]
        for part in parts:
            if part != own:
                deps |= {part} if part in earlier else set(earlier)
    return [d for d in earlier if d in deps]


def _paths(s: str):
    """A config string read as a path, and the part after a prefix such as ``rm:`` (not ``builtin:``)."""
    if s and len(s) < 1024 and "\n" not in s and _RUN_DIR not in s:
        yield s
        if ":" in s and not s.startswith("builtin:"):
            yield s.split(":", 1)[1]


def _part_in(path: str, rd: Path) -> str | None:
    """The first part of ``path`` below the run directory ``rd``; None for ``rd`` itself or an existing
    folder holding it (``.``, ``runs``); '' for a path outside it."""
    try:
        p = Path(path).resolve()
        if p.is_relative_to(rd):
            return next(iter(p.relative_to(rd).parts), None)
        return None if rd.is_relative_to(p) and p.is_dir() else ""
    except (OSError, ValueError, RuntimeError):
        return ""


def data_prints(resolved: dict[str, Any], run_dir: Path) -> dict[str, str]:
    """{path: fingerprint} of every file or folder outside the run directory that the config names
    (``rm:PATH`` and similar prefixed forms too): content hash up to 1 MiB, else size and mtime."""
    out, rd = {}, run_dir.resolve()
    for s in _strings(resolved):
        for cand in _paths(s):
            try:
                if _part_in(cand, rd) == "" and Path(cand).exists():
                    out[cand] = _path_print(Path(cand))
            except (OSError, ValueError):
                continue
    return out


def _path_print(p: Path) -> str:
    if p.is_file():
        st = p.stat()
        return ("sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()[:16] if st.st_size <= SMALL_FILE
                else f"size:{st.st_size} mtime:{st.st_mtime_ns}")
    files = sorted(itertools.islice((q for q in p.rglob("*") if q.is_file()), MAX_FILES))
    return "listing:" + _sha([(str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns) for q in files])[:16]


def fingerprint(command: str, resolved: dict, data: dict, inputs: dict) -> str:
    """sha256 of the sorted JSON of the command, resolved config, data files and the inputs' run ids."""
    return _sha({"command": command, "config": resolved, "data": data, "inputs": inputs})


def _sha(x: Any) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _show(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def config_changes(old: dict[str, Any], new: dict[str, Any], most: int = 3) -> str:
    """'train.lr 0.0001 -> 0.0005, train.max_steps 2 -> 3 and 2 more' ('' if nothing changed)."""
    absent = object()
    keys = [k for k in [*new, *(k for k in old if k not in new)] if old.get(k, absent) != new.get(k, absent)]
    shown = [f"{k} {_show(old[k]) if k in old else '(absent)'} -> {_show(new[k]) if k in new else '(absent)'}"
             for k in keys[:most]]
    return ", ".join(shown) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _legacy_config(stage_dir: Path, resolved: dict, run_dir: Path) -> dict | None:
    """A stage finished before stage.json existed: its config.yaml, keyed like ``resolved`` (keys it lacks left out)."""
    try:
        tree = read_yaml(stage_dir / "config.yaml")
    except PosttrainError:
        return None
    out, pattern = {}, _roots(run_dir)
    for key in resolved:
        node: Any = tree
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            out[key] = _portable(node, pattern)
    return out


def _newest_step(stage_dir: Path) -> int | None:
    steps = [int(p.name[5:]) for p in (stage_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return max(steps, default=None)


# ----------------------------------------------------------------------------- deciding, then running


def plan(stages: list[tuple[Stage, Any]], run_dir: Path, only=(), force=()) -> dict[str, Decision]:
    """Decide, before anything runs, what every stage does and why."""
    names = [s.name for s, _ in stages]
    for key, given in (("only", only), ("force", force)):
        for n in given:
            if n not in names:
                raise ConfigError(f"'{n}' is not a stage of this pipeline", where=key,
                                  fix=f"the stages are {', '.join(names)}")
    out: dict[str, Decision] = {}
    run_ids: dict[str, str | None] = {}
    for stage, cfg in stages:
        stored = _read_json(stage.dir / STAGE_FILE)
        done = (stage.dir / "DONE").exists()
        run_ids[stage.name] = (stored or {}).get("run_id") if done else None
        out[stage.name] = _decide(stage, cfg, stored, done, out, run_ids, run_dir, only, force)
    return out


def _decide(stage, cfg, stored, done, earlier, run_ids, run_dir, only, force) -> Decision:
    if only and stage.name not in only:
        return Decision("keep", f"skip (not selected: only=[{','.join(only)}])")
    if stage.name in force:
        return Decision("run", "run (forced)", fresh=True)
    if not stage.dir.exists():
        return Decision("run", "run (not run before)")
    resolved = resolved_config(cfg, run_dir)
    rerun = [d for d in stage.deps if earlier[d].action in ("run", "resume")]
    if stored is not None:
        reasons = _changes(stage, stored, resolved, rerun, {d: run_ids.get(d) for d in stage.deps}, run_dir)
    else:  # no stage.json: interrupted, or finished by an older posttrain (compared with its config.yaml)
        old = _legacy_config(stage.dir, resolved, run_dir) if done else None
        changes = config_changes(old, {k: resolved[k] for k in old}) if old else ""
        reasons = (["config changed: " + changes] if changes else []) + (
            ["an input changed: " + ", ".join(rerun)] if rerun else [])
        if done and old is None and not reasons:
            return Decision("skip", f"skip (finished; no fingerprint or config.yaml to compare; "
                                    f"force={stage.name} re-runs it)")
    if reasons:
        return Decision("run", f"run ({'; '.join(reasons)})", fresh=True)
    if done:
        return Decision("skip", "skip (finished, config unchanged)")
    if not hasattr(cfg, "train"):  # interrupted, and the command cannot resume
        return Decision("run", "run (interrupted; starts over)")
    step = _newest_step(stage.dir)
    return Decision("resume", f"resume from step {step}" if step else "run (interrupted before its first checkpoint)")


def _changes(stage, stored: dict, resolved: dict, rerun: list[str], inputs: dict, run_dir: Path) -> list[str]:
    """Why a stage's stored fingerprint no longer holds ([] if it does)."""
    reasons, data, old_data = [], data_prints(resolved, run_dir), stored.get("data") or {}
    if stored.get("command") != stage.command:
        reasons.append(f"command changed: {stored.get('command')} -> {stage.command}")
    elif config_changes(stored.get("config") or {}, resolved):
        reasons.append("config changed: " + config_changes(stored.get("config") or {}, resolved))
    changed = sorted(k for k in {*data, *old_data} if data.get(k) != old_data.get(k))
    if changed:
        reasons.append("a data file changed: " + ", ".join(changed[:3]))
    moved = rerun + [d for d in stage.deps if d not in rerun and (stored.get("inputs") or {}).get(d) != inputs[d]]
    if moved:
        reasons.append("an input changed: " + ", ".join(moved))
    if not reasons and stored.get("fingerprint") != fingerprint(stage.command, resolved, data, inputs):
        reasons.append("fingerprint changed")
    return reasons


def run_spec(spec: dict, run_dir: Path, where: str, only=(), force=(), on_stage=None,
             say: Callable[[str], None] | None = None) -> dict:
    say = say or (lambda line: print(line, flush=True))
    stages = load_stages(spec, run_dir, where)
    decisions = plan(stages, run_dir, only, force)
    for stage, _ in stages:
        say(f"stage {stage.name}: {decisions[stage.name].text}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(json.dumps(spec, indent=2))
    dirs = {s.name: s.dir for s, _ in stages}
    table = []
    for stage, cfg in stages:
        decision, done = decisions[stage.name], stage.dir / "DONE"
        if decision.action == "keep":
            continue
        if decision.action == "skip":
            table.append({**json.loads(done.read_text()), "skipped": True})
            continue
        if decision.fresh and stage.dir.exists():
            shutil.rmtree(stage.dir)
        if decision.action == "resume":
            cfg.train.resume = True  # an interrupted training stage continues from its checkpoint
        if on_stage:
            on_stage(stage.name, stage.command)
        resolved = resolved_config(cfg, run_dir)
        data = data_prints(resolved, run_dir)
        inputs = {d: (_read_json(dirs[d] / STAGE_FILE) or {}).get("run_id") for d in stage.deps}
        record = {"stage": stage.name, "fingerprint": fingerprint(stage.command, resolved, data, inputs),
                  "command": stage.command, "config": resolved, "data": data, "inputs": inputs,
                  "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        stage.dir.mkdir(parents=True, exist_ok=True)
        (stage.dir / STAGE_FILE).write_text(json.dumps(record, indent=2))
        _, run = load_command(COMMANDS[stage.command])
        t0 = time.perf_counter()
        result = run(cfg)
        info = {"stage": stage.name, "command": stage.command, "seconds": round(time.perf_counter() - t0, 1),
                "dir": str(stage.dir), "summary": _jsonable(result)}
        record.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      run_id=_sha([record["fingerprint"], time.time_ns()])[:16])
        (stage.dir / STAGE_FILE).write_text(json.dumps(record, indent=2))
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

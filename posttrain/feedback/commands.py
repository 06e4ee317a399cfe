"""``posttrain label <sub>``: configs and run functions of the labeling app's commands.

    posttrain label add-user name=alice role=admin          # password from $POSTTRAIN_LABEL_PASSWORD
    posttrain label add-user name=bob revoke=true           # end bob's API tokens and browser sessions
    posttrain label add-user name=bob active=false          # deactivate bob (also revokes)
    posttrain label create-project name=helpful overlap=3 annotators=[bob,carol]
    posttrain label generate model=runs/sft/final prompts=prompts.jsonl k=2 output=candidates.jsonl
    posttrain label import project=helpful file=candidates.jsonl
    posttrain label serve port=8600
    posttrain label export project=helpful output=runs/labels/helpful.jsonl aggregate=majority

``COMMANDS`` maps each sub-command to its config class and run function for the CLI's lazy groups
(``python -m posttrain.feedback <sub> key=value ...`` works too).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

from posttrain.commands import Command
from posttrain.config import opt
from posttrain.data.formats import load_records
from posttrain.data.records import ReadOptions
from posttrain.errors import ConfigError, DataError
from posttrain.feedback import accounts, auth, importing
from posttrain.feedback.app import LOOPBACK_HOSTS, Settings, create_app
from posttrain.feedback.assign import Refused
from posttrain.feedback.db import MAX_CANDIDATES, make_engine, make_sessionmaker, safe_url
from posttrain.feedback.export import ExportOptions, export_project, write_records
from posttrain.feedback.generate import sample_candidates

DB_HELP = ("Database URL: sqlite:///path/labels.db (default; WAL mode) or "
           "postgresql+psycopg://user:password@host:5432/db. A bare path means a SQLite file.")
DEFAULT_DB = "sqlite:///runs/labels.db"


def _refused(e: Exception, where: str) -> ConfigError:
    return ConfigError(str(e), where=where)


def _session(db_url: str):
    return make_sessionmaker(make_engine(db_url))()


# ----------------------------------------------------------------------------- serve


@dataclass
class LabelServeConfig:
    db: str = opt(DEFAULT_DB, DB_HELP)
    host: str = opt("127.0.0.1", "Interface to listen on; 0.0.0.0 exposes the app to the network "
                    "(put it behind HTTPS and set secure_cookies=true).")
    port: int = opt(8600, "TCP port.")
    session_hours: float = opt(12.0, "Browser sessions expire after this many hours.")
    token_days: float = opt(30.0, "API tokens expire this many days after they were issued (401 after that; "
                            "get a new one with POST /api/token).")
    max_body_bytes: int = opt(1024 * 1024, "Largest JSON or form request body (413 beyond; a larger declared "
                              "Content-Length is refused before anything is read).")
    max_upload_bytes: int = opt(50 * 1024 * 1024, "Largest task import (admin page upload, POST "
                                "/api/projects/{id}/tasks).")
    secure_cookies: bool = opt(False, "Mark the cookies Secure even on plain-HTTP requests (set it behind a TLS "
                               "proxy; requests that arrive as https get Secure cookies anyway).")
    allowed_hosts: list[str] = opt([], "Host header names the app answers (others get 400: DNS-rebinding "
                                   "protection). Empty: the bind address plus localhost, 127.0.0.1 and ::1. Behind a "
                                   "proxy list the public name, e.g. [labels.example.com]; '*' turns the check off.")
    login_max_failures: int = opt(10, "Failed logins (login form, POST /api/token, HTTP Basic) allowed per user "
                                  "name and per client address within login_window_s; then 429 with Retry-After. "
                                  "0: no limit.")
    login_window_s: float = opt(900.0, "The window of login_max_failures in seconds (also the longest lockout).")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = opt("warning", "uvicorn log level.")
    access_log: bool = opt(False, "Log every request.")

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be 1..65535, got {self.port}", where="port")
        if self.session_hours <= 0:
            raise ConfigError("session_hours must be positive", where="session_hours")
        if self.token_days <= 0:
            raise ConfigError("token_days must be positive", where="token_days")
        if self.login_max_failures < 0 or self.login_window_s <= 0:
            raise ConfigError("login_max_failures must be 0 (no limit) or more and login_window_s positive",
                              where="login_max_failures/login_window_s")
        if self.max_body_bytes < 4096 or self.max_upload_bytes < self.max_body_bytes:
            raise ConfigError("max_body_bytes must be at least 4096 and max_upload_bytes at least max_body_bytes",
                              where="max_body_bytes/max_upload_bytes")


def serve_settings(cfg: LabelServeConfig) -> Settings:
    # the bind address is a name clients may use; a wildcard address (0.0.0.0, ::) is not a Host name
    bind = () if cfg.host in ("0.0.0.0", "::") else (cfg.host,)
    hosts = tuple(cfg.allowed_hosts) or tuple(dict.fromkeys((*bind, *LOOPBACK_HOSTS)))
    return Settings(session_hours=cfg.session_hours, secure_cookies=cfg.secure_cookies, token_days=cfg.token_days,
                    max_body_bytes=cfg.max_body_bytes, max_upload_bytes=cfg.max_upload_bytes, allowed_hosts=hosts,
                    login_max_failures=cfg.login_max_failures, login_window_s=cfg.login_window_s)


def run_serve(cfg: LabelServeConfig) -> dict:
    import uvicorn

    app = create_app(cfg.db, serve_settings(cfg))
    if cfg.host not in LOOPBACK_HOSTS and not cfg.secure_cookies:
        print("warning: serving beyond loopback without secure_cookies=true; passwords and session cookies "
              "travel in clear text unless a HTTPS proxy is in front", file=sys.stderr)
    if cfg.host in ("0.0.0.0", "::") and not cfg.allowed_hosts:
        print(f"warning: host={cfg.host} answers only the Host names localhost, 127.0.0.1 and ::1; set "
              "allowed_hosts=[the.name.clients.use] (others get 400)", file=sys.stderr)
    print(f"posttrain label: http://{cfg.host}:{cfg.port}/ (db {safe_url(cfg.db)})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=cfg.access_log)
    return {}


# ----------------------------------------------------------------------------- accounts and projects


@dataclass
class LabelAddUserConfig:
    db: str = opt(DEFAULT_DB, DB_HELP)
    name: str = opt("", "User name (letters, digits, _ . @ -).")
    role: Literal["admin", "annotator"] = opt("annotator", "admin: creates projects and users, sees the "
                                              "dashboard; annotator: labels assigned tasks.")
    password: str | None = opt(None, "Password (at least 8 characters). Prefer password_env: a value on "
                               "the command line is visible in the process list and shell history.")
    password_env: str = opt("POSTTRAIN_LABEL_PASSWORD", "Environment variable read when password is not given.")
    projects: list[str] = opt([], "Projects to add the user to.")
    update: bool = opt(False, "Reset the password and role of an existing user instead of failing.")
    token: bool = opt(False, "Also print a new API token for the user (shown once).")
    revoke: bool = opt(False, "Revoke the existing user's API tokens and end their browser sessions; without "
                       "update=true nothing else changes and no password is needed. A password reset "
                       "(update=true) always does this.")
    active: bool | None = opt(None, "active=false deactivates the existing user (no login, no tokens; also revokes); "
                              "active=true reactivates. Without update=true no password is needed.")

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("name is required", where="name", fix="e.g. name=alice")


def _access_only(cfg: LabelAddUserConfig) -> bool:
    return (cfg.revoke or cfg.active is not None) and not cfg.update


def run_access(cfg: LabelAddUserConfig) -> dict:
    """revoke=true / active=false|true on an existing user, without touching the password."""
    with _session(cfg.db) as db:
        try:
            user = accounts.user_by_name(db, cfg.name)
        except Refused as e:
            raise _refused(e, "name") from None
        out = accounts.set_access(db, user, revoke=cfg.revoke, active=cfg.active)
    print(f"{out['user']}: {'active' if out['active'] else 'deactivated'}; revoked {out['tokens_revoked']} API "
          f"token(s), ended {out['sessions_ended']} browser session(s)")
    return out


def run_add_user(cfg: LabelAddUserConfig) -> dict:
    if _access_only(cfg):
        return run_access(cfg)
    password = cfg.password or os.environ.get(cfg.password_env)
    if not password:
        raise ConfigError("no password given", where="password",
                          fix=f"export {cfg.password_env}=... (or pass password=...)")
    with _session(cfg.db) as db:
        try:
            projects = [accounts.project_by_name(db, p) for p in cfg.projects]
            user = accounts.create_user(db, cfg.name, cfg.role, password, update=cfg.update)
            for project in projects:
                accounts.add_members(db, project, [user.name])
            if cfg.revoke or cfg.active is not None:
                accounts.set_access(db, user, revoke=cfg.revoke, active=cfg.active)
        except Refused as e:
            raise _refused(e, e.field or ("name" if "user" in str(e) else "projects")) from None
        out = {"user": user.name, "role": user.role, "projects": cfg.projects}
        if cfg.token:
            out["token"] = auth.issue_token(db, user)
    print(f"{'updated' if cfg.update else 'created'} {out['role']} {out['user']}"
          + (f"; API token: {out['token']}" if cfg.token else ""))
    return out


@dataclass
class LabelCreateProjectConfig:
    db: str = opt(DEFAULT_DB, DB_HELP)
    name: str = opt("", "Project name.")
    overlap: int = opt(3, "Distinct annotators per task (k); agreement needs k >= 2.",
                       "InstructGPT/HH use several raters on a subset; Argilla min_submitted")
    gold_rate: float = opt(0.1, "Share of assignments drawn from gold tasks (tasks with a known answer).")
    instructions: str = opt("", "Guidelines shown above every task.")
    assignment_ttl_s: int = opt(3600, "A task served but not labeled within this many seconds is offered "
                                "to someone else.")
    annotators: list[str] = opt([], "Users to add as members.")
    update: bool = opt(False, "Change the settings of an existing project instead of failing.")

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("name is required", where="name", fix="e.g. name=helpfulness")
        if self.overlap < 1:
            raise ConfigError("overlap must be at least 1", where="overlap")
        if not 0 <= self.gold_rate <= 1:
            raise ConfigError("gold_rate must be between 0 and 1", where="gold_rate")


def run_create_project(cfg: LabelCreateProjectConfig) -> dict:
    with _session(cfg.db) as db:
        try:
            for name in cfg.annotators:
                accounts.user_by_name(db, name)
            project = accounts.create_project(db, cfg.name, overlap=cfg.overlap, gold_rate=cfg.gold_rate,
                                              instructions=cfg.instructions, assignment_ttl_s=cfg.assignment_ttl_s,
                                              update=cfg.update)
            accounts.add_members(db, project, cfg.annotators)
        except Refused as e:
            raise _refused(e, "name/annotators") from None
        out = {"project": project.name, "id": project.id, "overlap": project.overlap, "members": cfg.annotators}
    print(f"project {out['project']} (id {out['id']}, overlap {out['overlap']})")
    return out


# ----------------------------------------------------------------------------- data in and out


@dataclass
class LabelImportConfig:
    db: str = opt(DEFAULT_DB, DB_HELP)
    project: str = opt("", "Project to add the tasks to (create it first with create-project).")
    file: str = opt("", "A .jsonl/.json/.parquet file of {prompt, responses:[{text, model}], gold?} or "
                    "{prompt, chosen, rejected} records.")
    gold_from_chosen: bool = opt(False, "Treat 'chosen' of preference records as the gold answer (plants "
                                 "QC items from a trusted dataset).")
    max_records: int | None = opt(None, "Import only the first N records.")

    def validate(self) -> None:
        if not self.project or not self.file:
            raise ConfigError("project and file are required", where="project/file",
                              fix="e.g. project=helpful file=candidates.jsonl")


def run_import(cfg: LabelImportConfig) -> dict:
    specs, identical = importing.read_tasks(cfg.file, gold_from_chosen=cfg.gold_from_chosen,
                                            max_records=cfg.max_records)
    with _session(cfg.db) as db:
        try:
            project = accounts.project_by_name(db, cfg.project)
        except Refused as e:
            raise ConfigError(str(e), where="project",
                              fix="create it: posttrain label create-project name=...") from None
        counts = importing.add_tasks(db, project, specs)
    out = {**counts, "identical_skipped": identical, "gold": sum(s.gold is not None for s in specs)}
    print(f"imported {out['added']} task(s) into {cfg.project}: {out['duplicates']} already there, "
          f"{identical} skipped (identical responses), {out['gold']} gold")
    return out


@dataclass
class LabelExportConfig:
    db: str = opt(DEFAULT_DB, DB_HELP)
    project: str = opt("", "Project to export.")
    output: str = opt("runs/labels/preferences.jsonl", "Output file (.jsonl or .parquet).")
    format: Literal["auto", "jsonl", "parquet"] = opt("auto", "File format; auto follows the file suffix.")
    aggregate: Literal["all", "majority"] = opt("all", "all: one record per label with its annotator; majority: "
                                                "one record per task pair with vote counts and agreement.")
    ranking_as: Literal["pairs", "ranking"] = opt("pairs", "Rankings of 3+ responses: all C(K,2) pairs, or "
                                                  "{prompt, responses, ranking} records.", "InstructGPT uses all pairs")
    both_bad: Literal["flag", "exclude"] = opt("flag", "flag: keep as tie=true, both_bad=true; exclude: leave out.",
                                               "Chatbot Arena counts both-bad as a tie")
    include_gold: bool = opt(False, "Also export labels of gold (QC) tasks.")
    min_labels: int = opt(1, "majority: leave out tasks with fewer labels.")

    def validate(self) -> None:
        if not self.project:
            raise ConfigError("project is required", where="project", fix="e.g. project=helpful")
        if self.min_labels < 1:
            raise ConfigError("min_labels must be at least 1", where="min_labels")


def run_export(cfg: LabelExportConfig) -> dict:
    opts = ExportOptions(cfg.aggregate, cfg.ranking_as, cfg.both_bad, cfg.include_gold, cfg.min_labels)
    with _session(cfg.db) as db:
        try:
            project = accounts.project_by_name(db, cfg.project)
        except Refused as e:
            raise ConfigError(str(e), where="project") from None
        records = export_project(db, project, opts)
    path = write_records(records, cfg.output, cfg.format)
    out = {"records": len(records), "ties": sum(bool(r.get("tie")) for r in records),
           "both_bad": sum(bool(r.get("both_bad")) for r in records), "output": str(path)}
    print(f"wrote {out['records']} record(s) ({out['ties']} ties, {out['both_bad']} both-bad) to {path}")
    return out


@dataclass
class LabelGenerateConfig:
    model: str = opt("tiny", "Model directory or hub id (AutoModelForCausalLM); 'tiny' = the offline test model.")
    prompts: str = opt("builtin:prompts", "Prompt-only data: a file with a 'prompt' column, a datasets name, "
                       "or builtin:prompts.")
    output: str = opt("runs/labels/candidates.jsonl", "Where the import-format JSONL goes.")
    k: int = opt(2, "Responses per prompt (2 = pairwise; 3..9 = ranking).", "InstructGPT ranks K=4..9")
    max_prompts: int | None = opt(None, "Use only the first N prompts.")
    max_new_tokens: int = opt(128, "Longest response, in tokens.")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    batch_size: int = opt(8, "Prompts per generate call.")
    seed: int = opt(0, "torch seed.")

    def validate(self) -> None:
        if not 2 <= self.k <= MAX_CANDIDATES:
            raise ConfigError(f"k must be 2..{MAX_CANDIDATES}, got {self.k}", where="k")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive (sampling)", where="temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p must be in (0, 1]", where="top_p")


def run_generate(cfg: LabelGenerateConfig) -> dict:
    rows = load_records(cfg.prompts, "prompt", max_rows=cfg.max_prompts, options=ReadOptions(prefix=None))
    records = sample_candidates(cfg.model, [r["prompt"] for r in rows], k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                seed=cfg.seed)
    identical = sum(len({c["text"] for c in r["responses"]}) < cfg.k for r in records)
    if identical == len(records):
        raise DataError("every prompt got identical samples, so there is nothing to compare",
                        where="generate", fix="raise temperature or max_new_tokens")
    path = write_records(records, cfg.output, "jsonl")
    print(f"wrote {len(records)} prompt(s) x {cfg.k} responses to {path} ({identical} with duplicates; "
          f"import skips those)")
    return {"prompts": len(records), "with_duplicates": identical, "output": str(path)}


COMMANDS: dict[str, Command] = {
    "serve": Command(__name__, "LabelServeConfig", "Run the labeling web app (FastAPI; SQLite or PostgreSQL).",
                     run="run_serve"),
    "add-user": Command(__name__, "LabelAddUserConfig", "Create an admin or annotator account.", run="run_add_user"),
    "create-project": Command(__name__, "LabelCreateProjectConfig", "Create a labeling project (overlap, gold rate).",
                              run="run_create_project"),
    "import": Command(__name__, "LabelImportConfig", "Import tasks (prompt + 2..9 responses) from JSONL/JSON/Parquet.",
                      run="run_import"),
    "export": Command(__name__, "LabelExportConfig", "Export labels as preference records (JSONL/Parquet).",
                      run="run_export"),
    "generate": Command(__name__, "LabelGenerateConfig", "Sample K responses per prompt into the import format.",
                        run="run_generate"),
}

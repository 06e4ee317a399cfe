"""The labeling app (``posttrain label serve``, docs/labeling.md) as a feedback source of the loop.

Each round gets its own project in the app, ``f"{project}-round-{round_}"``, created once with the
round's pairs as 2-candidate tasks; people label them in the browser (or anything else through the
JSON API); ``collect`` waits for them and turns the app's export into :data:`Label` dicts.

Spec keys (``feedback.sources[i]`` of the loop config, ``kind: app``):

- ``url``: the app's base URL, e.g. ``http://127.0.0.1:8600`` (required);
- an admin's credentials: ``token`` (``posttrain label add-user name=... role=admin token=true`` prints
  one) or ``token_env`` (the variable holding it), or ``username`` + ``password`` / ``password_env``
  (a token is then made with ``POST /api/token``, and made again when it expires);
- ``project``: the project name prefix (required); round r is labelled in ``f"{project}-round-{r}"``;
- ``annotators``: user names made members of every round's project (they must exist in the app; empty:
  add members by hand on the dashboard);
- ``overlap``: labels per pair, from distinct annotators (the project's overlap; default 1);
- ``quota``: the fraction of the round's pairs that must have all their labels before ``collect``
  returns (default 1.0);
- ``deadline_s``: ``collect(wait=True)`` stops waiting this many seconds after it was called and returns
  what is labelled by then (default: none, wait until the quota is met);
- ``poll_s``: seconds between polls (default 2); ``status_every_s``: the status line is printed when the
  counts change, else at most this often (default 30);
- ``both_bad``: ``"skip"`` (default: a "both bad" label says nothing about which response is better, so
  it gives the loop no label) or ``"tie"`` (as Chatbot Arena counts it);
- ``instructions`` (shown above every task), ``assignment_ttl_s`` (an unlabelled assignment goes to
  someone else after this; default 3600), ``retries`` (extra tries after a failed connection or a
  5xx/429; default 2), ``timeout_s`` (per request; default 30).

**Pairs and sides.** The app's export leaves out task metadata (the importer keeps ``id`` = the pair
id and ``meta`` = {pair_id, round, model} in its database only), so each candidate carries its pair
and side as its ``model``, ``loop:<pair_id>:a`` / ``loop:<pair_id>:b``, which the export writes as
``chosen_model`` / ``rejected_model``: an id, not a text match. The app shows every assignment's
candidates in its own random order (recorded) and stores the winner as a candidate, not a slot, so
"A" on the screen is whichever response was shown first, while ``choice: "a"`` here always means the
pair's ``a`` (ties keep the shown order in the export; a tie has no side).

**Labels.** ``{"label_id": "app:<the app's label id>", "pair_id", "round", "choice": "a"|"b"|"tie",
"strength": 1..3 (0 for a tie, as the simulated annotators give), "annotator": <user name>, "source":
<name>, "source_version": "<project name>#<project id>", "app_task_id", "labeled_at"}``.

**State** (under ``state_dir``, one JSON file per round, ``<name>.round-<r>.json``, replaced
atomically): the project's id and name, the pair ids imported (a second ``request`` with the same
pairs, or a new AppSource after a restart, imports nothing again), pairs the app cannot take
(identical responses, text it cannot store), and every label already returned by ``collect`` (each
label is returned at most once, across calls and restarts; :meth:`AppSource.returned` gives them all
again should the caller have lost them).

**Trained models.** :meth:`AppSource.record_model` sends a model's lineage record (``lineage.json``) to
``POST /api/models`` with this app's label ids only, so the app's database knows which of its labels
trained which model (``GET /api/models?label_id=N``); re-sending it changes nothing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, ServiceError
from posttrain.loop.app_client import AppClient
from posttrain.loop.sources import Label, Pair

TAG = "loop"  # candidate model = f"{TAG}:{pair_id}:{side}"
BATCH = 500  # records per import request
MODEL_IDS = 20_000  # label ids per POST /api/models (the app caps JSON bodies at 1 MiB by default)
MODEL_KEYS = ("loop", "model", "run_id", "kind", "stage", "round", "labels", "distinct_labels", "per_annotator",
              "per_source", "per_round", "source_versions", "excluded_annotators", "started_from", "command",
              "candidates_model", "candidates_model_id", "loop_dir")  # of a lineage record, as the app takes them
MAX_MODEL = 200  # the app keeps the first 200 characters of a candidate's model
NUMBERS = {  # spec key: (default, type, valid, what it must be)
    "overlap": (1, int, lambda v: v >= 1, "a whole number >= 1"),
    "quota": (1.0, float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "deadline_s": (None, float, lambda v: v > 0, "seconds > 0 (or left out: no deadline)"),
    "poll_s": (2.0, float, lambda v: v > 0, "seconds > 0"),
    "status_every_s": (30.0, float, lambda v: v >= 0, "seconds >= 0"),
    "retries": (2, int, lambda v: v >= 0, "a whole number >= 0"),
    "timeout_s": (30.0, float, lambda v: v > 0, "seconds > 0"),
    "assignment_ttl_s": (3600, int, lambda v: v >= 60, "seconds >= 60"),
}


def _say(line: str) -> None:
    from posttrain.engines.runlog import say

    say(line)


def _untag(model: Any) -> tuple[str, str] | None:
    """(pair id, side) from a candidate's model, None when it is not one of ours."""
    if not isinstance(model, str) or not model.startswith(TAG + ":"):
        return None
    pid, _, side = model[len(TAG) + 1:].rpartition(":")
    return (pid, side) if pid and side in ("a", "b") else None


class AppSource(AppClient):
    """Feedback from people in the labeling app; see the module docstring for the spec keys."""

    def __init__(self, spec: dict, state_dir: Path):
        self.spec = dict(spec)
        self.name = str(spec.get("name", "app"))
        self.state_dir = Path(state_dir)
        url = spec.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"the labeling app's url must start with http:// or https://, got {url!r}",
                              where=f"feedback source {self.name}: url",
                              fix="e.g. url: http://127.0.0.1:8600 (where `posttrain label serve` listens)")
        self.url = url.rstrip("/")
        self.project = spec.get("project").strip() if isinstance(spec.get("project"), str) else ""
        if not self.project:
            raise ConfigError("project (the app's project name prefix) is required", where=f"feedback source "
                              f"{self.name}: project", fix="e.g. project: helpful (round r: project helpful-round-r)")
        self.version = f"app:{self.project}"
        self.annotators = [str(a) for a in spec.get("annotators") or []]
        for key, (default, kind, valid, what) in NUMBERS.items():
            value = spec.get(key, default)
            try:
                ok = (value is None and default is None) or (
                    not isinstance(value, bool) and kind(value) == float(value) and valid(kind(value)))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"{key} must be {what}, got {value!r}", where=f"feedback source {self.name}: {key}")
            setattr(self, key, None if value is None else kind(value))
        self.instructions, self.both_bad = str(spec.get("instructions") or ""), spec.get("both_bad", "skip")
        if self.both_bad not in ("skip", "tie"):
            raise ConfigError(f"both_bad must be skip or tie, got {self.both_bad!r}",
                              where=f"feedback source {self.name}: both_bad")
        if self.annotators and len(set(self.annotators)) < self.overlap:
            raise ConfigError(f"overlap {self.overlap} needs at least {self.overlap} distinct annotators, "
                              f"got {self.annotators}", where=f"feedback source {self.name}: annotators",
                              fix="add annotators or lower overlap")
        env = {k: os.environ.get(spec[f"{k}_env"]) if spec.get(f"{k}_env") else None for k in ("token", "password")}
        self.token, self.username = spec.get("token") or env["token"], spec.get("username")
        self.password = spec.get("password") or env["password"]
        if not self.token and not (self.username and self.password):
            raise ConfigError("the labeling app needs an admin's credentials: no token and no username + password "
                              "(or their *_env variable is empty)", where=f"feedback source {self.name}",
                              fix="set token (posttrain label add-user name=... role=admin token=true prints one), "
                                  "token_env, or username + password / password_env of an admin")
        self._client = None
        self._checked: set[int] = set()  # rounds whose project was looked up in the app by this process

    # ------------------------------------------------------------------------- state

    def _state_path(self, round_: int) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        return self.state_dir / f"{safe}.round-{int(round_)}.json"

    def _load(self, round_: int) -> dict:
        path = self._state_path(round_)
        try:
            st = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise ConfigError(f"cannot read the app source's state ({e})", where=str(path),
                              fix="restore the file, or delete it to start the round's labelling over "
                                  "(the project and its tasks in the app are then found again)") from None
        return {"project": f"{self.project}-round-{int(round_)}", "project_id": None, "imported": {},
                "unusable": {}, "returned": {}, **st}

    def _save(self, round_: int, st: dict) -> None:
        path = self._state_path(round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(st, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # a reader (a restart) sees the old file or the new one, never half of one
        finally:
            Path(tmp).unlink(missing_ok=True)

    # ------------------------------------------------------------------------- the project

    def _project_id(self, round_: int, st: dict) -> int:
        """The round's project in the app: created once, taken over when it exists (a crash before the
        state was written)."""
        if st["project_id"] is not None:
            if round_ not in self._checked:
                found = self._find_project(st["project"])
                if found is None or found["id"] != st["project_id"]:
                    raise ServiceError(f"project {st['project']!r} (id {st['project_id']}, from the state file) is "
                                       f"not in the labeling app at {self.url}", where=str(self._state_path(round_)),
                                       fix="point url at the app (and database) this loop used, or delete the "
                                           "state file to create the round's project again")
                self._checked.add(round_)
            return st["project_id"]
        body = {"name": st["project"], "overlap": self.overlap, "gold_rate": 0.0, "instructions": self.instructions,
                "assignment_ttl_s": self.assignment_ttl_s, "annotators": self.annotators}
        r = self._send("POST", "/api/projects", f"creating project {st['project']!r}", json=body)
        project = self._find_project(st["project"]) if r.status_code == 409 else None
        if project is not None:  # created before a crash (or by hand): take it over
            _say(f"{self.name}: using the existing project {st['project']!r} (id {project['id']}, overlap "
                 f"{project['overlap']}; the spec says {self.overlap})")
            r = self._send("POST", f"/api/projects/{project['id']}/members", "adding members",
                           json={"users": self.annotators})
        if r.status_code == 404:  # an annotator the app does not know
            raise ConfigError(f"the labeling app at {self.url} answered: {self._detail(r)}",
                              where=f"feedback source {self.name}: annotators",
                              fix="create the annotators first (posttrain label add-user name=... with the app's db), "
                                  "or fix their names")
        answer = self._ok(r, f"creating project {st['project']!r}" if project is None else "adding members")
        project = project or answer
        st["project_id"] = int(project["id"])
        st["project_overlap"] = int(project.get("overlap", self.overlap))
        self._save(round_, st)
        self._checked.add(round_)
        return st["project_id"]

    def _find_project(self, name: str) -> dict | None:
        projects = self._ok(self._send("GET", "/api/projects", "listing projects"), "GET /api/projects")
        return next((p for p in projects if p.get("name") == name), None)

    # ------------------------------------------------------------------------- the source

    def request(self, round_: int, pairs: list[Pair]) -> None:
        """Import the pairs not imported yet as tasks of the round's project (created on first use)."""
        st = self._load(round_)
        todo, seen = [], set()
        for p in pairs:
            pid = str(p["pair_id"])
            if pid in st["imported"] or pid in st["unusable"] or pid in seen:
                continue
            seen.add(pid)
            problem = self._unusable(p)
            if problem:
                st["unusable"][pid] = problem
                _say(f"{self.name}: pair {pid} cannot be labelled in the app ({problem}); it gets no label")
                continue
            todo.append(p)
        self._save(round_, st)
        if not todo:
            return
        project_id = self._project_id(round_, st)
        for i in range(0, len(todo), BATCH):
            chunk = todo[i:i + BATCH]
            r = self._send("POST", f"/api/projects/{project_id}/tasks", f"importing {len(chunk)} tasks",
                           json={"records": [self._record(p, round_) for p in chunk]})
            self._ok(r, f"importing tasks into project {st['project']!r}")
            st["imported"].update((str(p["pair_id"]), True) for p in chunk)
            self._save(round_, st)  # after every batch: a crash re-sends at most one (deduplicated by the app)
        _say(f"{self.name}: {len(todo)} pair(s) sent to {self.url} project {st['project']!r} "
             f"({len(st['imported'])} in this round)")

    @staticmethod
    def _unusable(p: Pair) -> str | None:
        from posttrain.feedback.db import find_text_problem

        if p["a"] == p["b"]:
            return "both responses are the same text"
        if len(f"{TAG}:{p['pair_id']}:a") > MAX_MODEL:
            return "pair id longer than the app's model field"
        return find_text_problem({"prompt": p["prompt"], "a": p["a"], "b": p["b"]})

    @staticmethod
    def _record(p: Pair, round_: int) -> dict:
        pid = str(p["pair_id"])
        meta = {"pair_id": pid, "round": int(round_), "model": None if p.get("model") is None else str(p["model"])}
        return {"id": pid, "prompt": p["prompt"], "meta": meta,
                "responses": [{"text": p["a"], "model": f"{TAG}:{pid}:a"}, {"text": p["b"], "model": f"{TAG}:{pid}:b"}]}

    def _labels(self, round_: int, st: dict, project_id: int) -> dict[str, list[Label]]:
        """Every label of the round's project on one of our pairs, by pair id (both-bad ones included,
        marked ``both_bad``)."""
        r = self._send("GET", f"/api/projects/{project_id}/export", "exporting labels",
                       params={"aggregate": "all", "both_bad": "flag", "include_gold": "false"})
        out: dict[str, list[Label]] = defaultdict(list)
        source_version = f"{st['project']}#{project_id}"
        for rec in self._ok(r, f"exporting project {st['project']!r}", ndjson=True):
            chosen, rejected = _untag(rec.get("chosen_model")), _untag(rec.get("rejected_model"))
            if chosen is None or rejected is None or chosen[0] != rejected[0] or rec.get("label_id") is None:
                continue  # not a task of the loop (imported by hand)
            pid = chosen[0]
            tie = bool(rec.get("tie")) or bool(rec.get("both_bad"))
            out[pid].append({
                "label_id": f"app:{rec['label_id']}", "pair_id": pid, "round": int(round_),
                "choice": "tie" if tie else chosen[1], "strength": 0 if tie else rec.get("strength"),
                "annotator": rec.get("annotator"), "source": self.name, "source_version": source_version,
                "app_task_id": rec.get("task_id"), "labeled_at": rec.get("labeled_at"),
                "both_bad": bool(rec.get("both_bad"))})
        return out

    def _progress(self, st: dict, pids: list[str], labels: dict[str, list[Label]]) -> dict:
        overlap = int(st.get("project_overlap") or self.overlap)
        mine = [lab for pid in pids for lab in labels.get(pid, [])]
        full = sum(len({lab["annotator"] for lab in labels.get(pid, [])}) >= overlap for pid in pids)
        return {"project": st["project"], "project_id": st["project_id"], "pairs": len(pids),
                "pairs_done": full, "pairs_needed": math.ceil(self.quota * len(pids) - 1e-9),
                "labels_done": len(mine), "labels_needed": len(pids) * overlap,
                "per_annotator": dict(sorted(Counter(lab["annotator"] for lab in mine).items())),
                "returned": len(st["returned"]), "unusable": len(st["unusable"])}

    def collect(self, round_: int, pair_ids: list[str], wait: bool = True) -> list[Label]:
        """The labels on ``pair_ids`` not returned before. With ``wait``, first poll until ``quota`` of
        the pairs have all their labels, or ``deadline_s`` has passed."""
        st = self._load(round_)
        pids = [str(p) for p in dict.fromkeys(pair_ids) if str(p) in st["imported"]]
        if not pids or st["project_id"] is None:
            return []
        project_id = self._project_id(round_, st)
        start = time.monotonic()
        shown, shown_at = None, -math.inf
        while True:
            labels = self._labels(round_, st, project_id)
            prog = self._progress(st, pids, labels)
            met = prog["pairs_done"] >= prog["pairs_needed"]
            waited = time.monotonic() - start
            late = self.deadline_s is not None and waited >= self.deadline_s
            key = (prog["pairs_done"], prog["labels_done"])
            if wait and (key != shown or time.monotonic() - shown_at >= self.status_every_s or met or late):
                people = ", ".join(f"{k} {v}" for k, v in prog["per_annotator"].items()) or "nobody yet"
                _say(f"{self.name} round {round_} ({prog['project']}): {prog['pairs_done']}/{prog['pairs_needed']} "
                     f"pairs labelled, {prog['labels_done']}/{prog['labels_needed']} labels ({people}); waited "
                     f"{waited:.0f} s" + (" - quota met" if met else " - deadline passed, taking what is labelled"
                                          if late else ""))
                shown, shown_at = key, time.monotonic()
            if not wait or met or late:
                break
            pause = self.poll_s if self.deadline_s is None else min(self.poll_s, self.deadline_s - waited)
            time.sleep(max(pause, 0.0))
        out = []
        for pid in pids:
            for lab in labels.get(pid, []):
                if lab["label_id"] not in st["returned"]:
                    skip = lab.pop("both_bad") and self.both_bad == "skip"
                    st["returned"][lab["label_id"]] = None if skip else lab  # None: seen, skipped
                    out += [] if skip else [lab]
        self._save(round_, st)  # before returning: a label is handed out once, also across restarts
        return out

    def returned(self, round_: int) -> list[Label]:
        """Every label ``collect`` has returned for the round (from the state), for a caller that lost them."""
        return [lab for lab in self._load(round_)["returned"].values() if lab is not None]

    def status(self, round_: int) -> dict:
        st = self._load(round_)
        if st["project_id"] is None:
            return self._progress(st, [], {})
        return self._progress(st, list(st["imported"]), self._labels(round_, st, self._project_id(round_, st)))

    def record_model(self, record: dict) -> None:
        """Record a trained model in the app (``POST /api/models``): ``record`` is its lineage.json record;
        only this app's label ids (``app:<id>``) are sent, and nothing at all when there are none. Idempotent:
        the app keeps one row per (loop, model, run_id) and adds only label ids it does not have yet, so
        ids over MODEL_IDS go in several requests, and a record cut short by an error is completed by
        sending it again (the loop does when resumed)."""
        ids = sorted({int(i[4:]) for i in record.get("label_ids") or []
                      if isinstance(i, str) and i.startswith("app:") and i[4:].isascii() and i[4:].isdigit()})
        if not ids:
            return
        body = {k: record[k] for k in MODEL_KEYS if record.get(k) is not None}
        what = f"recording {record.get('kind')} model {record.get('model')}"
        statuses = []
        for i in range(0, len(ids), MODEL_IDS):  # the app adds each part's ids to the model's (a union)
            r = self._send("POST", "/api/models", what, json={**body, "label_ids": ids[i:i + MODEL_IDS]})
            if r.status_code == 404:
                raise ServiceError(f"{what}: the labeling app at {self.url} has no POST /api/models (HTTP 404: "
                                   f"{self._detail(r)}); it is older than this posttrain",
                                   where=self.url + "/api/models",
                                   fix="restart `posttrain label serve` from this posttrain (it adds the new tables at "
                                       "start-up); lineage.json beside the model holds the record meanwhile")
            if r.status_code == 422:
                raise ServiceError(f"{what}: the labeling app at {self.url} answered HTTP 422: {self._detail(r)}",
                                   where=self.url + "/api/models",
                                   fix="point url at the app (and database) whose labels trained this model; "
                                       "lineage.json beside the model holds the record either way")
            statuses.append(self._ok(r, f"POST /api/models ({what})")["status"])
        if any(s != "unchanged" for s in statuses):
            _say(f"{self.name}: the labeling app at {self.url} records {record.get('kind')} model "
                 f"{record.get('model')} as trained on {len(ids)} of its labels (GET /api/models)")

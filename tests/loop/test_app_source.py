"""AppSource against the real labeling app on loopback, labelled by simulated annotators over HTTP:
tasks created once, labels exported once, A/B orientation, quota, deadline, errors, and trained models
recorded in the app (record_model)."""

from __future__ import annotations

import json
import random
import time
from types import SimpleNamespace

import httpx
import pytest
from app_helpers import annotate, free_port, labeling_app

from posttrain.errors import ConfigError, ServiceError
from posttrain.loop import app_source, lineage
from posttrain.loop.app_source import AppSource
from posttrain.loop.sources import make_source, pair_id
from posttrain.tasks.builtin import heldout_problems


def make_pairs(round_: int, n: int, seed: int = 0) -> list[dict]:
    """Built-in prompts with two different responses: the right answer on the a side for some, on the
    b side for others (so a flipped orientation shows), and one pair the gold reward calls a tie."""
    rng = random.Random(seed)
    pairs = []
    for i, p in enumerate(heldout_problems(n)):
        right = p.answer
        wrong = f"Sure! The answer is {right}" if i % 3 else " ".join(reversed(right.split())) + " 0"
        a, b = (right, wrong) if i % 2 == 0 else (wrong, right)
        if i == n - 1:
            a, b = right, right + " "  # same gold reward, different text
        pairs.append({"pair_id": pair_id(round_, p.prompt, a, b), "round": round_, "prompt": p.prompt, "a": a,
                      "b": b, "model": f"policy-{rng.randrange(100)}"})
    return pairs


def count_imports(src: AppSource) -> list:
    """Wrap src._send to record the task-import requests it makes."""
    calls, send = [], src._send

    def spy(method, path, what, **kw):
        if path.endswith("/tasks"):
            calls.append(path)
        return send(method, path, what, **kw)

    src._send = spy
    return calls


def test_tasks_once_labels_once_and_orientation(tmp_path):
    pairs = make_pairs(0, 6)
    by_id = {p["pair_id"]: p for p in pairs}
    state = tmp_path / "state"
    with labeling_app(tmp_path / "app", annotators=["careful", "hasty"]) as app:
        src = make_source(app.spec("loop", overlap=2), state, seed=0)
        assert isinstance(src, AppSource)
        assert src.collect(0, list(by_id), wait=True) == []  # nothing requested yet: nothing to wait for
        imports = count_imports(src)
        src.request(0, pairs)
        src.request(0, pairs)  # the same pairs again: nothing is sent
        src.request(0, pairs[:3])
        assert len(imports) == 1
        fresh = AppSource(app.spec("loop", overlap=2), state)  # a restart
        imports2 = count_imports(fresh)
        fresh.request(0, pairs)
        assert imports2 == []
        project_id = app.project_id("loop-round-0")
        assert project_id is not None and app.stats(project_id)["tasks"] == len(pairs)
        assert len(app.get("/api/projects").json()) == 1  # the project was created once
        st = src.status(0)
        assert (st["project"], st["pairs"], st["labels_done"], st["labels_needed"]) == ("loop-round-0", 6, 0, 12)
        assert src.collect(0, list(by_id), wait=False) == []

        ann = annotate(app, "loop-round-0")
        t0 = time.monotonic()
        labels = src.collect(0, list(by_id), wait=True)
        waited = time.monotonic() - t0
        sent = {s["label_id"]: s for s in ann.stop()}
        assert waited < 60
        assert len(labels) == len(pairs) * 2 == len(sent)
        assert sorted((lab["pair_id"], lab["annotator"]) for lab in labels) == sorted(
            (pid, who) for pid in by_id for who in ("careful", "hasty"))
        shown_first = set()
        for lab in labels:
            s = sent[int(lab["label_id"].removeprefix("app:"))]
            p = by_id[lab["pair_id"]]
            assert s["annotator"] == lab["annotator"] and s["prompt"] == p["prompt"]
            assert {s["A"], s["B"]} == {p["a"], p["b"]}  # the label is on the pair its id says
            shown_first.add("a" if s["A"] == p["a"] else "b")
            want = "tie" if s["choice"] == "tie" else "a" if s["chosen_text"] == p["a"] else "b"
            assert lab["choice"] == want, (lab, s, p)
            assert lab["strength"] == (0 if want == "tie" else s["strength"])
            assert lab["round"] == 0 and lab["source"] == "app"
            assert lab["source_version"] == f"loop-round-0#{project_id}"
        # the careful annotator (beta 30) picks the right answer of every non-tie pair here
        for lab in labels:
            p = by_id[lab["pair_id"]]
            if lab["annotator"] == "careful" and p["b"] != p["a"] + " ":
                assert lab["choice"] == ("a" if p["a"] == heldout_answer(p["prompt"]) else "b")
        assert src.collect(0, list(by_id), wait=True) == []  # exported once
        again = AppSource({**app.spec("loop", overlap=2), "token": None, "username": "admin",
                           "password": app.password}, state)  # a restart, logging in with a password
        assert again.collect(0, list(by_id), wait=True) == []
        assert sorted(x["label_id"] for x in again.returned(0)) == sorted(x["label_id"] for x in labels)
        st = again.status(0)
        assert (st["labels_done"], st["labels_needed"], st["pairs_done"]) == (12, 12, 6)
        assert st["per_annotator"] == {"careful": 6, "hasty": 6}
        print(f"A/B as shown first: {sorted(shown_first)}; waited {waited:.1f} s")

        bad = AppSource({**app.spec("loop"), "token": "not-a-token"}, tmp_path / "other")
        with pytest.raises(ConfigError, match="refused the API token"):
            bad.request(0, pairs)
        with pytest.raises(ConfigError, match="refused user"):
            AppSource({**app.spec("loop"), "token": None, "username": "admin", "password": "wrong password!"},
                      tmp_path / "other").request(0, pairs)
        with pytest.raises(ConfigError, match="403"):  # an annotator's token is not enough
            AppSource({**app.spec("loop"), "token": app.tokens["careful"]}, tmp_path / "other2").request(0, pairs)


def heldout_answer(prompt: str) -> str:
    from posttrain.tasks.builtin import parse_prompt, solve

    p = parse_prompt(prompt)
    return " ".join(map(str, solve(p.op, p.numbers)))


def test_quota_deadline_and_late_labels(tmp_path):
    pairs = make_pairs(3, 4, seed=1)
    pids = [p["pair_id"] for p in pairs]
    state = tmp_path / "state"
    with labeling_app(tmp_path / "app", annotators=["careful", "hasty"]) as app:
        src = AppSource(app.spec("q", overlap=1, quota=0.5), state)
        src.request(3, pairs)
        ann = annotate(app, "q-round-3", max_labels=1)  # one label each: half the pairs
        first = src.collect(3, pids, wait=True)
        ann.stop()
        assert len(first) == 2 and len({x["pair_id"] for x in first}) == 2
        assert sorted(x["annotator"] for x in first) == ["careful", "hasty"]

        strict = AppSource(app.spec("q", overlap=1, quota=1.0, deadline_s=1.0), state)
        t0 = time.monotonic()
        assert strict.collect(3, pids, wait=True) == []  # the deadline passes; nothing new
        assert 1.0 <= time.monotonic() - t0 < 10

        ann = annotate(app)  # every project the annotators are members of
        rest = strict.collect(3, pids, wait=True)
        ann.stop()
        assert len(rest) == 2 and {x["pair_id"] for x in first + rest} == set(pids)
        assert not {x["label_id"] for x in first} & {x["label_id"] for x in rest}
        assert strict.status(3)["pairs_done"] == 4

        # a later pair joins the round's project; a "both bad" label on it is skipped (both_bad: skip)
        extra = make_pairs(3, 6, seed=1)[4]
        imports = count_imports(strict)
        strict.request(3, pairs + [extra])
        assert len(imports) == 1 and app.stats(app.project_id("q-round-3"))["tasks"] == 5
        task = httpx.post(f"{app.url}/api/projects/{app.project_id('q-round-3')}/next",
                          headers={"Authorization": f"Bearer {app.tokens['careful']}"}).json()
        assert {c["text"] for c in task["candidates"]} == {extra["a"], extra["b"]}
        r = httpx.post(f"{app.url}/api/assignments/{task['assignment_id']}/label",
                       json={"idempotency_key": "bb-1", "choice": "both_bad"},
                       headers={"Authorization": f"Bearer {app.tokens['careful']}"})
        assert r.status_code == 201
        assert strict.collect(3, pids + [extra["pair_id"]], wait=True) == []
        assert strict.status(3)["pairs_done"] == 5

        # the state lost (a crash before it was first written): the project is found again, not duplicated
        (state / "app.round-3.json").unlink()
        again = AppSource(app.spec("q", overlap=1), state)
        again.request(3, pairs + [extra])
        assert [p["name"] for p in app.get("/api/projects").json()] == ["q-round-3"]
        assert app.stats(app.project_id("q-round-3"))["tasks"] == 5
        assert len(again.collect(3, pids, wait=True)) == 4  # its record of returned labels went with it


def test_unreachable_app_and_bad_specs(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    src = AppSource({"url": url, "token": "t", "project": "p", "retries": 1}, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as e:
        src.request(0, make_pairs(0, 2))
    assert time.monotonic() - t0 < 10
    assert url in str(e.value) and "posttrain label serve" in str(e.value) and "failed after 2 tries" in str(e.value)
    with pytest.raises(ConfigError, match="url"):
        AppSource({"url": "127.0.0.1:8600", "token": "t", "project": "p"}, tmp_path)
    with pytest.raises(ConfigError, match="project"):
        AppSource({"url": url, "token": "t"}, tmp_path)
    with pytest.raises(ConfigError, match="credentials"):
        AppSource({"url": url, "project": "p"}, tmp_path)
    with pytest.raises(ConfigError, match="quota"):
        AppSource({"url": url, "token": "t", "project": "p", "quota": 0}, tmp_path)
    with pytest.raises(ConfigError, match="overlap 3 needs at least 3"):
        AppSource({"url": url, "token": "t", "project": "p", "overlap": 3, "annotators": ["x", "y"]}, tmp_path)


def test_record_model_sends_the_app_labels_once(tmp_path, monkeypatch):
    pairs = make_pairs(0, 3, seed=2)
    pids = [p["pair_id"] for p in pairs]
    with labeling_app(tmp_path / "app", annotators=["careful"]) as app:
        src = AppSource(app.spec("lin", overlap=1), tmp_path / "state")
        src.request(0, pairs)
        ann = annotate(app, "lin-round-0")
        labels = src.collect(0, pids, wait=True)
        ann.stop()
        app_ids = sorted(int(lab["label_id"].removeprefix("app:")) for lab in labels)
        assert len(app_ids) == 3
        judge = {"label_id": "judge:gpt:1", "pair_id": pids[0], "round": 0, "choice": "a", "strength": 1,
                 "annotator": "judge:gpt", "source": "judge", "source_version": "gpt@v1"}
        store = SimpleNamespace(rows={lab["label_id"]: lab for lab in labels + [judge]})
        # the lineage records the loop writes (lineage.record_round), as rounds.py hands them over
        rd = tmp_path / "loop" / "round-0"
        for stage, run in (("reward", "rm-run-1"), ("policy", "pol-run-1")):
            (rd / stage / "final").mkdir(parents=True)
            (rd / stage / "stage.json").write_text(json.dumps({"run_id": run, "command": stage,
                                                               "config": {"model.name_or_path": "sft"}}))
        cfg = SimpleNamespace(name="lin", run_dir=str(tmp_path / "loop"), exclude_annotators=[])
        used = {"reward": sorted(store.rows), "policy": ["judge:gpt:1"]}
        reward, policy = lineage.record_round(cfg, rd, 0, "sft", "sft", used, store)
        posts = []
        send = src._send

        def spy(method, path, what, **kw):
            if path == "/api/models":
                posts.append(kw["json"]["label_ids"])
            return send(method, path, what, **kw)

        monkeypatch.setattr(src, "_send", spy)
        src.record_model(policy)  # trained on the judge's labels only: nothing to tell the app
        assert posts == []
        src.record_model(reward)
        assert posts == [app_ids]  # the app's ids only, as integers
        src.record_model(reward)  # the loop resumed: sent again, stored once
        AppSource(app.spec("lin", overlap=1), tmp_path / "state").record_model(reward)  # a restart
        models = app.get("/api/models", params={"ids": "true"}).json()
        assert len(models) == 1
        m = models[0]
        assert (m["loop"], m["model"], m["run_id"], m["kind"], m["round"]) == ("lin", reward["model"], "rm-run-1",
                                                                               "reward", 0)
        assert m["label_ids"] == app_ids and m["app_labels"] == 3 and m["labels"] == 4
        assert m["per_source"] == {"app": 3, "judge": 1} and "gpt@v1" in m["source_versions"]
        assert m["per_annotator"] == {"careful": 3, "judge:gpt": 1}
        assert [x["id"] for x in app.get("/api/models", params={"label_id": app_ids[1]}).json()] == [m["id"]]
        project = app.get("/api/models", params={"project": "lin-round-0"}).json()
        assert [x["run_id"] for x in project] == ["rm-run-1"]

        # a retrained model (new run id) with more ids than one request takes: sent in parts, one row
        posts.clear()
        with monkeypatch.context() as mp:
            mp.setattr(app_source, "MODEL_IDS", 2)
            src.record_model({**reward, "run_id": "rm-run-2"})
        assert posts == [app_ids[:2], app_ids[2:]]
        again = app.get("/api/models", params={"ids": "true", "label_id": app_ids[2]}).json()
        assert [(x["run_id"], x["label_ids"]) for x in again] == [("rm-run-1", app_ids), ("rm-run-2", app_ids)]

        # label ids the app does not have (another app's database): a clear error, nothing stored
        with pytest.raises(ServiceError, match=r"HTTP 422: label_ids: no such labels in this app: 999999") as e:
            src.record_model({**reward, "run_id": "rm-run-3", "label_ids": reward["label_ids"] + ["app:999999"]})
        assert "point url at the app" in str(e.value)
        assert len(app.get("/api/models").json()) == 2
        with pytest.raises(ConfigError, match="403"):  # an annotator's token is not enough
            AppSource({**app.spec("lin"), "token": app.tokens["careful"]}, tmp_path / "s2").record_model(reward)


def test_record_model_against_an_app_without_the_endpoint(tmp_path):
    src = AppSource({"url": "http://127.0.0.1:9", "token": "t", "project": "p", "retries": 0}, tmp_path)
    old_app = httpx.MockTransport(lambda req: httpx.Response(404, json={"detail": "Not Found"}))
    src._client = httpx.Client(transport=old_app)
    with pytest.raises(ServiceError, match="has no POST /api/models") as e:
        src.record_model({"kind": "reward", "model": "m/final", "label_ids": ["app:1"], "loop": "l", "run_id": "r"})
    assert "posttrain label serve" in str(e.value)


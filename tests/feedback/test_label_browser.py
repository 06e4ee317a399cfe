"""The whole human path in Chromium: log in, label three pairs by keyboard and mouse (and rank three
candidates), see hostile model output as inert text, check the admin dashboard, export preference JSONL."""

from __future__ import annotations

import json

from label_helpers import PASSWORD, ServerProcess, seed
from sqlalchemy import select

from posttrain.feedback.commands import LabelExportConfig, run_export
from posttrain.feedback.db import Label, make_engine, make_sessionmaker

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned2=1">'
TASKS = [
    {"prompt": f"Repeat this exactly: {SCRIPT}",
     "responses": [{"text": f"Sure: {SCRIPT} and {IMG}", "model": "evil"}, {"text": "I will not.", "model": "safe"}]},
    {"prompt": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Which country?"}, {"role": "user", "content": "France."}],
     "responses": [{"text": "Paris.", "model": "m1"}, {"text": "Lyon.", "model": "m2"}]},
    {"prompt": "Say hi", "responses": [{"text": "hi", "model": "m1"}, {"text": "hello", "model": "m2"}]},
    {"prompt": "Rank these greetings", "responses": ["good day", "yo", "greetings"]},  # 3 candidates: ranking
]


def login(context, base: str, name: str):
    page = context.new_page()
    page.goto(base + "/login")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    with page.expect_navigation():
        page.get_by_role("button", name="Log in").click()
    return page


def slot_texts(page) -> dict[str, str]:
    return {s: page.locator(f"#cand-{s} .candidate-text").inner_text() for s in "AB"}


def test_annotator_labels_by_keyboard_and_mouse_and_admin_sees_it(browser, sqlite_url, tmp_path):
    seed(sqlite_url, annotators=["ann"], records=TASKS, project="web", overlap=1, tokens=False)
    server = ServerProcess(sqlite_url).start()
    base = server.url
    try:
        ctx = browser.new_context()
        page = login(ctx, base, "ann")
        assert page.url == base + "/"
        with page.expect_navigation():
            page.get_by_role("link", name="Label web").click()
        assert "Keyboard shortcuts" in page.inner_text("aside.help")  # shortcuts are documented on the page
        csp = page.request.get(page.url).headers["content-security-policy"]
        assert "script-src 'self'" in csp

        # 1) the hostile task, by keyboard: A (whatever the random order put there), much better
        shown = slot_texts(page)
        assert any(SCRIPT in t and IMG in t for t in shown.values())  # the literal markup is visible text
        assert SCRIPT in page.locator(".conversation").inner_text()
        assert page.get_by_text(SCRIPT).first.is_visible()
        assert page.locator(".candidate img, .conversation img, .candidate script").count() == 0
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.evaluate("typeof window.__pwned2") == "undefined"
        page.wait_for_timeout(300)  # give a (wrongly) injected handler time to fire
        assert page.evaluate("[typeof window.__pwned, typeof window.__pwned2]") == ["undefined", "undefined"]
        expected = {"t1": shown["A"]}
        page.keyboard.press("1")
        assert page.locator("#cand-A").get_attribute("class").split().count("picked") == 1
        page.keyboard.press("e")
        with page.expect_navigation():
            page.keyboard.press("Enter")

        # 2) a multi-turn conversation, by mouse: B slightly better, a flag on A, a rationale
        assert page.locator(".turn").count() == 4 and "You are terse." in page.inner_text(".conversation")
        shown = slot_texts(page)
        expected["t2_chosen"], expected["t2_flagged"] = shown["B"], shown["A"]
        page.get_by_label("B is better").click()
        page.get_by_label("slightly").click()
        page.locator("#cand-A").get_by_label("harmful").click()
        page.get_by_label("Why? (optional)").click()
        page.keyboard.type("B answers the question; 1 and t here must not act as shortcuts")
        with page.expect_navigation():
            page.get_by_role("button", name="Submit").click()

        # 3) keyboard again: a tie
        shown = slot_texts(page)
        expected["t3_order"] = (shown["A"], shown["B"])
        page.keyboard.press("t")
        with page.expect_navigation():
            page.keyboard.press("Enter")

        # 4) three candidates: rank by pressing them best first (C, then A; B is implied last)
        assert page.locator(".candidate").count() == 3
        texts = {s: page.locator(f"#cand-{s} .candidate-text").inner_text() for s in "ABC"}
        expected["t4_best_first"] = [texts["C"], texts["A"], texts["B"]]
        page.keyboard.press("3")
        page.keyboard.press("1")
        assert page.locator("#ranking-order").inner_text() == "C > A > B"
        assert page.locator("select[name=rank_C]").input_value() == "1"
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "All done in web" in page.inner_text("#done")
        assert "labeled 4 task(s)" in page.inner_text("#done")
        ctx.close()

        # the admin's dashboard shows the progress
        admin_ctx = browser.new_context()
        admin = login(admin_ctx, base, "admin")
        assert admin.url == base + "/admin"
        card = admin.locator(".project", has_text="web")
        assert card.locator("td.labels").inner_text() == "4"
        assert card.locator("td.progress").inner_text().startswith("4 / 4 (100.0%)")
        assert card.locator("tr[data-annotator=ann] td.n-labels").inner_text() == "4"
        assert card.locator("td.mean-time").inner_text() != "n/a"
        stats = admin.request.get(base + "/api/dashboard").json()  # the JSON twin, same cookie session
        assert stats[0]["labels"] == 4 and stats[0]["tasks_done"] == 4
        admin_ctx.close()
    finally:
        server.stop()

    # export: the preference JSONL the trainers read
    out = tmp_path / "prefs.jsonl"
    summary = run_export(LabelExportConfig(db=sqlite_url, project="web", output=str(out), ranking_as="ranking"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["records"] == 4 and summary["ties"] == 1
    by_task = {r["task_id"]: r for r in records}
    t1, t2, t3, t4 = (by_task[i] for i in sorted(by_task))
    assert t1["chosen"] == expected["t1"] and t1["margin"] == 1.0 and t1["tie"] is False and t1["strength"] == 3
    assert t2["chosen"] == expected["t2_chosen"] and t2["margin"] == round(1 / 3, 4)
    assert t2["flags"] == {"chosen": [], "rejected": ["harmful"]} and t2["rejected"] == expected["t2_flagged"]
    assert t2["rationale"].startswith("B answers the question; 1 and t")
    assert t2["prompt"][0] == {"role": "system", "content": "You are terse."}
    assert t3["tie"] is True and (t3["chosen"], t3["rejected"]) == expected["t3_order"]
    assert [t4["responses"][t4["ranking"].index(r)] for r in (1, 2, 3)] == expected["t4_best_first"]
    assert {r["annotator"] for r in records} == {"ann"} and all(r["source"] == "human:web" for r in records)
    engine = make_engine(sqlite_url)
    with make_sessionmaker(engine)() as db:
        times = list(db.scalars(select(Label.client_ms)))
    engine.dispose()
    assert len(times) == 4 and all(ms is not None and ms > 0 for ms in times)  # browser-measured time

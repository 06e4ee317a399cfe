"""Two rounds of the loop against the real labeling app on loopback, simulated annotators labelling
through its HTTP API; the loop is SIGKILLed mid-round and resumed: every round's tasks were created
once, every label exported once, and the round-1 models were trained on exactly the labels of rounds
0 and 1 (lineage)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loop"))
from app_helpers import annotate, labeling_app  # noqa: E402

from posttrain.config import load_config  # noqa: E402
from posttrain.loop.config import LoopConfig  # noqa: E402
from posttrain.loop.rounds import run  # noqa: E402

SMALL = {"train": {"epochs": 2, "progress": False, "batch_size": 8, "micro_batch_size": 8}}


def test_two_rounds_with_people_in_the_labeling_app_survive_a_kill(sft_policy, tmp_path):
    with labeling_app(tmp_path, annotators=["careful", "hasty"]) as app:
        root = tmp_path / "loop"
        path = tmp_path / "loop.yaml"
        path.write_text(yaml.safe_dump({
            "name": "t", "run_dir": str(root), "rounds": 2, "sft": sft_policy, "prompts_per_round": 24,
            "labels_per_round": 16, "reward": SMALL, "policy": {**SMALL, "task_eval": False}, "eval": None,
            "heldout_prompts": 0, "sources": [app.spec("people", name="people")]}))
        people = annotate(app)  # both annotators label whatever the app offers them, round after round
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "loop", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        requested = root / "round-1" / "requests.json"
        deadline = time.time() + 300
        while not requested.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # round 1's tasks go to the app and its labels start coming back
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert requested.exists(), "the loop did not reach round 1"
        run(load_config(LoopConfig, path))
        sent = people.stop()

        labels = [json.loads(x) for x in (root / "labels.jsonl").read_text().splitlines()]
        assert len({x["label_id"] for x in labels}) == len(labels) == len(sent)  # each label exported once
        for r in (0, 1):
            dealt = json.loads((root / f"round-{r}" / "requests.json").read_text())["people"]
            pid = app.project_id(f"people-round-{r}")
            stats = app.stats(pid)
            assert stats["tasks"] == len(dealt)  # created once, also across the kill
            assert stats["labels"] == sum(x["round"] == r for x in labels)
        chosen = [set(json.loads((root / f"round-{r}" / "selection.json").read_text())["chosen"]) for r in (0, 1)]
        rm1 = json.loads((root / "round-1" / "reward" / "lineage.json").read_text())
        assert sorted(rm1["label_ids"]) == sorted(x["label_id"] for x in labels if x["pair_id"] in chosen[0] | chosen[1])
        assert rm1["per_source"] == {"people": len(labels)} and set(rm1["per_annotator"]) <= {"careful", "hasty"}
        pol1 = json.loads((root / "round-1" / "policy" / "lineage.json").read_text())
        assert set(pol1["label_ids"]) <= {x["label_id"] for x in labels if x["pair_id"] in chosen[1]}
        # the app's database knows which of its labels trained which model: one row per model, none twice
        models = app.get("/api/models", params={"ids": "true"}).json()
        assert len(models) == 4  # reward and policy of two rounds
        rm_row = next(m for m in models if m["model"] == rm1["model"])
        assert sorted(f"app:{i}" for i in rm_row["label_ids"]) == sorted(rm1["label_ids"])

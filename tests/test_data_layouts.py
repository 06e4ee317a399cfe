"""Users' datasets as they are: each public layout is read into exactly the tokens the commands train on.

The fixtures are written here from the public descriptions of the formats (Anthropic HH-RLHF,
UltraFeedback-binarized, pandas-written CSV, save_to_disk folders, OpenAI-style tool calling). Every
test decodes the encoded prompt / response ids and compares them with the expected text exactly.
"""

import json

import pytest

from posttrain.data.preference import encode_pair, encode_unpaired, load_preference_rows
from posttrain.data.chat import encode_sft
from posttrain.data.formats import load_data, load_records
from posttrain.errors import DataError

USER = "<|im_start|>user\n{}<|im_end|>\n"
ASSISTANT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.tiny import build_tokenizer

    return build_tokenizer()


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def decoded_pair(tok, record, max_length=512):
    enc = encode_pair(tok, record, max_length)
    return [tok.decode(ids) for ids in (enc.prompt_ids, *enc.responses)]


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


# ----------------------------------------------------------------------------- UltraFeedback-binarized


ULTRAFEEDBACK = {
    "prompt": "Name a primary color.", "prompt_id": "3f2a",
    "chosen": msgs(("user", "Name a primary color."), ("assistant", "Red is a primary color.")),
    "rejected": msgs(("user", "Name a primary color."), ("assistant", "Purple.")),
    "messages": msgs(("user", "Name a primary color."), ("assistant", "Red is a primary color.")),
    "score_chosen": 8.5, "score_rejected": 3.0,
}


def test_ultrafeedback_layout_holds_the_user_turn_once(tmp_path, tok, capsys):
    path = jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK])
    for kind_loader in (lambda: load_preference_rows(path), lambda: load_records(path, "preference")):
        (rec,) = kind_loader()
        prompt, chosen, rejected = decoded_pair(tok, rec)
        assert prompt == USER.format("Name a primary color.") + ASSISTANT
        assert chosen == "Red is a primary color.<|im_end|>"
        assert rejected == "Purple.<|im_end|>"
        full = tok.decode(encode_pair(tok, rec, 512).example(0).input_ids)
        assert full.count("Name a primary color.") == 1
        assert rec["score_chosen"] == 8.5 and rec.get("margin") is None  # kept as metadata only
    err = capsys.readouterr().err
    assert "prompt column was not added again" in err and "data.scores_as_margin=true" in err


def test_ultrafeedback_scores_as_margin_and_messages_for_sft(tmp_path, tok):
    from posttrain.data.records import ReadOptions

    path = jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK])
    (rec,) = load_records(path, "preference", options=ReadOptions(scores_as_margin=True))
    assert encode_pair(tok, rec, 512).margin == 5.5
    (sft,) = load_records(path, "sft")  # the messages column is the SFT conversation
    ex = encode_sft(tok, sft, 512)
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m]) == "Red is a primary color.<|im_end|>"


def test_prompt_column_that_differs_from_the_shared_turns(tmp_path, tok, capsys):
    from posttrain.data.records import ReadOptions

    row = {"prompt": "Summarize.", "chosen": msgs(("user", "Long text"), ("assistant", "Short.")),
           "rejected": msgs(("user", "Long text"), ("assistant", "Long text"))}
    path = jsonl(tmp_path / "d.jsonl", [row])
    (rec,) = load_records(path, "preference")
    assert decoded_pair(tok, rec)[0] == USER.format("Long text") + ASSISTANT
    assert "the shared turns were used as the prompt (data.prompt_from=column uses the column)" in capsys.readouterr().err
    (rec,) = load_records(path, "preference", options=ReadOptions(prompt_from="column"))
    assert decoded_pair(tok, rec)[0] == USER.format("Summarize.") + USER.format("Long text") + ASSISTANT


# ----------------------------------------------------------------------------- Anthropic HH


HH_MULTI = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: No idea.",
}


def test_anthropic_hh_raw_strings_multi_turn(tmp_path, tok):
    path = jsonl(tmp_path / "hh.jsonl", [HH_MULTI, {
        "chosen": "\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?",
        "rejected": "\n\nHuman: Tell me a joke\n\nAssistant: No."}])
    loaded = load_data(path, "preference")
    assert dict(loaded.layouts) == {"anthropic-hh": 2} and not loaded.bad
    prompt, chosen, rejected = decoded_pair(tok, loaded.records[0])
    assert prompt == (USER.format("Hi there") + ASSISTANT + "Hello! How can I help?<|im_end|>\n"
                      + USER.format("What is 2+2?") + ASSISTANT)
    assert (chosen, rejected) == ("It is 4.<|im_end|>", "No idea.<|im_end|>")
    assert decoded_pair(tok, loaded.records[1])[1:] == ["Why did the chicken cross the road?<|im_end|>", "No.<|im_end|>"]
    # the reward command and kto read it too (kto unpairs it)
    assert len(load_preference_rows(path)) == 2


def test_hh_prompt_column_with_plain_responses_and_the_plain_override(tmp_path, tok):
    from posttrain.data.records import ReadOptions

    row = {"prompt": "\n\nHuman: Capital of France?\n\nAssistant:", "chosen": " Paris.", "rejected": " Lyon."}
    path = jsonl(tmp_path / "hp.jsonl", [row])
    (rec,) = load_records(path, "preference")
    assert decoded_pair(tok, rec) == [USER.format("Capital of France?") + ASSISTANT, "Paris.<|im_end|>", "Lyon.<|im_end|>"]
    (rec,) = load_records(path, "preference", options=ReadOptions(format="plain"))
    assert decoded_pair(tok, rec)[0] == USER.format(row["prompt"]) + ASSISTANT
    with pytest.raises(DataError, match="not an Anthropic HH transcript"):
        load_records(jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}]),
                     "preference", options=ReadOptions(format="hh"))


def test_hh_pairs_that_diverge_early_are_bad_rows(tmp_path):
    row = {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
           "rejected": "\n\nHuman: A\n\nAssistant: X\n\nHuman: C\n\nAssistant: D"}
    with pytest.raises(DataError, match=r":1: chosen: chosen and rejected first differ at message 2"):
        load_records(jsonl(tmp_path / "e.jsonl", [row]), "preference")
    with pytest.raises(DataError, match="identical"):
        load_records(jsonl(tmp_path / "i.jsonl", [{"chosen": HH_MULTI["chosen"], "rejected": HH_MULTI["chosen"]}]),
                     "preference")


# ----------------------------------------------------------------------------- CSV written by pandas


def test_csv_of_message_lists_trains_the_same_tokens_as_the_jsonl(tmp_path, tok, capsys):
    import pandas as pd

    sft_rows = [{"messages": msgs(("system", "Be brief."), ("user", "Hi, it's me"), ("assistant", 'Hello "you".'))},
                {"messages": msgs(("user", "2+2?"), ("assistant", "4"))}]
    pref_rows = [{"prompt": "p", **{k: ULTRAFEEDBACK[k] for k in ("chosen", "rejected")}}]
    for kind, rows in (("sft", sft_rows), ("preference", pref_rows)):
        src = jsonl(tmp_path / f"{kind}.jsonl", rows)
        pd.read_json(src, lines=True).to_csv(tmp_path / f"{kind}.csv", index=False)  # Python literals in cells
        a = load_records(src, kind)
        b = load_records(str(tmp_path / f"{kind}.csv"), kind)
        enc = (lambda r: encode_sft(tok, r, 512).input_ids) if kind == "sft" else (
            lambda r: [encode_pair(tok, r, 512).example(k).input_ids for k in (0, 1)])
        assert [enc(r) for r in a] == [enc(r) for r in b]
        assert "[{" not in tok.decode(enc(b[0]) if kind == "sft" else enc(b[0])[0])
    assert "cells holding the text of a message list were decoded" in capsys.readouterr().err


def test_csv_cell_that_cannot_be_decoded_is_a_bad_row_with_its_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('messages\n"[{\'role\': \'user\', \'content\': \'hi\\nthere\'}, {\'role\': \'assistant\', \'content\': \'yo\'}]"\n'
                 '"[{""role"": ""user"", ""content"": ""json""}, {""role"": ""assistant"", ""content"": ""ok""}]"\n'
                 '"[{\'role\': \'user\', \'content\': \'broken\'"\n')
    with pytest.raises(DataError) as e:
        load_records(str(p), "sft")
    msg = str(e.value)
    assert "1 bad sft record(s)" in msg and f"{p}:4: messages: holds the text of a list" in msg


def test_csv_line_numbers_count_cells_that_span_lines(tmp_path):
    p = tmp_path / "multi.csv"
    p.write_text('prompt,completion\n"a prompt\non two lines",fine\n\n"x",\n')
    with pytest.raises(DataError, match=f"{p}:5: completion: missing"):
        load_records(str(p), "sft")


# ----------------------------------------------------------------------------- every bad row, editor lines


def test_json_error_missing_field_and_wrong_type_reported_together_with_editor_lines(tmp_path):
    p = tmp_path / "three.jsonl"
    p.write_text('{"prompt": "ok", "completion": "fine"}\n\n'
                 '{"prompt": "broken json", \n'
                 '{"prompt": "no completion"}\n\n\n'
                 '{"prompt": ["not", "messages"], "completion": "x"}\n')
    with pytest.raises(DataError) as e:
        load_records(str(p), "sft")
    msg = str(e.value)
    assert "3 bad sft record(s)" in msg
    assert f"{p}:3: record: not valid JSON" in msg
    assert f"{p}:4: completion: missing" in msg
    assert f"{p}:7: prompt[0]: expected an object" in msg


def test_cli_reports_all_bad_rows_without_traceback_or_model(tmp_path):
    from click.testing import CliRunner

    from posttrain.cli import main

    p = tmp_path / "three.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{oops\n\n{"prompt": "x"}\n{"prompt": 3, "completion": "y"}\n')
    res = CliRunner().invoke(main, ["sft", f"data.train={p}", "model.name_or_path=/nonexistent/model",
                                    f"train.output_dir={tmp_path / 'run'}"])
    assert res.exit_code == 2
    out = res.output
    assert f"{p}:2: record: not valid JSON" in out and f"{p}:4: completion: missing" in out
    assert f"{p}:5: prompt: expected a string" in out
    assert "Traceback" not in out and "nonexistent" not in out  # no model was loaded
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- save_to_disk folders


def test_datasetdict_folder_is_read_in_place_with_its_splits(tmp_path, monkeypatch):
    import datasets

    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([row] * 3),
                          "test_prefs": datasets.Dataset.from_list([row])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(str(tmp_path / "dd"), "preference", split="train_prefs")) == 3
    assert len(load_records(str(tmp_path / "dd"), "preference", split="test_prefs")) == 1
    with pytest.raises(DataError, match="has no split 'train'; its splits are: train_prefs, test_prefs") as e:
        load_records(str(tmp_path / "dd"), "preference")
    assert "data.split" in str(e.value)
    assert not cache.exists() or not any(cache.rglob("*.arrow"))  # nothing copied into a cache


# ----------------------------------------------------------------------------- tool calling


def test_tool_calling_conversation_trains_the_calls_and_answer_only(tmp_path, tok):
    row = {"messages": [
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": "What is 17*3?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "17*3"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "calculator", "content": "51"},
        {"role": "assistant", "content": "17*3 = 51."}],
        "tools": [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                                     "parameters": {"type": "object", "properties": {
                                                         "expression": {"type": "string"}}}}}]}
    (rec,) = load_records(jsonl(tmp_path / "tools.jsonl", [row]), "sft")
    ex = encode_sft(tok, rec, 1024)
    trained = tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == ('<tool_call>{"name": "calculator", "arguments": {"expression": "17*3"}}</tool_call><|im_end|>'
                       "17*3 = 51.<|im_end|>")
    full = tok.decode(ex.input_ids)
    assert full.startswith("<|im_start|>tools\n[") and '"calculator"' in full.split("<|im_end|>")[0]
    assert "<|im_start|>tool\n51<|im_end|>" in full  # the tool output is context, never trained


# ----------------------------------------------------------------------------- truncation


def test_multi_turn_truncation_drops_whole_earliest_turns_and_keeps_system_and_final_turn(tmp_path, tok):
    conv = msgs(("system", "Be kind."), ("user", "first question " * 8), ("assistant", "first answer " * 8),
                ("user", "second question " * 8), ("assistant", "second answer " * 8),
                ("user", "Last?"), ("assistant", "Final answer."))
    whole = encode_sft(tok, {"messages": conv}, 10 ** 6)
    last_two = encode_sft(tok, {"messages": conv[:1] + conv[3:]}, 10 ** 6)
    ex = encode_sft(tok, {"messages": conv}, len(last_two))  # room for system + the last two turns
    assert len(whole) > len(ex) == len(last_two) and ex.dropped_turns == 1 and ex.truncated
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>") and "first" not in text
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m]) == (
        ("second answer " * 8) + "<|im_end|>Final answer.<|im_end|>")
    # only the final turn fits: the system message and the whole final turn stay
    only_last = encode_sft(tok, {"messages": conv[:1] + conv[5:]}, 10 ** 6)
    ex = encode_sft(tok, {"messages": conv}, len(only_last))
    assert ex.dropped_turns == 2 and tok.decode(ex.input_ids) == tok.decode(only_last.input_ids)
    # preference prompts follow the same rule
    pair = {"prompt": conv[:-1], "chosen": "Yes.", "rejected": "No."}
    enc = encode_pair(tok, pair, len(only_last))
    assert enc.dropped_turns == 2 and tok.decode(enc.prompt_ids) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n" + USER.format("Last?") + ASSISTANT)


# ----------------------------------------------------------------------------- kto


def test_unpaired_conversation_that_repeats_the_prompt(tmp_path, tok):
    row = {"prompt": msgs(("user", "Hi")), "completion": msgs(("user", "Hi"), ("assistant", "Hello.")), "label": True}
    (rec,) = load_records(jsonl(tmp_path / "k.jsonl", [row]), "unpaired")
    enc = encode_unpaired(tok, rec, 512)
    assert tok.decode(enc.prompt_ids) == USER.format("Hi") + ASSISTANT
    assert tok.decode(enc.responses[0]) == "Hello.<|im_end|>"


# ----------------------------------------------------------------------------- hints name real keys

HINT_CASES = [  # command, the override that points it at the file, the record kind the file lacks
    ("sft", "data.train"), ("dpo", "data.train"), ("reward", "data.train"), ("kto", "data.train"),
    ("eval-reward", "data"), ("grpo", "rollout.prompts"), ("ppo", "rollout.prompts"), ("rloo", "rollout.prompts"),
    ("reinforce", "rollout.prompts"), ("best-of-n", "rollout.prompts"), ("cai", "prompts"), ("judge", "input"),
    ("eval", "prompts"), ("collect", "prompts"),
]


@pytest.mark.parametrize("command,key", HINT_CASES, ids=[c for c, _ in HINT_CASES])
def test_every_data_error_hint_names_a_key_the_command_has(tmp_path, command, key):
    import re

    from click.testing import CliRunner

    from posttrain.cli import main
    from posttrain.commands import load_command
    from posttrain.config_view import describe

    path = jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "chosen": "a", "label": "yes"}])
    args = [command, f"{key}={path}", f"output_dir={tmp_path / 'o'}" if command in ("eval-reward", "cai", "judge", "eval", "collect")
            else f"train.output_dir={tmp_path / 'o'}"]
    if command == "eval-reward":
        args.append("model.name_or_path=/nonexistent/rm")
    args += {"judge": ["input_kind=preference"], "eval": ["policies={a: /nonexistent/a}"],
             "collect": ["annotators=none"]}.get(command, [])
    if key == "rollout.prompts":  # your own prompts need your own reward
        args.append("reward=[exact_match]")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "bad" in res.output and str(path) in res.output and "Traceback" not in res.output
    keys = {k for k, *_ in describe(load_command(command)[0])}
    named = re.findall(r"with ([\w.]*columns)=", res.output)
    for k in named:
        assert k in keys, (command, k)
    if not any(k.endswith("columns") for k in keys):
        assert not named and "rename your column" in res.output
    else:
        assert named


# ----------------------------------------------------------------------------- sft evaluates on the user's data


def test_sft_with_user_data_never_evaluates_on_the_builtin_task(tmp_path, capsys):
    from posttrain.algorithms.sft import SFTConfig, run
    from posttrain.config import load_config

    rows = [{"messages": msgs(("user", f"Say {w}."), ("assistant", f"{w}."))} for w in
            ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    path = jsonl(tmp_path / "mine.jsonl", rows)
    base = [f"data.train={path}", "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4",
            "train.progress=false"]
    s = run(load_config(SFTConfig, None, base + [f"train.output_dir={tmp_path / 'a'}"]))
    assert "no held-out data" in capsys.readouterr().err
    assert s["eval_examples"] == 0 and s["train_examples"] == 8
    for phase in ("initial", "final"):
        assert not {"gold_reward", "accuracy", "loss"} & set(s.get(phase) or {}), s.get(phase)
    s = run(load_config(SFTConfig, None, base + [f"train.output_dir={tmp_path / 'b'}", "data.eval_fraction=0.25"]))
    assert s["eval_examples"] == 2 and s["train_examples"] == 6
    assert "loss" in s["final"] and "gold_reward" not in s["final"]


# ----------------------------------------------------------------------------- posttrain data inspect


def _inspect(*args):
    from click.testing import CliRunner

    from posttrain.cli import main

    res = CliRunner().invoke(main, ["data", "inspect", *args])
    return res.exit_code, res.output


def test_data_inspect_shows_format_bad_rows_and_trained_tokens(tmp_path):
    hh = jsonl(tmp_path / "hh.jsonl", [HH_MULTI])
    code, out = _inspect(hh, "--task", "dpo")
    assert code == 0 and "format: anthropic-hh" in out and "0 bad row(s)" in out
    assert "[chosen]\n⟦It is 4.<|im_end|>⟧" in out and "[rejected]\n⟦No idea.<|im_end|>⟧" in out
    assert "reading:" in out and "Anthropic HH" in out
    code, out = _inspect(hh, "--task", "dpo", "--json")
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["format"] == "anthropic-hh" and rep["records"] == 1 and rep["bad_rows"] == []
    (ex,) = rep["examples"][:1]
    assert ex["chosen"] == "It is 4.<|im_end|>" and ex["rejected"] == "No idea.<|im_end|>"
    assert ex["prompt"].endswith(USER.format("What is 2+2?") + ASSISTANT)
    assert ex["trained_tokens"] > 0

    uf = jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK])
    rep = json.loads(_inspect(uf, "--task", "reward", "--json")[1].strip().splitlines()[-1])
    assert rep["format"] == "prompt + conversations"
    assert rep["examples"][0]["prompt"] == USER.format("Name a primary color.") + ASSISTANT
    rep = json.loads(_inspect(uf, "--task", "sft", "--json")[1].strip().splitlines()[-1])
    assert rep["format"] == "messages" and rep["examples"][0]["completion"] == "Red is a primary color.<|im_end|>"
    rep = json.loads(_inspect(uf, "--task", "kto", "--json")[1].strip().splitlines()[-1])
    assert rep["unpaired_examples"] == 2 and [e["label"] for e in rep["examples"][:2]] == [True, False]
    assert rep["examples"][1]["completion"] == "Purple.<|im_end|>"


def test_data_inspect_lists_every_bad_row_and_truncation(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": \n{"prompt": "x"}\n{"prompt": 5, "completion": "y"}\n')
    code, out = _inspect(str(p), "--json")
    assert code == 1
    rep = json.loads(out.strip().splitlines()[-1])
    assert [(b["line"], b["field"]) for b in rep["bad_rows"]] == [(3, ""), (4, "completion"), (5, "prompt")]
    assert rep["records"] == 1 and rep["examples"][0]["completion"] == "b<|im_end|>"
    long = jsonl(tmp_path / "long.jsonl", [{"messages": msgs(("system", "S"), ("user", "u " * 40), ("assistant", "a " * 40),
                                                              ("user", "last"), ("assistant", "end"))}])
    rep = json.loads(_inspect(long, "--max-length", "40", "--json")[1].strip().splitlines()[-1])
    assert rep["truncated"] == 1 and rep["dropped"] == 0 and rep["token_lengths"]["max"] > 40
    assert rep["examples"][0]["dropped_turns"] == 1 and rep["examples"][0]["completion"] == "end<|im_end|>"


def test_label_import_reads_the_trainers_layouts(tmp_path):
    from posttrain.feedback import importing

    hh = jsonl(tmp_path / "hh.jsonl", [HH_MULTI])
    (spec,), _ = importing.read_tasks(hh)
    assert spec.prompt[-1] == {"role": "user", "content": "What is 2+2?"} and len(spec.prompt) == 3
    assert [c for c, _ in spec.candidates] == ["It is 4.", "No idea."]
    (spec,), _ = importing.read_tasks(jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK]))
    assert spec.prompt == msgs(("user", "Name a primary color."))
    assert [c for c, _ in spec.candidates] == ["Red is a primary color.", "Purple."]


def test_data_inspect_on_csv_datasetdict_and_tool_calling_fixtures(tmp_path):
    import datasets
    import pandas as pd

    src = jsonl(tmp_path / "m.jsonl", [{"messages": msgs(("user", "Hi"), ("assistant", "Hello."))}])
    pd.read_json(src, lines=True).to_csv(tmp_path / "m.csv", index=False)
    rep = json.loads(_inspect(str(tmp_path / "m.csv"), "--json")[1].strip().splitlines()[-1])
    assert rep["format"] == "messages" and rep["examples"][0]["completion"] == "Hello.<|im_end|>"
    assert any("decoded" in r for r in rep["readings"])

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([ULTRAFEEDBACK])}).save_to_disk(str(tmp_path / "dd"))
    code, out = _inspect(str(tmp_path / "dd"), "--task", "dpo", "--split", "train_prefs")
    assert code == 0 and "format: prompt + conversations" in out and "⟦Purple.<|im_end|>⟧" in out
    assert f"{tmp_path / 'dd'}[train_prefs]" in out

    tools = {"messages": [{"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "calc", "arguments": {"e": "2+2"}}}]},
                          {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4."}],
             "tools": [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]}
    code, out = _inspect(jsonl(tmp_path / "t.jsonl", [tools]))
    assert code == 0 and "format: messages" in out
    assert '⟦<tool_call>{"name": "calc", "arguments": {"e": "2+2"}}</tool_call><|im_end|>⟧' in out
    assert "<|im_start|>tool\n4<|im_end|>" in out and "⟦4.<|im_end|>⟧" in out

import json

import pytest

from posttrain.data.chat import DEFAULT_TEMPLATE, Example, encode_chat, encode_response, encode_sft, truncate
from posttrain.data.formats import load_records
from posttrain.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- formats


def test_each_format_and_file_type(tmp_path):
    import pandas as pd

    rows = [{"prompt": "Sort the numbers 2 1.", "completion": "1 2"}]
    assert load_records(write_jsonl(tmp_path / "a.jsonl", rows), "sft") == rows
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "a.json"), "sft") == rows
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    assert load_records(str(tmp_path / "a.csv"), "sft") == rows
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    pd.DataFrame(msgs).to_parquet(tmp_path / "m.parquet")
    assert load_records(str(tmp_path / "m.parquet"), "sft") == msgs


def test_datasets_saved_to_disk(tmp_path):
    import datasets

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds"), "preference") == rows


def test_bad_rows_are_listed_with_file_row_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "completion": "fine"},
        {"prompt": "no completion"},
        {"messages": [{"role": "user", "content": "only a user turn"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"prompt": 3, "completion": "x"},
    ])
    with pytest.raises(DataError) as e:
        load_records(path, "sft")
    msg = str(e.value)
    assert f"{path}:2: completion: missing" in msg
    assert f"{path}:3: messages: no assistant message" in msg
    assert f"{path}:4: messages[0].role: 'robot'" in msg
    assert f"{path}:5: prompt: expected a string" in msg
    assert "4 bad sft record(s)" in msg


def test_error_cap_and_invalid_json_line(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"x": i} for i in range(50)])
    with pytest.raises(DataError) as e:
        load_records(path, "sft", max_errors=5)
    assert "50 bad sft record(s) (the first 5 listed)" in str(e.value)
    p = tmp_path / "broken.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError) as e:
        load_records(str(p), "sft")
    assert f"{p}:2" in str(e.value)


def test_preference_unpaired_prompt_kinds(tmp_path):
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    assert load_records(write_jsonl(tmp_path / "p.jsonl", [implicit]), "preference")
    with pytest.raises(DataError, match="margin: expected a number"):
        load_records(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b",
                                                        "margin": "big"}]), "preference")
    with pytest.raises(DataError, match="label: expected true/false"):
        load_records(write_jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": 1}]),
                     "unpaired")
    rows = load_records(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "q", "answer": "4"}]), "prompt")
    assert rows[0]["answer"] == "4"


def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "response": "a"}])
    with pytest.raises(DataError, match=r"map yours with data\.columns"):
        load_records(path, "sft")
    rows = load_records(path, "sft", columns={"question": "prompt", "response": "completion"})
    assert rows == [{"prompt": "q", "completion": "a"}]


def test_missing_file_and_unknown_builtin():
    with pytest.raises(DataError, match="does not exist"):
        load_records("nope/none.jsonl", "sft")
    with pytest.raises(DataError, match="builtin:sft"):
        load_records("builtin:nothing", "sft")


# ----------------------------------------------------------------------------- templating and masks


def test_multi_turn_mask_positions_by_hand(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sort the numbers 2 1."},
            {"role": "assistant", "content": "1 2"},
            {"role": "user", "content": "Reverse the numbers 1 2."},
            {"role": "assistant", "content": "2 1"}]
    ex = encode_chat(tokenizer, msgs)
    # Tokens (ChatML): 0-13 system turn, 14-24 user turn, 25-27 '<|im_start|>' 'assistant' '\n',
    # 28 '1' 29 ' 2' 30 '<|im_end|>' 31 '\n', 32-42 user turn, 43-45 assistant header,
    # 46 '2' 47 ' 1' 48 '<|im_end|>' 49 '\n'. Trained: the two answers and their end-of-turn tokens.
    assert [i for i, m in enumerate(ex.loss_mask) if m] == [28, 29, 30, 46, 47, 48]
    assert len(ex) == 50
    assert tokenizer.decode([ex.input_ids[i] for i in (28, 29, 30)]) == "1 2<|im_end|>"
    last = encode_chat(tokenizer, msgs, train="last_assistant")
    assert [i for i, m in enumerate(last.loss_mask) if m] == [46, 47, 48]


def test_prompt_completion_mask(tokenizer):
    ex = encode_sft(tokenizer, {"prompt": "Sort the numbers 2 1.", "completion": "1 2"}, 256)
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tokenizer.decode(trained) == "1 2<|im_end|>"
    prompt_ids, response_ids = encode_response(tokenizer, "Sort the numbers 2 1.", "1 2")
    assert prompt_ids + response_ids == ex.input_ids[:len(prompt_ids) + len(response_ids)]
    assert tokenizer.decode(response_ids) == "1 2<|im_end|>"


def test_text_records_train_everything(tokenizer):
    ex = encode_sft(tokenizer, {"text": "Sort the numbers"}, 256)
    assert all(ex.loss_mask) and ex.input_ids[-1] == tokenizer.eos_token_id


def test_default_template_for_tokenizers_without_one(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.chat_template = None
    ex = encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "1 2"}])
    assert tok.chat_template == DEFAULT_TEMPLATE
    assert tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m]) == "1 2" + tok.eos_token


def test_truncation_policy():
    ex = Example(list(range(10)), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    # 2 over: the prompt loses its first two tokens, the answer is intact
    assert truncate(ex, 8).input_ids == [2, 3, 4, 5, 6, 7, 8, 9]
    # 8 over: all 6 prompt tokens go, then the answer loses its end
    cut = truncate(ex, 2)
    assert cut.input_ids == [6, 7] and cut.loss_mask == [1, 1]
    assert truncate(ex, 20) is ex

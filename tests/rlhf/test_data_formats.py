"""Readers: every supported format normalises to DeepSpeed-Chat's prompt format; bad rows are named
(file + row) or, with skip_bad_rows, counted and skipped."""
import json
import logging

import pandas as pd
import pytest

from rlhf.data import DataError, Record, format_prompt, load_records, load_records_with_stats

ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
    {"prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:", "chosen": " Pear.", "rejected": " Rock."},
    {"prompt": "Say hi", "response": "hi", "chosen": "hi", "rejected": None},
]
EXPECTED = [
    Record(" Human: What is 2+2? Assistant:", " 4.", " 5."),
    Record(" Human: Hi Assistant: Hello! Human: Name a fruit. Assistant:", " Pear.", " Rock."),
    Record(" Human: Say hi Assistant:", " hi", None),
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_format_prompt_is_idempotent():
    for raw in ["What?", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", " Human: x Assistant:"]:
        once = format_prompt(raw)
        assert once.startswith(" Human: ") and once.endswith(" Assistant:")
        assert format_prompt(once) == once


def test_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    assert load_records(str(tmp_path / "a.json")) == EXPECTED
    assert load_records(str(tmp_path / "b.json")) == EXPECTED
    assert load_records(write_jsonl(tmp_path / "c.jsonl", ROWS)) == EXPECTED


def test_hh_rlhf_dialogues(tmp_path):
    head = "\n\nHuman: What color is the sky?\n\nAssistant: Which sky?\n\nHuman: Ours.\n\nAssistant:"
    rows = [{"chosen": head + " It is blue.", "rejected": head + " Green, obviously."}]
    (rec,) = load_records(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert rec.prompt == " Human: What color is the sky? Assistant: Which sky? Human: Ours. Assistant:"
    assert (rec.chosen, rec.rejected) == (" It is blue.", " Green, obviously.")


def test_parquet_file_and_dir(tmp_path):
    df = pd.DataFrame(
        [{"prompt": r["prompt"], "response": r.get("response", r["chosen"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in ROWS]
    )
    df.to_parquet(tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet")) == EXPECTED
    sub = tmp_path / "shards"
    sub.mkdir()
    df.iloc[:2].to_parquet(sub / "train-0.parquet")
    df.iloc[2:].to_parquet(sub / "train-1.parquet")
    assert load_records(str(sub)) == EXPECTED


def test_save_to_disk_dirs(tmp_path):
    import datasets

    rows = [{k: r.get(k) for k in ("prompt", "chosen", "rejected")} for r in ROWS]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds")) == EXPECTED
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[2:]), "train": datasets.Dataset.from_list(rows[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(str(tmp_path / "dd")) == EXPECTED  # train first, then the other splits


def test_builtin_name():
    recs = load_records("builtin")
    assert len(recs) >= 3000 and all(r.rejected for r in recs)
    assert all(r.prompt.startswith(" Human: ") and r.prompt.endswith(" Assistant:") for r in recs)


BAD_ROWS = [
    ({"prompt": "p"}, "chosen"),
    ({"prompt": "p", "chosen": 3}, "string"),
    ({"prompt": "p", "chosen": "   "}, "empty answer"),
    ({"chosen": "no dialogue here"}, "Human"),
    (["not", "an", "object"], "object"),
    ({"prompt": "", "chosen": "x"}, "empty prompt"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_malformed_row_names_file_and_row(tmp_path, bad, reason):
    rows = [ROWS[0], ROWS[1], bad, ROWS[0]]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 3: .*" + reason):
        load_records(path)
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad\.json: row 3"):
        load_records(str(tmp_path / "bad.json"))


def test_invalid_json_line_and_skip_bad_rows(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps({"prompt": "p"}) + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match=r"mixed\.jsonl: row 2: invalid JSON"):
        load_records(str(path))
    with caplog.at_level(logging.WARNING, logger="rlhf.data.formats"):
        recs, bad = load_records_with_stats(str(path), skip_bad_rows=True)
    assert recs == EXPECTED[:2] and bad == 2
    assert "skipped 2 malformed row(s) of 4" in caplog.text


def test_bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_records(str(tmp_path / "broken.json"))
    (tmp_path / "obj.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(DataError, match="obj.json"):
        load_records(str(tmp_path / "obj.json"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="emptydir"):
        load_records(str(tmp_path / "emptydir"))
    df = pd.DataFrame([{"prompt": "p", "chosen": "c"}, {"prompt": "p", "chosen": None}])
    df.to_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match=r"nulls\.parquet: row 2"):
        load_records(str(tmp_path / "nulls.parquet"))

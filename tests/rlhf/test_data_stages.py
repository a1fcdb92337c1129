"""3-stage split + blend (deterministic, disjoint, seeded), tokenised stage items, the content-hash
cache, empty-split errors, collators and the pretraining text blocks."""
import json
import random

import numpy as np
import pytest
import torch

from rlhf.config import DataConfig
from rlhf.data import (
    DataError, blend_stage_records, build_pretrain_data, build_stage_data, collate_pairs, collate_prompts,
    collate_sft, parse_split, split_indices,
)
from rlhf.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def make_jsonl(path, n, tag, seed=0):
    rng = random.Random(seed)
    rows = [
        {"prompt": f"{tag} question {i} {rng.random():.6f}", "chosen": f"good {i}", "rejected": f"bad {i}"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_parse_split():
    assert parse_split("2,4,4") == [0.2, 0.4, 0.4]
    assert parse_split("1,0,0") == [1.0, 0.0, 0.0]
    for bad in ["1,2", "a,b,c", "0,0,0", "-1,2,2"]:
        with pytest.raises(DataError):
            parse_split(bad)


@pytest.mark.parametrize("n", [0, 1, 7, 100, 1001])
def test_split_indices_disjoint_cover_and_seeded(n):
    shares = parse_split("2,4,4")
    parts = split_indices(n, shares, seed=3)
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(n))  # disjoint and covering
    assert all(abs(len(p) - s * n) <= 1 for p, s in zip(parts, shares))
    again = split_indices(n, shares, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if n >= 100:
        other = split_indices(n, shares, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_blend_is_deterministic_disjoint_and_proportional(tmp_path):
    a = make_jsonl(tmp_path / "a.jsonl", 200, "A", 1)
    b = make_jsonl(tmp_path / "b.jsonl", 50, "B", 2)
    sft = make_jsonl(tmp_path / "s.jsonl", 30, "S", 3)
    kw = dict(data_path=[a, b], data_split="2,4,4", sft_only_data_path=[sft], eval_fraction=0.1, seed=7)
    stages = {s: blend_stage_records(stage=s, **kw) for s in (1, 2, 3)}
    prompts = {s: [r.prompt for r in d.train + d.eval] for s, d in stages.items()}
    for s in (1, 2, 3):
        again = blend_stage_records(stage=s, **kw)
        assert [r.prompt for r in again.train] == [r.prompt for r in stages[s].train]
        assert len(set(prompts[s])) == len(prompts[s])
        assert not set(r.prompt for r in stages[s].train) & set(r.prompt for r in stages[s].eval)
    assert not set(prompts[1]) & set(prompts[2]) and not set(prompts[2]) & set(prompts[3]) and not set(prompts[1]) & set(prompts[3])
    count = lambda s, tag: sum(f"Human: {tag} " in p for p in prompts[s])  # noqa: E731
    assert (count(1, "A"), count(2, "A"), count(3, "A")) == (40, 80, 80)
    assert (count(1, "B"), count(2, "B"), count(3, "B")) == (10, 20, 20)
    assert count(1, "S") == 30 and count(2, "S") == count(3, "S") == 0  # sft-only goes to stage 1 only
    total = sum(len(d.train) + len(d.eval) for d in stages.values())
    assert total == 250 + 30
    assert abs(len(stages[2].eval) - 0.1 * 100) <= 2
    other_seed = blend_stage_records(stage=2, **{**kw, "seed": 8})
    assert {r.prompt for r in other_seed.train} != {r.prompt for r in stages[2].train}


def cfg_for(tmp_path, paths, **kw):
    return DataConfig(data_path=paths, data_output_path=str(tmp_path / "cache"), **kw)


def test_stage_items_and_truncation(tmp_path):
    long_prompt = "word " * 60
    rows = [{"prompt": long_prompt + str(i), "chosen": "yes " * 20, "rejected": "no " * 20} for i in range(40)]
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = cfg_for(tmp_path, [str(path)], data_split="1,1,1", max_seq_len=512, max_prompt_seq_len=32)
    s1 = build_stage_data(cfg, TOK, 1)
    ids = s1.train[0]["input_ids"]
    assert ids.dtype == torch.long and ids[0] == TOK.bos_token_id and ids[-1] == TOK.eos_token_id
    text = TOK.decode(ids)
    assert text.startswith(" Human: word") and text.endswith(" Assistant: " + ("yes " * 20).strip())
    s3 = build_stage_data(cfg, TOK, 3)
    p = s3.train[0]["prompt_input_ids"]
    assert p.shape == (32,) and TOK.decode(p).endswith(" Assistant:")  # cut from the LEFT
    short = cfg_for(tmp_path, [str(path)], data_split="1,1,1", max_seq_len=50)
    s1s = build_stage_data(short, TOK, 1)
    assert max(len(s1s.train[i]["input_ids"]) for i in range(len(s1s.train))) == 50
    with pytest.raises(DataError, match="stage 2: the training split is empty.*equal after truncation"):
        build_stage_data(short, TOK, 2)  # the prompt alone fills 50 tokens: every pair is equal


def test_stage2_drops_equal_pairs_and_counts(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}" if i % 4 else f"a{i}"} for i in range(80)]
    rows += [{"prompt": f"sft{i}", "chosen": "x"} for i in range(8)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = build_stage_data(cfg_for(tmp_path, [str(path)], data_split="0,1,0"), TOK, 2)
    assert data.dropped == {"chosen == rejected": 20, "no rejected answer": 8}
    assert data.num_dropped == 28 and len(data.train) + len(data.eval) == 60
    item = data.train[0]
    assert set(item) == {"chosen_input_ids", "rejected_input_ids"}
    assert not torch.equal(item["chosen_input_ids"], item["rejected_input_ids"])
    c, r = TOK.decode(item["chosen_input_ids"]), TOK.decode(item["rejected_input_ids"])
    assert c.split("Assistant:")[0] == r.split("Assistant:")[0]  # same prompt, different answers


def test_cache_hit_on_second_call_and_key_changes(tmp_path):
    path = make_jsonl(tmp_path / "c.jsonl", 60, "C")
    cfg = cfg_for(tmp_path, [path])
    first = build_stage_data(cfg, TOK, 2)
    second = build_stage_data(cfg, TOK, 2)
    assert not first.from_cache and second.from_cache and second.cache_path == first.cache_path
    assert len(first.train) == len(second.train) > 0
    for i in range(len(first.train)):
        for k in first.train[i]:
            assert torch.equal(first.train[i][k], second.train[i][k])
    assert not build_stage_data(cfg_for(tmp_path, [path], max_seq_len=64), TOK, 2).from_cache  # settings
    assert not build_stage_data(cfg, TOK, 3).from_cache  # stage
    with open(path, "a") as f:  # content: one more row
        f.write(json.dumps({"prompt": "new", "chosen": "c", "rejected": "r"}) + "\n")
    third = build_stage_data(cfg, TOK, 2)
    assert not third.from_cache and third.cache_path != first.cache_path

    class ShiftedTokenizer(ByteTokenizer):  # same name, different ids: a different tokenizer identity
        def __call__(self, text, **kw):
            enc = super().__call__(text, **kw)
            ids = enc["input_ids"]
            enc["input_ids"] = [i ^ 1 for i in ids] if isinstance(text, str) else [[i ^ 1 for i in r] for r in ids]
            return enc

    assert not build_stage_data(cfg, ShiftedTokenizer(), 2).from_cache


def test_empty_splits_are_errors(tmp_path):
    path = make_jsonl(tmp_path / "e.jsonl", 30, "E")
    with pytest.raises(DataError, match="stage 2: the training split is empty"):
        build_stage_data(cfg_for(tmp_path, [path], data_split="1,0,1"), TOK, 2)
    one = make_jsonl(tmp_path / "one.jsonl", 1, "O")
    with pytest.raises(DataError, match="eval split is empty"):
        build_stage_data(cfg_for(tmp_path, [one], data_split="1,0,0"), TOK, 1)
    ok = build_stage_data(cfg_for(tmp_path, [one], data_split="1,0,0", eval_fraction=0.0), TOK, 1)
    assert len(ok.train) == 1 and len(ok.eval) == 0
    with pytest.raises(DataError, match="no data"):
        build_stage_data(cfg_for(tmp_path, []), TOK, 3)


def test_skip_bad_rows_counted_in_stage_data(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) for i in range(40)]
    path.write_text("\n".join(good[:10] + ["{oops", json.dumps({"prompt": "q"})] + good[10:]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: row 11"):
        build_stage_data(cfg_for(tmp_path, [str(path)]), TOK, 1)
    data = build_stage_data(cfg_for(tmp_path, [str(path)], skip_bad_rows=True), TOK, 1)
    assert data.dropped == {"malformed rows skipped": 2} and data.num_dropped == 2


def test_builtin_stage_data_defaults(tmp_path):
    cfg = DataConfig(data_output_path=str(tmp_path / "cache"))
    sizes = {s: build_stage_data(cfg, TOK, s) for s in (1, 2, 3)}
    n = {s: len(d.train) + len(d.eval) for s, d in sizes.items()}
    assert sum(n.values()) == len(__import__("rlhf.data.builtin", fromlist=["x"]).records())
    assert abs(n[2] / n[1] - 2) < 0.01 and abs(n[3] / n[1] - 2) < 0.01
    assert sizes[2].num_dropped == 0


def random_rows(key, lengths, gen):
    return [{key: torch.randint(0, 256, (n,), generator=gen)} for n in lengths]


def test_collate_sft_right_pads_and_masks_labels():
    gen = torch.Generator().manual_seed(0)
    batch = random_rows("input_ids", [5, 2, 7], gen)
    out = collate_sft(batch, pad_token_id=TOK.pad_token_id)
    assert out["input_ids"].shape == out["attention_mask"].shape == out["labels"].shape == (3, 7)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        assert torch.equal(out["input_ids"][i, :n], row["input_ids"])
        assert torch.all(out["input_ids"][i, n:] == TOK.pad_token_id)
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (7 - n)
        assert torch.equal(out["labels"][i, :n], row["input_ids"]) and torch.all(out["labels"][i, n:] == -100)


def test_collate_pairs_chosen_first_then_rejected():
    gen = torch.Generator().manual_seed(1)
    batch = [
        {"chosen_input_ids": torch.randint(0, 256, (c,), generator=gen), "rejected_input_ids": torch.randint(0, 256, (r,), generator=gen)}
        for c, r in [(4, 6), (3, 2)]
    ]
    out = collate_pairs(batch, pad_token_id=TOK.pad_token_id)
    assert out["input_ids"].shape == out["attention_mask"].shape == (4, 6)
    expect = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    for i, row in enumerate(expect):
        assert torch.equal(out["input_ids"][i, : len(row)], row)
        assert int(out["attention_mask"][i].sum()) == len(row) and out["attention_mask"][i, 0] == 1


def test_collate_prompts_left_pads():
    gen = torch.Generator().manual_seed(2)
    batch = random_rows("prompt_input_ids", [3, 6, 1], gen)
    out = collate_prompts(batch, pad_token_id=TOK.pad_token_id)
    assert out["input_ids"].shape == (3, 6)
    for i, row in enumerate(batch):
        n = len(row["prompt_input_ids"])
        assert torch.equal(out["input_ids"][i, 6 - n :], row["prompt_input_ids"])
        assert torch.all(out["input_ids"][i, : 6 - n] == TOK.pad_token_id)
        assert out["attention_mask"][i].tolist() == [0] * (6 - n) + [1] * n
    assert torch.all(out["attention_mask"][:, -1] == 1)  # generation appends after a real token


def test_pretrain_blocks(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc line one\nstill first\n\nsecond doc\n")
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "third doc"}) + "\n")
    data = build_pretrain_data([str(txt), str(jl)], TOK, max_seq_len=8)
    stream = torch.cat([data[i]["input_ids"] for i in range(len(data))]).tolist()
    expect = []
    for doc in ["first doc line one\nstill first", "second doc", "third doc"]:
        expect += TOK.encode(doc) + [TOK.eos_token_id]
    assert all(len(data[i]["input_ids"]) == 8 for i in range(len(data)))
    assert stream == expect[: len(stream)] and len(expect) - len(stream) < 8
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert TOK.decode(build_pretrain_data([str(lines)], TOK, 64)[0]["input_ids"]) == "onetwothree"
    built = build_pretrain_data(["builtin"], TOK, 64)
    assert len(built) > 100
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(DataError, match="row 1"):
        build_pretrain_data([str(bad)], TOK, 8)

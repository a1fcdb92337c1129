"""rlhf.chat: conversation rendering, the ChatSession API, interactive commands, batch mode."""
import io
import json

import pytest
import torch

from rlhf.chat import ChatSession, GenerationOptions, clean_answer, interactive, main, render, run_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlhf.models import load_causal_lm, load_tokenizer

    d = tmp_path_factory.mktemp("actor")
    load_causal_lm("tiny-opt", seed=11).save_pretrained(str(d))
    load_tokenizer("tiny-opt").save_pretrained(str(d))
    return str(d)


def test_render_and_clean():
    assert render([], "Hi?") == " Human: Hi? Assistant:"
    assert render([("Hi?", "Hello.")], " And you? ") == " Human: Hi? Assistant: Hello. Human: And you? Assistant:"
    assert clean_answer(" Fine, thanks. Human: and then?") == "Fine, thanks."


def test_session_reply_keeps_history_and_matches_plain_generate(model_dir):
    s = ChatSession(model_dir, GenerationOptions(max_new_tokens=10), device="cpu")
    a1 = s.reply("What sound does a cow make?")
    a2 = s.reply("And a dog?")
    assert isinstance(a1, str) and isinstance(a2, str)
    assert s.history == [("What sound does a cow make?", a1), ("And a dog?", a2)]
    # the second turn was conditioned on the first: same text as generating from the rendered history
    ids = s.tokenizer(render([("What sound does a cow make?", a1)], "And a dog?"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = s.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=s.tokenizer.pad_token_id, eos_token_id=s.tokenizer.eos_token_id)
    assert a2 == clean_answer(s.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    s.clear()
    assert s.history == [] and s.reply("What sound does a cow make?") == a1  # greedy, same context


def test_interactive_commands(model_dir):
    s = ChatSession(model_dir, GenerationOptions(max_new_tokens=4), device="cpu")
    out = io.StringIO()
    interactive(s, stdin=io.StringIO("hello\n\nclear\nhow are you?\nquit\nnever read\n"), stdout=out)
    text = out.getvalue()
    assert text.count("Assistant: ") == 2 and "(conversation cleared)" in text
    assert [h for h, _ in s.history] == ["how are you?"]


def test_batch_mode_file_and_cli(model_dir, tmp_path):
    prompts = ["Name a fruit.", "What color is snow?", "What is the opposite of up?"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    s = ChatSession(model_dir, GenerationOptions(max_new_tokens=6), device="cpu")
    assert run_batch(s, str(tmp_path / "p.txt"), str(tmp_path / "a.jsonl"), batch_size=2) == 3
    rows = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    # batched (left padded) answers equal one-by-one answers
    assert [r["answer"] for r in rows] == [s.answer([render([], p)])[0] for p in prompts]
    assert main(["--path", model_dir, "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "b.jsonl"),
                 "--max_new_tokens", "6", "--device", "cpu"]) == 0
    assert [json.loads(l) for l in (tmp_path / "b.jsonl").read_text().splitlines()] == rows

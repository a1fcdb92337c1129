"""Chat with a trained actor: interactive multi-turn, a Python API, and batch mode.

    python -m rlhf.chat --path output/step3_ppo/actor              # interactive (`clear`, `quit`)
    python -m rlhf.chat --path DIR --input prompts.txt --output answers.jsonl   # batch

The conversation is rendered in the training format (DeepSpeed-Chat's):
    " Human: {q1} Assistant: {a1} Human: {q2} Assistant:"
and the answer is cut at EOS or where the model starts the next " Human:" turn itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TURN_MARK = " Human:"


@dataclass
class GenerationOptions:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def render(history: list[tuple[str, str]], text: str) -> str:
    """The whole conversation so far plus the new question, ending in "Assistant:"."""
    turns = "".join(f" Human: {h.strip()} Assistant: {a.strip()}" for h, a in history)
    return f"{turns} Human: {text.strip()} Assistant:"


def clean_answer(text: str) -> str:
    """Cut at the model's own next turn and strip."""
    for mark in (TURN_MARK, "\nHuman:"):
        cut = text.find(mark)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


class ChatSession:
    """Multi-turn chat with a causal LM directory (or built-in name); `reply(text) -> str`."""

    def __init__(self, path: str, options: GenerationOptions | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, max_context_tokens: int = 1024):
        from rlhf.models import load_causal_lm, load_tokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path, dtype).to(self.device).eval()
        self.options = options or GenerationOptions()
        self.max_context_tokens = max_context_tokens
        self.history: list[tuple[str, str]] = []

    def clear(self) -> None:
        self.history = []

    def _gen_kwargs(self) -> dict:
        o = self.options
        kw = dict(max_new_tokens=o.max_new_tokens, do_sample=o.do_sample, pad_token_id=self.tokenizer.pad_token_id,
                  eos_token_id=self.tokenizer.eos_token_id, repetition_penalty=o.repetition_penalty)
        if o.do_sample:
            kw.update(temperature=o.temperature, top_k=o.top_k or None, top_p=o.top_p)
        else:
            kw.update(temperature=None, top_k=None, top_p=None)
        return kw

    @torch.no_grad()
    def answer(self, prompts: list[str]) -> list[str]:
        """Answer rendered prompts in one left-padded batch."""
        tok = self.tokenizer
        saved_side, saved_trunc = tok.padding_side, getattr(tok, "truncation_side", "right")
        tok.padding_side, tok.truncation_side = "left", "left"  # keep the latest turns when too long
        try:
            enc = tok(prompts, padding=True, truncation=True, max_length=self.max_context_tokens, return_tensors="pt")
        finally:
            tok.padding_side, tok.truncation_side = saved_side, saved_trunc
        input_ids = enc["input_ids"].to(self.device)  # [B, Lp]
        attention_mask = enc["attention_mask"].to(self.device)  # [B, Lp]
        seq = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **self._gen_kwargs())
        answers = tok.batch_decode(seq[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [clean_answer(a) for a in answers]

    def reply(self, text: str) -> str:
        """The assistant's answer to `text`, given the conversation so far (which it extends)."""
        answer = self.answer([render(self.history, text)])[0]
        self.history.append((text, answer))
        return answer


def read_prompts(path: str) -> list[str]:
    """One prompt per line (.txt), or JSON lines / a JSON list with a `prompt` field."""
    with open(path) as f:
        text = f.read()
    if path.endswith((".jsonl", ".json")):
        rows = json.loads(text) if path.endswith(".json") else [json.loads(l) for l in text.splitlines() if l.strip()]
        return [r["prompt"] if isinstance(r, dict) else str(r) for r in rows]
    return [line for line in (l.strip() for l in text.splitlines()) if line]


def run_batch(session: ChatSession, input_path: str, output_path: str, batch_size: int = 16) -> int:
    """Answer every prompt of `input_path` (each on its own, no shared history); write JSONL rows
    {"prompt", "answer"} to `output_path`. Returns the number of prompts."""
    prompts = read_prompts(input_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w") as f:
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            for p, a in zip(chunk, session.answer([render([], p) for p in chunk])):
                f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return len(prompts)


def interactive(session: ChatSession, stdin=sys.stdin, stdout=sys.stdout) -> None:
    print("Chat with the model. Commands: `clear` (new conversation), `quit`.", file=stdout, flush=True)
    while True:
        print("Human: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            break
        if text.lower() == "clear":
            session.clear()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        print(f"Assistant: {session.reply(text)}", file=stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="model directory (e.g. <output_dir>/step3_ppo/actor) or built-in name")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    p.add_argument("--do_sample", "--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", "--top-k", type=int, default=0)
    p.add_argument("--top_p", "--top-p", type=float, default=1.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--max_context_tokens", type=int, default=1024, help="older turns are cut beyond this")
    p.add_argument("--input", help="batch mode: file of prompts (.txt lines, .jsonl/.json with `prompt`)")
    p.add_argument("--output", help="batch mode: answers as JSONL (default: <input>.answers.jsonl)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    opts = GenerationOptions(args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p,
                             args.repetition_penalty)
    session = ChatSession(args.path, opts, device=args.device, max_context_tokens=args.max_context_tokens)
    if args.input:
        out = args.output or os.path.splitext(args.input)[0] + ".answers.jsonl"
        n = run_batch(session, args.input, out, args.batch_size)
        print(f"answered {n} prompts -> {out}")
        return 0
    interactive(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())

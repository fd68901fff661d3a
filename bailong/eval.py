"""Measure what training did: perplexity, bits per character, tokenizer efficiency, and a bench.

    python -m bailong.eval perplexity --model out/pretrain --text held_out.txt
    python -m bailong.eval tokenizers --text zh_tw.txt llama2/tokenizer.model out/pretrain/adapter/tokenizer.model
    python -m bailong.eval bench --model out/sft --questions bench.json --out answers.jsonl \\
        [--judge-url http://127.0.0.1:8000/v1 --judge-model gpt-4o]

Loss is reported per character as well as per token, so that models with
different vocabularies compare fairly. The bench file follows Bailong-bench's
layout: a JSON list of items, each with a "category" and its user "turns"
(one for single-turn, several for multi-turn). With --judge-url, an
OpenAI-compatible chat endpoint scores each answer 0-10 under Bailong-bench's
rules: an answer in the wrong language, or with any Simplified Chinese, scores 0.
Those rules are the judge's to apply (they are in its prompt; no code here tells
Simplified from Traditional Chinese).
"""
import json
import math
import os
import re
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

from bailong.errors import BailongError, Parser, Terminated, loading, read_json, run_cli

with loading(__name__):  # Ctrl-C meanwhile (torch and the modules loading): answered once they have
    import torch
    from bailong import progress
    from bailong.config import DTYPES
    from bailong.data import checked_text, listed, read_corpus
    from bailong.files import ANSWERED_BY, ANSWERS, check_output_file, is_answers
    from bailong.tokenizer import open_tokenizer, tokenizer_found

JUDGE_PROMPT = """You are grading an AI assistant's answer, in a conversation, on a scale from 0 to 10.
Rules: if the answer is not in the language the user asked for (where they did not say, the one they wrote in),
the score is 0; if the answer contains any Simplified Chinese characters where Traditional Chinese is expected,
the score is 0. Otherwise judge helpfulness, correctness, relevance and detail. Reply with the score alone, as
"Score: N".

[Conversation]
{conversation}

[Answer to grade]
{answer}"""


def tokens_per_char(tokenizer, texts) -> float:
    """Tokens per character of ``texts`` (or of one text): how compactly a tokenizer writes them."""
    texts = listed(texts)
    return sum(len(tokenizer.encode(t)) for t in texts) / max(1, sum(len(t) for t in texts))


def first_chars(texts, max_chars):
    """Whole documents from the start, up to ``max_chars`` characters (at least one document)."""
    kept, total = [], 0
    for t in texts:
        if kept and total + len(t) > max_chars:
            break
        kept.append(t)
        total += len(t)
    return kept


@torch.no_grad()
def loss_per_char(model, tokenizer, texts, max_len=None):
    """Total next-token loss (nats) over the texts, divided by their characters: every token of a text scored,
    the first after bos, or, for a tokenizer that begins no prompt with one (a tokenizer.json may not), after eos:
    as a document begins in pre-training's stream (before, its first token went unscored, yet counted per
    token). One text may be given alone."""
    texts = listed(texts)
    max_len = max_len or model.config.max_position_embeddings
    device = model.lm_head.weight.device
    total = 0.0
    for text in texts:
        ids = tokenizer.encode(text, bos=tokenizer.adds_bos)
        if not tokenizer.adds_bos and tokenizer.eos_id >= 0:
            ids = [tokenizer.eos_id] + ids
        for start in range(0, len(ids) - 1, max_len - 1):  # windows share one token of context
            chunk = torch.tensor([ids[start:start + max_len]], device=device)
            # the training loss's way: the head and float32 log-softmax a slice of positions at a time (a whole
            # window's float32 logits at Llama 3's context and vocabulary would be some 70 GB)
            total += model(chunk[:, :-1], targets=chunk[:, 1:]).item() * (chunk.shape[1] - 1)
    if not (chars := sum(len(t) for t in texts)):
        raise ValueError("no characters to score")
    return total / chars


def perplexity(model_path, text, max_chars=200_000, dtype=None):
    """Loss per token and per character, perplexity and bits per character on ``text``, in ``dtype`` (default:
    the checkpoint's own, else ``load``'s)."""
    from bailong.hub import resolve
    from bailong.weights import load, not_finite, own_dtype
    texts = read_corpus([text])
    folder = resolve(str(model_path))
    model, tokenizer = load(folder, dtype=dtype or own_dtype(folder))
    tokenizer = tokenizer_found(tokenizer, model_path)
    kept = first_chars(texts, max_chars)
    total = sum(map(len, kept))
    nats_per_char = loss_per_char(model, tokenizer, kept)
    if not math.isfinite(nats_per_char):
        broken = f"{name} holds" if (name := not_finite(model)) else "its outputs hold"
        raise BailongError(f"{model_path}: the loss is {nats_per_char} ({broken} NaN or infinite values)")
    per_char = tokens_per_char(tokenizer, kept)
    per_token = nats_per_char / per_char
    return {"characters": total, "tokens_per_char": per_char, "loss_per_token": per_token,
            "perplexity": progress.perplexity(per_token), "bits_per_char": nats_per_char / math.log(2)}


def text_tokenizer(path):
    """The tokenizer a file, model folder or training output reads text with: a training output's, its adapter's
    grown vocabulary, else its base's, as loading it gives."""
    from bailong.hub import resolve
    from bailong.outputs import training_output
    if (run := training_output(Path(path).expanduser())) is not None:
        return open_tokenizer(run[1]) or text_tokenizer(resolve(str(run[0]), weights=False))
    return tokenizer_found(open_tokenizer(path), path)


def compare_tokenizers(text, tokenizers):
    opened = {path: text_tokenizer(path) for path in listed(tokenizers)}
    texts = read_corpus([text])
    chars = sum(map(len, texts))
    rows = {}
    for path, tokenizer in opened.items():
        rows[path] = tokens_per_char(tokenizer, texts)
        print(f"{path}: {rows[path]:.3f} tokens per character ({rows[path] * chars:,.0f} tokens for {chars:,} characters)")
    return rows


def read_bench(path) -> list[dict]:
    items = read_json(path, expect=list)
    for i, item in enumerate(items):
        turns = item.get("turns") if isinstance(item, dict) else None
        if not (isinstance(turns, list) and turns and all(isinstance(checked_text(t, f"{path}: item {i}"), str)
                                                          for t in turns)):
            raise BailongError(f"{path}: item {i} needs \"turns\", a list of user messages")
        if not isinstance(item.get("category", ""), str):  # scores are summed by it
            raise BailongError(f"{path}: item {i}'s \"category\" must be a string, not {item['category']!r}")
    return items


def judge(url, model, conversation, answer, api_key=None, timeout=120) -> tuple[int | None, str]:
    """The 0-10 score an OpenAI-compatible chat endpoint gives ``answer`` (``score_of`` its reply), and the reply."""
    transcript = "\n".join(f"{m['role']}: {m['content']}" for m in conversation)
    body = {"model": model, "temperature": 0,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(conversation=transcript, answer=answer)}]}
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())["choices"][0]["message"]["content"]
        assert isinstance(reply, str), f"content {reply!r}"
    except (OSError, ValueError, KeyError, IndexError, TypeError, AssertionError) as e:  # JSONDecodeError too
        raise BailongError(f"{url}: the judge did not answer ({type(e).__name__}: {e})") from None
    return score_of(reply), reply


NUMBER = r"-?\d+(?:\.\d+)?(?!\s*[-–]\s*\d)"  # not the first of a range ("0-10")
SCORES = [re.compile(rf"score\s*(?:[(\[][^)\]]*[)\]])?(?:[\s:*=]|is)*({NUMBER})", re.I),  # "Score (0-10): N"
          re.compile(rf"\[\[({NUMBER})\]\]"), re.compile(rf"({NUMBER})\s*(?:/|out of)\s*10(?!\.?\d)", re.I)]


def score_of(reply: str) -> int | None:
    """A judge's score: the last "Score: N" (the prompt's form; or "**Score:** N", "Score (0-10): N"), else the
    last "[[N]]", else the last "N/10" or "N out of 10", else the reply's one number; None where there is none,
    or several that could each be it (a refusal; "on a scale from 0 to 10, 3"). Halves round up; held to 0-10
    ("Score: -3" is 0)."""
    given = next((found for pattern in SCORES if (found := pattern.findall(reply))), None)
    numbers = re.findall(NUMBER, reply)
    value = given[-1] if given else numbers[0] if len(numbers) == 1 else None
    return None if value is None else max(0, min(10, math.floor(float(value) + 0.5)))  # round() takes 6.5 to 6


def bench(model_path, questions, out, judge_url=None, judge_model="gpt-4o", max_new_tokens=512, overwrite=False):
    """Answer every item (turn by turn), write the conversations as jsonl, optionally judge each answer."""
    import sys

    from bailong.chat_template import model_template
    from bailong.conversation import Chat, save_answers
    from bailong.generation import Sampling, generation_eos
    from bailong.hub import resolve
    from bailong.weights import load
    check = check_output_file(out, {"the questions": questions}, overwrite, ours=is_answers, kind=ANSWERS)
    items = read_bench(questions)
    folder = resolve(str(model_path))
    model, tokenizer = load(folder)
    tokenizer = tokenizer_found(tokenizer, model_path)
    greedy = Sampling(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    conversation = Chat(model, tokenizer, model_template(tokenizer, folder), greedy, max_new_tokens,
                        stop_ids=generation_eos(folder))
    rows, scores, unscored, stopped = [], defaultdict(list), 0, None
    try:
        for item in items:
            conversation.messages, said, judged = [], [], []
            for turn in item["turns"]:
                answer = conversation.answer(turn, stream=False)
                said += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
                if judge_url:  # the judge sees what the model saw (older turns dropped to fit its context)
                    judged.append(judge(judge_url, judge_model, conversation.shown, answer,
                                        os.environ.get("OPENAI_API_KEY")))
            row = {**item, "messages": said, ANSWERED_BY: str(model_path)}
            if judge_url:  # a reply without a score (a refusal) is kept for a reader, its turn left unscored
                row["scores"], row["judge_replies"] = [score for score, _ in judged], [reply for _, reply in judged]
                scores[item.get("category", "uncategorized")] += [s for s in row["scores"] if s is not None]
                unscored += row["scores"].count(None)
            rows.append(row)
    except (KeyboardInterrupt, Terminated, BailongError) as e:  # the items answered so far are written all the
        # same (Ctrl-C, SIGTERM: a job scheduler's stop, a judge that fails)
        stopped = e
    if rows or stopped is None:
        written = save_answers(Path(out), rows, stopped is None, check)
        print(f"wrote {len(rows)} answered items to {written}", file=sys.stderr)
    if isinstance(stopped, BailongError):
        written = f", written to {written}" if rows else ""
        raise BailongError(f"{stopped}; {len(rows)} of the {len(items)} items answered{written}")
    if stopped is not None:
        raise stopped
    if judge_url:
        print(f"{'category':24s} {'scores':>6s} {'mean':>6s}")
        every = [v for values in scores.values() for v in values]
        for category, values in sorted(scores.items()) + [("all", every)]:
            print(f"{category:24s} {len(values):6d} {sum(values) / len(values) if values else math.nan:6.2f}")
        if unscored:
            print(f"{unscored} answer(s) unscored: the judge's reply gave no plain score (each item's judge_replies "
                  f"in {out} holds them)")
    return rows, dict(scores)


def main(argv=None):
    p = Parser(prog="python -m bailong.eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("perplexity", help="loss per token and character, perplexity, bits per character")
    a.add_argument("--model", required=True)
    a.add_argument("--text", required=True)
    a.add_argument("--max-chars", type=int, default=200_000)
    a.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's own (where its files name none, float32 "
                   "on a CPU, bfloat16 on CUDA); a 7B model takes 25 GiB in float32, 13 in bfloat16")
    b = sub.add_parser("tokenizers", help="tokens per character of one or more tokenizers (lower is better; not "
                       "the paper's gold words per token)")
    b.add_argument("--text", required=True)
    b.add_argument("tokenizers", nargs="+")
    c = sub.add_parser("bench", help="answer a Bailong-bench style file; judge with --judge-url")
    c.add_argument("--model", required=True)
    c.add_argument("--questions", required=True)
    c.add_argument("--out", required=True, help="a new file for the answered items (jsonl)")
    c.add_argument("--overwrite", action="store_true", help="let --out replace an earlier file of answers")
    c.add_argument("--judge-url", help="an OpenAI-compatible endpoint (key from $OPENAI_API_KEY)")
    c.add_argument("--judge-model", default="gpt-4o")
    c.add_argument("--max-new-tokens", type=int, default=512)
    args = p.parse_args(argv)
    for name in ("max_chars", "max_new_tokens"):
        if getattr(args, name, 1) < 1:  # (its subcommand's --help lists it)
            {"perplexity": a, "bench": c}[args.command].error(
                f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if getattr(args, "judge_url", None) and urllib.parse.urlsplit(args.judge_url).scheme not in ("http", "https"):
        c.error(f"--judge-url must be an http:// or https:// address, not {args.judge_url!r}")
    if args.command == "perplexity":
        result = perplexity(args.model, args.text, args.max_chars, args.dtype and getattr(torch, args.dtype))
        print(f"{result['characters']} characters: {result['loss_per_token']:.4f} nats per token (perplexity "
              f"{result['perplexity']:.2f}), {result['bits_per_char']:.4f} bits per character")
    elif args.command == "tokenizers":
        compare_tokenizers(args.text, args.tokenizers)
    else:
        bench(args.model, args.questions, args.out, args.judge_url, args.judge_model, args.max_new_tokens,
              args.overwrite)
    return 0


if __name__ == "__main__":
    run_cli(main)

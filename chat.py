"""Chat with a Llama 2 model in the terminal, answers streamed as they are generated.

    python chat.py                                        # the result of python train.py --stage sft
    python chat.py meta-llama/Llama-2-7b-chat-hf          # a Hub repo id or a local folder
    python chat.py ./my-model --prompt "你好" --temperature 0
    python chat.py --preset tiny --prompt "Hello"        # random weights: a smoke test

Uses the Llama 2 chat format ([INST], <<SYS>>). Older turns are dropped when the
conversation would outgrow the context window; the system prompt stays.
/exit or Ctrl-D ends the chat; Ctrl-C stops an answer, or exits at the prompt.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from bailong import load, load_preset
from bailong.chat_template import fit_prompt
from bailong.errors import BailongError, run_cli
from bailong.generate import Sampling, generate
from bailong.quantized import quantize_model
from bailong.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "out/sft"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", help=f"model folder, training output or Hugging Face repo id "
                                            f"(default: {DEFAULT_MODEL})")
    p.add_argument("--preset", help="instead of a model: random weights of a preset (e.g. tiny)")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the model folder's")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    d = Sampling()
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--quantize", choices=["nf4"], help="store the projections in NF4 while loading")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder or repo id to apply to the model")
    args = p.parse_args(argv)
    if args.model and args.preset:
        p.error("give a model folder or repo id, or --preset NAME, not both")
    if not args.model and not args.preset:  # what `python train.py --stage sft` made
        if not Path(DEFAULT_MODEL).exists():
            p.error(f"no model given and no {DEFAULT_MODEL}: run `python train.py --stage pretrain` and "
                    "`python train.py --stage sft` first, or name a model")
        args.model = DEFAULT_MODEL
    if args.preset and args.adapter:
        p.error("--adapter needs a model, not a preset")
    return args


def answer(model, tokenizer, messages, args, sampling) -> str:
    """Generate and print one reply to ``messages`` (trimmed in place to fit the context)."""
    context = model.config.max_position_embeddings
    budget = context - min(args.max_new_tokens, context // 4)  # room kept for the answer
    ids, kept = fit_prompt(tokenizer, messages, budget)
    messages[:] = kept
    stream = tokenizer.stream()
    out = []

    def on_token(i):
        if i not in model.config.eos_token_id:
            print(stream.put(i), end="", flush=True)
            out.append(i)

    start = time.perf_counter()
    try:
        generate(model, ids, args.max_new_tokens, sampling, on_token=on_token)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(stream.flush(), flush=True)
    seconds = time.perf_counter() - start
    print(f"[{len(out)} tokens, {len(out) / seconds:.1f} tokens/s]", file=sys.stderr)
    return tokenizer.decode(out)


def main(argv=None):
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.preset:
        model, tokenizer = load_preset(args.preset, dtype, args.device)
        if args.quantize:
            quantize_model(model)
    else:
        model, tokenizer = load(args.model, dtype, args.device, quantize=args.quantize, adapter=args.adapter)
    if args.tokenizer:
        tokenizer = Tokenizer(args.tokenizer)
    if tokenizer is None:
        raise BailongError(f"{args.model}: no tokenizer.model in the model folder; pass --tokenizer FILE")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise BailongError(f"{args.tokenizer or args.model}: the tokenizer has {tokenizer.vocab_size} pieces, "
                           f"more than the model's {model.config.vocab_size} embeddings")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def turn(text):
        messages.append({"role": "user", "content": text})
        try:
            reply = answer(model, tokenizer, messages, args, sampling)
        except ValueError as e:  # a message too long for the context window
            messages.pop()
            raise BailongError(str(e)) from None
        messages.append({"role": "assistant", "content": reply})

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    print("Chat started. /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text == "/exit":
            return 0
        if not text:
            continue
        try:
            turn(text)
        except BailongError as e:
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)

"""Chat with a Llama 2 model in the terminal, answers streamed as they are generated.

    python chat.py                                        # the result of python train.py --stage sft
    python chat.py meta-llama/Llama-2-7b-chat-hf          # a Hub repo id, a local folder or a training output
    python chat.py ./my-model --prompt "你好" --temperature 0
    python chat.py BASE --adapter ADAPTER --quantize nf4  # a PEFT adapter over an NF4 base
    python chat.py MODEL --input questions.jsonl --output answers.jsonl
    python chat.py --preset tiny --prompt "Hello"         # random weights: a smoke test

The chat format is the model folder's Jinja chat template (chat_template.jinja, else
tokenizer_config.json's chat_template) when it has one (a training output: its base model's),
else Llama 2's ([INST], <<SYS>>): the format our SFT stage trains in too.
Sampling defaults come from generation_config.json when present (read as transformers
reads it). Older turns are left out of the prompt when the conversation would outgrow
the context window (/save keeps them); the system prompt stays. Commands: /reset,
/system TEXT, /save FILE (/save! FILE replaces a file), /exit (or Ctrl-D);
Ctrl-C stops an answer; at the prompt it quits (asking first where a conversation would be lost).
At a terminal the arrow keys edit the line and bring back earlier messages.
"""
import contextlib
import json
import locale
import sys
from pathlib import Path

from bailong.config import DTYPES, HF_SAMPLING, PRESETS, SAMPLING, Sampling
from bailong.errors import BailongError, Parser, Terminated, check_device, out_of_memory, run_cli, signals_held
from bailong.files import ANSWERED_BY, ANSWERS, check_output_file, is_answers

DEFAULT_MODEL = "out/sft"
LESS_MEMORY = "--quantize nf4 takes less, as do shorter conversations"  # said where the GPU's memory runs out


def parse_args(argv):
    p = Parser(prog="chat.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help=f"model folder, training output or Hugging Face repo id "
                                            f"(default: {DEFAULT_MODEL})")
    p.add_argument("--preset", choices=list(PRESETS), help="instead of a model: random weights of a preset")
    p.add_argument("--adapter", help="a PEFT LoRA adapter folder or repo id to apply to the model")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the model folder's")
    p.add_argument("--template", choices=["auto", "llama2", "model"], default="auto",
                   help="chat format: the model's chat_template (model), Llama 2's, or the model's when it has one")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--input", help="a jsonl of {\"messages\": [...]} conversations to answer, each ending with a user")
    p.add_argument("--output", help="with --input: write the answered conversations to this new file "
                                    "(default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="let --output replace a file of answers that "
                                                            "chat.py or eval bench wrote")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, help="default: generation_config.json's, or 512")
    d = Sampling()
    for name in SAMPLING:  # a generation_config.json is read as transformers reads it (HF_SAMPLING where silent)
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)),
                       help=f"default: generation_config.json's ({HF_SAMPLING[name]} where it is silent, as in "
                            f"transformers; greedy unless it says do_sample), without one {getattr(d, name)}"
                            + (" (0: the most likely token, after the repetition penalty)" if name == "temperature"
                               else ""))
    p.add_argument("--seed", type=int, help="for reproducible sampling")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu (a --preset: float32)")
    p.add_argument("--quantize", choices=["nf4"], help="store the projections in NF4 while loading")
    args = p.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    try:
        Sampling(**{name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None})
    except ValueError as e:  # "top_p must be ..." -> "--top-p must be ..."
        name, _, rest = str(e).partition(" ")
        p.error(f"--{name.replace('_', '-')} {rest}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        p.error(f"--seed must be from 0 to {2**32 - 1}, not {args.seed}")
    if args.device:
        check_device(args.device)
    if args.input and args.prompt is not None:
        p.error("--prompt answers one message and --input a file of conversations: give one of them")
    if args.output and not args.input:
        p.error("--output goes with --input (the interactive chat saves with /save FILE)")
    if args.output:  # (checked again as the answers are written: what was made there meanwhile is kept)
        args.output_check = check_output_file(args.output, {"the input": args.input}, args.overwrite,
                                              ours=is_answers, kind=ANSWERS, flag="--output")
    if args.model and args.preset:
        p.error("give a model folder or repo id, or --preset NAME, not both")
    if args.preset and args.adapter:
        p.error("--adapter needs a model, not a preset")
    if not args.model and not args.preset:  # what `python train.py --stage sft` made
        if not Path(DEFAULT_MODEL).exists():
            p.error(f"no model given and no {DEFAULT_MODEL}: run `python train.py --stage pretrain` and "
                    "`python train.py --stage sft` first, or name a model")
        args.model = DEFAULT_MODEL
    return args


def main(argv=None):
    args = parse_args(argv)  # before the libraries load (seconds): a mistake is answered at once
    with signals_held():  # Ctrl-C while torch loads: answered once it has
        import torch

    from bailong import load, load_preset
    from bailong.chat_template import model_template
    from bailong.conversation import Chat, save_answers
    from bailong.data import read_conversations
    from bailong.generation import generation_eos, model_sampling
    from bailong.hub import resolve
    from bailong.quantized import quantize_model
    from bailong.tokenizer import check_fits, open_tokenizer, tokenizer_found

    if args.input:  # read (and check) the questions before minutes of loading
        questions = read_conversations(args.input, ending="user")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    folder = None
    if args.preset:
        model, tokenizer = load_preset(args.preset, dtype, args.device)
        if args.quantize:
            quantize_model(model)
    else:
        folder = resolve(str(args.model))
        model, tokenizer = load(folder, dtype, args.device, quantize=args.quantize, adapter=args.adapter)
    if args.tokenizer:
        tokenizer = tokenizer_found(open_tokenizer(args.tokenizer), args.tokenizer)
    tokenizer = tokenizer_found(tokenizer, args.model, "pass --tokenizer FILE")
    check_fits(tokenizer, model)
    template = model_template(tokenizer, folder) if args.template != "llama2" else None
    if args.template == "model" and template is None:
        raise BailongError(f"{args.model}: no chat template (chat_template.jinja, or tokenizer_config.json's "
                           "chat_template)")
    sampling, max_new_tokens = model_sampling(folder, vars(args), args.seed)
    name = f"preset {args.preset}" if args.preset else str(args.model) + (f" + {args.adapter}" if args.adapter else "")
    chat = Chat(model, tokenizer, template, sampling, max_new_tokens, args.system, generation_eos(folder), name)

    if args.input:  # batch: every conversation answered and written back whole, with its answer
        system = [{"role": "system", "content": args.system}] if args.system else []
        questions = [m if m[0]["role"] == "system" else system + m for m in questions]
        for n, messages in enumerate(questions, 1):  # each fits, or none is answered
            try:
                chat.prompt(messages)
            except BailongError as e:
                raise BailongError(f"{args.input}: conversation {n}: {e}") from None
        answered, stopped = [], None
        try:
            for messages in questions:
                chat.messages = messages[:-1]  # the model sees what fits (chat.prompt); the file keeps them all
                answer = chat.answer(messages[-1]["content"], stream=False)
                answered.append({"messages": messages + [{"role": "assistant", "content": answer}], ANSWERED_BY: name})
        except (KeyboardInterrupt, Terminated, BailongError, torch.OutOfMemoryError) as e:  # Ctrl-C, SIGTERM (a job
            stopped = e  # scheduler's stop), the model's logits not finite, the GPU's memory: the answers so far kept
        written = None
        if args.output:
            if answered or stopped is None:  # (stopped before any answer: nothing written)
                written = save_answers(Path(args.output), answered, stopped is None, args.output_check)
        else:
            # JSON's escapes where the output cannot hold the text (an ASCII or cp1252 one): what it prints shows
            # "?" for what it cannot hold, and jsonl must keep every character
            utf8 = (sys.stdout.encoding or "").lower().replace("-", "") == "utf8"
            print("".join(json.dumps(r, ensure_ascii=not utf8) + "\n" for r in answered), end="")
        if stopped is None:
            return 0
        done = f"{len(answered)} of the {len(questions)} conversations answered"
        if written:
            done += f", written to {written}"
        if isinstance(stopped, (BailongError, torch.OutOfMemoryError)):
            said = out_of_memory(stopped)
            raise BailongError(f"{said}: {LESS_MEMORY}; {done}" if said else f"{stopped}; {done}")
        if isinstance(stopped, Terminated):
            print(f"terminated: {done}", file=sys.stderr)
            raise stopped
        print(f"interrupted: {done}", file=sys.stderr)
        return 130
    if args.prompt is not None:
        chat.answer(args.prompt)
        return 130 if chat.stopped else 0  # stopped by Ctrl-C: the answer printed is not whole
    print("Chat started. /exit or Ctrl-D to quit; /reset, /system TEXT, /save FILE.", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 must not take the lines after it with it
        sys.stdin.reconfigure(errors="surrogateescape")
    # at a terminal, the arrow keys move in the line and bring back earlier ones, as at any prompt; where the locale
    # is not UTF-8 (LC_ALL=C) readline read Chinese as Meta keys and dropped it: plain lines there
    if sys.stdin.isatty() and locale.nl_langinfo(locale.CODESET) == "UTF-8":
        with contextlib.suppress(ImportError):  # (a Python built without it: plain lines)
            import readline  # noqa: F401 (input() edits through it once it is loaded)
    asked = False  # Ctrl-C at the prompt quits, once asked where a conversation would be lost
    while True:
        try:
            text = input("\n> ").strip()
            text.encode("utf-8")  # bytes that are not UTF-8 were read as surrogate escapes, which do not encode
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            if asked or all(m["role"] == "system" for m in chat.messages):
                return 0
            print("(Ctrl-C again, Ctrl-D or /exit quits; /save FILE keeps the conversation)", file=sys.stderr)
            asked = True
            continue
        except UnicodeEncodeError:
            print("error: the line is not UTF-8 text", file=sys.stderr)
            continue
        asked = False
        if not text:
            continue
        try:  # a mistake ends a command or an answer, never the conversation
            if text.startswith("/"):
                if not chat.command(text):
                    return 0
            else:
                chat.answer(text)
        except (BailongError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
        except torch.OutOfMemoryError as e:  # this conversation's, not the chat's end
            print(f"error: {out_of_memory(e)}: the chat goes on (/reset begins a shorter one; --quantize nf4 takes "
                  "less)", file=sys.stderr)
        except KeyboardInterrupt:  # before an answer began (its prompt made), or in a command: that alone stops
            print("\n(stopped; the conversation goes on)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main, less_memory=LESS_MEMORY)

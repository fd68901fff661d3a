"""Time and peak host memory of the GGUF export at a real model shape, and llama.cpp's reading of the file.

Writes a random checkpoint of a preset (with the Llama 2 tokenizer), then runs
``python -m bailong.export --out model.gguf --type T`` for each type in a fresh
process, reporting seconds, the file's size and the process's peak resident
memory (VmHWM) against the model's size. With llama-cpp-python installed, each
file is then loaded in llama.cpp and its logits on a Chinese and English prompt
compared with ours in float32 (relative root-mean-square difference, and how often the
most likely next token agrees).

    python bench/bench_export_gguf.py --preset tinyllama-1.1b --tokenizer tokenizer.model
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_load_memory import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
from bailong.export import main
main(["--base", {folder!r}, "--out", {out!r}, "--type", {kind!r}])
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""
PROMPT = "臺灣的夜市有蚵仔煎和滷肉飯，颱風天學校停課。The quick brown fox jumps over the lazy dog."


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tinyllama-1.1b")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "assets" / "llama2-tokenizer" /
                                                "tokenizer.model"), help="a 32000-piece SentencePiece model")
    p.add_argument("--disk-dtype", default="bfloat16")
    p.add_argument("--types", default="f16,bf16,q8_0")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the comparison (it holds our model in "
                                                               "float32 and llama.cpp's beside it)")
    args = p.parse_args()
    import shutil

    import numpy as np
    import torch

    import bailong
    from bailong.config import preset
    config = preset(args.preset)
    gib = 2 ** 30
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        folder = Path(tmp) / "model"
        disk, _ = write_checkpoint(config, folder, getattr(torch, args.disk_dtype))
        shutil.copy(args.tokenizer, folder / "tokenizer.model")
        print(f"{args.preset}: {disk / gib:.2f} GiB of {args.disk_dtype} weights")
        try:
            if args.no_llama_cpp:
                raise ImportError
            import llama_cpp
            model, tok = bailong.load(folder, dtype=torch.float32, device="cpu")
            ids = tok.encode(PROMPT, bos=True)
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0]
            del model
        except ImportError:
            llama_cpp = None
        for kind in args.types.split(","):
            out = Path(tmp) / f"{kind}.gguf"
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", CHILD.format(folder=str(folder),
                                                                     out=str(out), kind=kind)],
                                 capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if run.returncode:
                print(f"{kind}: failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            peak = int(run.stdout.strip().splitlines()[-1])
            line = (f"{kind:5s}: {seconds:6.1f} s, file {out.stat().st_size / gib:.2f} GiB, peak memory "
                    f"{peak / gib:.2f} GiB = {peak / disk:.2f}x the {args.disk_dtype} model")
            if llama_cpp:
                llm = llama_cpp.Llama(model_path=str(out), logits_all=True, verbose=False, n_ctx=128, type_k=0,
                                      type_v=0)
                llm.eval(ids)
                theirs = torch.tensor(np.array(llm.scores[:len(ids)]))
                error = ((theirs - ours).norm() / ours.norm()).item()
                agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
                line += f"; llama.cpp: logits {error:.1e} apart, next token agrees at {agree:.0%} of positions"
                del llm
            print(line, flush=True)
            out.unlink()


if __name__ == "__main__":
    main()

"""A training run's progress, as train.py's loop keeps it: the learning-rate schedule, the best held-out loss
so far, metrics.jsonl and loss.png, a graceful stop on Ctrl-C, SIGTERM or a closed standard output, the
startup's memory estimate and the closing lines. Like ``bailong.training`` (the options), it does not import
torch."""
import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

from bailong.errors import BailongError, Terminated, handling, in_ipython, silence
from bailong.files import atomic_write
from bailong.run_folder import latest_checkpoint


def lr_at(step, config) -> float:
    """Linear warmup to lr (step 0 at lr / warmup), then cosine decay toward min_lr, which the step after the
    last would take: transformers' cosine schedule after its warmup."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def perplexity(loss: float) -> float:
    """exp(loss), the held-out perplexity; infinite past the largest float (a loss above 709.78: a run gone wrong,
    though finite; metrics.jsonl then holds Infinity, which Python's json reads)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def held_out_record(rows) -> tuple:
    """(best held-out loss, its step, evaluations since it) from the metric rows; (None, None, 0) if none."""
    evals = [(r["eval_loss"], r["step"]) for r in rows if "eval_loss" in r]
    if not evals:
        return None, None, 0
    best = min(range(len(evals)), key=lambda i: (math.isnan(evals[i][0]), evals[i][0], i))  # (an older run's NaN)
    return evals[best][0], evals[best][1], len(evals) - 1 - best


# tqdm's ``disable`` for every bar: None hides one where the output is no terminal (a log file; training then says
# progress_line's lines), False shows it where IPython runs (a notebook's output is no terminal, yet draws a bar)
BAR_HIDDEN = False if in_ipython() else None
LINE_EVERY = 60.0  # seconds between progress lines where no bar is shown


def progress_line(done, steps, loss, tokens_per_s, elapsed, steps_timed) -> str:
    """The progress bar's news as a line, for an output that shows no bar (a file: nohup's, a job scheduler's
    log): the step, its loss, tokens/s, and the time the steps left take at this run's pace so far."""
    left = (steps - done) * elapsed / max(1, steps_timed)
    return (f"step {done:,}/{steps:,}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s, "
            f"{_interval(elapsed)} elapsed, {_interval(left)} left")


def _interval(seconds) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {seconds:02d}s"


class GracefulStop:
    """Ctrl-C (or SIGTERM: ``kill``, a job scheduler's stop) during training: the first one lets the step in
    progress finish, so that the checkpoint saved after it resumes exactly (the random state after a whole
    step, as at any save); a second one stops at once without saving, and the last checkpoint stays.
    ``echoes``: under torchrun a terminal's Ctrl-C reaches each process twice, from the terminal and from
    torchrun passing on its own, and a job scheduler's stop may too: a second signal within that many seconds
    of the first is the same stop."""

    def __init__(self, say=print, echoes=0.0):
        self.say, self.echoes = say, echoes

    def __enter__(self):
        self.requested, self.code = False, 0  # code: the exit status the shell gives the signal (130, 143)
        self.handlers = contextlib.ExitStack()
        self.handlers.enter_context(handling(self._handle))
        self.handlers.enter_context(contextlib.redirect_stdout(_Watched(sys.stdout, self._output_gone)))
        self.handlers.enter_context(contextlib.redirect_stderr(_Watched(sys.stderr, self._output_gone)))
        return self

    def _output_gone(self, stream):
        """An output's reader went (``train.py | head``, ``2>&1 | head``, a pager quit): stop as on Ctrl-C,
        saving, the rest of that output sent nowhere (a command piped so lost every step since its last
        checkpoint)."""
        silence(stream)
        if not self.requested:
            self.requested, self.code, self.when = True, 128 + signal.SIGPIPE, time.monotonic()
            print("\nthe output was closed: stopping after this step to save a checkpoint; continue with --resume",
                  file=sys.stderr, flush=True)

    def _handle(self, signum, frame):
        if self.requested and time.monotonic() - self.when < self.echoes:
            return
        if self.requested:  # a second SIGTERM ends as one does (exit 143: a job scheduler reads it so), not as Ctrl-C
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested, self.code, self.when = True, 128 + signum, time.monotonic()
        self.say("\nstopping after this step to save a checkpoint (a second Ctrl-C or SIGTERM stops at once, "
                 "without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self.handlers.close()


class _Watched:
    """A text stream whose ``gone(stream)`` is called, instead of an error, when its reader has closed the pipe."""

    def __init__(self, stream, gone):
        self.stream, self.gone = stream, gone

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.gone(self.stream)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.gone(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class Metrics:
    """metrics.jsonl (one JSON object a line) and loss.png, both rewritten as training goes."""

    def __init__(self, file: Path, plot: Path, keep_until=0):
        self.file, self.plot_file = file, plot
        self.rows, self.plotted = [], None  # the rows loss.png shows
        if self.file.exists():  # a resumed run keeps the steps it had done (none when it starts again at 0)
            lines = self.file.read_text(errors="replace").splitlines()
            for n, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and type(row.get("step")) is int:
                    self.rows.append(row)
                elif n < len(lines):  # (the last, cut short by a kill, goes without a word)
                    print(f"warning: {self.file}:{n}: not a step's record (a JSON object with its \"step\"); "
                          "left out", file=sys.stderr)
            self.rows = [r for r in self.rows if r["step"] <= keep_until] if keep_until else []
            atomic_write(self.file, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, **row):
        self.rows.append(row)
        with open(self.file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self):
        """The losses as a PNG, drawn without pyplot: a caller's backend (a notebook's) stays as it was; not drawn
        again for the same rows (a run's end after an evaluation at its last step: 0.15 s of the quick start's 12)."""
        if self.plotted == len(self.rows):
            return
        from matplotlib.figure import Figure
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="held-out loss")
            best, best_step, _ = held_out_record([r for r in self.rows if r["step"] > 0])
            if best is not None:
                ax.plot([best_step], [best], "*", color="crimson", markersize=14, label="kept as the result")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            atomic_write(self.plot_file, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
            self.plotted = len(self.rows)
        except BailongError as e:  # a picture of what metrics.jsonl holds: the run goes on, or ends well, without it
            print(f"warning: {e}; the plot was not updated", file=sys.stderr)


def estimate_memory(model, config) -> str:
    """A rough figure for the startup summary: weights + LoRA with Adam states + logits."""
    device = model.lm_head.weight.device  # not an embedding table offloaded to host memory
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device == device)  # LoRA's too
    moments = 2 if config.optimizer == "adamw8bit" else 8  # two 8-bit codes, or two float32 values
    grad = 2 if config.bf16_grads else 4  # (the embedding's and head's stay float32: few)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad) * (grad + moments)
    logits = config.batch_size * config.seq_len * model.config.vocab_size * 4 * 3
    return f"~{(weights + lora + logits) / 2**30:.2f} GiB (weights, LoRA + AdamW, logits; activations extra)"


def summary(rows, done, stopped, run, best_step, held_out) -> str:
    """The closing lines: both losses, what the result is, and a warning when held-out loss never fell."""
    train = [r["loss"] for r in rows if "loss" in r]
    lines = [f"stopped early after step {done}: {stopped}"] if stopped else []
    n = max(1, min(10, len(train) // 2))  # the first and last steps apart, in a short run too
    first, last = train[:n], train[-n:]
    lines.append(f"done: training loss {sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f} (means of the "
                 f"first and last {len(last)} steps)")
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        best = next(loss for step, loss in evals if step == best_step)
        lines[-1] += (f"; held-out loss {evals[0][1]:.4f} at step {evals[0][0]} -> {evals[-1][1]:.4f} at step "
                      f"{evals[-1][0]}, best {best:.4f} at step {best_step}")
        if evals[0][0] == 0 and best >= evals[0][1]:  # and its own loss: not learned; else memorised
            own, began = sum(last) / len(last), sum(first) / len(first)  # the training loss's
            lines.append("warning: training never lowered the held-out loss" + (
                ": the run memorised its data rather than learned (more data, fewer steps or a lower --lr)"
                if own < min(began, evals[-1][1]) else (", nor its own" if own >= began else ", and its own no lower "
                "than it (a run collapsed to outputs that fit nothing)") + ": the run did not learn (a --lr too "
                "high makes it diverge: try a lower one)") + "; the adapter kept does worse on it than none")
        result = f"the adapter of step {best_step}, best on held-out data"
    else:
        why = "--held-out 0" if not held_out else "too few documents to keep any apart"
        lines.append(f"note: no held-out data ({why}), so nothing shows whether the run learned or memorised")
        result = f"the adapter of the last step, {done}"
    lines.append(f"wrote {run.result} ({result}), {run.metrics}, {run.plot}; the last step's checkpoint is "
                 f"{latest_checkpoint(run.path)}")
    return "\n".join(lines)

"""A conversation with one model: history, prompt format, streaming answers, commands."""
import io
import json
import sys
import time
from itertools import count
from pathlib import Path

from bailong.chat_template import fit_prompt, llama2_ids, render_jinja, turn_end_ids
from bailong.errors import BailongError
from bailong.files import ANSWERED_BY, ANSWERS, atomic_write, check_not_in_a_run, is_answers, not_a_file
from bailong.generation import generate


class Chat:
    """A conversation with one model: the history, the prompt format, and streaming answers."""

    def __init__(self, model, tokenizer, template, sampling, max_new_tokens, system=None, stop_ids=(), name=None):
        """``name``: the model's, which /save writes with the conversation (``ANSWERED_BY``)."""
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.messages = [{"role": "system", "content": system}] if system else []  # the whole conversation
        self.stopped = False  # whether Ctrl-C stopped the last answer
        self.shown = []  # the messages the last answer's prompt held
        # an answer ends at the model's eos, the tokenizer's, the end-of-turn token its template puts after an
        # answer (<|eot_id|>), which SFT in that template taught it, or ``stop_ids`` (``generation_eos``)
        self.stop_ids = set(model.config.eos_token_id) | {tokenizer.eos_id} - {-1} | (
            turn_end_ids(tokenizer, template) if template else set()) | set(stop_ids)

    @property
    def messages(self) -> list[dict]:
        return self._messages

    @messages.setter
    def messages(self, messages):  # a new conversation: none of its exchanges is left out of the prompt yet, and
        self._messages, self.dropped = messages, 0  # it wrote no file that /save may update (a file the
        self.saved = set()  # conversation before it wrote is that one's)

    def encode(self, messages):
        if self.template is None:
            return llama2_ids(self.tokenizer, messages)
        template, specials = self.template
        try:
            text = render_jinja(template, messages, specials)
        except Exception as e:  # jinja2's errors, and any a template's Python raises (a str added to an int)
            raise BailongError(f"the model's chat_template fails on this conversation ({type(e).__name__}: {e})") \
                from None
        return self.tokenizer.encode_chat(text, specials)

    def prompt(self, messages) -> tuple[list[int], list[dict]]:
        """The prompt's ids for ``messages`` (ending with a user turn) and the messages they hold: the oldest
        exchanges dropped to leave room for an answer, the system prompt kept; a BailongError where even the
        last turn does not fit, or the template fails on the conversation."""
        context = self.model.config.max_position_embeddings
        try:
            return fit_prompt(self.encode, messages, context - min(self.max_new_tokens, context // 4))
        except ValueError as e:
            raise BailongError(str(e)) from None

    def answer(self, text, stream=True) -> str:
        """The reply to ``text``, streamed to stdout as it comes unless ``stream`` is False (answers to a
        file of questions); the history keeps both, and the prompt the newest exchanges that fit the context
        (``dropped``: the oldest left out so far)."""
        out = sys.stdout if stream else io.StringIO()  # a quiet answer is written nowhere
        self.messages.append({"role": "user", "content": text})
        system = self.messages[:1] if self.messages[0]["role"] == "system" else []
        shown = system + self.messages[len(system) + self.dropped:]
        decoder, reply, said = self.tokenizer.stream(), [], []

        def on_token(i):
            if i not in self.stop_ids:
                said.append(decoder.put(i))
                print(said[-1], end="", flush=True, file=out)
                reply.append(i)

        try:  # whatever stops it before the answer is whole (but Ctrl-C while one streams), the question is taken
            # back: the turns keep alternating
            ids, self.shown = self.prompt(shown)  # the messages the model sees (a judge sees them too)
            self.dropped += len(shown) - len(self.shown)
            start, self.stopped = time.perf_counter(), False
            try:
                generate(self.model, ids, self.max_new_tokens, self.sampling, self.stop_ids, on_token=on_token)
            except KeyboardInterrupt:
                if not stream:  # answering a file: Ctrl-C stops them all, not this answer
                    raise
                self.stopped = True  # the answer so far is kept; the note is not part of it
                print(" [stopped]", end="", file=sys.stderr, flush=True)
            seconds = time.perf_counter() - start
        except BaseException as e:
            self.messages.pop()
            if reply:  # the line it began streaming, ended before what is said of the error
                print(flush=True, file=out)
            if isinstance(e, FloatingPointError):  # the model's fault, not the conversation's
                raise BailongError(str(e)) from None
            raise
        tail = decoder.flush()  # an answer cut inside a character (at --max-new-tokens) ends in U+FFFD: shown, but
        answer = "".join(said) + (tail if tail.strip("\ufffd") else "")  # not kept (the next prompt would spell it)
        self.messages.append({"role": "assistant", "content": answer})  # kept, before the rest is printed
        print(tail, flush=True, file=out)
        context = self.model.config.max_position_embeddings  # where generate stops, whatever is asked for
        cut = f"; cut at the context's {context} tokens" if len(ids) + len(reply) >= context else ""
        print(f"[{len(reply)} tokens, {len(reply) / seconds:.1f} tokens/s{cut}]", file=sys.stderr)
        return answer

    def command(self, line) -> bool:
        """Run a /command; False means exit."""
        name, _, rest = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.messages = [m for m in self.messages if m["role"] == "system"]
            print("(the conversation is cleared" + ("; the system prompt stays)" if self.messages else ")"),
                  file=sys.stderr)
        elif name == "/system":
            if any(m["role"] != "system" for m in self.messages):
                print("(the conversation so far is cleared: a new system prompt starts a new one)", file=sys.stderr)
            self.messages = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
        elif name in ("/save", "/save!") and rest.strip():
            path = Path(rest.strip()).expanduser()
            check_not_in_a_run(path, "/save")  # (training would replace it)
            if path.is_dir():
                raise BailongError(f"{path}: is a folder; /save FILE names a file")
            if path.exists() and not path.is_file():  # (before it is read: a pipe would wait for a writer)
                raise BailongError(not_a_file(path))
            if path.exists() and path.resolve() not in self.saved:
                if not is_answers(path):  # (as chat.py --output: a model's own files, a user's notes or data)
                    raise BailongError(f"{path}: already exists and is not a {ANSWERS}; nothing was written")
                if name == "/save":
                    raise BailongError(f"{path}: already exists; /save! {rest.strip()} replaces it")
            save_jsonl(path, [{"messages": self.messages, ANSWERED_BY: self.name}])
            self.saved.add(path.resolve())
            print(f"saved {path}", file=sys.stderr)
        else:
            print("commands: /reset, /system TEXT, /save FILE (/save! FILE replaces a file), /exit", file=sys.stderr)
        return True


def save_jsonl(path: Path, rows, check=None):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), check)


def save_answers(path: Path, rows, whole=True, check=None) -> str:
    """Write answered conversations to ``path``, and say where they went: answers cut short (not ``whole``:
    Ctrl-C, a scheduler's stop) never replace the file ``--overwrite`` would have replaced, nor any answers a
    file made at ``path`` while they were answered (``check``, ``files.as_checked``, refuses it), but go beside
    it, to NAME.partial.jsonl (NAME.partial-2.jsonl where that is taken, and so on)."""
    try:
        if check:
            check(path)
        here = whole or not path.exists()
    except BailongError:  # a file made there while the answers were answered: left as it is
        here = False
    if here:
        save_jsonl(path, rows, check)
        return str(path)
    names = (path.with_name(f"{path.stem}.partial{f'-{n}' if n > 1 else ''}{path.suffix}") for n in count(1))
    beside = next(name for name in names if not name.exists())
    save_jsonl(beside, rows)
    return f"{beside} ({path} is as it was)"



"""Chat formats: Llama 2's, a model's own Jinja template, and keeping a conversation inside the context window.

Meta's format wraps each exchange in its own ``<s>...</s>`` and merges the
system prompt into the first user message:

    <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST]

We tokenize each exchange as two parts, the prompt ``<s>[INST] ... [/INST]`` and
the answer ``{answer}</s>`` (SentencePiece's leading space is the space after
[/INST]), so that training can mask exactly the answer tokens and the chat
prompt is the same token sequence the model was trained on. Meta's code
(``generation.py``) encodes an exchange whole, with a space after the answer: a
lone "▁" before ``</s>`` that our answers leave out, so a model we fine-tune
ends an answer straight after its last word. (A model that ships Meta's format
as a Jinja template, Llama-2-chat, is read through that template, below.)

A model that ships its own format (a Jinja ``chat_template`` in tokenizer_config.json
or chat_template.jinja) is rendered as transformers renders it, and its training
examples are the whole conversation encoded once, the answers' tokens learned
(``template_example``).
"""
import functools
import os

from bailong.tokenizer import Tokenizer, token_text

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


# The same format as a Jinja chat template, for tools that read one (a GGUF file's
# tokenizer.chat_template): rendered and tokenized, it gives llama2_ids' tokens.
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set dialog = messages[1:] %}{% else %}{% set system = '' %}{% set dialog = messages %}{% endif %}"
    "{% for message in dialog %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('expected user/assistant turns alternating from a user turn') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% set content = message['content'].strip() %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}"
    "{% endif %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}")


def llama2_jinja(tokenizer) -> str:
    """The Llama 2 format as a Jinja template whose text the tokenizer reads as ``llama2_turns``' ids: an
    answer, encoded alone, begins with SentencePiece's space, and a byte-level BPE tokenizer's with none, so
    for one of those nothing is written between [/INST] and the answer."""
    return LLAMA2_JINJA if isinstance(tokenizer, Tokenizer) else LLAMA2_JINJA.replace("{{ ' ' + message", "{{ message")


def llama2_turns(tokenizer: Tokenizer, messages) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each exchange; an open last turn has no answer ids.

    ``messages``: [{"role": "system"|"user"|"assistant", "content": str}, ...], an
    optional system message first, then user and assistant alternating.
    """
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    dialog = messages[1:] if system is not None else messages
    roles = [m["role"] for m in dialog]
    if not roles or roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise ValueError(f"expected user/assistant turns alternating from a user turn, got {roles}")
    turns = []
    for i in range(0, len(dialog), 2):
        user = dialog[i]["content"].strip()
        if i == 0 and system:
            user = B_SYS + system + E_SYS + user
        prompt = tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True)
        answer = tokenizer.encode(dialog[i + 1]["content"].strip(), eos=True) if i + 1 < len(dialog) else []
        turns.append((prompt, answer))
    return turns


def training_example(tokenizer: Tokenizer, messages) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its labels: the answer ids (but an answer's whose "weight" is 0, as
    OpenAI's fine-tuning data mark one not to learn), -100 (ignored) elsewhere."""
    ids, labels = [], []
    weights = iter([m.get("weight", 1) for m in messages if m["role"] == "assistant"])
    for prompt, answer in llama2_turns(tokenizer, messages):
        ids += prompt + answer
        labels += [-100] * len(prompt) + (answer if next(weights, 1) else [-100] * len(answer))
    return ids, labels


def llama2_ids(tokenizer: Tokenizer, messages) -> list[int]:
    """The prompt for an open user turn, in the Llama 2 format."""
    return [i for prompt, answer in llama2_turns(tokenizer, messages) for i in prompt + answer]


def fit_prompt(encode, messages, budget) -> tuple[list[int], list[dict]]:
    """``encode(messages)`` (prompt ids), dropping the oldest exchanges until at most ``budget``
    tokens remain; the system prompt is always kept. Returns the ids and the messages kept.
    Raises ValueError if even the last turn is too long.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    dialog = messages[len(system):]
    if dialog and dialog[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn to be answered")
    while True:
        kept = system + dialog
        ids = encode(kept)
        if len(ids) <= budget:
            return ids, kept
        if len(dialog) <= 1:
            alone = len(encode(system + [{"role": "user", "content": ""}])) if system else 0
            what = f"the system prompt alone is {alone} tokens" if alone > budget else \
                f"the message is {len(ids)} tokens"
            raise ValueError(f"{what}; the context leaves room for {budget}")
        dialog = dialog[2:]


def jinja_template(folder) -> tuple[str, dict] | None:
    """The chat template and special-token strings of a model folder (``tokenizer_settings``), or of a training
    output's (or checkpoint's) base model (``outputs.model_file``); None where there is none."""
    from bailong.outputs import model_file
    from bailong.tokenizer import CHAT_TEMPLATE_FILE, tokenizer_settings
    file = model_file(folder, CHAT_TEMPLATE_FILE) or model_file(folder, "tokenizer_config.json")
    return template_in(tokenizer_settings(file.parent), file.parent / "tokenizer_config.json") if file else None


def model_template(tokenizer, folder=None) -> tuple[str, dict] | None:
    """The Jinja chat template a model is used with (chat, SFT, bench), None for Llama 2's format: a
    tokenizer.json model's own tokenizer_config.json (it travels with the tokenizer, into an adapter and
    a run), else the model folder's."""
    settings = getattr(tokenizer, "settings", None)
    if settings:
        return template_in(settings, tokenizer.path.with_name("tokenizer_config.json"))
    return jinja_template(folder) if folder else None


def template_in(config: dict, file) -> tuple[str, dict] | None:
    """The chat template and special-token strings of a tokenizer_config.json's content (read from ``file``,
    its template from chat_template.jinja beside it where there is one: ``tokenizer_settings``)."""
    from bailong.errors import BailongError
    from bailong.tokenizer import CHAT_TEMPLATE_FILE
    if file and file.with_name(CHAT_TEMPLATE_FILE).is_file():
        file = file.with_name(CHAT_TEMPLATE_FILE)  # where a template error is
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
            raise BailongError(f'{file}: chat_template is a list, but not of {{"name": ..., "template": ...}} objects')
        template = next((t.get("template") for t in template if t["name"] == "default"), None)
    if not template:
        return None
    import jinja2
    try:
        _compiled(template)
    except (jinja2.TemplateSyntaxError, TypeError, RecursionError, MemoryError) as e:  # (nested too deep for the
        # compiler; a constant it folds too large)
        where = f"line {e.lineno}: {e.message}" if isinstance(e, jinja2.TemplateSyntaxError) else \
            "not a string" if isinstance(e, TypeError) else f"it cannot be compiled: {type(e).__name__}"
        raise BailongError(f"{file}: chat_template is not a Jinja template ({where})") from None
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return template, {name: token_text(config.get(name)) for name in names}


def turn_end_ids(tokenizer, template) -> set[int]:
    """The special tokens a template puts after an answer's text (<|eot_id|>, <|im_end|>, </s>): where an answer
    ends. Found by rendering a one-exchange conversation; empty if the template refuses it. A special token adds
    nothing to the text even after a word; alone, SentencePiece's lone "▁" (Llama 2's template writes one
    before </s>, and its answers before every digit) decodes to nothing too, but not after a word."""
    try:
        _, labels = template_example(tokenizer, template, [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Yes"}])
    except Exception:  # jinja2's errors, raise_exception's ValueError, and any a template's Python raises
        return set()
    word = tokenizer.encode("Yes")
    return {i for i in labels if i != -100 and tokenizer.decode(word + [i]) == tokenizer.decode(word)}


def template_example(tokenizer, template, messages) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation in the model's own chat template, and its labels: what the
    template adds for each assistant message after the generation prompt (the answer and its end-of-turn
    token, as far as the conversation that goes on writes them so) is learned, -100 elsewhere. The
    conversation is encoded whole, as a chat prompt is (encoded piece by piece, SentencePiece began each piece
    with a space, and BPE merged nothing across them); a token is learned where its text lies in an answer (a
    token only partly in an answer the template writes otherwise when it is the last message is not).
    Raises ValueError if a generation prompt is not how the conversation goes on, or an answer's text is not
    written as given (a template that drops reasoning)."""
    template, specials = template
    text = render_jinja(template, messages, specials, add_generation_prompt=False)
    ids, spans = tokenizer.encode_chat(text, specials, spans=True)
    answers = []  # (first, end) characters of each answer in text, and whether only whole tokens count
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("weight", 1):  # (weight 0: not to learn, as OpenAI's)
            continue
        prompt = render_jinja(template, messages[:i], specials, add_generation_prompt=True)
        if not text.startswith(prompt):
            raise ValueError("the chat template writes the conversation on otherwise than its generation prompt "
                             "asks (it moves the system prompt, or the prompt's last words, as turns come): "
                             "its answers cannot be marked for fine-tuning")
        full = render_jinja(template, messages[:i + 1], specials, add_generation_prompt=False)
        a, answer = len(prompt), message["content"].strip()
        stop, whole = len(full), False
        if not text.startswith(full):  # written last, an answer is written otherwise (Phi-3's eos after it,
            # Qwen3's empty reasoning before it): its text, then its turn's end as far as the conversation
            # writes the same, in whole tokens
            found, own = text.find(answer, a), full.find(answer, a)
            ends = os.path.commonprefix([full[own + len(answer):], text[found + len(answer):]])
            stop, whole = (a if min(found, own) < 0 else found + len(answer) + len(ends)), True
        if answer not in text[a:stop]:
            raise ValueError("the chat template does not write an answer's text as the conversation gives it (it "
                             "drops its reasoning, or an earlier answer's): its answers cannot be marked for "
                             "fine-tuning")
        answers.append((a, stop, whole))
    labels = [i if any(start < b and (end > a or start >= a) and (end <= b or not whole) for a, b, whole in answers)
              else -100 for i, (start, end) in zip(ids, spans)]
    return ids, labels


def render_jinja(template: str, messages, specials: dict, add_generation_prompt=True) -> str:
    """Render a Hugging Face chat template the way transformers' ``apply_chat_template`` does:
    a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, ``raise_exception``,
    ``tojson`` and ``strftime_now``, the messages, and the special-token strings."""
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                      documents=None, **{k: v for k, v in specials.items() if v is not None})


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """A template compiled once (compiling took nearly all of the time SFT's tokenizing took)."""
    import datetime
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"the chat template refuses these messages: {message}")

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: transformers marks the
        tags = {"generation"}  # assistant's text with it; we find it by rendering, so it writes what it holds

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env.from_string(template)

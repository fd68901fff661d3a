"""The Llama 2 chat format, and keeping a conversation inside the context window.

Meta's format wraps each exchange in its own ``<s>...</s>`` and merges the
system prompt into the first user message:

    <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user 1} [/INST] {answer 1}</s><s>[INST] {user 2} [/INST]

We tokenize each exchange as two parts, the prompt ``<s>[INST] ... [/INST]`` and
the answer ``{answer}</s>`` (SentencePiece's leading space is the space after
[/INST]), so that training can mask exactly the answer tokens and the chat
prompt is the same token sequence the model was trained on.
"""
from bailong.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


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
    """Token ids of a whole conversation and its labels: the answer ids, -100 (ignored) elsewhere."""
    ids, labels = [], []
    for prompt, answer in llama2_turns(tokenizer, messages):
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    return ids, labels


def fit_prompt(tokenizer: Tokenizer, messages, budget) -> tuple[list[int], list[dict]]:
    """The prompt ids for ``messages``, dropping the oldest exchanges until at most
    ``budget`` tokens remain; the system prompt is always kept. Returns the ids and
    the messages that were kept. Raises ValueError if even the last turn is too long.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    dialog = messages[len(system):]
    if dialog and dialog[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn to be answered")
    while True:
        kept = system + dialog
        ids = [i for prompt, answer in llama2_turns(tokenizer, kept) for i in prompt + answer]
        if len(ids) <= budget:
            return ids, kept
        if len(dialog) <= 1:
            raise ValueError(f"the message is {len(ids)} tokens; the context leaves room for {budget}")
        dialog = dialog[2:]

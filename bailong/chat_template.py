"""The Llama 2 chat format, and keeping a conversation inside the context window.

Meta's reference tokenises a dialogue turn by turn, each finished exchange as
its own ``<s>...</s>`` sequence, and merges the system prompt into the first
user message:

    <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user 1} [/INST] {answer 1} </s><s>[INST] {user 2} [/INST]
"""
from bailong.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def llama2_turns(tokenizer: Tokenizer, messages) -> list[list[int]]:
    """Token ids of each exchange; the last is the open user turn the model answers.

    ``messages``: [{"role": "system"|"user"|"assistant", "content": str}, ...], an
    optional system message first, then user and assistant alternating, ending
    with a user message.
    """
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    dialog = messages[1:] if system is not None else messages
    roles = [m["role"] for m in dialog]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]) \
            or not roles or roles[-1] != "user":
        raise ValueError(f"expected user/assistant turns alternating and ending with user, got {roles}")
    turns = []
    for i in range(0, len(dialog), 2):
        user = dialog[i]["content"].strip()
        if i == 0 and system:
            user = B_SYS + system + E_SYS + user
        if i + 1 < len(dialog):
            answer = dialog[i + 1]["content"].strip()
            turns.append(tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True))
        else:
            turns.append(tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True))
    return turns


def fit_prompt(tokenizer: Tokenizer, messages, budget) -> tuple[list[int], list[dict]]:
    """The prompt ids for ``messages``, dropping the oldest exchanges until at most
    ``budget`` tokens remain; the system prompt is always kept. Returns the ids and
    the messages that were kept. Raises ValueError if even the last turn is too long.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    dialog = messages[len(system):]
    while True:
        kept = system + dialog
        ids = [i for turn in llama2_turns(tokenizer, kept) for i in turn]
        if len(ids) <= budget:
            return ids, kept
        if len(dialog) <= 1:
            raise ValueError(f"the message is {len(ids)} tokens; the context leaves room for {budget}")
        dialog = dialog[2:]

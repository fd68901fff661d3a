"""Zip-tie embedding: start each added token from the byte-level tokens it replaces.

Llama 2 spells most Traditional Chinese characters as three UTF-8 byte pieces
(臺 = <0xE8> <0x87> <0xBA>). When the vocabulary gains the piece 臺, the model
already knows that byte sequence; zip-tie "ties the bytes back together" by
building the new rows from the rows of the ids the ORIGINAL tokenizer gives
the piece's text, t_1..t_k:

    input embedding:  e_new = (1/k) * sum_i e_{t_i}
    output (LM head): h_new = (1/k) * sum_i h_{t_i}         (method "zip-tie", the default)
                      h_new = h_{t_1}                       (method "zip-tie-first")

Why this lowers the initial loss: a token whose input row averages its pieces'
rows lands in the region of embedding space the model used for that text, so
the layers above see something familiar rather than noise; its head row makes
the model give the new token about the logits it gave that text's pieces,
instead of an arbitrary score.

The head rule was chosen by measurement. The position that now predicts the
new token is where the original model predicted the piece's FIRST byte, which
argues for h_{t_1}; but that row makes the new token a copy of its first piece,
equally likely wherever that piece was, including where the text continues
differently. On the stories260K model (frequent id pairs and triples of its own
samples merged into new tokens; held-out loss in nats per original token, with
25 / 50 / 100 new tokens) the mean won every time:

    zip-tie (mean head)    6.668 / 6.954 / 7.016
    zip-tie-first          6.707 / 7.047 / 7.203
    mean-all               7.042 / 7.347 / 7.516
    random                 7.836 / 8.425 / 9.041     (original model: 2.832)

Our reading of the paper: it describes initialising new embeddings from their
byte-level tokens, but its exact formula is not available to us; both rules
above are our reading, the numbers are ours (docs/BENCHMARKS.md; tests/test_zip_tie.py
repeats the comparison at a smaller size, 38 new tokens, where the order is the same).
"mean-all" uses the mean of all old rows and "random" draws from a normal with the
old rows' standard deviation, for comparison.
"""
import torch
from torch import nn

from bailong.config import INIT_METHODS as METHODS


def piece_ids(base, extended) -> dict[int, list[int]]:
    """For each id the extended tokenizer adds, the ids the base tokenizer gives its text.

    The text is encoded on its own, without SentencePiece's dummy leading space,
    so a piece "臺灣" maps to its bytes and "▁臺灣" to "▁" plus its bytes. A
    byte-level BPE token's bytes go through the base's BPE model alone (no
    pre-tokenizer), which is how the base splits them inside a word.
    """
    from bailong.tokenizer import JsonTokenizer
    if isinstance(base, JsonTokenizer):
        return {new_id: [t.id for t in base.tk.model.tokenize(extended.tk.id_to_token(new_id))]
                for new_id in range(base.vocab_size, extended.vocab_size)}
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(base.sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    plain = SentencePieceProcessor(model_proto=proto.SerializeToString())
    mapping = {}
    for new_id in range(base.vocab_size, extended.vocab_size):
        text = extended.sp.id_to_piece(new_id).replace("\u2581", " ")
        mapping[new_id] = plain.encode(text)
    return mapping


def resize_vocab(model, vocab_size):
    """Grow the input embedding and the LM head to ``vocab_size`` rows; old rows stay as they are.

    New rows start at zero: fill them with ``init_new_rows``.
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"resize_vocab grows the vocabulary; {vocab_size} < {old}")
    for name in ("model.embed_tokens", "lm_head"):
        module = model.get_submodule(name)
        if type(module) not in (nn.Embedding, nn.Linear):
            raise ValueError(f"resize {name} before wrapping it (it is a {type(module).__name__})")
        w = module.weight
        grown = torch.zeros(vocab_size, w.shape[1], dtype=w.dtype, device=w.device)
        grown[:old] = w.detach()
        module.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
        if isinstance(module, nn.Embedding):
            module.num_embeddings = vocab_size
        else:
            module.out_features = vocab_size
    model.config.vocab_size = vocab_size
    model.tie_weights()
    model.vocab_grown_from = getattr(model, "vocab_grown_from", old)  # an adapter saved of it takes the new rows
    return model


@torch.no_grad()
def init_new_rows(model, mapping: dict[int, list[int]], method="zip-tie", seed=0):
    """Fill the rows of the new ids (the keys of ``mapping``) by ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown initialisation {method!r}; choose from {', '.join(METHODS)}")
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    old = min(mapping)
    generator = torch.Generator().manual_seed(seed)
    tied = head.data_ptr() == embed.data_ptr()  # one matrix: its rows follow the embedding's rule
    for rows, is_head in ((embed, False),) + (() if tied else ((head, True),)):
        known = rows[:old].float()
        for new_id, ids in sorted(mapping.items()):
            if method == "mean-all":
                row = known.mean(0)
            elif method == "random":
                row = torch.randn(rows.shape[1], generator=generator).to(rows.device) * known.std()
            elif is_head and method == "zip-tie-first":
                row = known[ids[0]]
            else:
                row = known[ids].mean(0)
            rows[new_id] = row.to(rows.dtype)
    return model


def extends(base, extended) -> bool:
    """Whether ``extended`` gives every id of ``base`` to the same piece (an extension only appends)."""
    if extended.vocab_size <= base.vocab_size or type(base) is not type(extended):
        return False
    if hasattr(base, "sp"):
        return all(base.sp.id_to_piece(i) == extended.sp.id_to_piece(i) for i in range(base.vocab_size))
    theirs = extended.tk.get_vocab(with_added_tokens=True)
    return all(theirs.get(token) == i for token, i in base.tk.get_vocab(with_added_tokens=True).items())


def extend_model(model, base, extended, method="zip-tie", seed=0):
    """Resize ``model`` from ``base``'s vocabulary to ``extended``'s and initialise the new rows (``random``
    ones drawn from ``seed``). A model with rows past ``base``'s ids (a vocabulary padded for speed) gives the
    new ids those rows first: no token reached them."""
    if model.config.vocab_size < base.vocab_size:
        raise ValueError(f"the model has {model.config.vocab_size} embeddings, fewer than the base tokenizer's "
                         f"{base.vocab_size} ids")
    if not extends(base, extended):
        raise ValueError("the extended tokenizer does not keep every id of the base tokenizer")
    resize_vocab(model, max(model.config.vocab_size, extended.vocab_size))
    return init_new_rows(model, piece_ids(base, extended), method, seed)

"""What one QLoRA step of ours computes and moves, counted without running it (``bench/bench_train.py --count``):
the matmuls' FLOPs on the meta device, the NF4 dequantization's and AdamW's bytes by arithmetic."""
import json

import torch


def count(config, args):
    """What one step of ours computes, counted on the meta device (nothing is run or allocated): the matmuls'
    FLOPs (forward, the checkpointed layers' recomputation, backward) on the path train.py takes (set
    BAILONG_FUSED_LORA=0 for the plain one: the same count), and attention's; beside them, by arithmetic, the
    bytes the NF4 weights' dequantization moves (packed codes and absmax read, bf16 written, before every
    matmul with them) and those fused AdamW moves. At the fastest rates a GPU reaches, their times add up to
    a floor that no implementation of the recipe with activation checkpointing goes under (docs/BENCHMARKS.md)."""
    import bailong
    from bailong.lora import LoRAConfig, inject_lora, mark_only_lora_trainable
    from bailong.quantized import PROJECTIONS, projections
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = bailong.Llama(config).to(torch.bfloat16)
    # NF4 on the GPU, dense here: the same FLOPs but for down's rank-r product (x A^T) B^T, which the plain
    # path's recomputation skips too on an NF4 base. Dequantized for each matmul with it (as a test counts on
    # a real NF4 step): forward, recomputation (not down's: it stops before the layer's last product) and
    # backward (not layer 0's q, k and v when the embedding trains nothing: no dL/dx)
    no_dx = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"] if not args.embedding_and_head else []
    dequantized = sum(m.weight.numel() * (3 - name.endswith("down_proj") - (name in no_dx))
                      for name, m in projections(model))
    # with the recomputation's copies kept for the backward (bailong.recompute): every weight twice, for the
    # forward and then for the recomputation (whose copy serves the backward too), or, for down, which the
    # recomputation does not multiply by, for the backward
    kept = 2 * sum(m.weight.numel() for _, m in projections(model))
    # with the MLP in chunks (bailong.memory.ChunkedMLP): gate, up and down once for all the forward's chunks and
    # once for all the backward's (the recomputation skips the chunks), the attention's as without
    chunked = sum(m.weight.numel() * (2 if ".mlp." in name else 3 - (name in no_dx)) for name, m in projections(model))
    targets = PROJECTIONS + (("embed_tokens", "lm_head") if args.embedding_and_head else ())
    mark_only_lora_trainable(inject_lora(model, LoRAConfig(r=args.rank, dropout=args.dropout, targets=targets)))
    model.checkpointing = True
    model.train()
    ids = torch.zeros((args.batch, args.seq_len + 1), dtype=torch.long, device="meta")
    # the fused path adds into its matmuls' outputs in place (addmm_), which torch's table leaves out
    in_place = {torch.ops.aten.addmm_: lambda _, a, b, out_shape=None, **scalars: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        model(ids[:, :-1], targets=ids[:, 1:]).backward()
    flops = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = flops.pop("bmm", 0)  # on the meta device attention is the math path's two batched matmuls
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nf4_bytes = dequantized * (0.5 + 1 / 64 + 2)  # codes and absmax read, bf16 written
    tokens = args.batch * args.seq_len
    print(f"{args.preset} ({config.num_hidden_layers} layers), sequence {args.seq_len}, batch {args.batch}, LoRA "
          f"r={args.rank} ({trained:,} trained), activation checkpointing; one step, counted on the meta device:")
    kinds = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in flops.items())
    print(f"  matmuls {sum(flops.values()) / 1e12:.2f} TFLOP ({kinds}; {sum(flops.values()) / tokens / 1e9:.1f} "
          "GFLOP a token)")
    print(f"  attention {attention / 1e12:.2f} TFLOP as counted, the whole T x T (a causal kernel skips about half)")
    print(f"  NF4 dequantization {nf4_bytes / 1e9:.1f} GB moved ({dequantized / 1e9:.2f} G weights dequantized, one "
          f"for each matmul with them); {nf4_bytes * kept / dequantized / 1e9:.1f} GB with the recomputation's "
          f"copies kept for the backward; {nf4_bytes * chunked / dequantized / 1e9:.1f} GB with the MLP in chunks")
    adamw_bytes = trained * (16 if args.optimizer == "adamw8bit" else 28)
    kind = "8-bit" if args.optimizer == "adamw8bit" else "fused"
    print(f"  {kind} AdamW {adamw_bytes / 1e9:.1f} GB moved (parameter, gradient and two moments read, parameter and "
          "moments written)")
    print(json.dumps({"matmul_flops": sum(flops.values()), "attention_flops": attention, "nf4_bytes": nf4_bytes,
                      "nf4_bytes_kept": nf4_bytes * kept / dequantized,
                      "nf4_bytes_chunked_mlp": nf4_bytes * chunked / dequantized,
                      "adamw_bytes": adamw_bytes, "trainable": trained}))

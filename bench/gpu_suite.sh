#!/usr/bin/env bash
# Everything that needs a GPU, in one go: correctness first, then the timings the docs record.
#
#   bash bench/gpu_suite.sh                  # the default parts (all but first and pdl), with no time limit
#   bash bench/gpu_suite.sh tests kernels    # some: tests, kernels, reads, attention, decode, pdl, host, first,
#                                            # train, train-8bit, train-long, train-dropout, model
#   GPU_SUITE_SECONDS=540 bash bench/gpu_suite.sh tests kernels decode first    # as much as fits in 9 minutes
#
# Each part prints under its own heading and a failing part does not stop the others; the
# exit status is the number of parts that failed or ran out of time. With GPU_SUITE_SECONDS
# the parts share that many seconds, in the order given: a part is stopped when they are
# spent, and one not begun with under a minute left is skipped. Each part's time is printed,
# and a summary last. ``first`` is the training targets' first look: setting (a) with the
# fastest paths, eager and replayed from a CUDA graph, and setting (b) with the leanest, each against
# transformers+PEFT+bitsandbytes.
# The training parts share one random Llama-2-7B checkpoint (bench_train.py --checkpoint), written by the
# first of them and removed at the end.
cd "$(dirname "$0")/.." || exit 1
parts=("${@:-tests kernels reads attention decode host train train-8bit train-long train-dropout model}")
known=" tests kernels reads attention decode pdl host first train train-8bit train-long train-dropout model "
for part in ${parts[*]}; do  # a misspelt part is answered before any other has used the GPU
    if [[ $known != *" $part "* ]]; then
        echo "unknown part: $part (${known# })"
        exit 1
    fi
done
unset TRITON_INTERPRET  # the kernels compiled for the GPU, not interpreted
export PYTHONUNBUFFERED=1  # a part stopped by its time limit keeps what it printed
export HF_HUB_OFFLINE=1  # nothing here reads the network
scratch=$(mktemp -d) || exit 1
trap 'rm -rf -- "$scratch"' EXIT
checkpoint=$scratch/llama2-7b
train=(python bench/bench_train.py --checkpoint "$checkpoint")
# the package itself, over whatever torch and triton the machine has (without --no-deps pip would pin torch):
# with a fresh setuptools from the index where one is reachable, else with the machine's own (64 or newer)
if ! python -c "import bailong_kernels" 2>/dev/null; then
    pip install -q --no-deps -e . 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . || {
        echo "cannot install the package: pip install -e . needs the package index or setuptools>=64 with wheel"
        exit 1
    }
fi
# wheels put in bench/wheels (ignored by git) for a machine that cannot reach the package index: bitsandbytes,
# which the comparisons need (pip download bitsandbytes==0.50.2 --no-deps -d bench/wheels, where the index is)
for wheel in bench/wheels/*.whl; do
    [[ -e $wheel ]] && { pip install -q --no-deps "$wheel" || echo "cannot install $wheel"; }
done
python -c "import bitsandbytes" 2>/dev/null || echo "bitsandbytes is absent: every row and column against it fails or " \
    "stays empty (put its wheel in bench/wheels)"
# the versions every figure below depends on (the kernels compile differently under each Triton: docs/BENCHMARKS.md)
python - <<'VERSIONS'
from importlib import metadata, util
import torch
names = ("torch", "triton", "bitsandbytes", "transformers", "peft", "accelerate", "sentencepiece")  # as imported
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu}, CUDA {torch.version.cuda}; "
      + ", ".join(f"{n} {metadata.version(n) if util.find_spec(n) else 'absent'}" for n in names))
VERSIONS
budget=${GPU_SUITE_SECONDS:-0}  # 0: no limit
failed=0
summary=()
run() {
    local name=$1 limit=() left=$((budget - SECONDS))
    if ((budget)); then
        if ((left < 60)); then
            echo "==== $name skipped: $left s of GPU_SUITE_SECONDS left"
            summary+=("$name: skipped") && failed=$((failed + 1)) && return
        fi
        limit=(timeout --kill-after=10 "$left")  # the part's process group: its row subprocesses too
    fi
    echo "==== $name: ${*:2}"
    local start=$SECONDS status=ok
    "${limit[@]}" "${@:2}"
    case $? in
        0) ;;
        124 | 137) status="stopped: GPU_SUITE_SECONDS spent" && echo "==== $name $status" ;;
        *) status=FAILED && echo "==== $name FAILED" ;;
    esac
    [[ $status == ok ]] || failed=$((failed + 1))
    summary+=("$name: $status, $((SECONDS - start)) s")
    echo "==== $name took $((SECONDS - start)) s"
}
for part in ${parts[*]}; do
    case $part in
        tests)   run tests python -m pytest -q -m gpu tests ;;
        kernels) run kernels python bench/bench_nf4_matmul.py ;;
        reads)   run reads python bench/bench_gemv_reads.py ;;  # the GEMV against its reads without its work
        attention) run attention python bench/bench_attention.py ;;  # SDPA's kernels at the settings' shapes
        decode)  run decode python bench/bench_decode.py ;;
        pdl)     run pdl-test python -m pytest -q -m gpu tests/test_gpu.py -k programmatic  # PDL: the same bits,
                 run pdl-kernels python bench/bench_nf4_matmul.py --m 1,4 --sweep ""  # then its time
                 run pdl-decode python bench/bench_decode.py --batch 1 --limit 5 --profile ;;  # and where it goes
        host)    run host python bench/bench_host.py ;;  # this machine's CPU issuing a step: beside train's profile
        first)   run first-recipe "${train[@]}" --setting recipe --rows ours ours-all ours-graph theirs
                 run first-long "${train[@]}" --setting long --rows ours-lean theirs ;;
        train)   run train "${train[@]}" --setting recipe --profile \
                 --rows ours ours-fused ours-autograd ours-layers ours-all ours-offload ours-keep ours-grads \
                        ours-offload-grads ours-casts-grads ours-leanest ours-plain-graph ours-graph ours-keep-graph \
                        theirs ;;  # each loads
        train-8bit) run train-8bit "${train[@]}" --setting recipe --optimizer adamw8bit \
                    --rows ours ours-all theirs ;;  # AdamW's moments in 8 bits, both sides
        train-long) run train-long "${train[@]}" --setting long \
                    --rows ours-all ours-offload ours-attention ours-offload-attention ours-cudnn \
                           ours-offload-attention-cudnn ours-mlp ours-lean theirs theirs-cudnn ;;  # minutes a row
        train-dropout) run train-dropout "${train[@]}" --setting long --dropout 0.05 \
                       --rows ours-all ours-graph ours-torch-dropout theirs ;;  # the kernels' dropout, graphed too
        model)   run model python bench/bench_model_gpu.py ;;
    esac
done
echo "==== summary"
printf '%s\n' "${summary[@]}"
exit $failed

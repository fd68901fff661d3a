"""A training step's forward and backward captured once as a CUDA graph and replayed (``train.py --cuda-graph``).

Eagerly, a QLoRA step issues about a hundred kernels a layer, forward and backward,
and the host's Python between them (about 1.8 ms a layer on a CPU machine:
``bench/bench_host.py``) can leave the GPU waiting, most where kernels are small. A
CUDA graph issues the whole step, every micro-batch's forward and backward, in one
launch. That is legal because every step touches the same memory: the batches are
copied into the graph's own input buffers, and the gradients are the graph's own
tensors (the first micro-batch's backward makes them, the others add to them, as
eagerly), given back to the parameters after each replay. Clipping, the optimizer
and evaluation stay eager, outside the graph.

What a step must be to be captured: the same shapes every step (train.py's batches
are), no host work that waits on the device's values (no ``.item()``; the loss stays
on the device), and no random state read or restored on the host. torch's dropout
fails that: activation checkpointing draws a layer's masks again in the backward by
restoring the generator's state, which a replay would not do. LoRA dropout's kernels
pass it: a forward draws one seed on the device, a captured random kernel that each
replay runs anew, and a recomputation takes the forward's keys from it again
(``bailong.recompute.MaskSeeds``). So a step with LoRA dropout is captured on the
fused LoRA path with the training layer kernels (``dropout_captured``; train.py's
default on CUDA), else only with ``--lora-dropout 0``; and train.py takes ``--cuda-graph``
for one process, activations kept on the GPU.

The first ``warmup`` steps run eagerly, on the side stream the graph is then captured
on: Triton's compiles, cuBLAS's handles and lazily made tensors settle there, not
in the capture. The next step is captured and replayed, and so is every one after.
A capture that fails is warned about, and training goes on without a graph (torch's
own notes say a failed capture can leave its allocator in odd states: where the
warning appears, running again without the graph is the safe course).

The graph keeps the memory its capture freed (the step's activations) for its
replays: evaluation and the optimizer take theirs beside it.
"""
import contextlib
import warnings

import torch

from bailong import lora_fused
from bailong.errors import BailongWarning
from bailong.lora import LoRALinear
from bailong.lora_casts import forget_casts
from bailong.recompute import forget_kept


def accumulate(loss_of, inputs, targets, normalizer=None):
    """Each micro-batch's forward and backward, ``loss_of(inputs[i], targets[i])`` (the mean over its targeted
    tokens, those not -100) weighted by its share of the step's targeted tokens: the mean loss over all of them,
    left on the device (reading it waits for the step), and its gradients summed in ``.grad``. So micro-batches
    train as one batch of them all would, where SFT's answers of a few tokens and of hundreds are learned
    token by token alike. ``normalizer`` (``processes_normalizer``): the backward's divisor in place of these
    micro-batches' targeted tokens; the loss returned is then the mean over every process's targeted tokens too,
    as the gradient is, the same in each. The parts are added in float64, as Python adds the floats read from
    each."""
    counts = (targets != -100).flatten(1).sum(1)  # (micro-batches,)
    tokens = counts.sum().clamp(min=1)
    total = 0
    for x, y, n in zip(inputs, targets, counts):
        loss = loss_of(x, y) * (n / tokens)
        (loss if normalizer is None else loss * (tokens / normalizer)).backward()
        total = total + loss.detach().double()
    if normalizer is not None:  # each process's mean weighted by its share of the targeted tokens
        import torch.distributed as dist
        total = total * (tokens / normalizer)
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return total


def processes_normalizer(targets, device):
    """For ``accumulate`` in each of several processes, whose gradients DDP averages: all the processes'
    targeted tokens of the step over their number, so that the averaged gradient is that of the mean loss over
    every targeted token of every process (``targets``: this process's, its micro-batches')."""
    import torch.distributed as dist
    tokens = (targets != -100).sum().to(device)
    dist.all_reduce(tokens)
    return tokens.clamp(min=1) / dist.get_world_size()


class GraphedStep:
    """``accumulate(loss_of, ...)`` for ``model``'s trained parameters, captured in a CUDA graph after ``warmup``
    eager steps."""

    def __init__(self, loss_of, model, warmup=2):
        self.loss_of, self.warmup = loss_of, warmup
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.device = self.parameters[0].device
        if not dropout_captured(model, self.device):
            raise ValueError("a captured step draws LoRA dropout's masks only through its kernels (the fused LoRA path "
                             "with the training layer kernels): torch's dropout is drawn again in a checkpointed "
                             "layer's backward from a random state restored on the host. Switch them on, or set "
                             "LoRA dropout to 0")
        self.graph = self.stream = self.inputs = self.targets = self.loss = None
        self.grads, self.eager_steps, self.failed = [], 0, None  # failed: why a capture failed

    def __call__(self, inputs, targets):
        """The mean loss of the micro-batches ``inputs`` and ``targets`` (micro-batches, batch, sequence) as
        ``accumulate`` gives it; once captured, the graph's own tensor, to be read before the next call."""
        if self.graph is None:
            if self.stream is None:
                with torch.cuda.device(self.device):
                    self.stream = torch.cuda.Stream()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            if self.eager_steps < self.warmup or not self._capture(inputs, targets):
                self.eager_steps += 1
                with self._side_stream():
                    return accumulate(self.loss_of, inputs, targets)
        if (inputs.shape, targets.shape) != (self.inputs.shape, self.targets.shape):
            raise ValueError(f"the CUDA graph was captured for batches of {tuple(self.inputs.shape)}, not "
                             f"{tuple(inputs.shape)}: a graph replays one shape")
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay()
        for p, grad in zip(self.parameters, self.grads):  # an eager zero_grad(set_to_none=True) let them go
            p.grad = grad
        return self.loss

    @contextlib.contextmanager
    def _side_stream(self):
        """Within: this step's stream current, after what the current stream had issued; at its end, the
        current stream waits for it (the optimizer reads the gradients made here)."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)

    def _capture(self, inputs, targets) -> bool:
        """Capture the step (nothing runs); False, warned about, where it cannot be captured."""
        for p in self.parameters:
            p.grad = None  # made inside the graph, by the first micro-batch's backward
        graph, current = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=self.stream):
                loss = accumulate(self.loss_of, inputs, targets)
        except Exception as e:  # an operation that cannot be captured
            self.failed = capture_failure(e)
            warnings.warn(f"CUDA graph capture failed, training without it: {self.failed}", BailongWarning,
                          stacklevel=3)
            for p in self.parameters:
                p.grad = None
            self.warmup = float("inf")
            return False
        finally:  # a failed capture leaves its stream current: put ours back
            torch.cuda.set_stream(current)
            forget_casts()  # the copies the capture made hold nothing until a replay: not for eager use
            forget_kept()
        self.graph, self.loss, self.inputs, self.targets = graph, loss, inputs, targets
        self.grads = [p.grad for p in self.parameters]
        return True


def dropout_captured(model, device) -> bool:
    """Whether a CUDA graph of ``model``'s training step on ``device`` draws the masks eager steps draw: it has no
    dropout, or only LoRA dropout on the fused path (``LoRALinear.fused``) through the kernels
    (``bailong.lora_fused.seeded_dropout``), keyed on the device (``bailong.recompute.MaskSeeds``)."""
    fused = {id(m.dropout) for m in model.modules() if isinstance(m, LoRALinear) and m.fused()}
    dropped = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p]
    return not dropped or (all(id(m) in fused for m in dropped)
                           and lora_fused.seeded_dropout(torch.empty(0, device=device)) is not None)


def capture_failure(e) -> str:
    """Why a capture failed, in a line. On CUDA the operation that cannot be captured invalidates the capture, and
    leaving ``torch.cuda.graph`` then raises an error of its own: the first is named, then that one."""
    def line(error):
        return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    cause = e.__context__
    return line(e) if cause is None or cause is e else f"{line(cause)} (then {line(e)})"

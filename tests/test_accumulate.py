"""bailong.step_graph.accumulate: how a step's micro-batches add up, eagerly or in a CUDA graph: each weighted by its
share of the step's targeted tokens, the parts added as Python adds floats."""
import torch

from test_step_graph import qlora_model


def test_the_mean_loss_adds_its_parts_as_python_adds_the_floats_read():
    """train.py logs a step's loss once, from the device: the same number it logged when it read each
    micro-batch's loss and added the floats (in float32 the small part would be lost)."""
    from bailong.step_graph import accumulate
    parts = [torch.tensor(v, requires_grad=True) for v in (1.0, 1e-8, 3.3, 7.1)]  # float32
    mean = accumulate(lambda i, _: parts[i] * 1, range(4), torch.zeros(4, 1))  # a targeted token each
    assert mean.item() == sum((p / 4).item() for p in parts) != sum(p / 4 for p in parts).item()
    assert [p.grad.item() for p in parts] == [0.25] * 4


def test_micro_batches_train_as_one_batch_of_them_all():
    """SFT's answers differ in length: a step's micro-batches weigh each targeted token alike, as one batch of them
    all does (each micro-batch's mean used to weigh alike: an answer of 2 tokens as much as one of 16)."""
    from bailong.step_graph import accumulate
    model = qlora_model(torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 2, 17), generator=torch.Generator().manual_seed(0))
    targets = ids[..., 1:].clone()
    targets[0, :, :14] = -100  # 2 targeted tokens a row in the first micro-batch, 16 in the second

    def step(inputs, targets):
        loss = accumulate(lambda x, y: model(x, targets=y), inputs, targets)
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return loss, grads
    (one, one_grads), (two, two_grads) = step(ids[None, :, :, :-1].flatten(1, 2), targets.flatten(0, 1)[None]), \
        step(ids[..., :-1], targets)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=0)
    for ours, theirs in zip(two_grads, one_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)

"""The full-softmax loss made a block of positions at a time (pretraining.losses): the loss
and gradients of one cross-entropy over the whole logits, without keeping those logits.

Both compute the same float32 sums in another order (per block, and softmax's max and sum
instead of log_softmax's), so they agree to float32 rounding: torch.testing's float32
tolerance (rtol 1.3e-6, atol 1e-5), not bitwise."""

import pytest
import torch
import torch.nn.functional as F

import peftrec.pretraining.losses as losses
from peftrec.pretraining.losses import full_softmax_loss

POSITIONS, NUM_ITEMS, WIDTH = 23, 40, 8


def whole_logits_loss(states, catalog, targets, item_offsets=None):
    """The loss as one F.cross_entropy over every position's logits [..., N]."""
    logits = states @ catalog[1:].T
    if item_offsets is not None:
        logits = logits + item_offsets[..., 1:]
    return F.cross_entropy(logits.flatten(0, -2), (targets - 1).flatten(), ignore_index=-1)


def inputs(offsets: str | None):
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(POSITIONS, WIDTH, generator=generator).requires_grad_()
    catalog = (3 * torch.randn(NUM_ITEMS + 1, WIDTH, generator=generator)).requires_grad_()
    targets = torch.randint(1, NUM_ITEMS + 1, (POSITIONS,), generator=generator)
    targets[::4] = 0  # padding positions: no target
    shape = {"per position": (POSITIONS, NUM_ITEMS + 1), "shared": (NUM_ITEMS + 1,)}
    tensors = [states, catalog]
    if offsets is not None:
        tensors.append(torch.randn(shape[offsets], generator=generator).requires_grad_())
    return tensors, targets


@pytest.fixture
def five_position_blocks(monkeypatch):
    """Blocks of 5 positions: 23 positions make four whole blocks and a partial one."""
    monkeypatch.setattr(losses, "logit_block_rows", lambda num_items, device: 5)


@pytest.mark.parametrize("offsets", [None, "per position", "shared"])
def test_loss_and_gradients_equal_one_cross_entropy_over_the_whole_logits(
        offsets, five_position_blocks):
    tensors, targets = inputs(offsets)
    results = []
    for loss_function in (whole_logits_loss, full_softmax_loss):
        for tensor in tensors:
            tensor.grad = None
        loss = loss_function(tensors[0], tensors[1], targets, *tensors[2:])
        loss.backward()
        results.append([loss.detach()] + [tensor.grad.clone() for tensor in tensors])
    expected, blockwise = results
    for got, want in zip(blockwise, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert blockwise[2][0].abs().sum() == 0  # padding (row 0) is never a candidate


def test_positions_keep_their_shape_and_no_gradient_mode_gives_the_same_loss(
        five_position_blocks):
    (states, catalog), targets = inputs(None)
    expected = whole_logits_loss(states, catalog, targets)
    batched = full_softmax_loss(states.view(1, POSITIONS, WIDTH), catalog, targets.view(1, -1))
    torch.testing.assert_close(batched, expected)
    with torch.no_grad():
        torch.testing.assert_close(full_softmax_loss(states, catalog, targets), expected)


def test_a_large_logit_gap_gives_the_exact_loss_not_infinity():
    # The target's probability underflows to 0 in float32; the loss is still lse - logit.
    states = torch.tensor([[1.0]])
    catalog = torch.tensor([[0.0], [200.0], [-10.0]])
    loss = full_softmax_loss(states, catalog, torch.tensor([2]))
    torch.testing.assert_close(loss, torch.tensor(210.0))


def test_no_logits_of_every_position_are_kept_for_the_backward(five_position_blocks):
    (states, catalog), targets = inputs(None)
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        full_softmax_loss(states, catalog, targets)
    assert saved_shapes  # the gradients themselves are kept
    assert all(shape[-1] != NUM_ITEMS for shape in saved_shapes), saved_shapes


def test_a_frozen_catalog_leaves_the_states_gradient_unchanged(five_position_blocks):
    (states, catalog), targets = inputs(None)
    catalog.requires_grad_(False)
    whole_logits_loss(states, catalog, targets).backward()
    expected, states.grad = states.grad, None
    full_softmax_loss(states, catalog, targets).backward()
    torch.testing.assert_close(states.grad, expected)
    assert catalog.grad is None


def test_seen_items_get_the_bias_once_as_dense_offsets_would(five_position_blocks):
    (states, catalog), targets = inputs(None)
    generator = torch.Generator().manual_seed(2)
    seen_ids = torch.randint(0, NUM_ITEMS + 1, (POSITIONS, 6), generator=generator)
    seen_ids[:, 1] = seen_ids[:, 0]  # listed twice: still one bias
    bias = torch.tensor(-0.8, requires_grad=True)
    indicator = torch.zeros(POSITIONS, NUM_ITEMS + 1).scatter_(1, seen_ids, 1.0)
    results = []
    for loss in (lambda: whole_logits_loss(states, catalog, targets, bias * indicator),
                 lambda: full_softmax_loss(states, catalog, targets, seen_ids=seen_ids,
                                           seen_bias=bias)):
        for tensor in (states, catalog, bias):
            tensor.grad = None
        value = loss()
        value.backward()
        results.append([value.detach(), states.grad, catalog.grad, bias.grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


def test_mixed_precision_states_train_a_float32_catalog(five_position_blocks):
    """Under bf16 autocast the backbone's states are bf16 while the item table stays float32
    (what `--mixed-precision bf16` gives): each gradient comes back in its input's dtype and
    close to the whole-logits loss under the same autocast."""
    (states, catalog), targets = inputs(None)
    results = []
    for loss_function in (whole_logits_loss, full_softmax_loss):
        states.grad = catalog.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_function(states.to(torch.bfloat16), catalog, targets)
        loss.backward()
        assert states.grad.dtype == catalog.grad.dtype == torch.float32
        results.append((loss.detach().float(), states.grad.clone(), catalog.grad.clone()))
    for got, want in zip(*reversed(results), strict=True):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)  # bf16: 8 bits of mantissa

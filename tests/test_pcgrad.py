"""PCGrad (--pcgrad): the projection of conflicting gradients, the combined gradient it
backpropagates, and a training run with it."""

import pytest
import torch

from peftrec.pretraining import trainer
from peftrec.pretraining.pcgrad import pcgrad_objective, project_conflicting
from tests.helpers import run_pretrain

DIFFREC = ["--backbone", "diffrec", "--preset", "none", "--diffusion-steps", "20",
           "--num-seeds", "2", "--max-len", "10", "--num-layers", "1"]


@pytest.mark.parametrize("seed", range(5))
def test_projected_gradients_have_no_negative_inner_product(seed):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(50, generator=generator, dtype=torch.float64)
    second = torch.randn(50, generator=generator, dtype=torch.float64) - first  # conflicting
    assert first @ second < 0
    projected = project_conflicting([first, second])
    assert projected[0] @ projected[1] >= 0
    # Each has lost exactly its component along the other.
    assert abs(projected[0] @ second) < 1e-9
    assert abs(projected[1] @ first) < 1e-9


def gradients_of(objective: torch.Tensor, parameters) -> list[torch.Tensor]:
    return list(torch.autograd.grad(objective, parameters, retain_graph=True))


def test_agreeing_terms_sum_as_without_pcgrad():
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    shared_input = torch.tensor([3.0, 1.0])
    terms = [(weight @ shared_input) ** 2, 2 * (weight @ shared_input)]  # same direction
    plain = gradients_of(sum(terms), [weight])
    combined = gradients_of(pcgrad_objective(terms, [weight]), [weight])
    torch.testing.assert_close(combined, plain)


def test_conflicting_terms_are_projected_on_shared_parameters_only():
    shared = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    own = torch.nn.Parameter(torch.tensor([2.0]))  # reached by the first term alone
    unused = torch.nn.Parameter(torch.tensor([5.0]))
    pull = shared @ torch.tensor([1.0, 0.0]) + (own ** 2).sum()  # gradients (1, 0) and 4
    push = shared @ torch.tensor([-1.0, 1.0])  # (-1, 1): conflicts with (1, 0)
    parameters = [shared, own, unused]
    combined = gradients_of(pcgrad_objective([pull, push], parameters), parameters)
    # (1, 0) less its part along (-1, 1) is (0.5, 0.5); (-1, 1) less its part along (1, 0)
    # is (0, 1); their sum (0.5, 1.5). `own` keeps the plain gradient, `unused` none.
    torch.testing.assert_close(combined[0], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(combined[1], torch.tensor([4.0]))
    torch.testing.assert_close(combined[2], torch.tensor([0.0]))


def test_a_diffrec_run_trains_with_pcgrad(tiny_dataset_dir, tmp_path, monkeypatch):
    calls = []

    def counted(terms, parameters):
        calls.append(len(terms))
        return pcgrad_objective(terms, parameters)

    monkeypatch.setattr(trainer, "pcgrad_objective", counted)
    metrics = run_pretrain(tiny_dataset_dir, tmp_path / "run", *DIFFREC, "--pcgrad",
                           "--epochs", "1", "--max-steps", "2")
    assert calls == [2, 2]  # MSE and cross-entropy, at each step
    assert metrics["test"]["ndcg@10"] >= 0


def test_pcgrad_on_a_loss_of_one_term_is_refused(tiny_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="drop --pcgrad"):
        run_pretrain(tiny_dataset_dir, tmp_path / "run", "--pcgrad", "--epochs", "1",
                     "--max-steps", "1")

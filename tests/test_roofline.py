"""benchmarks/roofline.py: the FLOP accounting behind each bound, and a run at tiny shapes."""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def roofline():
    return load_benchmark("roofline")


def test_backward_products_have_the_forward_flops_and_transposed_shapes(roofline):
    forward = roofline.Product("x", batch=3, m=5, k=7, n=11, count=2)
    assert forward.flops == 2 * 3 * 5 * 7 * 11 * 2
    grad_a, grad_b = forward.backward()
    assert (grad_a.m, grad_a.k, grad_a.n) == (5, 11, 7)  # dC [m, n] @ B^T [n, k]
    assert (grad_b.m, grad_b.k, grad_b.n) == (7, 5, 11)  # A^T [k, m] @ dC [m, n]
    assert grad_a.flops == grad_b.flops == forward.flops


def test_the_bound_is_each_products_flops_at_its_shapes_speed(roofline):
    products = roofline.forward_products(batch=2, length=4, logit_rows=8, items=10)
    speed = {(p.batch, p.m, p.k, p.n): 1.0 for p in products}  # 1 GFLOP/s everywhere
    assert roofline.bound_seconds(products, speed) == pytest.approx(
        sum(p.flops for p in products) / 1e9)
    logits = products[-1]
    assert (logits.m, logits.k, logits.n) == (8, roofline.HIDDEN, 10)


def test_a_tiny_run_prints_every_workload_against_its_bound(roofline, capsys):
    roofline.main(["--train-batch", "2", "--train-length", "5", "--train-items", "30",
                   "--steps", "1", "--eval-users", "5", "--eval-length", "5",
                   "--eval-items", "20", "--eval-batch", "4", "--repeats", "1",
                   "--threads", "1", "--clock", "cpu", "--runs", "3"])
    out = capsys.readouterr().out
    for workload in ("training step", "evaluation", "evaluation forward (query)"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {workload} |"))
        ratio, per_run = row.removesuffix(" |").split(" | ")[-2:]
        runs = sorted(per_run.split(", "), key=float)
        assert len(runs) == 3 and ratio == runs[1]  # the median run's
    assert "| logits dB | 1 x [64, 10] @ [10, 30] |" in out

"""How close a SASRec training step and a full-ranking evaluation come to this CPU's matmul
speed: each workload's measured time against its FLOP bound.

1. Dense matmul GFLOP/s at every shape the workload multiplies (forward, and for training
   the two backward products of each), each the best of `--repeats` timings.
2. The bound of a workload: the sum over its matrix products of FLOPs / GFLOP/s measured at
   that product's shape, i.e. the time if nothing but its matmuls ran, each as fast as
   this machine multiplies that shape alone (elementwise work, softmax and the optimizer
   count as zero).
3. The workload itself, timed end to end: the full-softmax training step (`model.loss`,
   backward, AdamW) and `pretraining.evaluation.evaluate` over every user, with the
   forward (`model.query`) also timed alone; each `--runs` times, after the bound, and
   reported by the median (every run's ratio is listed: the machine may be shared).

Shapes (defaults): training as in the issue (batch 64 x 50 positions, 10,000 items),
evaluation as ML-1M (6,040 users x 200 positions, 3,416 items, batch 256); d 64, 2 layers,
2 heads, feed-forward 256. Items are random (no padding: every position is computed, as
SASRec computes padded ones too). The machine may be shared: the load average is printed.

    python benchmarks/roofline.py --results roofline/cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from results import write_result
from tables import markdown, number

HIDDEN, LAYERS, HEADS, FFN = 64, 2, 2, 256
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Product:
    """`count` batched products [batch, m, k] @ [batch, k, n]."""

    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n * self.count

    def backward(self) -> list[Product]:
        """The gradients of both inputs: dA = dC @ B^T and dB = A^T @ dC."""
        return [Product(f"{self.name} dA", self.batch, self.m, self.n, self.k, self.count),
                Product(f"{self.name} dB", self.batch, self.k, self.m, self.n, self.count)]


def forward_products(batch: int, length: int, logit_rows: int, items: int) -> list[Product]:
    """The matrix products of a SASRec forward over [batch, length] and its logits."""
    tokens, head = batch * length, HIDDEN // HEADS
    return [
        Product("q, k, v, o projections", 1, tokens, HIDDEN, HIDDEN, 4 * LAYERS),
        Product("feed-forward in", 1, tokens, HIDDEN, FFN, LAYERS),
        Product("feed-forward out", 1, tokens, FFN, HIDDEN, LAYERS),
        Product("attention q k^T", batch * HEADS, length, head, length, LAYERS),
        Product("attention weights v", batch * HEADS, length, length, head, LAYERS),
        Product("logits", 1, logit_rows, HIDDEN, items),
    ]


def gflops(product: Product, repeats: int, clock: Callable[[], float]) -> float:
    """GFLOP/s of one product of this shape: the best of `repeats` timings, each of enough
    calls to last about 50 ms (best, not median: on a shared machine the slower timings
    measure the other jobs)."""
    a = torch.randn(product.batch, product.m, product.k)
    b = torch.randn(product.batch, product.k, product.n)
    out = torch.empty(product.batch, product.m, product.n)
    started = clock()
    torch.matmul(a, b, out=out)  # warm-up, and a first estimate of the call's time
    calls = max(1, int(0.05 / max(clock() - started, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        for _ in range(calls):
            torch.matmul(a, b, out=out)
        best = min(best, (clock() - started) / calls)
    return product.flops / product.count / best / 1e9


def bound_seconds(products: list[Product], speed: dict[tuple, float]) -> float:
    return sum(p.flops / (speed[(p.batch, p.m, p.k, p.n)] * 1e9) for p in products)


def model(num_items: int, length: int):
    from peftrec.pretraining import RecommenderConfig, SequentialRecommender

    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(
        num_items=num_items, loss="full",
        backbone_config={"hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": HEADS,
                         "ffn_size": FFN, "max_len": length}))


def time_training_step(batch: int, length: int, items: int, steps: int,
                       clock: Callable[[], float]) -> float:
    """Seconds per full-softmax step (loss, backward, AdamW), after two warm-up steps."""
    recommender = model(items, length).train()
    optimizer = torch.optim.AdamW(recommender.parameters(), lr=1e-3)
    windows = torch.randint(1, items + 1, (steps + 2, batch, length + 1))

    def step(window: torch.Tensor) -> None:
        recommender.loss({"input_ids": window[:, :-1], "target_ids": window[:, 1:]})[
            "loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for window in windows[:2]:
        step(window)
    started = clock()
    for window in windows[2:]:
        step(window)
    return (clock() - started) / steps


def time_evaluation(users: int, length: int, items: int, batch: int,
                    clock: Callable[[], float]) -> tuple[float, float]:
    """Seconds of `evaluate` over `users` users, and of its forward (`query`) alone."""
    from accelerate import Accelerator

    from peftrec.pretraining.evaluation import evaluate

    recommender = model(items, length).eval()
    windows = torch.randint(1, items + 1, (users, length + 1))
    batches = [{"input_ids": w[:, :-1], "target_ids": w[:, -1]} for w in windows.split(batch)]
    accelerator = Accelerator(cpu=True)
    evaluate(recommender, batches[:1], accelerator)  # warm-up
    started = clock()
    evaluate(recommender, batches, accelerator)
    total = clock() - started
    started = clock()
    with torch.no_grad():
        for b in batches:
            recommender.query(b)
    return total, clock() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-length", type=int, default=50)
    parser.add_argument("--train-items", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--eval-users", type=int, default=6_040)
    parser.add_argument("--eval-length", type=int, default=200)
    parser.add_argument("--eval-items", type=int, default=3_416)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timings per matmul shape (the best counts)")
    parser.add_argument("--runs", type=int, default=3,
                        help="timings of each workload (the median counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: this process's CPU time, which other jobs on a shared "
                        "machine hardly change (use it with --threads 1: idle threads "
                        "spinning at barriers would count too)")
    parser.add_argument("--results", metavar="NAME",
                        help="also write benchmarks/results/NAME.{json,md}")
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    train_tokens = args.train_batch * args.train_length
    train = forward_products(args.train_batch, args.train_length, train_tokens, args.train_items)
    train += [g for p in train for g in p.backward()]
    batches, last = divmod(args.eval_users, args.eval_batch)
    per_batch = forward_products(args.eval_batch, args.eval_length, args.eval_batch,
                                 args.eval_items)
    evaluation = [Product(p.name, p.batch, p.m, p.k, p.n, p.count * batches) for p in per_batch]
    if last:
        evaluation += forward_products(last, args.eval_length, last, args.eval_items)
    speed = {}
    for p in train + evaluation:
        shape = (p.batch, p.m, p.k, p.n)
        if shape not in speed:
            speed[shape] = gflops(p, args.repeats, clock)
    shapes = [{"product": p.name, "shape": f"{p.batch} x [{p.m}, {p.k}] @ [{p.k}, {p.n}]",
               "GFLOP/s": speed[(p.batch, p.m, p.k, p.n)]} for p in train + per_batch]

    steps, totals, forwards = [], [], []
    for _ in range(args.runs):
        steps.append(time_training_step(args.train_batch, args.train_length,
                                        args.train_items, args.steps, clock))
        total, forward = time_evaluation(args.eval_users, args.eval_length, args.eval_items,
                                         args.eval_batch, clock)
        totals.append(total)
        forwards.append(forward)
    forward_only = [p for p in evaluation if p.name != "logits"]
    rows = []
    for name, products, runs in (
            ("training step", train, steps),
            ("evaluation", evaluation, totals),
            ("evaluation forward (query)", forward_only, forwards)):
        bound = bound_seconds(products, speed)
        seconds = statistics.median(runs)
        rows.append({"workload": name, "GFLOP": sum(p.flops for p in products) / 1e9,
                     "seconds": seconds, "bound seconds": bound, "ratio": seconds / bound,
                     "ratio per run": ", ".join(f"{s / bound:.2f}" for s in runs)})
    load_after = os.getloadavg()[0]
    table = markdown(rows, ["workload", "GFLOP", "seconds", "bound seconds", "ratio",
                            "ratio per run"],
                     lambda column, value: f"{value:.2f}" if column == "ratio" else number(value))
    shape_table = markdown(shapes, ["product", "shape", "GFLOP/s"])
    note = (f"CPU, {os.cpu_count()} cores, {args.threads} torch threads, {args.clock} clock "
            "(seconds are CPU seconds with the cpu clock); load average "
            f"{load_before:.1f} before, {load_after:.1f} after. Training: batch "
            f"{args.train_batch} x {args.train_length}, {args.train_items:,} items, full "
            f"softmax, AdamW. Evaluation: {args.eval_users:,} users x {args.eval_length}, "
            f"{args.eval_items:,} items, batch {args.eval_batch}. d {HIDDEN}, {LAYERS} layers, "
            f"{HEADS} heads, feed-forward {FFN}. Bound: each product's FLOPs at the GFLOP/s "
            f"measured for its shape alone; ratio = median seconds of {args.runs} runs / "
            "bound.")
    text = f"{table}\n\n{shape_table}\n\n{note}\n"
    print(text)
    if args.results:
        settings = {k: v for k, v in vars(args).items() if k != "results"}
        path = write_result(args.results, rows, text,
                            {**settings, "shapes": shapes, "load": [load_before, load_after]})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

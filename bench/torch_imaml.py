"""The Omniglot meta-step as the iMAML paper's official PyTorch code computes it, for a speed comparison on the
same machine (bench.omniglot runs it beside the trainer's step when PyTorch is available; it is not a
dependency of the project).

The official code (github.com/aravindr93/imaml_dev, examples/omniglot_implicit_maml.py) takes its tasks one
after another in Python; per task: a query loss before adaptation, 16 SGD steps on the support loss, one
step of the proximal term back towards theta, the support and query accuracies, the query gradient, and 5 CG
steps on ((1 + damping) I + H / (lambda + 10)) v = g with double-backward Hessian-vector products (its CG
evaluates the product with the zero start too); then one Adam step on the mean. Its network is MAML's: 4 x
[3x3 conv, stride 2, batch statistics, ReLU] with a zero pad before the third block, and a linear head on
the flattened 2 x 2 x width map. Images are random, as in bench.omniglot (the cost does not depend on them).

    python bench/torch_imaml.py --width 64 --meta-batch 32 --threads 2 --steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn


def make_network(width: int, ways: int) -> nn.Sequential:
    block = lambda channels: [
        nn.Conv2d(channels, width, 3, stride=2, padding=1),
        nn.BatchNorm2d(width, track_running_stats=False),
        nn.ReLU(),
    ]
    layers = block(1) + block(width) + [nn.ZeroPad2d((0, 1, 0, 1))] + block(width) + block(width)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(4 * width, ways))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


class MetaStep:
    """One meta-step of the official algorithm on `meta_batch` random 5-way 1-shot tasks."""

    def __init__(self, width: int, meta_batch: int, ways: int = 5, inner_steps: int = 16, cg_steps: int = 5):
        self.meta, self.fast = make_network(width, ways), make_network(width, ways)
        self.meta_batch, self.ways, self.inner_steps, self.cg_steps = meta_batch, ways, inner_steps, cg_steps
        self.lam, self.damping = 2.0, 1.0
        self.loss = nn.CrossEntropyLoss()
        self.inner = torch.optim.SGD(self.fast.parameters(), lr=0.1)
        self.outer = torch.optim.Adam(self.meta.parameters(), lr=1e-3, eps=1e-3)

    def _set_fast(self, theta: torch.Tensor) -> None:
        offset = 0
        for p in self.fast.parameters():
            p.data.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def _hvp(self, x, y, v: torch.Tensor) -> torch.Tensor:
        params = list(self.fast.parameters())
        grad = flat(torch.autograd.grad(self.loss(self.fast(x), y), params, create_graph=True))
        return flat(torch.autograd.grad(torch.dot(grad, v), params))

    def _cg(self, matvec, b: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(b)
        r = b - matvec(v)
        p = r.clone()
        for _ in range(self.cg_steps):
            rr = torch.dot(r, r)
            ap = matvec(p)
            alpha = rr / torch.dot(p, ap)
            v, r = v + alpha * p, r - alpha * ap
            p = r + torch.dot(r, r) / rr * p
        return v

    def _task_grad(self, theta: torch.Tensor) -> torch.Tensor:
        shape = (self.ways, 1, 28, 28)
        xs, xq, y = torch.randn(shape), torch.randn(shape), torch.arange(self.ways)
        self._set_fast(theta.clone())
        with torch.no_grad():
            self.loss(self.fast(xq), y).item()
        for _ in range(self.inner_steps):
            self.inner.zero_grad()
            loss = self.loss(self.fast(xs), y)
            loss.backward()
            self.inner.step()
            loss.item()
        self.inner.zero_grad()
        pull = 0.5 * self.lam * torch.sum((flat(self.fast.parameters()) - theta) ** 2)
        pull.backward()
        self.inner.step()
        with torch.no_grad():
            self.loss(self.fast(xq), y).item()
            self.fast(xs).argmax(1), self.fast(xq).argmax(1)
        g = flat(torch.autograd.grad(self.loss(self.fast(xq), y), list(self.fast.parameters())))
        scale = self.lam + 10.0
        return self._cg(lambda v: (1 + self.damping) * v + self._hvp(xs, y, v) / scale, g)

    def __call__(self) -> None:
        theta = flat(p.data for p in self.meta.parameters()).clone()
        grad = sum(self._task_grad(theta) for _ in range(self.meta_batch)) / self.meta_batch
        offset = 0
        for p in self.meta.parameters():
            p.grad = grad[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        self.outer.step()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one untimed")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = MetaStep(args.width, args.meta_batch)
    step()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    result = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        width=args.width,
        meta_batch=args.meta_batch,
        steps=args.steps,
        step_s=statistics.median(times),
        step_s_min=min(times),
        step_s_max=max(times),
    )
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()

"""How far apart fp32 rounding can put two runs of one algorithm, for the equivalence tests.

Equivalence tests (gradient accumulation vs a larger batch, ZeRO shards vs one process) run the same
algorithm on the same tokens from the same initial weights; only the way fp32 sums are split differs
(two micro-batches of 128 tokens vs one of 256, a reduce-scatter of two halves vs one sum, kernels of
other shapes). Everything else (clipping's norm, the optimizer, PALSGD's pull and sync) is the same
code on values that differ only because of those sums. The bound, step by step:

1. A sum of n fp32 terms c_i, in any order, is within (n-1) u sum|c_i| of the exact sum (u = 2^-24),
   so two orders differ by at most 2 n u sum|c_i| = 2 n u kappa |sum c_i|, where kappa is the
   cancellation of the sum. Per step, the gradient g (a sum over the step's n tokens per rank)
   differs by ||dg|| <= 2 n u kappa ||g||. We allow kappa <= KAPPA.
2. Clipping at max_grad_norm = 1 gives the step direction g / max(1, ||g||), which then differs by at
   most 2 ||dg|| / max(1, ||g||) <= 4 n u kappa (norm <= 1 either way).
3. SGD moves the weights by lr_t times that direction: its update is Lipschitz in the gradient with
   constant lr_t. (AdamW's lr m / (sqrt(v) + eps) has constant lr / eps, 3e5 at lr 3e-3 and eps 1e-8:
   a last-bit difference in a near-zero gradient becomes a visible weight difference. That is why the
   equivalence tests train with SGD.) Over the run: sum_t lr_t * 4 n u kappa.
4. Later steps carry an earlier difference along: a pseudo-sync pull x <- x - c (x - anchor) shrinks
   it; a gradient step grows it by at most a factor (1 + lr L) for curvature L, at most e over a run
   with sum_t lr_t L <= 1. At a sync the workers' difference D becomes a pseudo-gradient difference,
   which the outer Nesterov step (lr_o, momentum mu) passes into the anchor with total gain
   lr_o (1 + mu) + lr_o (mu^2 + mu^3 + ...) = lr_o / (1 - mu) over this and all later syncs (7 at
   0.7 and 0.9); a difference the anchor already had is carried with gain 1.
   Allowance: AMPLIFICATION = e max(1, lr_o / (1 - mu)).

So the weights differ in L2 norm by at most AMPLIFICATION * 4 n u KAPPA * sum_t lr_t. This is a worst
case (measured differences are some 10^4 times smaller); a run that trained on other data, with another
learning rate or another step kind differs by a fraction of the distance the weights travel (<= sum_t
lr_t in L2 norm), which the tests check is at least 50 times the bound. Measured on the accumulation test:
reading the examples in another order, or a learning rate 3% off, ends 1.5-2 times past the bound.
"""

from __future__ import annotations

import math

import torch

U_FP32 = 2.0**-24  # fp32 unit round-off
KAPPA = 4.0  # allowed cancellation sum|c_i| / |sum c_i| of a gradient coordinate's sum over tokens


def linear_lr_sum(lr: float, steps: int) -> float:
    """sum_t lr_t of the Trainer's linear schedule (no LR warm-up): lr (1 - t / steps) for t = 0..steps-1."""
    return lr * (steps + 1) / 2


def sgd_rounding_bound(lr_sum: float, tokens_per_step: int, outer_lr: float = 0.7,
                       outer_momentum: float = 0.9) -> float:
    """The L2 distance that fp32 rounding alone can put between two runs' weights (module docstring)."""
    amplification = math.e * max(1.0, outer_lr / (1 - outer_momentum))
    return amplification * 4 * tokens_per_step * U_FP32 * KAPPA * lr_sum


def l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).norm().item()

"""Analytic FLOPs of each method on a workload: the cost table of arXiv 2206.08720, term by term.

N examples (x2 = None, so N1 = N2 = N), O outputs, P parameters, F the forward FLOPs of one
example, and Oc = O² for the full kernel or O when the outputs are traced. A backward pass
costs 2F and a forward-mode pass 3F (primal and tangent). FLOPs are 2 × multiply-adds.

- Jacobian contraction: N·(F + 2·O·F) for the Jacobians, then 2·N²·Oc·P.
- NTK-vector products: N·(F + 2·O·F) for the vjps of x2, then N²·O jvps of 3F through x1.
- Structured derivatives: N·(F + O·F) for the cotangents (the backward passes need only the
  input cotangents, not the weight gradients), then per layer the
  cheaper of the dense rule's two orders (the choice ntkcore's rule makes): pairwise
  2·N²·T²·(a + Oc·b + Oc), or per-example 2·N·O·T·a·b + 2·N²·Oc·a·b, for a layer with
  fan-in a, fan-out b and T positions sharing its weights (tokens, pixels).

neural-tangents' implementations 1, 2, 3 and the torch.func baselines are counted by the
same formulas as the method they implement.
"""

from __future__ import annotations

from benchmarks.workloads import TOKENS, WIDTH, Workload, layers

METHOD = {"jacobian_contraction": "jc", "ntk_vector_products": "nvp", "structured": "sd"}


def sizes(workload: Workload) -> dict[str, int]:
    """N, O, P and F for the workload."""
    spec = layers(workload)
    forward = sum(2 * a * b * t for _, a, b, t, _ in spec)
    if workload.kind == "transformer":  # attention: scores and weighted values over all heads
        forward += 2 * 2 * TOKENS * TOKENS * WIDTH
    outputs = spec[-1][2]
    return {"n": workload.n, "o": outputs, "p": sum(s[4] for s in spec), "f": forward}


def flops(workload: Workload, implementation: str) -> float | None:
    """Analytic FLOPs of ``implementation`` ("auto" and unknown methods: None)."""
    method = METHOD.get(implementation)
    if method is None:
        return None
    s = sizes(workload)
    n, o, p, f = s["n"], s["o"], s["p"], s["f"]
    oc = o if workload.traced else o * o
    backward = n * (f + 2 * o * f)
    if method == "jc":
        return backward + 2 * n * n * oc * p
    if method == "nvp":
        return backward + n * n * o * 3 * f
    total = n * (f + o * f)
    for _, a, b, t, _ in layers(workload):
        pairwise = 2 * n * n * t * t * (a + oc * b + oc)
        per_example = 2 * n * o * t * a * b + 2 * n * n * oc * a * b
        total += min(pairwise, per_example)
    return total


def jacobian_bytes(workload: Workload, itemsize: int = 4) -> float:
    """Bytes of the N·O·P Jacobian that Jacobian contraction materialises."""
    s = sizes(workload)
    return s["n"] * s["o"] * s["p"] * itemsize

"""The plain torch.func NTK, the way a user writes it without ntkcore (the torch anchor).

Jacobian contraction: ``vmap(jacrev)`` over examples, then an einsum over every parameter.
NTK-vector products: for each example of x1, one vjp per output basis vector, then one jvp
of each resulting parameter-space vector through the batch x2 (N1·O vjps and N1·O batched
jvps, the cost table's N²·O·[FP]). The torch.func tutorial's version vmaps over every pair
of examples, which holds N²·O parameter-sized tangents at once and exhausts 24 GB on the
2048-wide MLP; this one keeps O of them. Attention runs with the fused fast paths off (they have no
vmap/forward-mode support), which a user has to do too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.func import functional_call, jacrev, jvp, vjp, vmap


def kernel_fn(model: torch.nn.Module, implementation: str, traced: bool) -> Any:
    """``ntk(x1, x2) -> (N1, N2, O, O)`` tensor, or (N1, N2) when ``traced`` (a true trace, a sum)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:  # one example
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    def jacobian_contraction(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        j1 = vmap(jacrev(f), (None, 0))(params, x1)
        j2 = vmap(jacrev(f), (None, 0))(params, x2)
        spec = "Naf,Maf->NM" if traced else "Naf,Mbf->NMab"
        return sum(torch.einsum(spec, a.flatten(2), b.flatten(2)) for a, b in zip(j1.values(), j2.values()))

    def ntk_vector_products(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        def batch(p: dict) -> torch.Tensor:
            return functional_call(model, (p, buffers), (x2,))

        def row(a: torch.Tensor) -> torch.Tensor:  # Θ(a, x2) as (N2, O, O): O vjps, then O jvps over x2
            out, pullback = vjp(lambda p: f(p, a), params)
            (cotangents,) = vmap(pullback)(torch.eye(out.shape[-1], dtype=out.dtype, device=out.device))
            columns = vmap(lambda t: jvp(batch, (params,), (t,))[1])(cotangents)  # (O1, N2, O2)
            block = columns.movedim(0, 1)
            return torch.diagonal(block, dim1=1, dim2=2).sum(-1) if traced else block

        return vmap(row, chunk_size=1)(x1)  # one x1 example at a time: O·P tangents in memory, not N·O·P

    compute = {"jacobian_contraction": jacobian_contraction, "ntk_vector_products": ntk_vector_products}[implementation]

    def ntk(x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        with _math_attention():
            return compute(x1, x1 if x2 is None else x2)

    return ntk


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Attention through differentiable kernels: no MHA fast path, SDPA's math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)

"""Per-layer capture for structured derivatives: forward hooks on the layers that have rules.

A discovery pass on a batch of one records, under a ``TorchFunctionMode``, every call of a
supported layer (its output shape) and every use of a trainable parameter outside its own
layer's call (tied weights, ``F.linear(x, other.weight)``): those parameters go to the exact
fallback, so a hook that cannot see a use never gives a wrong number. MultiheadAttention's
self-attention is run by an explicit forward during capture, so that its in-projection is one
dense layer and its output projection a call of ``out_proj``; cross-attention falls back.
Convolutions are differentiated by torch itself, in the same backward passes that give the
cotangents (its convolution backward beats patches and a matmul on CPU), except where the conv
rule's pairwise order is cheaper: their patches are then formed on request (:mod:`.patches`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ntkcore.adapter import CallRecorder, LayerEntry, ParameterAudit, Patches, build_capture, owners_of, patched
from ntkcore.protocol import Capture, PreparedModel

from . import broadcast, recurrent
from . import patches as conv_patches

_BATCH_NORM = nn.modules.batchnorm._BatchNorm


def _is(module: nn.Module, cls: type) -> bool:
    """An instance of ``cls`` that runs ``cls``'s own forward: a subclass that overrides it
    computes something else, which the rule would get wrong."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _rule(module: nn.Module) -> tuple[str, dict[str, str], int] | None:
    """(kind, role -> attribute, feature axis) for a module with a structure rule, else None."""
    if _is(module, nn.Linear):
        return "dense", {"weight": "weight", "bias": "bias"}, -1
    if _is(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None:
        if not module.add_zero_attn:
            return "dense", {"weight": "in_proj_weight", "bias": "in_proj_bias"}, -1
    if any(_is(module, conv) for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d)):  # differentiated by torch
        return "conv", {"weight": "weight", "bias": "bias"}, 1
    if _is(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return "embedding", {"table": "weight"}, -1  # padding rows: ids -1, no gradient (_structured_input)
    if _is_hf_conv1d(module):  # transformers' Conv1D (GPT-2): a dense layer with its weight laid out (in, out)
        return "dense", {"weight": "weight", "bias": "bias"}, -1
    if _is(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
        return "affine", {"scale": "weight", "shift": "bias"}, -1
    if _is(module, nn.RMSNorm) and len(module.normalized_shape) == 1 and module.elementwise_affine:
        return "affine", {"scale": "weight"}, -1
    if _is(module, nn.GroupNorm) and module.affine:
        return "affine", {"scale": "weight", "shift": "bias"}, 1
    if _is(module, _BATCH_NORM) and module.affine and not module.training and module.track_running_stats:
        return "affine", {"scale": "weight", "shift": "bias"}, 1
    return None


def _is_conv(entry: LayerEntry | None) -> bool:
    return entry is not None and entry.kind == "conv"


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: y = x·W + b with W (in, out) (``pytorch_utils.Conv1D``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and hasattr(module, "nf")


def _native(module: nn.Module) -> bool:
    """Whether the rule's per-example gradients have the parameters' own layout (dense (out, in))."""
    return not _is_hf_conv1d(module)


def _structured_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the rule multiplies by: the input, or the normalised input x̂ (for a convolution
    nothing: torch's own convolution backward gives its per-example gradients); an embedding's
    ids, with the padding row's as -1 (it gets no gradient)."""
    if isinstance(module, nn.Embedding):
        return x if module.padding_idx is None else torch.where(x == module.padding_idx, -1, x)
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, _BATCH_NORM):
        shape = (1, -1, *([1] * (x.dim() - 2)))
        mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)
    return x


def _additive(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    """An attention mask as added to the scores: True (or -inf) forbids a position."""
    if mask is None:
        return 0.0
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, -math.inf)
    return mask.to(like.dtype)


def _self_attention(
    module: nn.MultiheadAttention,
    record: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    refuse: Callable[[], None],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``MultiheadAttention.forward`` written out for self-attention: ``record`` sees the
    in-projection's input and output; other uses run the module's own forward, unrecorded."""
    if not (query is key and key is value):
        refuse()
        return type(module).forward(
            module, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    batched = query.dim() == 3
    x = query if batched and module.batch_first else query.transpose(0, 1) if batched else query.unsqueeze(0)
    n, length, width = x.shape
    heads = module.num_heads
    qkv = record(x, F.linear(x, module.in_proj_weight, module.in_proj_bias))
    q, k, v = (t.reshape(n, length, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.reshape(n, heads, length, length)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.reshape(n, 1, 1, length)
    weights = torch.softmax(scores + _additive(attn_mask, scores) + _additive(key_padding_mask, scores), dim=-1)
    out = module.out_proj((weights @ v).transpose(1, 2).reshape(n, length, width))
    out = out if batched and module.batch_first else out.transpose(0, 1) if batched else out.squeeze(0)
    if not need_weights:
        return out, None
    weights = weights.mean(dim=1) if average_attn_weights else weights
    return out, weights if batched else weights.squeeze(0)


# properties whose reading uses none of a tensor's values
_METADATA_PROPERTIES = {"dtype", "shape", "device", "ndim", "requires_grad", "is_leaf", "layout", "is_cuda"}


def _reads_metadata(func: Any) -> bool:
    name = getattr(func, "__name__", None)
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA_PROPERTIES
    return name in ("size", "dim", "numel", "element_size")


class _Audit(TorchFunctionMode):
    """Reports every use of a trainable parameter (by tensor identity) to the audit, and records
    the broadcast uses of candidate parameters (``layers``: parameter -> layer) as their calls."""

    def __init__(
        self,
        audit: ParameterAudit,
        names: dict[int, str],
        layers: Mapping[str, str] | None = None,
        recorder: CallRecorder | None = None,
    ) -> None:
        super().__init__()
        self.audit, self.names, self.layers, self.recorder = audit, names, dict(layers or {}), recorder

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _reads_metadata(func):  # reading a parameter's dtype or shape uses none of its values
            return func(*args, **kwargs)
        found = broadcast.operand(func, args, kwargs, self.names, self.layers) if self.recorder else None
        if found is not None:
            out = func(*args, **kwargs)
            ids = broadcast.broadcast_ids(tuple(found[1].shape), tuple(out.shape), out)
            if ids is None:  # not a broadcast over tokens: an ordinary use
                self.audit.used(found[0])
                return out
            return self.recorder.record(self.recorder.next_key(self.layers[found[0]]), ids, out)
        for value in [*args, *kwargs.values()]:
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                name = self.names.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
                if name is not None:
                    self.audit.used(name)
        return func(*args, **kwargs)


def attention_modules(model: nn.Module) -> list[nn.MultiheadAttention]:
    """The self-attention modules :func:`plain_attention` writes out (those capture has a rule for)."""
    return [m for m in model.modules() if _rule(m) is not None and isinstance(m, nn.MultiheadAttention)]


@contextmanager
def plain_attention(modules: list[nn.MultiheadAttention]) -> Iterator[None]:
    """Run these modules' self-attention by :func:`_self_attention`, the formula capture uses.

    MultiheadAttention's own forward projects a sequence-first view of a batch-first input; under
    vmap over tangents torch turns that projection's tangent into a batched matmul that copies the
    weight tangent once per example (about a quarter of NTK-vector products' time on an attention
    block). Written out batch-first, the projection is one matmul over all tokens. A module whose
    forward is already patched (by capture) is left as it is.
    """

    def install(patches: Patches) -> None:
        for module in modules:
            if "forward" not in module.__dict__:
                patches.set(module, "forward", functools.partial(_self_attention, module, lambda x, y: y, lambda: None))

    with patched(install):
        yield


def _table(model: nn.Module, params: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, LayerEntry], dict[str, str]]:
    """(layer -> module, layer -> its rule's entry, candidates): the trainable parameters of a
    module without a rule are candidates (parameter -> the module's label), each its own layer
    of the embedding kind where it is only broadcast into activations (:mod:`.broadcast`)."""
    modules, table, candidates = {}, {}, {}
    # a parameter tied into several modules has one name in ``params``, whichever module asks
    first_name = {id(p): n for n, p in model.named_parameters()}
    canonical = {n: first_name[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    for name, module in model.named_modules():
        own = {
            attr: canonical[f"{name}.{attr}" if name else attr] for attr, _ in module.named_parameters(recurse=False)
        }
        trainable = {attr: full for attr, full in own.items() if full in params}
        if not trainable:
            continue
        if type(module) in recurrent.RECURRENT:  # its cells' projections, each a dense layer
            modules[name] = module
            for sub, roles in recurrent.sublayers(module).items():
                table[f"{name}:{sub}"] = LayerEntry(
                    "dense", {r: trainable[a] for r, a in roles.items() if a in trainable}
                )
            continue
        rule = _rule(module)
        if rule is None:
            for full in trainable.values():
                candidates[full] = f"{name or 'model'} ({type(module).__name__})"
                table[full] = LayerEntry("embedding", {"table": full})
            continue
        kind, roles, axis = rule
        modules[name] = module
        groups = module.groups if kind == "conv" else 1
        table[name] = LayerEntry(
            kind, {r: trainable[a] for r, a in roles.items() if a in trainable}, axis, _native(module), groups
        )
    return modules, table, candidates


def _install(patches: Patches, modules: dict, table: dict, recorder: CallRecorder, audit: ParameterAudit) -> None:
    """Hooks on every layer with a rule (self-attention: its written-out forward) that record its
    calls and report them to the audit."""
    for name, module in modules.items():
        if type(module) in recurrent.RECURRENT:
            patches.set(
                module, "forward", functools.partial(recurrent.forward, module, _cell_record(name, recorder, audit))
            )
            continue
        attention = isinstance(module, nn.MultiheadAttention)

        def pre(mod: nn.Module, args: tuple, name: str = name) -> None:
            audit.entered(name)

        def post(mod: nn.Module, args: tuple, output: Any, name: str = name, attention: bool = attention) -> Any:
            if not attention:
                output = recorder.record(recorder.next_key(name), _structured_input(mod, args[0]), output)
            audit.left()
            return output

        if attention:
            roles = table[name].roles
            record = lambda x, y, name=name: recorder.record(recorder.next_key(name), x, y)  # noqa: E731
            refuse = lambda roles=roles: audit.outside.update(roles.values())  # noqa: E731 - a use records miss
            patches.set(module, "forward", functools.partial(_self_attention, module, record, refuse))
        patches.handle(module.register_forward_pre_hook(pre))
        patches.handle(module.register_forward_hook(post))


def _cell_record(name: str, recorder: CallRecorder, audit: ParameterAudit) -> recurrent.Record:
    """Records each projection of a recurrent layer's cells as a call of its dense sub-layer."""

    def record(sub: str, x: torch.Tensor, compute: Any) -> torch.Tensor:
        layer = f"{name}:{sub}"
        audit.entered(layer)
        try:
            return recorder.record(recorder.next_key(layer), x, compute())
        finally:
            audit.left()

    return record


def capture(prepared: PreparedModel, x: torch.Tensor) -> Capture:
    """Capture the model of ``prepared`` (run as its ``apply``) on a batch of one ``x``."""
    model, params, call = prepared.source, prepared.params, prepared.apply
    modules, table, candidates = _table(model, params)
    # only parameters of layers with a rule (or candidates) need the audit: the others fall back anyway
    audit, recorder = ParameterAudit(owners_of(table)), CallRecorder()
    with patched(lambda p: _install(p, modules, table, recorder, audit)), torch.no_grad():
        with _Audit(audit, {id(t): n for n, t in params.items()}, {n: n for n in candidates}, recorder):
            call(params, x)
    recorded = {key.rpartition("#")[0] for key in recorder.shapes}
    # a candidate without a broadcast use is its module's own computation: no rule, as before
    unsupported = sorted({candidates[n] for n in candidates if n not in recorded or n in audit.outside})
    dropped = audit.outside & set(candidates)  # candidates also used otherwise: their calls are not kept
    shapes = {k: s for k, s in recorder.shapes.items() if k.rpartition("#")[0] not in dropped}
    layers = {n: n for n in candidates if n in recorded and n not in dropped}

    def apply_probed(p: Mapping[str, torch.Tensor], probes: Mapping[str, torch.Tensor], batch: torch.Tensor) -> tuple:
        probed = CallRecorder(probes)
        # the function mode sees every operation: installed only where a broadcast call is to be probed
        mode = _Audit(ParameterAudit({}), {id(t): n for n, t in p.items()}, layers, probed) if layers else nullcontext()
        with patched(lambda patches: _install(patches, modules, table, probed, ParameterAudit({}))), mode:
            return call(p, batch), probed.inputs

    return build_capture(
        table,
        shapes,
        apply_probed,
        unsupported=tuple(unsupported),
        excluded={n: why for n, why in audit.excluded("is also used outside its layer").items() if n not in candidates},
        framework_gradients=frozenset({"conv"}),  # torch's convolution backward beats patches and a matmul
        native_layout=True,  # torch's weights are laid out (out, in, *kernel), tables (vocabulary, F)
        deferred_inputs={
            n: functools.partial(conv_patches.patches, m) for n, m in modules.items() if _is_conv(table.get(n))
        },
    )

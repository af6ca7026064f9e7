"""Applying a ``rotate`` pass to a model: the residual stream's Hadamard Q fused into the
embeddings, the head and every block, and the online Hadamards attached to their layers.

Which layers read the residual stream (through which norm) and which write to it is found by
experiment, not by architecture name: each block is run on a probe (the embeddings of a few
tokens) with hooks, a layer reading a norm's output is a reader, a layer writing the hidden size
that reads no norm is a writer. A norm's weight is folded into its readers first (a norm with a
unit weight commutes with an orthogonal Q, as RMSNorm does and LayerNorm, which subtracts the
mean, does not), then the block is rotated and must compute, on the probe, its old output times
Q: where it does not (a post-norm, an unusual block) the run stops before anything is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..experts import ExpertList
from ..hadamard import HadamardTransform
from ..passes import Target
from ..passes.rotate import RotatePass, RotatePassConfig
from ..precision import computing_in
from .runner import BlockInputs, catch_block_inputs

# The block's own contribution (output minus input) after rotating may differ this much from the
# float block's, relative to its size: rounding the rotated weights to 16 bits leaves about 1%,
# a layer rotated on the wrong side leaves more than 100%.
_TOLERANCE = 0.05
_PROBE_TOKENS = 16
# Rows rotated at a time: an embedding of 150k x 4096 in float64 would take 5 GB at once.
_CHUNK_ROWS = 8192


@dataclass
class Rotation:
    """One rotate pass as it applies to one model: its residual Hadamard and the probe, caught
    on the model as the earlier rotations left it."""

    rotate: RotatePass
    config: RotatePassConfig
    residual: HadamardTransform
    probe: BlockInputs
    rotated_blocks: set[int] = field(default_factory=set)

    def block(self, index: int, block: nn.Module, block_name: str, targets: list[Target]) -> None:
        """Rotate one block in place (once), and attach the online Hadamards of its quantized targets."""
        if index in self.rotated_blocks:
            return
        online = {t.local_name: transform for t in targets if t.fmt is not None
                  and (transform := self.rotate.online(self.config, t.name, block.get_submodule(t.local_name).in_features)) is not None}
        rotate_block(block, block_name, self.residual, self.probe, online)
        self.rotated_blocks.add(index)


def prepare_rotations(model: nn.Module, blocks: nn.ModuleList, rotations: list[tuple[RotatePass, RotatePassConfig]],
                      device: torch.device) -> list[Rotation]:
    """Each rotate pass's ``Rotation``, with the embeddings and the head already rotated."""
    prepared = []
    hidden = model.get_input_embeddings().embedding_dim
    for rotate, config in rotations:
        probe = catch_block_inputs(model, blocks, _probe_tokens(model), 1, device, dtype=torch.float32)
        residual = rotate.residual(config, hidden)
        rotate_outside(model, blocks, residual)
        prepared.append(Rotation(rotate, config, residual, probe))
    return prepared


def _probe_tokens(model: nn.Module) -> Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return (torch.arange(_PROBE_TOKENS) * 7919 % vocab).unsqueeze(0)


def rotate_outside(model: nn.Module, blocks: nn.ModuleList, q: HadamardTransform) -> None:
    """Embeddings E Q; the final norm's weight folded into the head, which becomes W Q. A head
    tied to the embeddings gets its own tensor: after the fold the two differ."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = embeddings.embedding_dim
    if head is None or getattr(head, "weight", None) is None:
        raise ModelError(f"rotate: {type(model).__name__} has no output head to take the rotation: leave rotate out for this model")
    inside = {id(m) for m in blocks.modules()}
    outside = [(name, m) for name, m in model.named_modules() if id(m) not in inside]
    extra = [name for name, m in outside if isinstance(m, nn.Embedding) and m is not embeddings and m.embedding_dim == hidden]
    if extra:
        raise ModelError(f"rotate: {type(model).__name__} adds learned position embeddings ({extra[0]}) to the residual stream, "
                         "which llmcompress does not rotate yet: leave rotate out for this model")
    norms = [(name, m) for name, m in outside if _is_norm(m, hidden)]
    if len(norms) != 1:
        found = ", ".join(name for name, _ in norms) or "none"
        raise ModelError(f"rotate: expected one final norm of size {hidden} outside the decoder blocks, found {found}: "
                         "leave rotate out for this model")
    norm = norms[0][1]
    scale, neutral = _norm_fold(norm, norms[0][0], q)
    tied = head.weight is embeddings.weight
    head_weight = _rotated_rows(head.weight.detach(), q, columns=scale)
    with torch.no_grad():
        embeddings.weight.copy_(_rotated_rows(embeddings.weight.detach(), q))
        norm.weight.fill_(neutral)
    head.weight = nn.Parameter(head_weight, requires_grad=False)
    if tied:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False


def rotate_block(block: nn.Module, block_name: str, q: HadamardTransform, probe: BlockInputs,
                 online: dict[str, HadamardTransform]) -> None:
    """The block computing ``block(x Q^T) Q``, checked on the probe; ``online``: layers whose
    input is also rotated at run time by their own Hadamard."""
    hidden_size = q.n
    hidden, kwargs = probe[0]
    readers, writers, expected = _residual_layers(block, block_name, hidden_size, hidden, kwargs)
    norms = {name: block.get_submodule(name) for name in readers}
    for norm_name, names in readers.items():
        scale, neutral = _norm_fold(norms[norm_name], f"{block_name}.{norm_name}", q)
        for name in names:
            _set_weight(block.get_submodule(name), _rotated_rows(block.get_submodule(name).weight.detach(), q, columns=scale))
        with torch.no_grad():
            norms[norm_name].weight.fill_(neutral)
    for name in writers:
        linear = block.get_submodule(name)
        _set_weight(linear, _rotated_rows(linear.weight.detach().T, q).T)
        if getattr(linear, "bias", None) is not None:
            _set_bias(linear, q.apply(linear.bias.detach().double()))
    for name, transform in online.items():
        attach_online(block.get_submodule(name), transform)
    with torch.no_grad(), computing_in(block, torch.float32):
        rotated = q.apply_transposed(_output(block, q.apply(hidden), kwargs))
    change = (expected - hidden).norm()
    error = ((rotated - hidden) - (expected - hidden)).norm() / change if change > 0 else torch.tensor(0.0)
    if not error <= _TOLERANCE:
        raise ModelError(f"rotate: {block_name} does not compute the same function once rotated (relative change {float(error):.3f} "
                         f"of its output on a probe): its residual stream is not read only through norms that commute with a "
                         "rotation (a post-norm or a LayerNorm); leave rotate out for this model")


def attach_online(linear: nn.Linear, transform: HadamardTransform) -> None:
    """W H, and x H on every call: the layer computes what it did. Registered before any statistics
    hook, so the statistics see the rotated input; ``input_transform`` tells the compressed layer
    that replaces this one to do the same."""
    _set_weight(linear, _rotated_rows(linear.weight.detach(), transform))
    linear.input_transform = transform
    linear.register_forward_pre_hook(lambda module, args: (transform.apply(args[0]), *args[1:]))


def _residual_layers(block: nn.Module, block_name: str, hidden_size: int, hidden: Tensor,
                     kwargs: dict) -> tuple[dict[str, list[str]], list[str], Tensor]:
    """{norm: the layers reading its output}, the layers writing to the residual stream, and the
    block's output on the probe."""
    norm_outputs: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    handles = []
    # Linears, and routers that hold a [experts, hidden] weight without being an nn.Linear.
    linears = {name: m for name, m in block.named_modules()
               if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() == 2 and not isinstance(m, nn.Embedding)}
    expert_lists = {name: m for name, m in block.named_modules() if isinstance(m, ExpertList)}
    in_experts = {f"{e}.{name}" for e, experts in expert_lists.items() for name, m in experts.named_modules() if isinstance(m, nn.Linear)}
    def output_of(name: str):  # noqa: ANN202 - hooks return None, or they would replace what they see
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            norm_outputs.setdefault(name, out)
        return hook

    def input_of(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0])
        return hook

    for name, module in block.named_modules():
        if _is_norm(module, hidden_size):
            handles.append(module.register_forward_hook(output_of(name)))
        elif name in linears or name in expert_lists:
            handles.append(module.register_forward_pre_hook(input_of(name)))
    try:
        with torch.no_grad(), computing_in(block, torch.float32):
            output = _output(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    readers: dict[str, list[str]] = {name: [] for name in norm_outputs}

    def norm_of(x: Tensor) -> str | None:
        return next((n for n, out in norm_outputs.items() if x.data_ptr() == out.data_ptr() and x.numel() <= out.numel()), None)

    for name, experts in expert_lists.items():
        source = None if name not in inputs else norm_of(inputs[name])
        if source is None:
            raise ModelError(f"rotate: the experts {block_name}.{name} do not read a norm's output directly (they read "
                             "pre-scaled routed rows): llmcompress does not rotate this mixture-of-experts layout yet")
        readers[source] += [f"{name}.{i}.{proj}" for i, expert in enumerate(experts) for proj in ("gate_proj", "up_proj")
                            if hasattr(expert, proj)]
    writers = []
    for name, linear in linears.items():
        if name in in_experts:
            if name.endswith(".down_proj"):
                writers.append(name)
            continue
        if name not in inputs:
            raise ModelError(f"rotate: {block_name}.{name} was not called on the probe, so whether it reads or writes the "
                             "residual stream is unknown: leave rotate out for this model")
        source = norm_of(inputs[name])
        if source is not None:
            readers[source].append(name)
        elif linear.weight.shape[0] == hidden_size:
            writers.append(name)
    unread = [name for name, names in readers.items() if not names]
    if unread:
        raise ModelError(f"rotate: no layer reads the output of {block_name}.{unread[0]} (a norm after a sublayer, added to "
                         "the residual stream), which a rotation of the residual stream does not commute with: leave rotate out "
                         "for this model")
    return readers, writers, output


def _is_norm(module: nn.Module, hidden_size: int) -> bool:
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, Tensor) and weight.dim() == 1
            and weight.shape[0] == hidden_size and not list(module.children()))


def _norm_fold(norm: nn.Module, name: str, q: HadamardTransform) -> tuple[Tensor, float]:
    """The per-channel factor the norm's weight applies (``w``, or Gemma's ``1 + w``), and the
    weight value that makes it 1. Checked on random inputs: the norm must scale by it, and once
    neutral commute with Q."""
    if isinstance(getattr(norm, "bias", None), Tensor):
        raise ModelError(f"rotate: {name} is a LayerNorm with a bias, which does not commute with a rotation "
                         "(QuaRot needs RMSNorm): leave rotate out for this model")
    probe = copy.deepcopy(norm).float()
    weight = norm.weight.detach().double()
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = probe(x)
        for neutral, scale in ((1.0, weight), (0.0, 1 + weight)):
            probe.weight.fill_(neutral)
            plain = probe(x)
            if torch.allclose(reference.double(), plain.double() * scale, rtol=1e-3, atol=1e-5):
                if not torch.allclose(probe(q.apply(x)), q.apply(plain), rtol=1e-3, atol=1e-4):
                    break
                return scale, neutral
    raise ModelError(f"rotate: {name} ({type(norm).__name__}) is not a norm that commutes with a rotation once its weight "
                     "is folded (QuaRot needs RMSNorm): leave rotate out for this model")


def _rotated_rows(weight: Tensor, q: HadamardTransform, columns: Tensor | None = None) -> Tensor:
    """(W diag(columns)) Q in W's dtype, in float64 a chunk of rows at a time."""
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = weight[start:start + _CHUNK_ROWS].double()
        if columns is not None:
            rows = rows * columns.to(rows.device)
        out[start:start + _CHUNK_ROWS] = q.apply(rows).to(weight.dtype)
    return out


def _set_weight(linear: nn.Module, weight: Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)


def _set_bias(linear: nn.Module, bias: Tensor) -> None:
    with torch.no_grad():
        linear.bias.copy_(bias.to(linear.bias.dtype))


def _output(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    out = block(hidden, **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


__all__ = ["Rotation", "attach_online", "prepare_rotations", "rotate_block", "rotate_outside"]

"""Reading a Hugging Face safetensors model a block at a time, so it is never whole in memory.

The model is built on the meta device (shapes only); a module's tensors are read from the
shards (``llmcompress.shards``) when its turn comes and dropped back to meta when it is done.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..surgery import standard_layers
from ..shards import ShardedWeights
from ..disknames import CheckpointNames


def meta_model(directory: str | Path) -> nn.Module:
    """The model of ``directory``'s config.json with every parameter on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot read {Path(directory) / 'config.json'}: {err}") from err
    stored = getattr(config, "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=stored)
    except ValueError as err:
        raise ModelError(f"transformers cannot build a causal LM from {directory}'s config.json: {err}") from err
    model.tie_weights()  # from_config leaves a tied head its own (meta) tensor
    standard_layers(model)
    return model.eval()


def materialize(module: nn.Module, prefix: str, weights: ShardedWeights, device: torch.device | str, names: CheckpointNames) -> None:
    """Read ``module``'s tensors (state-dict names under ``prefix``) from the shards onto ``device``;
    ``names`` finds those the checkpoint stores under other names (per-expert or fused experts)."""
    tensors, missing = read_named(names, weights, [f"{prefix}{name}" for name in module.state_dict()], device)
    if missing:
        raise ModelError(f"{weights.directory} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: its tensor names "
                         "do not match the transformers model (an old or converted checkpoint): load it with transformers and "
                         "save_pretrained it, then compress that directory")
    module.load_state_dict({name[len(prefix):]: tensor for name, tensor in tensors.items()}, assign=True)


def read_named(names: CheckpointNames, weights: ShardedWeights, wanted: list[str], device: torch.device | str) -> tuple[dict, list[str]]:
    """The tensors the model calls ``wanted``, wherever the checkpoint stores them, and the names it lacks."""
    sources, missing = names.sources(wanted)
    stored = weights.read(sorted({source.stored for source in sources.values()}), device)
    return {name: source.take(stored[source.stored]) for name, source in sources.items()}, missing


def materialize_outside(model: nn.Module, blocks_path: str, weights: ShardedWeights, device: torch.device | str,
                        names: CheckpointNames) -> None:
    """Read every tensor outside the decoder blocks that the forward pass uses before block 0
    (embeddings, position tables), and re-tie tied ones: a tied head has no tensor of its own
    in the shards. An untied output head stays on the meta device (``materialize_head``):
    compression never calls it, and it is among the largest tensors of the model."""
    inside = f"{blocks_path}."
    head = _untied_head_names(model)
    wanted = [name for name in model.state_dict() if not name.startswith(inside) and name not in head]
    model.load_state_dict(read_named(names, weights, wanted, device)[0], assign=True, strict=False)
    model.tie_weights()
    still_meta = [name for name, tensor in model.state_dict().items() if name in wanted and tensor.is_meta]
    if still_meta:
        raise ModelError(f"{weights.directory} lacks {', '.join(still_meta[:3])}: the checkpoint is incomplete or its tensor names "
                         "do not match the transformers model")


def check_head(model: nn.Module, weights: ShardedWeights, names: CheckpointNames) -> None:
    """Fail now, before any block is compressed, if the untied output head is not in the shards
    under the name the model gives it."""
    _, missing = names.sources(sorted(_untied_head_names(model)))
    if missing:
        expected = set(model.state_dict())
        unmatched = sorted(name for name in weights.location if name not in expected)
        elsewhere = f" (tensors there that the model does not name: {', '.join(unmatched[:3])})" if unmatched else ""
        raise ModelError(f"{weights.directory} lacks {', '.join(missing)}{elsewhere}: the checkpoint is incomplete, or it stores "
                         "the output head under a name that this reader does not translate yet")


def materialize_head(model: nn.Module, weights: ShardedWeights, names: CheckpointNames) -> None:
    """Read the untied output head that ``materialize_outside`` left out, onto the CPU, unless it
    is in memory already (read early for a rotation, or made by one)."""
    state = model.state_dict()
    wanted = sorted(name for name in _untied_head_names(model) if state[name].is_meta)
    if not wanted:
        return
    tensors, missing = read_named(names, weights, wanted, "cpu")
    if missing:
        check_head(model, weights, names)
    model.load_state_dict(tensors, assign=True, strict=False)


def _untied_head_names(model: nn.Module) -> set[str]:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is embeddings.weight:
        return set()
    module_name = next(name for name, module in model.named_modules() if module is head)
    return {f"{module_name}.{name}" for name in head.state_dict()}


def release(module: nn.Module) -> None:
    """Drop ``module``'s tensors, keeping only their shapes."""
    module.to("meta")

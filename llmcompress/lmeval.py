"""lm-evaluation-harness tasks on our checkpoints: the ``llmcompress`` model class, and the
task runs behind ``compress eval --tasks``.

Our native checkpoints hold packed ``CompressedLinear`` layers that transformers alone cannot
load, so the class reads them with ``llmcompress.load`` and hands the model to lm-eval's own
``HFLM``, which does the tokenising, batching and scoring. Forwards compute in the dtype
``compress eval`` uses for perplexity (``precision.compute_dtype``: bfloat16 or float32 for a
16-bit model on a CPU), with each packed weight dequantized once per request type.

lm-eval 0.4.13 finds no model class outside its own tree, so ``python -m llmcompress.lmeval``
is ``lm_eval`` with this class registered (same arguments). The ``lm_eval.models`` entry point
in pyproject.toml is for lm-eval releases that read entry points (docs/lmeval.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load
from .errors import ConfigError
from .pipeline.placement import single_device
from .precision import compute_dtype, forward_weights

try:
    import lm_eval
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table
except ImportError as err:
    raise ConfigError(f"lm-evaluation-harness is not installed ({err}): pip install -e '.[lmeval]'") from err

MODEL_NAME = "llmcompress"
# What ``compress eval --json`` keeps of lm-eval's results: the numbers and how they were made, not the samples.
RECORD_KEYS = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "config")
_logger = logging.getLogger(__name__)


class LLMCompressLM(HFLM):
    """lm-eval's ``HFLM`` over a model ``llmcompress.load`` reads (a native checkpoint, one of our
    compressed-tensors or GPTQ exports, or a float model directory), or over a loaded model.

    ``dtype`` is what forwards compute in (``auto``, ``float32``, ``bfloat16``, ``float16``), not
    what the weights are stored in; ``verify`` checks the checkpoint's checksums first. Other
    keywords (``batch_size``, ``max_length``, ...) are ``HFLM``'s.
    """

    def __init__(self, pretrained: str | os.PathLike | nn.Module, tokenizer=None, dtype: str = "auto",  # noqa: ANN001
                 device: str | None = None, verify: bool = True, **kwargs) -> None:  # noqa: ANN003
        if isinstance(pretrained, nn.Module):
            model = pretrained
        else:
            model, loaded_tokenizer = load(pretrained, device=_device(device), verify=verify)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if tokenizer is None:
            raise ConfigError(f"{pretrained if isinstance(pretrained, str) else 'the model'} has no tokenizer, so lm-eval cannot "
                              "tokenise its tasks: add the tokenizer files to the checkpoint")
        stored = next(model.parameters())
        self.compute_dtype = compute_dtype(stored.dtype, stored.device, dtype)
        self.source = None if isinstance(pretrained, nn.Module) else str(pretrained)
        with _hflm_taking_a_loaded_model(model):
            # Log-probabilities in float32 whatever the forwards compute in, as our perplexity does.
            super().__init__(pretrained=model, tokenizer=tokenizer, softmax_dtype=torch.float32, **kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ANN001, ANN201 - HFLM's signature
        with forward_weights(self.model, self.compute_dtype):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: ANN001, ANN201
        with forward_weights(self.model, self.compute_dtype):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: ANN001, ANN201
        with forward_weights(self.model, self.compute_dtype):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        # HFLM's asks the Hugging Face hub for the model's revision, which a local checkpoint does not have.
        return {"model_source": self.source, "model_compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "lm_eval_model": MODEL_NAME}


# Run as ``python -m llmcompress.lmeval`` this file is imported twice (as __main__, then by any
# ``import llmcompress.lmeval``); lm-eval refuses a second class under a taken name.
if MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(LLMCompressLM)


def parse_tasks(text: str) -> list[str]:
    """``arc_easy,hellaswag`` as lm-eval's ``--tasks`` takes it."""
    tasks = [name.strip() for name in text.split(",") if name.strip()]
    if not tasks:
        raise ConfigError(f"--tasks {text!r} names no task: give lm-eval task names separated by commas")
    return tasks


def task_manager(tasks: list[str], tasks_path: str | os.PathLike | None = None) -> TaskManager:
    """The lm-eval task index that knows ``tasks`` (names, or paths of YAML files), with the
    tasks under ``tasks_path`` added; an unknown name is an error before any model loads."""
    if tasks_path is not None and not Path(tasks_path).is_dir():
        raise ConfigError(f"--tasks-path {tasks_path} is not a directory: give the directory that holds the task YAML files")
    if tasks_path is not None:
        # Indexing lm-eval's own thousands of task files takes seconds; tasks found under
        # tasks_path would win over built-ins of the same name anyway.
        local = TaskManager(include_path=str(tasks_path), include_defaults=False)
        if not _unknown(tasks, local):
            return local
    manager = TaskManager(include_path=None if tasks_path is None else str(tasks_path))
    unknown = _unknown(tasks, manager)
    if unknown:
        where = f"lm-eval's tasks or {tasks_path}" if tasks_path else "lm-eval's tasks (pass --tasks-path DIR for a directory of task YAML files)"
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not in {where}; `lm-eval ls tasks` lists the built-in ones")
    return manager


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], manager: TaskManager, *, limit: float | None = None,  # noqa: ANN001
                   num_fewshot: int | None = None, batch_size: int | str = 1, dtype: str = "auto",
                   log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on a loaded model, through ``LLMCompressLM``."""
    lm = LLMCompressLM(model, tokenizer=tokenizer, dtype=dtype, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=log_samples)


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], manager: TaskManager, *, model_name: str,  # noqa: ANN001
              limit: float | None, num_fewshot: int | None, batch_size: int | str, dtype: str, json_path: str | None,
              echo: Callable[[str], None]) -> dict:
    """``compress eval --tasks``: evaluate, print lm-eval's results table, and write the record as JSON."""
    echo(f"running lm-eval {lm_eval.__version__} tasks: {', '.join(tasks)}")
    results = evaluate_tasks(model, tokenizer, tasks, manager, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, dtype=dtype)
    echo(make_table(results))
    if results.get("groups"):
        echo(make_table(results, "groups"))
    limited = "" if limit is None else f", at most {limit:g} documents per task"
    echo(f"protocol: lm-eval {lm_eval.__version__}, model class {MODEL_NAME}, computed in {results['config']['model_compute_dtype']}, "
         f"batch size {batch_size}{limited}")
    record = {"model": model_name, "lm_eval_version": lm_eval.__version__,
              "lm_eval": json.loads(json.dumps({k: results[k] for k in RECORD_KEYS if k in results}, default=handle_non_serializable))}
    if json_path:
        Path(json_path).write_text(json.dumps(record, indent=2))
        echo(f"wrote: {json_path}")
    return record


def main() -> None:
    """``python -m llmcompress.lmeval ARGS``: lm-eval's own command line, with ``--model llmcompress`` known."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


def _unknown(tasks: list[str], manager: TaskManager) -> list[str]:
    return [task for task in tasks if task not in manager.all_tasks and not Path(task).is_file()]


def _device(requested: str | None) -> str:
    """Where to load: lm-eval's command line asks for cuda:0 unless told otherwise, and its ``hf``
    model falls back to the CPU when there is no GPU, so this one does too."""
    if requested is None or requested == "auto":
        return single_device("auto")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        _logger.warning("device %s requested but PyTorch sees no CUDA GPU: evaluating on the CPU", requested)
        return "cpu"
    return requested


@contextmanager
def _hflm_taking_a_loaded_model(model: nn.Module) -> Iterator[None]:
    """While ``HFLM.__init__`` runs: our ``quantization_config`` hidden from it, which would
    otherwise have transformers parse a method it does not know (the layers are already ours),
    and its warnings that a loaded model ignores loading options quieted (this class loaded it)."""
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        del config.quantization_config
    hflm_logger = logging.getLogger(HFLM.__module__)
    level = hflm_logger.level
    hflm_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hflm_logger.setLevel(level)
        if quantization is not None:
            config.quantization_config = quantization


if __name__ == "__main__":
    main()

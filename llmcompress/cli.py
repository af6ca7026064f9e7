"""The ``compress`` command line: parse, build the config, call the API, print.

``compress [MODEL] [OPTIONS]`` runs the main job; subcommands (added by later features) are
reached as ``compress NAME ...``.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from . import checkpoint, distributed, integrity, reports, rundir
from .api import compress as compress_model
from .api import compress_to_disk
from .calib import DEFAULT_EVALUATION, read_text
from .config import (
    ACT_BITS,
    COMPUTE_DTYPES,
    FORMAT_KINDS,
    LOWRANK_METHODS,
    METHODS,
    PRUNE_METHODS,
    AWQConfig,
    CalibConfig,
    CompressConfig,
    GPTQConfig,
    LowRankConfig,
    ModuleOverride,
    PruneConfig,
    QuantFormat,
)
from .errors import ConfigError, LLMCompressError
from .evalcache import cache_dir, cache_key, cached_perplexity
from .throughput import PEAK_SHAPE, matmul_peak
from .evaluate import PerplexityResult, perplexity
from .export import FORMATS as EXPORT_FORMATS
from .export import ExportError, export
from .export import notes as export_notes
from .export import vllm as vllm_check
from .export.engines import DEFAULT_ENGINE, ENGINES
from .fileio import staged_file
from .flags import recipe_from_config
from .memory import pin_mmap_threshold
from .lock import output_lock
from .models import DEFAULT_MODEL_NAME, load_config, load_model, resolve_model_dir
from .pipeline import find_decoder_blocks, plan_targets
from .pipeline.activations import PLACES
from .pipeline.coverage import Coverage, plan_coverage
from .pipeline.structure import plan_layers
from .pipeline.placement import AUTO, DEVICES, single_device
from .pipeline.sharded import meta_model
from .recipe import Recipe, load_recipe
from .summary import SizeSummary, size_summary

DEFAULT_COMMAND = "run"
ARGUMENTS_KEY = "llmcompress.arguments"
NO_QUANT_BITS = 16
COMPUTE_DTYPE_HELP = "What evaluation computes in; auto: as stored on a GPU, bfloat16 for 16-bit models on CPUs that have it, else float32."
NO_VERIFY_HELP = "Skip checking the checkpoint's files against the checksums recorded when it was written (loads faster)."


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to the default command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[ARGUMENTS_KEY] = list(args)  # quoted back in the command that resumes a run
        if args in (["-h"], ["--help"]):
            return super().parse_args(ctx, args)
        if not args or args[0] not in self.commands:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class SectionedCommand(click.Command):
    """A command whose --help lists its options under headings (one per pass, then calibration,
    evaluation, output, ...) instead of one long list."""

    def __init__(self, *args, sections: dict[str, tuple[str, ...]], **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = self.get_params(ctx)
        records = {p.name: p.get_help_record(ctx) for p in params}
        help_names = tuple(p.name for p in params if "--help" in getattr(p, "opts", ()))
        placed = {name for names in self.sections.values() for name in names} | set(help_names)
        leftover = ("Other options", tuple(n for n in records if n not in placed))
        for title, names in [*self.sections.items(), leftover, ("Help", help_names)]:
            rows = [records[name] for name in names if records.get(name)]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


RUN_SECTIONS = {
    "Model": ("model",),
    "Recipe": ("recipe_path", "print_recipe", "settings"),
    "Quantize": ("kind", "bits", "group_size", "symmetric", "method", "act_order", "static_groups", "damp", "gptq_clip", "awq_grid",
                 "no_awq_clip", "act_bits", "act_kind", "rotate"),
    "Low-rank branch": ("rank", "lowrank_method", "lowrank_alloc", "lowrank_dtype"),
    "Prune": ("prune_method", "sparsity", "pattern"),
    "Modules": ("skips", "overrides", "strict"),
    "Calibration": ("calib", "nsamples", "seqlen", "seed", "batch_size"),
    "Evaluation": ("run_eval", "eval_text", "eval_seqlen", "eval_windows", "eval_dtype"),
    "Output": ("out_dir", "overwrite", "resume", "export_format", "adapter", "engine"),
    "Placement": ("device", "activations", "offload_dir"),
}


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Compress a Hugging Face causal LM: `compress [MODEL] --bits 4 --out DIR`
    (the same as `compress run ...`). `compress COMMAND --help` tells more."""


def _parse_override(text: str) -> ModuleOverride:
    pattern, sep, fields = text.rpartition(":")
    if not sep or not pattern:
        raise click.BadParameter(f"{text!r}: expected REGEX:key=value[,key=value], e.g. 'down_proj:bits=8'")
    values: dict = {}
    for item in fields.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in ("bits", "group_size", "symmetric", "kind", "rank"):
            raise click.BadParameter(f"{item!r} in {text!r}: keys are bits, group_size, symmetric, kind, rank")
        values[key] = value.strip() if key == "kind" else (value.strip().lower() in ("1", "true", "yes") if key == "symmetric" else int(value))
    return ModuleOverride(pattern=pattern, **values)


@main.command(name=DEFAULT_COMMAND, cls=SectionedCommand, sections=RUN_SECTIONS,
              short_help="Compress a model (the default command): flags or a recipe file.")
@click.argument("model", required=False)
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="Run this YAML recipe (passes, options, targets, overrides) instead of building one from the flags below.")
@click.option("--print-recipe", is_flag=True, help="Print the recipe the options make, as YAML, and exit.")
@click.option("--set", "settings", multiple=True, metavar="KIND.OPTION=VALUE",
              help="Change one field of the recipe, e.g. quantize.bits=3 or calibration.nsamples=64 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory [default: out/<model>-<format>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory (or an unfinished run).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last committed block (same model and options).")
@click.option("--format", "kind", type=click.Choice(FORMAT_KINDS), default="int", show_default=True, help="Weight number format.")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits per weight: 2-8 (int), 4 (fp4), 16 = no quantization.")
@click.option("--group-size", type=int, default=None, help="Inputs per scale; -1 per channel [default: 128 int, 16 nvfp4, 32 mxfp4].")
@click.option("--sym/--asym", "symmetric", default=None, help="Symmetric (no zero points) or asymmetric [default: asym int].")
@click.option("--method", type=click.Choice(METHODS), default="rtn", show_default=True, help="Quantization method.")
@click.option("--act-order/--no-act-order", default=GPTQConfig.act_order, show_default=True, help="GPTQ: columns by descending Hessian diagonal.")
@click.option("--static-groups/--dynamic-groups", default=GPTQConfig.static_groups, show_default=True,
              help="GPTQ with act-order: fix group parameters up front (contiguous groups, no g_idx), or fit each group as reached (g_idx).")
@click.option("--damp", type=float, default=GPTQConfig.damp, show_default=True, help="GPTQ: dampening, a fraction of the mean Hessian diagonal.")
@click.option("--awq-grid", type=int, default=AWQConfig.grid, show_default=True, help="AWQ: grid points for the scale exponent.")
@click.option("--gptq-clip/--no-gptq-clip", default=None,
              help="GPTQ with static groups: search each group's range (shrunk by up to 20%) on the calibration output error "
                   "[default: on with static groups].")
@click.option("--no-awq-clip", is_flag=True, help="AWQ: skip the clipping search before RTN.")
@click.option("--lowrank", "rank", type=int, default=0, show_default=True, help="Rank of the 16-bit error branch beside each layer; 0 = none.")
@click.option("--lowrank-method", type=click.Choice(LOWRANK_METHODS), default=None,
              help="How the branch is fitted [default: eora with calibration text, lorc with --calib none].")
@click.option("--lowrank-alloc", type=click.Choice(["uniform", "energy"]), default="uniform", show_default=True,
              help="One rank everywhere, or the same budget spread by how much error each rank removes.")
@click.option("--lowrank-dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True, help="Storage of the branch factors.")
@click.option("--act-bits", type=click.Choice([str(b) for b in ACT_BITS]), default=None,
              help="Quantize the activations entering the low-bit matmul (W4A4 with 4; FP4 weights use FP4 activations).")
@click.option("--act-format", "act_kind", type=click.Choice(["int", "fp8_e4m3", "fp8_e5m2"]), default=None,
              help="Number format of the quantized activations [default: int; FP4 weights: their FP4]. Per token; "
              "static scales, groups and power-of-two scales: --set quantize.act_static=true, act_group_size, act_pow2.")
@click.option("--rotate", is_flag=True, help="Rotate the residual stream by a random Hadamard first, and down_proj's input online "
              "(QuaRot): outliers spread out, so low bits round with less error.")
@click.option("--prune", "prune_method", type=click.Choice(PRUNE_METHODS), default=None,
              help="Prune before quantizing: smallest |w|, Wanda (|w| x input norm) or SparseGPT (Hessian updates).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights removed, in [0, 1) [default: 0.5; N:M fixes it].")
@click.option("--pattern", default="unstructured", show_default=True, metavar="unstructured|N:M",
              help="Unstructured (per row) or N:M along the inputs, e.g. 2:4 (stored compact) or 4:8.")
@click.option("--skip", "skips", multiple=True, metavar="REGEX", help="Leave matching modules unquantized (repeatable).")
@click.option("--override", "overrides", multiple=True, metavar="REGEX:k=v,...", help="Other bits/group_size/symmetric/kind for matching modules (repeatable).")
@click.option("--strict", is_flag=True, help="Refuse to run when a weight would be left uncompressed without an explicit skip "
              "(a module type no pass handles); routers, embeddings and the head are skipped by default.")
@click.option("--calib", default=None, metavar="SOURCE", help="Calibration text: austen:train, FILE.txt, FILE.jsonl, hf:NAME, none [default: austen:train when the method needs data, else none].")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for drawing calibration windows.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration windows per forward pass.")
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True, help="Measure perplexity before and after.")
@click.option("--eval-text", default=DEFAULT_EVALUATION, show_default=True, metavar="SOURCE", help="Evaluation text source.")
@click.option("--eval-seqlen", type=int, default=1024, show_default=True, help="Tokens per evaluation window.")
@click.option("--eval-windows", type=int, default=40, show_default=True, help="Evaluation windows to score; 0 = the whole text.")
@click.option("--eval-dtype", type=click.Choice(COMPUTE_DTYPES), default="auto", show_default=True, help=COMPUTE_DTYPE_HELP)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where blocks are compressed and evaluated; auto: the blocks spread over the visible GPUs by accelerate's device map "
                   "(evaluation on the first), the CPU when there is none.")
@click.option("--activations", type=click.Choice(PLACES), default="auto", show_default=True,
              help="Where calibration activations between blocks are kept: on the device if they fit, else the host, else --offload-dir.")
@click.option("--offload-dir", type=click.Path(file_okay=False), default=None, help="Directory for calibration activations that fit nowhere else.")
@click.option("--export", "export_format", type=click.Choice(EXPORT_FORMATS), default="native", show_default=True,
              help="Checkpoint format to write: ours (keeps everything), or compressed-tensors / gptq, which transformers and vLLM load.")
@click.option("--adapter/--no-adapter", default=True, show_default=True,
              help="compressed-tensors / gptq: write low-rank branches as a PEFT LoRA adapter in OUT/adapter (else refuse them).")
@click.option("--engine", type=click.Choice(ENGINES), default=DEFAULT_ENGINE, show_default=True,
              help="compressed-tensors / gptq: the serving engine the export is for; what it would refuse to load is refused before writing.")
def run(model: str | None, recipe_path: str | None, print_recipe: bool, settings: tuple[str, ...], out_dir: str | None, overwrite: bool,
        resume: bool, calib: str | None, run_eval: bool, eval_text: str, eval_seqlen: int, eval_windows: int, eval_dtype: str, device: str,
        activations: str, offload_dir: str | None, export_format: str, adapter: bool, engine: str, strict: bool, **flags) -> None:  # noqa: ANN003
    """Compress MODEL (a Hugging Face directory, a .gguf file or a hub id; default: the bundled
    SmolLM2-135M-Instruct) and write a packed checkpoint that `llmcompress.load` reads.

    What is done is a recipe: the flags build one (--print-recipe shows it), or --recipe reads one."""
    started = time.perf_counter()
    out, streaming = None, False
    try:
        ctx = click.get_current_context()
        config = recipe_from_options(ctx, recipe_path, settings, calib=calib, **flags)
        if print_recipe:
            click.echo(config.to_yaml(), nl=False)
            return
        for warning in _unused_options(ctx, config, calib, run_eval):
            click.echo(warning, err=True)
        _check_device(device)
        if device == AUTO:
            click.echo(_describe_auto())
        if activations == "disk" and offload_dir is None:
            raise ConfigError("--activations disk needs a directory for them: add --offload-dir DIR")
        out = Path(out_dir or _default_out_dir(model, config))
        # Under torchrun, one process per GPU (or CPU share); the group lives as long as the command.
        device = ctx.with_resource(distributed.process_group(device))
        # A native checkpoint of a model on disk is written block by block as the blocks are
        # compressed (resumable, memory of one block); the serving formats need the whole model.
        streaming = export_format == "native" and _has_safetensors(model)
        placement = {"activations": activations, "offload_dir": offload_dir, "strict": strict}
        if not distributed.is_main():
            _lend_share(model, config, calib, device, placement, streaming, out)
            return
        # One run per output directory, from its checks until its result is in place.
        with output_lock(out):
            if resume and not streaming:
                raise ConfigError("--resume continues a native run of a local safetensors model: drop --export, or drop --resume")
            if streaming:
                rundir.check_start(out, resume, overwrite)
            else:
                checkpoint.check_output_dir(out, overwrite)
            _check_positions(load_config(model), _window_lengths(ctx, config, calib))
            eval_limit = eval_windows or None
            describe = _describe_run(config, calib)
            evaluation = (eval_text, eval_seqlen, eval_limit, eval_dtype) if run_eval else None
            before, after, before_ppl, after_ppl = _compress_and_measure(model, config, out, calib, device, resume, overwrite, export_format,
                                                                         (adapter, engine), describe, evaluation, placement, streaming)
    except KeyboardInterrupt:
        unfinished = rundir.unfinished_run(rundir.partial_path(out)) if streaming else None
        state = f"; {rundir.describe_unfinished(unfinished)}" if unfinished else ""
        click.echo(f"interrupted{state}", err=True)
        sys.exit(130)
    except LLMCompressError as err:
        raise click.ClickException(str(err)) from err
    click.echo(_summary_table(before, after, before_ppl, after_ppl, time.perf_counter() - started, out, config.summary_notes()))


def recipe_from_options(ctx: click.Context, recipe_path: str | None, settings: tuple[str, ...], **flags) -> Recipe:  # noqa: ANN003
    """The recipe a `compress run` command line describes: the --recipe file, or the one its flags
    build; then each --set applied."""
    if recipe_path is not None:
        spelled = {p.name: p.opts[0] for p in ctx.command.params}
        given = [spelled[name] for name in flags if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} part of the recipe, which --recipe {recipe_path} "
                              f"already gives: change it with --set KIND.OPTION=VALUE (e.g. --set quantize.bits=3), or edit the file")
        recipe = load_recipe(recipe_path)
    else:
        recipe = recipe_from_config(build_config(**flags))
    return recipe.with_settings(settings) if settings else recipe


def build_config(*, kind: str, bits: int, group_size: int | None, symmetric: bool | None, method: str, act_order: bool,
                 static_groups: bool, damp: float, awq_grid: int, gptq_clip: bool | None, no_awq_clip: bool, rank: int,
                 lowrank_method: str | None, lowrank_alloc: str, lowrank_dtype: str, act_bits: str | None, prune_method: str | None,
                 sparsity: float | None, pattern: str, skips: tuple[str, ...], overrides: tuple[str, ...], calib: str | None,
                 nsamples: int, seqlen: int, seed: int, batch_size: int, rotate: bool = False,
                 act_kind: str | None = None) -> CompressConfig:
    """The configuration that the command line's options describe (validated on construction)."""
    return CompressConfig(
        quant=None if bits == NO_QUANT_BITS else QuantFormat(kind=kind, bits=bits, group_size=group_size, symmetric=symmetric),
        method=method,
        calib=CalibConfig(source=calib or CalibConfig.source, nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size),
        overrides=tuple(ModuleOverride(pattern=p, skip=True) for p in skips) + tuple(_parse_override(o) for o in overrides),
        gptq=GPTQConfig(damp=damp, act_order=act_order, static_groups=static_groups, clip=gptq_clip),
        awq=AWQConfig(grid=awq_grid, clip=not no_awq_clip),
        lowrank=LowRankConfig(rank=rank, method=lowrank_method, alloc=lowrank_alloc, dtype=lowrank_dtype),
        act_bits=None if act_bits is None else int(act_bits),
        act_kind=act_kind,
        prune=PruneConfig(method=prune_method, sparsity=sparsity, pattern=pattern),
        rotate=rotate,
    )


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu (or auto)")


def _describe_auto() -> str:
    count = torch.cuda.device_count()
    return (f"--device auto: the blocks spread over {count} GPU{'s' if count > 1 else ''} by accelerate's device map" if count
            else "--device auto: PyTorch sees no GPU, so everything runs on the CPU")


def _has_safetensors(model: str | None) -> bool:
    """Whether the model can be read block by block: a local directory with safetensors weights,
    or a source we convert to one (the bundled default, a .gguf file)."""
    if model is None or model == "default" or model.lower().endswith(".gguf"):
        return True
    path = Path(model).expanduser()
    return (path / checkpoint.SINGLE_FILE).is_file() or (path / checkpoint.INDEX_FILE).is_file()


def _uses_calibration(recipe: Recipe, calib: str | None) -> bool:
    """Whether the run reads calibration text: a pass needs it, or --calib gives it to measure each layer's error."""
    return recipe.needs_calibration or (calib is not None and not recipe.calib.is_none)


def _describe_run(recipe: Recipe, calib: str | None) -> str:
    data = f"calibration {calib or recipe.calib.source}" if _uses_calibration(recipe, calib) else "data-free"
    return f"compressing: {recipe.describe()}, {data}"


def _window_lengths(ctx: click.Context, recipe: Recipe, calib: str | None) -> list[tuple[str, str, int]]:
    """The window lengths a run uses or its command line gives: (how each was given, how to change it, tokens)."""
    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE

    lengths = []
    if _uses_calibration(recipe, calib) or given("seqlen"):
        seqlen = recipe.calib.seqlen
        from_flag = ctx.params["recipe_path"] is None and seqlen == ctx.params["seqlen"]
        lengths.append(("--seqlen", "--seqlen ", seqlen) if from_flag else ("calibration.seqlen", "--set calibration.seqlen=", seqlen))
    if ctx.params["run_eval"] or given("eval_seqlen"):
        lengths.append(("--eval-seqlen", "--eval-seqlen ", ctx.params["eval_seqlen"]))
    return lengths


def _check_positions(config, lengths: list[tuple[str, str, int]]) -> None:  # noqa: ANN001 - a transformers PretrainedConfig
    """Refuse windows longer than the model has positions for, before any work: the model scores
    tokens beyond them as noise, and attention over such windows runs for hours."""
    limit = getattr(config, "max_position_embeddings", None)
    for name, setting, length in lengths:
        if limit is not None and length > limit:
            raise ConfigError(f"{name} {length} is beyond the model's {limit} positions (max_position_embeddings in its config.json): "
                              f"use {setting}{limit} or less")


def _unused_options(ctx: click.Context, recipe: Recipe, calib: str | None, run_eval: bool) -> list[str]:
    """Warnings for the options given on the command line that this run does not use."""
    given = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]
    calibration = [p.opts[0] for p in given if p.name in RUN_SECTIONS["Calibration"] and p.name != "calib"]
    evaluation = [p.opts[0] for p in given if p.name in RUN_SECTIONS["Evaluation"] and p.name != "run_eval"]
    with ctx.command.make_context(ctx.info_name, []) as fresh:
        defaults = fresh.params
    flags = {name: ctx.params[name] for name in FLAG_OPTIONS}
    built = recipe_from_config(build_config(**flags))
    # An option whose default is None is resolved from the others (--group-size 128 for INT4, 16
    # for NVFP4): giving the value it resolves to is not an option without effect.
    inert = [p.opts[0] for p in given if p.name in FLAG_OPTIONS and p.name not in RUN_SECTIONS["Calibration"]
             and defaults[p.name] is not None and flags[p.name] != defaults[p.name]
             and _same_recipe(built, {**flags, p.name: defaults[p.name]})]
    warnings = []
    if calibration and not _uses_calibration(recipe, calib):
        warnings.append(_unused(calibration, f": {recipe.describe()} is data-free, so no calibration text is read",
                                "add --calib SOURCE to measure each layer's error on it"))
    if inert:
        warnings.append(_unused(inert, f" on {recipe.describe()}", "add what uses {it} (compress run --help)"))
    if evaluation and not run_eval:
        warnings.append(_unused(evaluation, " with --no-eval", "drop --no-eval"))
    return warnings


def _same_recipe(recipe: Recipe, flags: dict) -> bool:
    """Whether ``flags`` build ``recipe`` (flags that build no valid recipe do not)."""
    try:
        return recipe_from_config(build_config(**flags)) == recipe
    except ConfigError:
        return False


def _unused(options: list[str], why: str, fix: str) -> str:
    """The warning for unused ``options``; ``fix`` may name them as {it}."""
    one = len(options) == 1
    it = "it" if one else "them"
    return f"warning: {', '.join(options)} {'has' if one else 'have'} no effect{why}; leave {it} out, or {fix.format(it=it)}"


def _compress_and_measure(model: str | None, recipe: Recipe, out: Path, calib: str | None, device: str, resume: bool,
                          overwrite: bool, export_format: str, serving: tuple[bool, str], describe: str, evaluation: tuple | None,
                          placement: dict, streaming: bool) -> tuple:
    """One run, whichever store holds the blocks: sizes and perplexity before, the compression,
    sizes and perplexity after, the output. Streaming, the model stays on disk and each block is
    committed to OUT.partial as it finishes; otherwise the model is loaded whole and written at the end."""
    single = single_device(device)  # loading and evaluation; the blocks go to ``device``, which may be "auto"
    label = model or DEFAULT_MODEL_NAME + " (bundled default)"
    if streaming:
        pin_mmap_threshold()
        float_model, tokenizer = meta_model(resolve_model_dir(model)), None
    else:
        click.echo(f"loading {label}")
        float_model, tokenizer = load_model(model, device=single)
    path, blocks = find_decoder_blocks(float_model)
    planned, left = plan_layers(blocks, path, recipe)  # a recipe that compresses nothing fails here
    coverage = plan_coverage(float_model, path, blocks, planned, left)
    click.echo(_coverage_line(coverage))
    if placement["strict"]:
        coverage.check_strict()
    targets = [target.name for target in planned]
    before = size_summary(float_model, targets)
    before_ppl = None
    if evaluation:
        def score_float_model() -> PerplexityResult:
            if not streaming:
                return _evaluate(float_model, tokenizer, "float model", *evaluation)
            click.echo(f"loading {label} whole, to evaluate it (--no-eval skips this)")
            return _evaluate(*load_model(model, device=single), "float model", *evaluation)
        before_ppl = _float_perplexity(model, single, evaluation, score_float_model)
    click.echo(describe)
    compressed = None
    if streaming:
        click.echo(f"{'resuming' if resume else 'committing'} each block in {rundir.partial_path(out)}; {out} appears when all are done")
        arguments = [a for a in click.get_current_context().meta[ARGUMENTS_KEY] if a not in ("--resume", "--overwrite")]
        compress_to_disk(model, recipe, out, calibration=calib, device=device, resume=resume, overwrite=overwrite,
                         command=shlex.join(["compress", *arguments]), **placement)
    else:
        compressed = compress_model(float_model, recipe, calibration=calib, tokenizer=tokenizer, device=device, **placement)
    after_ppl = None
    if evaluation:
        loaded, loaded_tokenizer = (compressed, tokenizer) if compressed is not None else checkpoint.load(out, device=single)
        after_ppl = _evaluate(loaded, loaded_tokenizer, "compressed model", *evaluation)
    # A layer that pruning left dense is still nn.Linear, and still counts.
    after = size_summary(compressed if compressed is not None else checkpoint.skeleton(out), targets)
    extras = _report_extras(before, after, before_ppl, after_ppl)
    if compressed is None:
        checkpoint.add_to_report(out, extras)
    else:
        click.echo(f"writing {out} ({export_format})")
        _write(compressed, out, export_format, tokenizer, {**compressed.compression_report.to_dict(), **extras}, overwrite, *serving)
    return before, after, before_ppl, after_ppl


def _lend_share(model: str | None, recipe: Recipe, calib: str | None, device: str, placement: dict, streaming: bool, out: Path) -> None:
    """A process other than the first under torchrun: the same compression, reading the model as
    the first process does, on its share of the calibration, writing and evaluating nothing."""
    if streaming:
        compress_to_disk(model, recipe, out, calibration=calib, device=device, progress=False, **placement)
    else:
        float_model, tokenizer = load_model(model, device=single_device(device))
        compress_model(float_model, recipe, calibration=calib, tokenizer=tokenizer, device=device, progress=False, **placement)


def _report_extras(before: SizeSummary, after: SizeSummary, before_ppl: PerplexityResult | None,
                   after_ppl: PerplexityResult | None) -> dict:
    return {
        "size_before": before.to_dict(),
        "size_after": after.to_dict(),
        "perplexity_before": before_ppl.to_dict() if before_ppl else None,
        "perplexity_after": after_ppl.to_dict() if after_ppl else None,
    }


def _write(model, out: Path, export_format: str, tokenizer, report: dict, overwrite: bool, adapter: bool, engine: str) -> None:  # noqa: ANN001
    """Write the chosen format; when a serving export refuses a layer, keep the work as a native checkpoint."""
    try:
        export(model, out, export_format, tokenizer=tokenizer, adapter=adapter, overwrite=overwrite, report=report, engine=engine)
    except ExportError as err:
        if export_format == "native":
            raise
        export(model, out, "native", tokenizer=tokenizer, overwrite=overwrite, report=report)
        raise ExportError(f"{err}. The compressed model was written to {out} as a native checkpoint instead; "
                          f"`compress export {out} --format {export_format}` converts it once the cause is fixed") from err
    _report_notes(model, export_format, engine)


def _report_notes(model, export_format: str, engine: str) -> None:  # noqa: ANN001
    for line in export_notes(model, export_format, engine):
        click.echo(line)


@main.command(name="export")
@click.argument("checkpoint_dir", metavar="CHECKPOINT", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "export_format", type=click.Choice(EXPORT_FORMATS), required=True, help="Format to write.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--adapter/--no-adapter", default=True, show_default=True,
              help="compressed-tensors / gptq: write low-rank branches as a PEFT LoRA adapter in OUT/adapter (else refuse them).")
@click.option("--no-verify", is_flag=True, help=NO_VERIFY_HELP)
@click.option("--engine", type=click.Choice(ENGINES), default=DEFAULT_ENGINE, show_default=True,
              help="compressed-tensors / gptq: the serving engine the export is for; what it would refuse to load is refused before writing.")
@click.option("--verify", "verify_in", type=click.Choice(["vllm"]), default=None,
              help="Load the export in vLLM, score the same text there and here, and fail if the perplexities differ by more than 0.5%.")
@click.option("--vllm-python", type=click.Path(dir_okay=False), default=None,
              help="--verify vllm: the python of a virtual environment with vLLM [default: $LLMCOMPRESS_VLLM_PYTHON].")
@click.option("--verify-windows", type=int, default=8, show_default=True, help="--verify vllm: windows of 512 tokens of austen:test to score.")
def export_command(checkpoint_dir: str, export_format: str, out_dir: str, overwrite: bool, adapter: bool, no_verify: bool, engine: str,
                   verify_in: str | None, vllm_python: str | None, verify_windows: int) -> None:
    """Convert a checkpoint of ours (native or an earlier export) into another format."""
    try:
        if verify_in == "vllm":
            if export_format == "native":
                raise ConfigError("--verify vllm checks what vLLM loads, and it does not load native checkpoints: "
                                  "export --format compressed-tensors or gptq")
            # Before the export: an interpreter without vLLM fails in a second, not after the work.
            click.echo(f"vLLM {vllm_check.vllm_version(vllm_python)} will score the export")
        click.echo(f"loading {checkpoint_dir}")
        model, tokenizer = checkpoint.load(checkpoint_dir, verify=not no_verify)
        click.echo(f"writing {out_dir} ({export_format})")
        out = export(model, out_dir, export_format, tokenizer=tokenizer, adapter=adapter, overwrite=overwrite, engine=engine)
    except LLMCompressError as err:
        raise click.ClickException(str(err)) from err
    _report_notes(model, export_format, engine)
    click.echo(f"wrote: {out}")
    if verify_in == "vllm":
        click.echo(f"scoring {verify_windows} windows of {vllm_check.WINDOW_TOKENS} tokens in vLLM and in llmcompress")
        try:
            result = vllm_check.check_export(model, tokenizer, out, vllm_python, verify_windows)
        except LLMCompressError as err:
            raise click.ClickException(str(err)) from err
        click.echo(result.describe())
        click.echo(f"protocol: {result.protocol}")
        if not result.ok:
            raise click.ClickException(f"vLLM's perplexity differs from ours by {result.relative:+.3%}, more than {result.tolerance:.1%}: "
                                       f"vLLM does not serve {out} as llmcompress computes it")


@main.command(name="verify")
@click.argument("checkpoint_dir", metavar="CHECKPOINT", type=click.Path(file_okay=False))
def verify_command(checkpoint_dir: str) -> None:
    """Check every file of a checkpoint against the checksums recorded when it was written, without loading the model."""
    directory = Path(checkpoint_dir).expanduser()
    started = time.perf_counter()
    try:
        checkpoint.read_config(directory)  # says what a missing path, an unfinished run or a plain directory is
        files = integrity.read_record(directory)
    except LLMCompressError as err:
        raise click.ClickException(str(err)) from err
    if files is None:
        raise click.ClickException(f"{directory} has no {integrity.CHECKSUM_FILE}: it was written before checkpoints recorded checksums, "
                                   "or not by llmcompress, so there is nothing to verify it against")
    damaged = 0
    for name, problem in integrity.check_files(directory, files):
        damaged += problem is not None
        click.echo(problem or f"ok  {name}")
    if damaged:
        raise click.ClickException(f"{damaged} of {len(files)} files damaged: {integrity.REMEDY}")
    megabytes = sum(entry["bytes"] for entry in files.values()) / 1e6
    click.echo(f"all {len(files)} files ({megabytes:,.1f} MB) match their checksums ({time.perf_counter() - started:.2f} s)")


@main.command(name="eval")
@click.argument("model", metavar="MODEL_OR_CHECKPOINT", required=False)
@click.option("--text", default=DEFAULT_EVALUATION, show_default=True, metavar="SOURCE", help="Evaluation text source.")
@click.option("--seqlen", type=int, default=1024, show_default=True, help="Tokens per window.")
@click.option("--windows", type=int, default=40, show_default=True, help="Windows to score; 0 = the whole text.")
@click.option("--baseline", is_flag=True, help="Also score the float model and print the difference.")
@click.option("--float-model", default=None, metavar="MODEL",
              help="The float model for --baseline [default: the one the checkpoint was compressed from].")
@click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default="auto", show_default=True, help=COMPUTE_DTYPE_HELP)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True, help="auto: the first GPU, else the CPU.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the numbers as JSON.")
@click.option("--no-verify", is_flag=True, help=NO_VERIFY_HELP)
@click.option("--tasks", default=None, metavar="TASK[,TASK...]",
              help="Run these lm-evaluation-harness tasks instead of perplexity (pip install -e '.[lmeval]'; docs/lmeval.md).")
@click.option("--tasks-path", type=click.Path(file_okay=False), default=None, help="--tasks: a directory of task YAML files to add.")
@click.option("--limit", type=float, default=None, help="--tasks: documents per task, or a fraction of them below 1 [default: all].")
@click.option("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples [default: each task's own].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="--tasks: sequences per forward pass.")
def eval_command(model: str | None, text: str, seqlen: int, windows: int, baseline: bool, float_model: str | None, dtype: str,
                 device: str, json_path: str | None, no_verify: bool, tasks: str | None, tasks_path: str | None, limit: float | None,
                 num_fewshot: int | None, batch_size: int) -> None:
    """Perplexity of a model (directory, .gguf, default) or of a checkpoint of ours, with its protocol;
    with --tasks, lm-evaluation-harness tasks instead."""
    try:
        _check_device(device)
        device = single_device(device)
        if tasks:
            if baseline or float_model:
                raise ConfigError("--baseline scores perplexity, not --tasks: run compress eval --tasks on the float model too")
            from . import lmeval  # an optional extra: imported only for --tasks

            task_names = lmeval.parse_tasks(tasks)
            manager = lmeval.task_manager(task_names, tasks_path)  # an unknown task fails here, before the model loads
        click.echo(f"loading {model or DEFAULT_MODEL_NAME + ' (bundled default)'}")
        loaded, tokenizer = _load_any(model, device, verify=not no_verify)
        if tasks:
            lmeval.run_tasks(loaded, tokenizer, task_names, manager, model_name=model or DEFAULT_MODEL_NAME, limit=limit,
                             num_fewshot=num_fewshot, batch_size=batch_size, dtype=dtype, json_path=json_path, echo=click.echo)
            return
        _check_positions(loaded.config, [("--seqlen", "--seqlen ", seqlen)])
        result = _evaluate(loaded, tokenizer, "model", text, seqlen, windows or None, dtype)
        peak = matmul_peak(getattr(torch, result.dtype), device)
        record = {"model": model or DEFAULT_MODEL_NAME, "perplexity": result.to_dict(), "matmul_peak_gflops": peak}
        click.echo(f"perplexity {result.perplexity:.3f}")
        click.echo(f"speed: {result.seconds:.1f} s, {result.gflops:.1f} GFLOP/s achieved; torch.mm {'x'.join(map(str, PEAK_SHAPE))} "
                   f"on this machine in {result.dtype}: {peak:.1f} GFLOP/s")
        if baseline:
            quantization = getattr(loaded.config, "quantization_config", None) or {}
            source = float_model or (quantization.get("source_model") if isinstance(quantization, dict) else None)
            if source is None:
                raise ConfigError(f"{model} does not record the float model it came from: pass --float-model MODEL")
            del loaded

            def score_float_model() -> PerplexityResult:
                click.echo(f"loading the float model {source}")
                return _evaluate(*load_model(source, device=device), "float model", text, seqlen, windows or None, dtype)
            reference = _float_perplexity(source, device, (text, seqlen, windows or None, dtype), score_float_model)
            delta = result.perplexity - reference.perplexity
            record.update(float_model=source, baseline=reference.to_dict(), delta=delta, relative_delta=delta / reference.perplexity)
            click.echo(f"float model perplexity {reference.perplexity:.3f}; difference {delta:+.3f} ({delta / reference.perplexity:+.2%})")
        click.echo(f"protocol: {result.protocol}")
    except LLMCompressError as err:
        raise click.ClickException(str(err)) from err
    if json_path:
        Path(json_path).write_text(json.dumps(record, indent=2))
        click.echo(f"wrote: {json_path}")


@main.command(name="report")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), default=None,
              help="YAML grid of configurations [default: the bundled grid, SmolLM2 on the CPU].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Directory for report.md, report.json, plots and runs/.")
@click.option("--model", default=None, help="Run the grid on this model instead of the one it names.")
@click.option("--checkpoints", "checkpoints_dir", type=click.Path(file_okay=False), default=None,
              help="Where each configuration's checkpoint is written [default: OUT/checkpoints].")
@click.option("--keep-checkpoints/--no-keep-checkpoints", default=False, show_default=True,
              help="Keep each checkpoint after it is evaluated (its per-layer statistics are kept either way).")
def report_command(grid_path: str | None, out_dir: str, model: str | None, checkpoints_dir: str | None, keep_checkpoints: bool) -> None:
    """Run a grid of configurations on one model and write report.md, report.json and PNG plots.

    Each configuration is a separate `compress` run and a separate `compress eval` run. Rerunning
    the same command resumes an interrupted grid: finished configurations are kept."""
    out = Path(out_dir)
    try:
        grid = reports.load_grid(grid_path or reports.DEFAULT_GRID)
        if model:
            grid = grid.with_model(model)
        _check_grid(grid)
        reports.check_plotting()
        command = shlex.join(["compress", "report", *click.get_current_context().meta[ARGUMENTS_KEY][1:]])
        click.echo(f"report grid {grid_path or reports.DEFAULT_GRID}: {len(grid.configurations)} configurations on "
                   f"{grid.model or DEFAULT_MODEL_NAME + ' (bundled default)'}; each run's output goes to {out / 'runs'}/NAME/log.txt")
        records = reports.run_grid(grid, out, Path(checkpoints_dir) if checkpoints_dir else out / "checkpoints", keep_checkpoints,
                                   echo=click.echo)
        report = reports.build_report(grid, records, out / "runs", command)
        plots = reports.draw_all(report, out)
        for name, text in (("report.json", json.dumps({**report, "plots": plots}, indent=2)), ("report.md", reports.markdown(report, plots))):
            with staged_file(out / name) as staging:
                staging.write_text(text)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to go on; finished configurations are kept", err=True)
        sys.exit(130)
    except LLMCompressError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote: {out / 'report.md'}, {out / 'report.json'}, " + ", ".join(str(out / p) for p in plots.values()))
    failed = [r["name"] for r in records if r["status"] != "ok"]
    if failed:
        raise click.ClickException(f"{len(failed)} configuration(s) failed: {', '.join(failed)} (see report.md); "
                                   "fix them and rerun the same command: the others are kept")


def _check_grid(grid: reports.Grid) -> None:
    """Every configuration's options must parse and make a valid config for this model, before hours are spent on the others."""
    skeleton = meta_model(resolve_model_dir(grid.model))
    blocks_path, blocks = find_decoder_blocks(skeleton)
    for configuration in grid.configurations:
        if configuration.is_float:
            continue
        try:
            with run.make_context("compress", list(configuration.args)) as ctx:
                params = ctx.params
                config = recipe_from_options(ctx, params["recipe_path"], params["settings"],
                                             **{name: params[name] for name in FLAG_OPTIONS})
            plan_targets(blocks, blocks_path, config)
        except (click.ClickException, LLMCompressError) as err:
            message = err.format_message() if isinstance(err, click.ClickException) else str(err)
            raise ConfigError(f"grid configuration {configuration.name!r} ({shlex.join(configuration.args)}): {message}") from err


def _load_any(model: str | None, device: str, verify: bool) -> tuple:
    """A checkpoint of ours or an export (``checkpoint.load``, checked against its checksums with
    ``verify``), or a float model of any source."""
    if model is None or model == "default" or model.lower().endswith(".gguf"):
        return load_model(model, device=device)
    return checkpoint.load(model, device=device, verify=verify)


def _default_out_dir(model: str | None, recipe: Recipe) -> str:
    name = Path(model).stem if model else "smollm2-135m-instruct"
    tag = re.sub(r"[^a-z0-9]+", "-", recipe.describe().lower()).strip("-")
    return str(Path("out") / f"{name}-{tag}")


def _coverage_line(coverage: Coverage) -> str:
    """The share of weight parameters the recipe compresses, and what the rest is."""
    left = "; ".join(f"{reason} {count} ({parameters:,} parameters)" for reason, (count, parameters) in coverage.left().items())
    return f"coverage: {coverage.share:.1%} of weight parameters compressed" + (f"; left: {left}" if left else "")


def _evaluate(model, tokenizer, label: str, text: str, seqlen: int, windows: int | None, dtype: str) -> PerplexityResult:  # noqa: ANN001
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer, so perplexity cannot be measured: add its tokenizer files, "
                          "or pass --no-eval when compressing")
    click.echo(f"evaluating the {label}")
    return perplexity(model, tokenizer, text, seqlen=seqlen, max_windows=windows, dtype=dtype)


def _float_perplexity(model: str | None, device: str, evaluation: tuple, score: Callable[[], PerplexityResult]) -> PerplexityResult:
    """The float model's perplexity: ``score()``, or the cached result of an earlier run that scored
    the same model files on the same text with the same protocol."""
    location = Path(resolve_model_dir(model))
    if not location.is_dir():  # a hub id: its files are not ours to fingerprint
        return score()
    text, seqlen, windows, dtype = evaluation
    result, cached = cached_perplexity(cache_key(location, read_text(text), seqlen, windows, False, dtype, device), score)
    if cached:
        click.echo(f"float model perplexity {result.perplexity:.3f}: cached from an earlier run on the same model files, "
                   f"text and protocol ({cache_dir()})")
    return result


def _summary_table(before: SizeSummary, after: SizeSummary, before_ppl: PerplexityResult | None,
                   after_ppl: PerplexityResult | None, seconds: float, out: Path, notes: list[str]) -> str:
    rows = [
        ("quantized layers: weights", f"{before.layer_parameters:,}", f"{after.layer_parameters:,}"),
        ("quantized layers: bytes", _mb(before.layer_bytes), _mb(after.layer_bytes)),
        ("quantized layers: bits/weight", f"{before.layer_bits_per_weight:.3f}", f"{after.layer_bits_per_weight:.3f}"),
        ("  of which low-rank branch", "", f"{after.branch_bits_per_weight:.3f}"),
        ("whole model: parameters", f"{before.parameters:,}", f"{after.parameters:,}"),
        ("whole model: bytes", _mb(before.bytes), _mb(after.bytes)),
        ("whole model: bits/weight", f"{before.bits_per_weight:.3f}", f"{after.bits_per_weight:.3f}"),
    ]
    if before_ppl and after_ppl:
        rows.append(("perplexity", f"{before_ppl.perplexity:.3f}", f"{after_ppl.perplexity:.3f}"))
    width = max(len(r[0]) for r in rows)
    lines = ["", f"{'':{width}}  {'before':>14}  {'after':>14}"]
    lines += [f"{name:{width}}  {b:>14}  {a:>14}" for name, b, a in rows]
    if after_ppl:
        lines.append(f"perplexity protocol: {after_ppl.protocol}")
    lines.append("layer formats: " + ", ".join(f"{label} x {count}" for label, count in after.layer_formats.items()))
    lines += notes
    lines.append(f"wall time: {seconds:.1f} s")
    lines.append(f"wrote: {out}")
    return "\n".join(lines)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.2f} MB"


# The options that build a recipe (everything build_config takes), as click names them.
FLAG_OPTIONS = tuple(inspect.signature(build_config).parameters)

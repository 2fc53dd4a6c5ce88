"""`lrc bench`: latency and throughput of a (compressed) model and the model it is measured against, in one run."""

from __future__ import annotations

import os

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from lowrank_cli.cli import console
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import options_of, with_options
from lowrank_cli.cli.options import Fused, Json, Model, choice, dtype_choice, number
from lowrank_cli.models.runtime import WayOptions
from lowrank_cli.models.source_options import SourceOptions

if TYPE_CHECKING:
    import torch

EPILOG = """\
Examples:

  lrc bench deit_lr.safetensors --against deit_base --device cuda --dtype bf16 --batch-size 1,32,256

  (on CUDA: eager rows, then compiled + CUDA-graphs rows; the low-rank layers run the fused kernel)

  lrc bench deit_lr.safetensors --against deit_base --device cuda --dtype bf16 --no-fused --eager-only

  lrc bench deit_lr.safetensors --against deit_base --device cuda --dtype bf16 --compile --cuda-graphs

  lrc bench deit_lr.safetensors --against deit_base --device cpu --threads 2 --batch-size 16 --json

  lrc bench deit_lr.safetensors --against deit_base --profile

  lrc bench llama_lr.safetensors --against meta-llama/Llama-3.2-1B --generate 64 --batch-size 1,16 --seq-len 512
"""

DEFAULT_BATCHES = {"cuda": "1,32,256", "cpu": "1,16"}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TIMING_PANEL = "Timing"

Against = Annotated[Optional[str], typer.Option(
    "--against", metavar="MODEL", show_default=False,
    help="The model to compare with (any MODEL source, e.g. the dense original); its row is the 1.00x reference.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Precision both models are cast to.", **dtype_choice())]
BatchSizes = Annotated[Optional[str], typer.Option(
    "--batch-size", metavar="N[,N...]", show_default=False,
    help="Comma-separated batch sizes (default: 1,32,256 on cuda, 1,16 on cpu).")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile both models the same way (the first calls compile: slow).")]
CompileMode = Annotated[Optional[str], typer.Option(
    "--compile-mode", show_default=False, **choice(*COMPILE_MODES, metavar="MODE"),
    help=f"torch.compile mode: {', '.join(COMPILE_MODES[:-1])} or {COMPILE_MODES[-1]} (implies --compile).")]
CudaGraphs = Annotated[bool, typer.Option(
    "--cuda-graphs", help="Replay both models from CUDA graphs (with --compile: mode reduce-overhead); CUDA only.")]
EagerOnly = Annotated[bool, typer.Option(
    "--eager-only", help="On CUDA, leave out the compiled + CUDA-graphs rows (torch.compile mode reduce-overhead) "
    "that follow the eager ones by default.")]
Generate = Annotated[Optional[int], typer.Option(
    "--generate", metavar="N", min=2, show_default=False,
    help="A causal LM: time greedy generation of N tokens instead (prefill ms, decode tokens/s; --seq-len prompt "
    "tokens; cuda: static KV cache and compiled decode, cpu: eager).")]
Profile = Annotated[bool, typer.Option(
    "--profile", help="Also split one forward pass at the largest batch into GEMMs, attention and the rest "
    "(torch.profiler).")]
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, show_default=False, rich_help_panel=TIMING_PANEL,
    help="CPU threads for torch (default: torch's choice).")]
Warmup = Annotated[Optional[int], typer.Option(
    "--warmup", min=1, show_default=False, rich_help_panel=TIMING_PANEL,
    help="Warm-up calls per model and batch size (default: 3 on cuda, 1 on cpu; +2 compiled).")]
Repeats = Annotated[Optional[int], typer.Option(
    "--repeats", min=1, show_default=False, rich_help_panel=TIMING_PANEL,
    help="Timed repeats per model and batch size (default: at least 5 (3 on cpu) and --min-time).")]
MinTime = Annotated[Optional[float], typer.Option(
    "--min-time", show_default=False, rich_help_panel=TIMING_PANEL, callback=number(low=0),
    help="Seconds of timed repeats per model and batch size, >= 0 (default: 2 on cuda, 1 on cpu).")]


@with_options(options_of(SourceOptions, only=("input_size", "seq_len", "library", "arch", "model_args",
                                               "revision")))
@with_options(options_of(WayOptions, only=("runtime", "group")), after="batch_size")
@with_options(options_of(SourceOptions, only=("device",)), after="against")
def bench(
    model: Model,
    against: Against = None,
    dtype: Dtype = "fp32",
    batch_size: BatchSizes = None,
    compile_: Compile = False,
    compile_mode: CompileMode = None,
    cuda_graphs: CudaGraphs = False,
    eager_only: EagerOnly = False,
    fused: Fused = None,
    generate: Generate = None,
    profile: Profile = False,
    json_out: Json = False,
    threads: Threads = None,
    warmup: Warmup = None,
    repeats: Repeats = None,
    min_time: MinTime = None,
    **source,
) -> None:
    """Measure latency, throughput and peak memory of MODEL, and of --against in the same run.

    Both models run interleaved at each batch size for at least --min-time; the median and its spread are shown.
    Every way the device offers is tried (--runtime: eager, compile, graphs on CUDA; eager on the CPU; grouped and
    ungrouped shared-input layers, --group / --no-group) and each model's fastest is reported, the ratio best
    against best. --compile / --compile-mode / --cuda-graphs / --eager-only pick one treatment instead. --fused
    runs the low-rank layers through the fused Triton kernel (default: the two linears, faster on an H200).
    """
    device, size, seq_len = source.pop("device"), source.pop("input_size"), source.pop("seq_len")
    runtime, group = source.pop("runtime"), source.pop("group")
    dev, dt, sizes, compile_arg = _refuse_bad_options(device, dtype, batch_size, threads, cuda_graphs, compile_,
                                                      compile_mode, fused)
    treatments: list | None = None
    if eager_only or compile_arg or cuda_graphs:
        treatments = [(compile_arg, cuda_graphs)]
    _check_runtime(runtime, dev, bool(treatments), generate is not None)
    models, reference, size = _load_models(model, against, size, seq_len, **source)
    common = {"device": dev, "dtype": dt, "batch_sizes": sizes, "input_size": size, "reference": reference,
              "fused": fused, "warmup": warmup, "repeats": repeats, "min_time": min_time}
    if generate is not None:
        from lowrank_cli.cli.bench_generate import run_generate

        return run_generate(models, reference, common, generate, runtime, group, json_out, seq_len)
    ways = None if treatments else _ways(dev, runtime, False if fused else group, models)  # fused: its own groups
    rows, profiles = _measure(models, treatments, ways, group, common, profile)
    document = _document(models, [model, against], reference, size, dev, dt, rows, profiles, cuda_graphs)
    if json_out:
        console.print_json(document)
        return
    print_table(document, rows)
    if profile:
        print_profiles(profiles, document["profile_note"])


def _refuse_bad_options(device: str, dtype: str, batch_size: str | None, threads: int | None, cuda_graphs: bool,
                        compile_: bool, compile_mode: str | None, fused: bool | None) -> tuple[Any, ...]:
    """Everything that can be refused, refused before the (slow) loading: (device, dtype, batch sizes, compile
    argument)."""
    import torch

    from lowrank_cli.devices import resolve_device, resolve_dtype
    from lowrank_cli.errors import UsageError
    from lowrank_cli.evaluation.bench_options import parse_batch_sizes, resolve_compile_mode

    if threads is not None:
        cores = os.cpu_count() or 1
        if threads > cores:
            raise UsageError(f"--threads must be at most {cores} (the CPU cores there are), got {threads}")
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, torch.float32)
    sizes = parse_batch_sizes(batch_size or DEFAULT_BATCHES["cuda" if dev.type == "cuda" else "cpu"])
    if cuda_graphs and dev.type != "cuda":
        raise UsageError("--cuda-graphs needs a CUDA device: drop it, or use --device cuda")
    compile_arg: bool | str = compile_mode or compile_
    resolve_compile_mode(compile_arg, cuda_graphs)  # an unknown mode fails here, before the models are loaded
    from lowrank_cli.models.fusion import resolve_fused

    resolve_fused(fused, dev)  # --fused without CUDA or Triton: exit 6 before the loading
    return dev, dt, sizes, compile_arg


def _load_models(model: str, against: str | None, size: tuple[int, ...] | None, seq_len: int | None, library: str,
                 arch: str | None, model_args: dict[str, Any] | None, revision: str | None) -> tuple[Any, ...]:
    """(label -> model, the reference's label or None, the input size: given, a text model's, or None for the
    model's own)."""
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.models.families import TEXT, modality_of
    from lowrank_cli.models.inputs import check_input_size, default_input_size

    loaded = load_model(model, arch=arch, model_args=model_args, revision=revision,
                        library=library, log=lambda msg: console.info(f"Model: {msg}"))
    models: dict[str, Any] = {}
    label = _label(model)
    models[label] = loaded.model
    reference = None
    if against is not None:
        ref = load_model(against, library=library, log=lambda msg: console.info(f"Against: {msg}"))
        ref_label = _label(against)
        if ref_label == label:
            ref_label += " (against)"
        models[ref_label] = ref.model
        reference = ref_label
    check_input_size(loaded.model, size)
    if seq_len is not None or modality_of(loaded.model) == TEXT:
        size = default_input_size(loaded.model, seq_len)
    return models, reference, size


def _check_runtime(runtime: str | None, dev: torch.device, treatment: bool, generate: bool) -> None:
    """--runtime checked before the loading: one the device cannot run, or one besides a --compile option."""
    from lowrank_cli.errors import UsageError
    from lowrank_cli.models.runtime import check_runtime

    if generate and treatment:
        raise UsageError("`generate` runs the way `runtime` says (eager, compile, graphs): leave out --compile / "
                         "--compile-mode / --cuda-graphs / --eager-only")
    if runtime is not None and treatment:
        raise UsageError("`runtime` picks the ways to run and --compile / --compile-mode / --cuda-graphs / "
                         "--eager-only pick one treatment: give one of them")
    if runtime not in (None, "all"):
        check_runtime(runtime, dev)


def _ways(dev: torch.device, runtime: str | None, group: bool | None, models: dict[str, Any]) -> list:
    """The ways --runtime and --group ask for (a runtime the device cannot run: a usage error)."""
    from lowrank_cli.evaluation.bench_ways import device_runtimes, ways_for

    runtimes = [runtime] if runtime not in (None, "all") else device_runtimes(dev.type, runtime == "all")
    return ways_for(dev, runtimes, group, list(models.values()), console.info)


def _measure(models: dict[str, Any], treatments: list | None, ways: list | None, group: bool | None,
             common: dict[str, Any], profile: bool) -> tuple[list, list | None]:
    """The bench rows of every way (or of every (compile, cuda_graphs) treatment, one after the other) and, with
    --profile, one eager profile per model at the largest batch (else None), under a spinner."""
    from lowrank_cli.evaluation.bench import bench as run_bench
    from lowrank_cli.evaluation.bench_ways import bench_ways, group_models

    status = console.err.status("benchmarking", spinner="dots") if console.is_main_process() else None
    if status:
        status.start()
    progress = (lambda msg: status.update(f"benchmarking: {msg}")) if status else None
    try:
        rows = []
        if ways is not None:
            rows = bench_ways(models, ways, warn=console.warn, progress=progress, **common)
        for compile_arg, cuda_graphs in treatments or []:
            group_models(models, group, console.info)
            rows += run_bench(models, compile=compile_arg, cuda_graphs=cuda_graphs, warn=console.warn,
                              progress=progress, **common)
        profiles = _profiles(models, common, status) if profile else None
    finally:
        if status:
            status.stop()
    return rows, profiles


def _profiles(models: dict[str, Any], common: dict[str, Any], status: Any) -> list:
    """One eager profile per model at the largest batch size."""
    import torch

    from lowrank_cli.evaluation.profiling import profile as run_profile
    from lowrank_cli.models.inputs import example_input

    profiles = []
    largest = max(common["batch_sizes"])
    first = next(iter(models.values()))
    size = common["input_size"] or _input_size(models, common["reference"])
    x = example_input(first, size, largest, device=common["device"], dtype=common["dtype"],
                      generator=torch.Generator().manual_seed(0))
    for name, m in models.items():
        if status:
            status.update(f"profiling {name} at batch {largest}")
        profiles.append(run_profile(m, x, name=name))
    return profiles


def _document(models: dict[str, Any], sources: list[str | None], reference: str | None,
              size: tuple[int, ...] | None, dev: torch.device, dt: torch.dtype, rows: list, profiles: list | None,
              cuda_graphs: bool) -> dict[str, Any]:
    """The --json document (the tables are printed from it too)."""
    import torch

    from lowrank_cli.devices import SHORT_DTYPE, device_name
    from lowrank_cli.evaluation.bench import process_peak_rss

    document = {
        "device": str(dev),
        "device_name": device_name(dev),
        "dtype": SHORT_DTYPE[dt],
        "compile": rows[0].compile if rows else None,
        "cuda_graphs": rows[0].cuda_graphs if rows else cuda_graphs,  # also true for modes that graph on their own
        "modes": list(dict.fromkeys(mode_label(r) for r in rows)),  # the treatments, in the order of the rows
        "fused": any(r.fused for r in rows),
        "threads": torch.get_num_threads(),
        "input_size": list(size or _input_size(models, reference)),
        "reference": reference,
        "models": {name: {"source": src, "params": sum(p.numel() for p in m.parameters()),
                          "macs_per_image": next((r.macs // r.batch_size for r in rows if r.model == name and r.macs), None)}
                   for (name, m), src in zip(models.items(), sources)},
        "rows": [r.to_json() for r in rows],
        "peak_memory_note": _memory_note(dev.type),
        "process_peak_rss_bytes": process_peak_rss(),
        "torch": torch.__version__,
    }
    if profiles is not None:
        document["profile"] = [p.to_json() for p in profiles]
        document["profile_note"] = ("ms per forward pass at the largest batch, eager (not compiled): "
                                    + ("CUDA kernel time" if dev.type == "cuda" else
                                       "CPU op time: linear/attention ops with what runs under them, the rest self time"))
    return document


def _label(source: str) -> str:
    from pathlib import Path

    return Path(source).name if ("/" in source or "\\" in source) and not source.startswith("hf-hub:") else source


def _input_size(models: dict, reference: str | None) -> tuple[int, ...]:
    from lowrank_cli.models.inputs import default_input_size

    return default_input_size(models[reference or next(iter(models))])


def _memory_note(device_type: str) -> str:
    from lowrank_cli.evaluation.bench import PEAK_MEMORY_NOTE

    return PEAK_MEMORY_NOTE["cuda" if device_type == "cuda" else "cpu"]


def mode_label(row: Any) -> str:
    """How a row's models ran: eager, compiled, whether from CUDA graphs and grouped; `fastest:` before the
    model's fastest way."""
    graphs = " + CUDA graphs" if row.cuda_graphs else ""
    if not row.compile:
        label = "eager" + graphs
    else:
        label = ("compiled" if row.compile in ("default", "reduce-overhead") else row.compile) + graphs
    label += ", grouped" if getattr(row, "grouped", False) else ""
    return ("fastest: " + label) if getattr(row, "fastest", False) else label


def print_table(doc: dict, rows: list) -> None:
    from rich import box
    from rich.table import Table

    from lowrank_cli.evaluation.counting import format_size

    modes = doc.get("modes") or ["eager"]
    title = (f"lrc bench on {doc['device_name']}, {doc['dtype']}{', ' + modes[0] if len(modes) == 1 else ''}"
             f", input {'x'.join(map(str, doc['input_size']))}")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    memory = any(r.peak_memory_bytes is not None for r in rows)  # never on the CPU: see the note below
    table.add_column("model", overflow="fold", min_width=16)
    if len(modes) > 1:
        table.add_column("mode", no_wrap=True)
    for col in ("batch", "median ms", "p10-p90 ms", "img/s", "speed-up", "MAC ratio", *(["peak mem"] if memory else [])):
        table.add_column(col, justify="right", no_wrap=True)
    last = None
    for r in rows:
        way = (r.batch_size, r.compile, r.cuda_graphs, getattr(r, "fastest", False))  # a way's models together
        if last is not None and way != last:
            table.add_section()
        last = way
        speed = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        macs = "-" if r.mac_ratio is None else f"{r.mac_ratio:.2f}x"
        mem = "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:,.0f} MiB"
        name = r.model + (" (ref)" if r.model == r.reference else "") + (" (fused)" if r.fused else "")
        table.add_row(name, *([mode_label(r)] if len(modes) > 1 else []), str(r.batch_size),
                      f"{r.median_ms:,.2f}", f"{r.p10_ms:,.2f}-{r.p90_ms:,.2f}", f"{r.throughput:,.1f}", speed, macs,
                      *([mem] if memory else []))
    console.out.print(table)
    rss = doc["process_peak_rss_bytes"]
    notes = ["speed-up: reference median / model median (same mode); MAC ratio: reference MACs / model MACs"
             if doc["reference"] else "one model: pass --against MODEL for speed-up and MAC ratio"]
    if any(getattr(r, "fastest", False) for r in rows):
        notes.append("fastest: each model's fastest way (every way timed, both models alike); its speed-up is "
                     "best against best")
    if doc.get("fused"):
        notes.append("(fused): the low-rank layers ran the fused Triton kernel (--no-fused: the two linears)")
    notes.append(f"peak memory: {doc['peak_memory_note']}"
                 + (f"; process peak RSS {format_size(rss)}B" if rss and doc["device"] == "cpu" else ""))
    for n in notes:
        console.out.print(n, highlight=False)


def print_profiles(profiles: list, note: str) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"where the time goes ({note})", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="fold", min_width=16)
    for col in ("batch", "GEMM ms", "attention ms", "other ms", "total ms", "GEMM share"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in profiles:
        share = p.gemm_ms / p.total_ms if p.total_ms else 0.0
        table.add_row(p.model, str(p.batch_size), f"{p.gemm_ms:,.1f}", f"{p.attention_ms:,.1f}", f"{p.other_ms:,.1f}",
                      f"{p.total_ms:,.1f}", f"{share:.0%}")
    console.out.print(table)
    for p in profiles:
        top = ", ".join(f"{n} {ms:,.1f} ms ({kind})" for kind, n, ms in p.top[:4])
        console.out.print(f"largest in {p.model}: {top}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(cls=LrcCommand, epilog=EPILOG)(bench)

"""Streaming factorize: a model larger than the machine's memory factorized from its safetensors files, one block
at a time, into an lrc checkpoint written tensor by tensor.

The model is a skeleton (models.skeleton: parameters on the meta device), so the plan, the rank rule and the
uncalled-linear check run on shapes alone, exactly as `factorize` runs them on a loaded model. Then each unit of
the state dict is handled in turn: a block (timm block, decoder layer) or a planned linear outside the blocks is
materialised from the files (only its own tensors are read), factorized by the same code as the in-memory path,
written at its place in the output (checkpoint.shard_writer) and sent back to meta; every other tensor is read,
written and dropped. Sequential calibration walks the decoder layers the same way (compress.sequential's
`layer_scope`); the modules before the first layer (token embeddings) are materialised while the calibration
windows pass through them. What is held at any time: one block in its file dtype, its SVD's float32 work, and
(with `calib`) one layer's calibration activations, in memory or, over the memory budget, in a temporary file
beside the output (compress.layer_inputs). The output is the in-memory path's, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli.checkpoint.format import info_of, metadata_of, record_source
from lowrank_cli.checkpoint.shard_writer import SetWriter
from lowrank_cli.checkpoint.shards import TensorSet
from lowrank_cli.compress.calibration import data_aware_factor_fn
from lowrank_cli.compress.factorization import (
    FactorizeResult,
    Swap,
    calibration_step,
    plan_step,
    record,
    sequential_step,
    swap_planned,
)
from lowrank_cli.compress.factorize_options import FactorizeOptions
from lowrank_cli.compress.plan import Plan
from lowrank_cli.evaluation.counting import count_params
from lowrank_cli.models.families import family_of
from lowrank_cli.models.skeleton import materialise, release
from lowrank_cli.models.weights import check_fits


@dataclass
class Unit:
    """One step of the stream: a module to materialise (`module`), or one tensor to copy through (`module` None)."""

    module: str | None
    names: list[str]


@dataclass
class Stream:
    """A skeleton model, the files its weights are in, and the state-dict names the output stores."""

    model: nn.Module
    tensors: TensorSet
    stored: list[str]

    def read(self, prefix: str, *, direct: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of module `prefix` (with `direct`, its own, not its children's), by their local names, read
        from the files."""
        start = f"{prefix}." if prefix else ""
        names = [k for k in self.tensors.entries if k.startswith(start) and not (direct and "." in k[len(start):])]
        return {k[len(start):]: self.tensors.read(k) for k in names}


def open_stream(model: nn.Module, tensors: TensorSet, what: str) -> Stream:
    """Check the files against the skeleton (names and shapes, as loading does) before any tensor is read."""
    family = family_of(model)
    family.finish(model)  # tie what the config ties (stored once), as loading does
    state = model.state_dict(keep_vars=True)
    tied = {copy for copy, original in family.tied_copies(model).items()
            if copy in state and original in state and state[copy] is state[original]}
    shapes = tensors.shapes
    expected = {k: v for k, v in shapes.items() if k not in tied}
    check_fits(model, {**expected, **{k: tuple(state[k].shape) for k in tied}}, what)
    return Stream(model, tensors, [k for k in state if k not in tied])


def units_of(model: nn.Module, plan: Plan, stored: list[str]) -> list[Unit]:
    """The stream's steps in state-dict order: the outermost blocks, the planned linears outside them, and each
    other tensor on its own."""
    blocks = family_of(model).block_names(model)
    outer = [b for b in blocks if not any(b.startswith(f"{o}.") for o in blocks if o != b)]
    modules = outer + [n for n in plan.ranks if not any(n.startswith(f"{b}.") for b in outer)]
    units: dict[str, Unit] = {}
    for name in stored:
        owner = next((m for m in modules if name.startswith(f"{m}.")), None)
        key = owner if owner is not None else f"\0{name}"
        units.setdefault(key, Unit(owner, [])).names.append(name)
    return list(units.values())


def output_layout(model: nn.Module, stream: Stream, plan: Plan,
                  out_dtype: torch.dtype | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every output tensor's dtype and shape, before any SVD: a planned linear's weight becomes its two factors
    (LowRankLinear `first` rank x d_in, `second` d_out x rank, the bias on `second`), in the weight's dtype."""
    def dtype_of(name: str) -> torch.dtype:
        dtype = stream.tensors.dtype(name)
        return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype

    layout = {}
    for name in stream.stored:
        module, _, leaf = name.rpartition(".")
        if module in plan.ranks:
            rank, (d_out, d_in) = plan.ranks[module], stream.tensors.shapes[f"{module}.weight"]
            dtype = dtype_of(f"{module}.weight")
            if leaf == "weight":
                layout[f"{module}.first.weight"] = (dtype, (rank, d_in))
                layout[f"{module}.second.weight"] = (dtype, (d_out, rank))
            else:
                layout[f"{module}.second.{leaf}"] = (dtype, stream.tensors.shapes[name])
            continue
        layout[name] = (dtype_of(name), stream.tensors.shapes[name])
    return layout


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def emit(writer: SetWriter, module: nn.Module, prefix: str, dtype: torch.dtype | None) -> None:
    """Write a materialised module's state dict at its places, then free it."""
    for key, value in module.state_dict(prefix=f"{prefix}.").items():
        if key in writer.layout:
            writer.write(key, _cast(value, dtype))
    release(module)


def copy_through(writer: SetWriter, stream: Stream, names: list[str], dtype: torch.dtype | None) -> None:
    for name in names:
        if name in writer.layout:
            writer.write(name, _cast(stream.tensors.read(name), dtype))


def stream_plain(stream: Stream, units: list[Unit], plan: Plan, result: FactorizeResult, swap: Swap,
                 writer: SetWriter) -> dict[str, list[float]]:
    """Without calibration: each unit materialised, its planned linears factorized, written, freed."""
    model, spectra = stream.model, {}
    planned = {p.name: p for p in plan.layers}
    for unit in units:
        if unit.module is None:
            copy_through(writer, stream, unit.names, swap.dtype)
            continue
        module = model.get_submodule(unit.module)
        materialise(module, stream.read(unit.module))
        mine = [n for n in plan.ranks if n == unit.module or n.startswith(f"{unit.module}.")]
        if mine:
            layer_swap = dataclasses.replace(swap, offset=len(result.layers), total=len(plan.ranks), cast_model=False)
            spectra.update(swap_planned(model, Plan([planned[n] for n in mine]), result.layers, layer_swap))
        emit(writer, model.get_submodule(unit.module), unit.module, swap.dtype)
    return spectra


@contextlib.contextmanager
def lazy_outside(stream: Stream, inside: list[str], device: torch.device | None = None) -> Iterator[None]:
    """While open, a module outside `inside` (the decoder layers) that runs gets its own tensors from the files
    first (the token embeddings, when the calibration windows pass through them); all are freed on exit."""
    model, done = stream.model, []

    def load(module: nn.Module, args: Any) -> None:
        own = stream.read(names[module], direct=True)
        if own:
            materialise(module, {k: v.to(device) if device is not None else v for k, v in own.items()})
            done.append(module)

    names = {m: n for n, m in model.named_modules()
             if not any(n == i or n.startswith(f"{i}.") for i in inside)
             and any(p.device.type == "meta" for p in m.parameters(recurse=False))}
    hooks = [m.register_forward_pre_hook(load) for m in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for module in done:
            release(module)


@contextlib.contextmanager
def lazy_forward(stream: Stream, units: list[Unit], device: torch.device) -> Iterator[None]:
    """While open, every forward pass reads each unit module (block) from the files when it is called and frees it
    when it returns, and the modules outside them read their own tensors when called (freed on exit): one block
    in memory at a time, for parallel calibration (each batch re-reads the blocks)."""
    model = stream.model
    modules = [u.module for u in units if u.module is not None]

    def enter(module: nn.Module, args: Any) -> None:
        materialise(module, stream.read(block_of[module]))
        module.to(device)  # `device` cuda: the block runs there, one at a time

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        release(module)

    block_of = {model.get_submodule(m): m for m in modules}
    hooks = [h for m in block_of for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with lazy_outside(stream, modules, device):
            yield
    finally:
        for h in hooks:
            h.remove()


def stream_sequential(stream: Stream, units: list[Unit], plan: Plan, result: FactorizeResult, swap: Swap,
                      writer: SetWriter, setup: Any, log: Callable[[str], None] | None
                      ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Sequential calibration streamed: each decoder layer materialised for its turn, written and freed after."""
    from lowrank_cli.compress.sequential import stack_of

    model = stream.model
    stack_name, stack = stack_of(model)
    layers = [f"{stack_name}.{i}" for i in range(len(stack))]

    @contextlib.contextmanager
    def scope(i: int, layer: nn.Module) -> Iterator[None]:
        materialise(layer, stream.read(layers[i]))
        yield
        emit(writer, layer, layers[i], swap.dtype)

    with lazy_outside(stream, layers):
        spectra, summary = sequential_step(model, plan, result, setup.run, dataclasses.replace(swap, cast_model=False),
                                           log, layer_scope=scope)
    for unit in units:  # sequential calibration refuses planned linears outside the layers: the rest is copied
        if unit.module not in layers:
            copy_through(writer, stream, unit.names, swap.dtype)
    return spectra, summary


def factorize_stream(stream: Stream, output: str, opts: FactorizeOptions, *, source: Callable[[], dict[str, Any]],
                     max_shard_size: int, steps: dict[str, Any], log: Callable[[str], None] | None,
                     warn: Callable[[str], None]) -> tuple[FactorizeResult, list]:
    """`factorize` of a skeleton from its files, written to `output` (one file, or shards above
    `max_shard_size`); returns the result and the files written."""
    start = time.perf_counter()
    model = stream.model
    setup = plan_step(model, opts, steps.get("plan"), steps.get("input_size"), steps.get("check_calls", True), warn,
                      steps.get("calib_progress"))
    plan, run = setup.plan, setup.run
    result = FactorizeResult(model, plan, params_before=count_params(model).total, dense=plan.dense,
                             extra={"streamed": True})
    swap = Swap(factor_fn=steps.get("factor_fn"), svd=opts.truncation.method, device=setup.device,
                dtype=setup.out_dtype, progress=steps.get("progress"))
    units = units_of(model, plan, stream.stored)
    layout = output_layout(model, stream, plan, setup.out_dtype)
    with SetWriter(output, layout, max_shard_size, reserve=_reserve(layout)) as writer:
        if run is not None and run.mode == "sequential":
            spectra, result.extra["calibration"] = stream_sequential(stream, units, plan, result, swap, writer, setup,
                                                                     log)
        else:
            if run is not None:  # parallel: every layer's statistics in one pass, one block in memory at a time
                if log is not None:
                    log("parallel calibration streamed: each batch reads the blocks one at a time; every target "
                        "layer's second moments are held in memory until its SVD")
                with lazy_forward(stream, units, run.device):
                    stats, result.extra["calibration"] = calibration_step(model, plan, run)
                swap = dataclasses.replace(swap, factor_fn=swap.factor_fn or data_aware_factor_fn(stats))
            spectra = stream_plain(stream, units, plan, result, swap, writer)
        result.params_after = count_params(model).total
        result.seconds = time.perf_counter() - start
        record(model, result, spectra, None, opts, setup)
        record_source(model, source())  # a file hash computed on the side is waited for here
        info = info_of(model)
        info.provenance.setdefault("saved", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        files = writer.finish(metadata_of(model, info))
    return result, files


def _reserve(layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Room for a one-file output's record (known at the end): spectra (~12 characters per singular value) and
    per-layer records, plus the config; a larger record is rewritten (checkpoint.shard_writer)."""
    values = sum(min(shape[1], layout[name.replace(".first.", ".second.")][1][0])
                 for name, (_, shape) in layout.items() if name.endswith(".first.weight"))
    return 256 * 1024 + 12 * values + 600 * len(layout)

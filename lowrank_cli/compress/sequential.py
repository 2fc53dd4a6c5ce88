"""Sequential calibration (SVD-LLM, arXiv 2403.07378): a causal LM's decoder layers calibrated and factorized one
at a time, layer i on the hidden states that layers 0..i-1, already compressed, give, so that each layer's
truncation sees the inputs it will really get, and calibration memory does not grow with depth.

    1. Run the model on the calibration windows up to its first decoder layer: a forward pre-hook on that layer
       keeps the hidden states entering it and the call's other arguments (rotary cos / sin, attention mask,
       positions: whatever the architecture passes), then stops the forward. SVD-LLM and GPTQ-style code do the
       same; it works for every architecture whose layers form one stack.
    2. For each layer: hooks add its linears' input second moments while it runs on the held hidden states; its
       planned linears are factorized on them (whitened SVD); the compressed layer then runs again and its outputs
       replace the held hidden states, batch by batch, as the next layer's inputs.

What is held between layers is one (windows, seq_len, hidden) tensor set, the size of one layer's activations
(logged; in memory, or on disk over a memory budget: compress.layer_inputs), and one layer's second moments; the
parallel mode instead keeps every layer's second moments for the whole run. Each layer runs on `device` (moved
there and back when the model lives elsewhere), so a model larger than the device's memory is calibrated one layer
at a time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowrank_cli.compress.calibration import InputStats, MomentHooks, linears_named, on_device
from lowrank_cli.compress.layer_inputs import HeldStates
from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.families import family_of

# (names of one layer's planned linears, their input statistics) -> factorize them in place
FactorizeLayer = Callable[[list[str], dict[str, InputStats]], None]
# (shape of all the held hidden states, dtype) -> the tensor to hold them in, or None: in memory on the device
Hold = Callable[[tuple[int, ...], torch.dtype], torch.Tensor | None]


class _Caught(Exception):
    """Raised by the pre-hook on the first decoder layer: the rest of the forward is not needed."""


@dataclass
class LayerInputs:
    """The hidden states entering the current decoder layer, per batch of windows, and the other arguments of the
    layer's call, per batch size (the last batch may be smaller; masks and positions have a batch dimension)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    device: torch.device | None = None  # where the layer runs; None: where the held batches are
    on_disk: bool = False  # the batches are views of one file-backed tensor (compress.layer_inputs)

    @property
    def bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def arguments(self, index: int) -> tuple[tuple, dict]:
        rest, kwargs = self.calls[len(self.hidden[index])]
        hidden = self.hidden[index]
        return (hidden.to(self.device) if self.device is not None else hidden, *rest), kwargs

    def replace(self, index: int, out: torch.Tensor) -> None:
        """The layer's outputs for batch `index` become its held hidden states (on disk: copied into its view)."""
        if self.on_disk:
            self.hidden[index].copy_(out)
        else:
            self.hidden[index] = out


def _to(value: Any, device: torch.device) -> Any:
    """Tensors (in tuples, lists, dicts) moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def first_layer_inputs(model: nn.Module, first: nn.Module, windows: torch.Tensor, *, batch_size: int,
                       device: torch.device, hold: Hold | None = None) -> LayerInputs:
    """Run `model` on `windows` (N, seq_len) up to its layer `first`; what enters that layer, kept on `device`, or
    in the tensor that `hold(shape of all of them, dtype)` gives for them at the first batch (None: on `device`)."""
    inputs = LayerInputs(device=device)
    store: torch.Tensor | None = None  # the one tensor that holds every batch, when `hold` gives one

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal store
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        if not inputs.hidden and hold is not None:
            store = hold((len(windows), *hidden.shape[1:]), hidden.dtype)
            inputs.on_disk = store is not None
        if store is not None:
            start = sum(len(h) for h in inputs.hidden)
            inputs.hidden.append(store[start:start + len(hidden)].copy_(hidden.detach()))
        else:
            inputs.hidden.append(hidden.detach().to(device))
        inputs.calls.setdefault(len(hidden), (_to(rest, device), _to(kwargs, device)))
        raise _Caught

    # where the model's weights are; a skeleton's (streaming factorize) are on meta until they are read: the CPU
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(windows[start:start + batch_size].to(home))
            except _Caught:
                continue
            raise InputError("the model's first decoder layer was never called: the layer stack its family found "
                             "is not on the forward path; use `calib_mode` parallel")
    finally:
        handle.remove()
    return inputs


def _run(layer: nn.Module, inputs: LayerInputs, *, keep: bool) -> None:
    """Run `layer` on every held batch; with `keep`, its outputs replace the held hidden states."""
    for i in range(len(inputs.hidden)):
        args, kwargs = inputs.arguments(i)
        out = layer(*args, **kwargs)
        if keep:
            inputs.replace(i, (out[0] if isinstance(out, (tuple, list)) else out).detach())


def _layer_stats(layer: nn.Module, prefix: str, names: list[str], inputs: LayerInputs, windows: int,
                 device: torch.device) -> dict[str, InputStats]:
    """The input second moments of the layer's `names` (full module names) while it runs on `inputs`."""
    local = {n: n[len(prefix):] for n in names}
    moments = MomentHooks(linears_named(layer, list(local.values())), device)
    try:
        _run(layer, inputs, keep=False)
    finally:
        moments.remove()
    for name, short in local.items():
        if moments.tokens[short] == 0:
            raise InputError(f"module {name!r} saw no input during calibration: it is not on the model's forward "
                             "path; leave it out of the factorized layers")
    return {n: InputStats(moments.sums[s], moments.tokens[s], windows) for n, s in local.items()}


def stack_of(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers (name, ModuleList); a model without a stack of repeated layers is refused."""
    family = family_of(model)
    name = family.layer_stack(model)
    if name is None:
        raise UsageError(f"`calib_mode` sequential calibrates the decoder layers of a causal LM one after another; "
                         f"{type(model).__name__} ({family.name}) has no repeated decoder layers: use `calib_mode` "
                         "parallel")
    stack = model.get_submodule(name)
    # Every layer is called with the arguments caught at the first one: layers of several attention types (sliding
    # window and full, as Gemma-style configs alternate them) get masks of their own, which this cannot replay.
    kinds = {getattr(layer, "attention_type", None) for layer in stack}
    if len(kinds) > 1:
        names = ", ".join(sorted(map(str, kinds)))
        raise UsageError(f"the decoder layers of {type(model).__name__} mix attention types ({names}), "
                         "which take different masks: `calib_mode` sequential cannot replay them; use `calib_mode` "
                         "parallel")
    return name, stack


def sequential_calibration(model: nn.Module, names: list[str], windows: torch.Tensor, factorize_layer: FactorizeLayer,
                           *, device: torch.device, batch_size: int = 8,
                           progress: Callable[[int, int], None] | None = None,
                           log: Callable[[str], None] | None = None,
                           layer_scope: Callable[[int, nn.Module], Any] | None = None, spill: bool | None = None,
                           memory_budget: int | None = None,
                           spill_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Calibrate and factorize the planned linears `names` of `model` layer by layer (see the module docstring),
    through `factorize_layer(layer_names, stats)`; returns the summary for the record. `layer_scope(i, layer)`: a
    context manager around layer i's turn (streaming factorize materialises the layer from its files on entry and
    writes and frees it on exit). The held hidden states are in memory, or on disk in a temporary folder in
    `spill_dir` (default: the system's) when `spill`, or by default when they are over `memory_budget` bytes
    (default: a share of the memory available, compress.layer_inputs)."""
    started = time.perf_counter()
    stack_name, stack = stack_of(model)
    prefixes = [f"{stack_name}.{i}." for i in range(len(stack))]
    outside = [n for n in names if not any(n.startswith(p) for p in prefixes)]
    if outside:
        raise UsageError(f"`calib_mode` sequential calibrates the linears inside the decoder layers ({stack_name}.N); "
                         f"{outside[0]} is outside them: leave it out, or use `calib_mode` parallel")
    was_training = model.training
    model.eval()
    held = HeldStates(device, spill=spill, budget=memory_budget, folder=spill_dir)
    try:
        with torch.no_grad(), family_of(model).plain_outputs(model), held:
            inputs = first_layer_inputs(model, stack[0], windows, batch_size=batch_size, device=device,
                                        hold=held.place)
            if log is not None:
                log(f"Sequential calibration: {len(windows)} windows of {windows.shape[1]} tokens; the hidden states "
                    f"entering each decoder layer are {held.describe(inputs.bytes, inputs.hidden[0].dtype)}")
            for i, layer in enumerate(stack):
                mine = [n for n in names if n.startswith(prefixes[i])]
                scope = layer_scope(i, layer) if layer_scope is not None else contextlib.nullcontext()
                with scope, on_device(layer, device):
                    if mine:
                        factorize_layer(mine, _layer_stats(layer, prefixes[i], mine, inputs, len(windows), device))
                    if i + 1 < len(stack):
                        _run(layer, inputs, keep=True)
                if progress is not None:
                    progress(i + 1, len(stack))
    finally:
        model.train(was_training)
    return {"mode": "sequential", "samples": len(windows), "tokens": int(windows.numel()),
            "held_bytes": inputs.bytes, "held": held.held, "seconds": round(time.perf_counter() - started, 2)}

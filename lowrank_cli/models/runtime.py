"""How a loaded model runs: eager, torch.compile, or replayed from CUDA graphs; and whether its low-rank layers
that read one input run grouped (models.grouping). Options defined once (`RunOptions`) for `lowrank_cli.load`,
`lrc eval` and `lrc bench`.

    runtime="eager"     the model as it is
    runtime="compile"   torch.compile (a causal LM: its forward, with a static KV cache for generate)
    runtime="graphs"    torch.compile mode reduce-overhead (CUDA graph trees; a causal LM: static KV cache and
                        compiled decode, transformers' recipe); CUDA only
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.errors import UsageError
from lowrank_cli.option_fields import Opt

RUNTIMES = ("eager", "compile", "graphs")
GRAPH_DEVICES = "a CUDA device (cuda, cuda:N)"

RUNTIME = Opt("eager", choices=RUNTIMES, metavar="eager|compile|graphs",
              help="How the model runs: eager, compile (torch.compile) or graphs (CUDA graphs, CUDA only).")
GROUP = Opt(None, flag="--group/--no-group", show_default=False,
            help="Run low-rank layers that read one input (q/k/v, gate/up) as one GEMM (default: on).")


@dataclass
class RunOptions:
    """How a loaded model runs (see the module docstring)."""

    runtime: str = RUNTIME.field()
    group: bool | None = GROUP.field()


@dataclass
class WayOptions:
    """`lrc bench`'s choice of ways (the runtime option of models.runtime, for several runtimes)."""

    runtime: str | None = RUNTIME.field(
        default=None, choices=(*RUNTIMES, "all"), metavar="eager|compile|graphs|all",
        help="Run every model this way only: eager, compile or graphs (CUDA); default: every way the device offers "
             "(cuda: all three; cpu: eager; all: compile on the cpu too), each model's fastest reported.")
    group: bool | None = GROUP.field(help="Run low-rank layers that read one input (q/k/v, gate/up) as one GEMM only "
                                     "(--no-group: never; default: both ways, the fastest reported).")


def check_runtime(runtime: str, device) -> str:
    """`runtime` checked for `device` (a UsageError for an unknown one, or graphs off CUDA)."""
    import torch

    if runtime not in RUNTIMES:
        raise UsageError(f"`runtime` '{runtime}' is not one of {', '.join(RUNTIMES)}")
    if runtime == "graphs" and torch.device(device).type != "cuda":
        raise UsageError(f"`runtime=graphs` replays CUDA graphs, which need {GRAPH_DEVICES}, not "
                         f"'{torch.device(device)}': use runtime=eager or runtime=compile there, or a CUDA device")
    return runtime


def compile_mode(runtime: str) -> str | None:
    """The torch.compile mode of a runtime (None: eager)."""
    return {"eager": None, "compile": "default", "graphs": "reduce-overhead"}[runtime]


def apply_runtime(model, runtime: str, device):
    """`model` ready to run as `runtime` says on `device` (checked first). A model that generates (a causal LM)
    keeps its class: its forward is compiled and generate uses a static KV cache; any other is torch.compile'd."""
    import torch

    mode = compile_mode(check_runtime(runtime, device))
    if mode is None:
        return model
    mode_arg = None if mode == "default" else mode
    if generates(model):
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode=mode_arg)
        return model
    return torch.compile(model, mode=mode_arg)


def generates(model) -> bool:
    """A model with a KV cache that `generate` fills (its family says what a token costs in cache)."""
    from lowrank_cli.models.families import family_of

    return (getattr(model, "generation_config", None) is not None and hasattr(model, "generate")
            and family_of(model).kv_cache_bytes_per_token(model) is not None)

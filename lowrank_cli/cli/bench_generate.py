"""`lrc bench --generate N`: a causal LM's prefill latency and decode tokens/s, and --against's, in one run."""

from __future__ import annotations

from typing import Any

from lowrank_cli.cli import console


def generate_runtime(runtime: str | None, device_type: str) -> str:
    """The runtime --generate runs: --runtime, else CUDA's static KV cache with compiled decode (graphs), the
    CPU's eager dynamic cache."""
    if runtime not in (None, "all"):
        return runtime
    return "graphs" if device_type == "cuda" else "eager"


def run_generate(models: dict[str, Any], reference: str | None, common: dict[str, Any], new_tokens: int,
                 runtime: str | None, group: bool | None, json_out: bool, seq_len: int | None = None) -> None:
    """Time generation (evaluation.generation_bench) and print the table or the --json document. The prompt is
    --seq-len tokens; without it, the default input length, shortened so that it and the new tokens fit the
    models' positions (a small model's default length is all of them)."""
    import torch

    from lowrank_cli.devices import SHORT_DTYPE, device_name
    from lowrank_cli.evaluation.bench_ways import group_models
    from lowrank_cli.evaluation.generation_bench import bench_generate, check_generates
    from lowrank_cli.evaluation.generation_bench import default_prompt_tokens

    check_generates(models)
    dev = common["device"]
    way = generate_runtime(runtime, dev.type)
    group_models(models, group, console.info)
    prompt = seq_len if seq_len is not None else default_prompt_tokens(models, new_tokens)
    status = console.err.status("timing generation", spinner="dots") if console.is_main_process() else None
    if status:
        status.start()
    try:
        rows = bench_generate(models, new_tokens=new_tokens, batch_sizes=common["batch_sizes"], prompt_tokens=prompt,
                              device=dev, dtype=common["dtype"], runtime=way, reference=reference,
                              repeats=common["repeats"] or 3,
                              progress=(lambda msg: status.update(f"timing generation: {msg}")) if status else None)
    finally:
        if status:
            status.stop()
    document = {"device": str(dev), "device_name": device_name(dev), "dtype": SHORT_DTYPE[common["dtype"]],
                "runtime": way, "prompt_tokens": prompt, "new_tokens": new_tokens, "reference": reference,
                "greedy": True, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "rows": [r.to_json() for r in rows]}
    if json_out:
        console.print_json(document)
        return
    print_generate_table(document, rows)


def print_generate_table(doc: dict, rows: list) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"lrc bench --generate on {doc['device_name']}, {doc['dtype']}, {doc['runtime']}, prompt "
                        f"{doc['prompt_tokens']} tokens, {doc['new_tokens']} new (greedy)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="fold", min_width=16)
    for col in ("batch", "cache", "prefill ms", "decode ms/step", "tokens/s", "prefill speed-up", "decode speed-up"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        name = r.model + (" (ref)" if r.model == r.reference else "") + (" (grouped)" if r.grouped else "")
        table.add_row(name, str(r.batch_size), r.cache, f"{r.prefill_ms:,.2f}", f"{r.decode_ms_per_token:,.2f}",
                      f"{r.decode_tokens_per_s:,.1f}", _ratio(r.prefill_speedup), _ratio(r.decode_speedup))
    console.out.print(table)
    console.out.print("prefill: the prompt's forward and the first token; decode: one step for the whole batch; "
                      "speed-up: the reference's time / the model's (same runtime)", highlight=False)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"

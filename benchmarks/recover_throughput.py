"""Images/s of one recovery step of `lrc recover`, next to the ideal measured in the same run.

    python benchmarks/recover_throughput.py                       # deit_base, kappa 2, batch 128, bf16, one GPU
    python benchmarks/recover_throughput.py --json
    python benchmarks/recover_throughput.py --device cpu --model vit_tiny_patch16_224 --batch-size 8   # smoke run

A recovery step runs the frozen teacher forward and a student training step on the same images, so its ideal
time is the sum of those two measured alone:

    teacher forward      no_grad, eval mode, bf16 autocast
    student step         forward, cross-entropy, backward, gradient clipping, fused AdamW step (no hooks, no
                         distillation)
    recovery step        lowrank_cli.training.recovery.Distiller.step: the code `lrc recover` runs (teacher forward, hooked
                         student forward, PELA Eq. 7 with labels and feature distillation, backward, clipping,
                         AdamW, the per-step loss check)

ratio = (recovery images/s) / (batch / (teacher time + student time)); the target is >= 0.9. The three are
measured in interleaved rounds after a warm-up, each timed between CUDA synchronisations, and the median of the
rounds is reported, so clock or thermal drift affects all three alike. Data loading is left out (synthetic
batches already on the device): it overlaps with the step in worker processes and is measured by nothing here.
Weights are random (no download): the speed of a step does not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_base_patch16_224", help="timm architecture (random weights)")
    p.add_argument("--kappa", type=float, default=2.0)
    p.add_argument("--rank-multiple", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each kind before measuring")
    p.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds")
    p.add_argument("--steps", type=int, default=10, help="steps of each kind per round")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (as lrc recover --compile)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device):
    import timm

    from lowrank_cli.training.losses import LossWeights, RecoveryLoss
    from lowrank_cli.models.structure import innermost_blocks
    from lowrank_cli.compress.factorization import factorize
    from lowrank_cli.training.step import Distiller, compile_hooked
    from lowrank_cli.training.schedule import param_groups

    torch.manual_seed(0)
    teacher = timm.create_model(args.model, pretrained=False).to(device).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    factorize(student, kappa=args.kappa, rank_multiple=args.rank_multiple, device=device, check_calls=False)
    student.train()
    dense_student = copy.deepcopy(student)  # the "student step alone": same model, no hooks, its own optimizer
    fused = True if device.type == "cuda" else None

    def adamw(model):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return torch.optim.AdamW(param_groups(named, 0.05), lr=1e-4, fused=fused), [p for _, p in named]

    opt, params = adamw(student)
    opt_alone, params_alone = adamw(dense_student)
    from lowrank_cli.models.inputs import data_config

    input_size = tuple(data_config(teacher)["input_size"])
    forward, teacher_forward, alone_forward = student, teacher, dense_student
    if args.compile:
        # compile_hooked for all three (as lrc recover): the hook-less dense_student shares their forward code.
        forward, teacher_forward, alone_forward = compile_hooked(student), compile_hooked(teacher), compile_hooked(dense_student)
    loss = RecoveryLoss(LossWeights(alpha=1.0), use_labels=True)
    distiller = Distiller(student, teacher, loss, innermost_blocks(student), optimizer=opt, params=params,
                          clip_grad=1.0, device=device, input_size=input_size, forward=forward,
                          teacher_forward=teacher_forward)
    images = torch.randn(args.batch_size, *input_size, device=device)
    labels = torch.randint(0, teacher.num_classes, (args.batch_size,), device=device)
    return distiller, teacher_forward, alone_forward, opt_alone, params_alone, images, labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("recover_throughput: no CUDA device here; this benchmark measures a GPU (use --device cpu "
              "--model vit_tiny_patch16_224 --batch-size 8 for a smoke run)")
        return 0
    from lowrank_cli.devices import autocast_for
    from lowrank_cli.data.images import Batch

    device = torch.device(args.device)
    distiller, teacher_forward, alone_forward, opt_alone, params_alone, images, labels = build(args, device)
    batch = Batch(images, labels, 0)

    def teacher_only() -> None:
        with torch.no_grad(), autocast_for(device):
            teacher_forward(images)

    def student_only() -> None:
        opt_alone.zero_grad(set_to_none=True)
        with autocast_for(device):
            out = alone_forward(images)
            loss = torch.nn.functional.cross_entropy(out.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_alone, 1.0)
        opt_alone.step()

    def recovery() -> None:
        distiller.step([batch])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    kinds = {"teacher_forward": teacher_only, "student_step": student_only, "recovery_step": recovery}
    for fn in kinds.values():
        for _ in range(args.warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, fn in kinds.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    t = {k: statistics.median(v) for k, v in times.items()}
    b = args.batch_size
    ideal = b / (t["teacher_forward"] + t["student_step"])
    actual = b / t["recovery_step"]
    result = {
        "model": args.model, "kappa": args.kappa, "rank_multiple": args.rank_multiple, "batch_size": b,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if device.type == "cuda" else "fp32", "compile": args.compile,
        "ms": {k: round(v * 1e3, 3) for k, v in t.items()},
        "images_per_s": {"teacher_forward": round(b / t["teacher_forward"], 1),
                         "student_step": round(b / t["student_step"], 1),
                         "ideal": round(ideal, 1), "recovery_step": round(actual, 1)},
        "ratio": round(actual / ideal, 4),
        "target": 0.9,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model} kappa {args.kappa:g} (rank multiple {args.rank_multiple}), batch {b}, "
              f"{result['precision']} on {result['device']}{', compiled' if args.compile else ''}")
        for name in ("teacher_forward", "student_step", "recovery_step"):
            print(f"  {name:16s} {result['ms'][name]:9.2f} ms  {b / t[name]:10.1f} images/s")
        print(f"  {'ideal':16s} {1e3 * b / ideal:9.2f} ms  {ideal:10.1f} images/s  (teacher + student)")
        print(f"  ratio {result['ratio']:.3f} of the ideal (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

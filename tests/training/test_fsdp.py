"""`recover --shard fsdp`: FSDP2 over two gloo processes on the CPU (torchrun), against one process.

A tiny timm ViT (2 blocks) distilled towards its dense twin on 40 digits. One process with batch 8 and two FSDP
processes with batch 4 see the same global batches (training/sampling: rank r takes every other image of the same
permutation), so their loss curves and weights agree up to the order of the float sums."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fsdp_runs import assert_stopped_at, env, largest_difference, torchrun
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.errors import Interrupted, UsageError
from lowrank_cli.training.metrics import metrics_path
from lowrank_cli.training.recovery import recover

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = dict(img_size=16, patch_size=8, embed_dim=32, num_heads=2, num_classes=10)
STEPS = 6
OPTIONS = dict(steps=STEPS, lr=2e-3, alpha=1.0, gamma=0.5, save_every=2, seed=1, num_workers=0, device="cpu",
               log_every=1)
DRIVER = Path(__file__).with_name("fsdp_driver.py")






def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))




def _losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_path(output).read_text().splitlines()]


@pytest.fixture(scope="module")
def pair(digits_folder, tmp_path_factory) -> SimpleNamespace:
    """A random 2-block ViT saved as the teacher, factorized at kappa 4 as the student; 40 training digits (no
    held-out split: FSDP runs without held-out evaluation)."""
    import timm
    from timm.models import save_for_hf

    from lowrank_cli.checkpoint.format import record_source

    root = tmp_path_factory.mktemp("fsdp")
    data = root / "data"
    shutil.copytree(digits_folder(16, 4) / "train", data / "train")
    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, **VIT).eval(),
                str(root / "teacher"), safe_serialization=True)
    loaded = lowrank_cli.load_model(str(root / "teacher"))
    lowrank_cli.factorize(loaded.model, kappa=4, rank_multiple=1)
    record_source(loaded.model, loaded.source)
    lowrank_cli.save(loaded.model, root / "student.safetensors")
    return SimpleNamespace(root=root, data=data, teacher=root / "teacher", student=root / "student.safetensors",
                           labelled=digits_folder(16, 4))


def cli_of(pair: SimpleNamespace, lr: float = OPTIONS["lr"]) -> list[str]:
    """`python -m lowrank_cli recover ... --resume` with OPTIONS (batch size and output to add)."""
    return ["-m", "lowrank_cli", "recover", str(pair.student), "--teacher", str(pair.teacher), "--data",
            str(pair.data), "--steps", str(STEPS), "--lr", str(lr), "--gamma", "0.5", "--save-every", "2", "--seed",
            "1", "--workers", "0", "--device", "cpu", "--log-every", "1", "--resume"]


def _driver(pair: SimpleNamespace, output: Path, stop_at: int | None = None, gathered: Path | None = None,
            **options) -> subprocess.CompletedProcess:
    spec = {"student": str(pair.student), "teacher": str(pair.teacher), "data": str(pair.data),
            "output": str(output), "stop_at": stop_at, "gathered": None if gathered is None else str(gathered),
            "options": {**OPTIONS, "batch_size": 4, **options}}
    return torchrun(2, [str(DRIVER), json.dumps(spec)], output.parent)


@pytest.fixture(scope="module")
def runs(pair) -> SimpleNamespace:
    """The same recovery on one process (batch 8) and as two FSDP processes (batch 4 each)."""
    one = recover(str(pair.student), str(pair.teacher), pair.data, output=pair.root / "one.safetensors",
                  batch_size=8, **OPTIONS)
    fsdp = pair.root / "fsdp.safetensors"
    done = _driver(pair, fsdp, gathered=pair.root / "gathered.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(one=one, fsdp=fsdp, gathered=pair.root / "gathered.safetensors", log=done.stderr)


def test_two_fsdp_processes_follow_the_one_process_run(runs) -> None:
    one, two = _losses(runs.one.output), _losses(runs.fsdp)
    assert len(one) == len(two) == STEPS
    assert one[0] != one[-1]  # the run trains: the curve moves
    assert two == pytest.approx(one, rel=1e-5, abs=1e-7)
    # AdamW divides by sqrt(v): float noise in a tiny gradient moves a weight by up to a few % of one step (lr)
    worst = largest_difference(_weights(runs.one.output), _weights(runs.fsdp))
    assert worst <= 0.05 * OPTIONS["lr"], worst
    assert not (runs.fsdp.parent / "fsdp.train").exists()  # a finished run leaves no training state


def test_the_output_is_the_gathered_model_and_loads(runs) -> None:
    written, gathered = _weights(runs.fsdp), _weights(runs.gathered)
    assert largest_difference(written, gathered) == 0
    model = lowrank_cli.load(str(runs.fsdp))
    state = model.state_dict()
    assert largest_difference({k: state[k] for k in gathered}, gathered) == 0
    from lowrank_cli.checkpoint.format import read_info

    assert read_info(runs.fsdp)[0].recovery["processes"] == 2


def test_gradient_accumulation_without_a_reduction_per_micro_batch(pair, tmp_path) -> None:
    """grad_accum 2: the first micro-batch of a step accumulates unreduced (FSDP2's set_requires_gradient_sync,
    the step's no_sync), the second reduces; the gradient norms and weights are those of one process."""
    options = dict(steps=3, grad_accum=2)
    one = recover(str(pair.student), str(pair.teacher), pair.data, output=tmp_path / "one.safetensors",
                  batch_size=4, **{**OPTIONS, **options})
    out = tmp_path / "fsdp.safetensors"
    done = _driver(pair, out, batch_size=2, **options)
    assert done.returncode == 0, done.stderr[-3000:]
    norms = [[json.loads(line)["grad_norm"] for line in metrics_path(o).read_text().splitlines()]
             for o in (one.output, out)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    worst = largest_difference(_weights(one.output), _weights(out))
    assert worst <= 0.05 * OPTIONS["lr"], worst


def test_resume_is_exact_also_on_another_number_of_processes(pair, runs, tmp_path) -> None:
    parts = tmp_path / "parts.safetensors"
    stopped = _driver(pair, parts, stop_at=3)
    assert_stopped_at(stopped, parts, 3)
    # resumed as ddp (the default shard): refused, one Error line, the state kept
    done = subprocess.run([sys.executable, *cli_of(pair), "--batch-size", "4", "-o", str(parts)], capture_output=True,
                          text=True, env=env(), cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and len(error_lines(done.stderr)) == 1, done.stderr
    assert "the interrupted run was --shard fsdp" in done.stderr and "resume with --shard fsdp" in done.stderr
    assert (tmp_path / "parts.train" / "state.json").is_file() and not parts.exists()
    # the same state resumed on one process with twice the batch (DCP reshards the weights and AdamW's state)
    shutil.copytree(tmp_path / "parts.train", tmp_path / "one.train")
    shutil.copy(metrics_path(parts), metrics_path(tmp_path / "one.safetensors"))
    cli = [*cli_of(pair), "--shard", "fsdp"]
    done = torchrun(2, [*cli, "--batch-size", "4", "-o", str(parts)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming at step 3/6" in done.stderr
    assert "FSDP: student and teacher sharded over 2 processes, 2 blocks each (fp32)" in done.stderr
    worst = largest_difference(_weights(runs.fsdp), _weights(parts))
    assert worst <= 1e-6, worst
    assert _losses(parts) == pytest.approx(_losses(runs.fsdp), rel=1e-6)
    resharded = tmp_path / "one.safetensors"
    done = torchrun(1, [*cli, "--batch-size", "8", "-o", str(resharded)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = largest_difference(_weights(runs.fsdp), _weights(resharded))  # other sums: as one process against two
    assert worst <= 0.05 * OPTIONS["lr"], worst
    assert _losses(resharded) == pytest.approx(_losses(runs.fsdp), rel=1e-5)


def test_held_out_evaluation_and_keep_best_as_one_process(pair, tmp_path) -> None:
    """With a val/ split: accuracy before and after and the held-out score every 2 steps, every process scoring
    all 10 images in the same batches (a sharded forward is collective); `keep` best (the default) keeps the
    best weights sharded, saves them with the sharded state, and a resumed run keeps the same."""
    from lowrank_cli.checkpoint.format import read_info

    options = dict(eval_every=2, eval_batch_size=8, lr=2e-2)  # at this lr the held-out score peaks before the end
    one = recover(str(pair.student), str(pair.teacher), pair.labelled, output=tmp_path / "one.safetensors",
                  batch_size=8, **{**OPTIONS, **options})
    labelled = SimpleNamespace(**{**vars(pair), "data": pair.labelled})
    out = tmp_path / "fsdp.safetensors"
    done = _driver(labelled, out, **options)
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_info(out)[0].recovery
    assert record["accuracy"] == one.accuracy and record["accuracy"]["after"]["images"] == 10
    assert record["kept"] == read_info(one.output)[0].recovery["kept"] and record["kept"]["which"] == "best"
    assert record["kept"]["step"] < STEPS  # the best weights were put back: the restore of sharded weights ran
    worst = largest_difference(_weights(one.output), _weights(out))
    assert worst <= 0.05 * options["lr"], worst
    lines = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    expected = [json.loads(line) for line in metrics_path(one.output).read_text().splitlines()]
    assert [line.get("val_top5") for line in lines] == [line.get("val_top5") for line in expected]
    assert [line["step"] for line in lines if "val_top1" in line] == [2, 4, 6]
    assert [line["loss"] for line in lines] == pytest.approx([line["loss"] for line in expected], rel=1e-5)
    parts = tmp_path / "parts.safetensors"
    stopped = _driver(labelled, parts, stop_at=3, **options)
    assert stopped.returncode == 0 and "interrupted" in stopped.stdout, stopped.stderr[-3000:]
    state = json.loads((tmp_path / "parts.train" / "state.json").read_text())
    assert set(state["extra_tensors"]) == {f"best.{k}" for k in _weights(out)}
    cli = [*cli_of(labelled, options["lr"]), "--shard", "fsdp", "--eval-every", "2", "--eval-batch-size", "8"]
    done = torchrun(2, [*cli, "--batch-size", "4", "-o", str(parts)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_info(parts)[0].recovery["kept"] == record["kept"]
    worst = largest_difference(_weights(out), _weights(parts))
    assert worst <= 1e-6, worst


def test_resume_of_a_ddp_state_as_fsdp_is_refused(pair, tmp_path, monkeypatch) -> None:
    # a state of a ddp run (one process), resumed as fsdp under torchrun's environment
    ddp = tmp_path / "ddp.safetensors"
    with pytest.raises(Interrupted):
        recover(str(pair.student), str(pair.teacher), pair.data, output=ddp, batch_size=8,
                on_step=lambda step, model: step == 2, **OPTIONS)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UsageError, match="the interrupted run was shard ddp .* resume with shard ddp"):
        recover(str(pair.student), str(pair.teacher), pair.data, output=ddp, batch_size=8, shard="fsdp",
                resume=True, **OPTIONS)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert ddp.with_name("ddp.train.safetensors").exists()  # the ddp run's state is kept


def test_fsdp_usage_errors(pair, tmp_path, capsys) -> None:
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(["recover", str(pair.student), "--teacher", str(pair.teacher), "--data", str(pair.data),
                            "--steps", "2", "--device", "cpu", "--shard", "fsdp", "-o", str(out)], capsys)
    assert code != 0 and len(error_lines(err)) == 1, err
    assert "torchrun" in err and "--shard fsdp" in err
    for wrong, said in [(dict(beta=0.1), "^beta compares"), (dict(method="progressive", kappa=4.0), "^method progressive keeps"),
                        (dict(compile=True), "^compile is not supported")]:
        with pytest.raises(UsageError, match=said):
            recover(str(pair.student), str(pair.teacher), pair.data, output=out, shard="fsdp",
                    **{**OPTIONS, **wrong})
    assert not out.exists()


def test_a_model_without_repeated_blocks_is_refused() -> None:
    import timm

    from lowrank_cli.models.structure import innermost_blocks
    from lowrank_cli.training.fsdp import FullyShard
    from lowrank_cli.training.strategy import Models

    one_block = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, **VIT)
    assert innermost_blocks(one_block) == []  # one block is not a repeated one
    models = Models(model=one_block, teacher=None, save_dtype=torch.float32, input_size=(3, 16, 16), blocks=[])
    env = SimpleNamespace(ctx=SimpleNamespace(device=torch.device("cpu"), world_size=2), log=print)
    with pytest.raises(UsageError, match="per repeated block .* has none: use shard ddp"):
        FullyShard().prepare(env, SimpleNamespace(val=None), models, list(one_block.named_parameters()))


def test_a_text_encoder_with_frozen_parameters(tmp_path) -> None:
    """A tiny BERT on a text file: the pooler, which the loss does not reach, is frozen inside the root FSDP unit
    (FSDP2 keeps requires_grad per parameter) and comes out as it went in; the rest trains."""
    from hf_fixtures import write_corpus, write_tiny_bert

    from lowrank_cli.checkpoint.format import record_source

    write_tiny_bert(tmp_path / "bert", head=None, dropout=0.0)
    write_corpus(tmp_path / "corpus.txt", n=32)
    loaded = lowrank_cli.load_model(str(tmp_path / "bert"))
    lowrank_cli.factorize(loaded.model, kappa=4, rank_multiple=1)
    record_source(loaded.model, loaded.source)
    lowrank_cli.save(loaded.model, tmp_path / "student.safetensors")
    out = tmp_path / "out.safetensors"
    done = torchrun(2, ["-m", "lowrank_cli", "recover", str(tmp_path / "student.safetensors"), "--teacher",
                         str(tmp_path / "bert"), "--data", str(tmp_path / "corpus.txt"), "--steps", "3",
                         "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--device", "cpu", "--shard", "fsdp",
                         "--val-fraction", "0.25", "--eval-every", "1", "-o", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "keeping the best state" in done.stderr
    scores = [json.loads(line).get("val_cosine") for line in metrics_path(out).read_text().splitlines()]
    assert len(scores) == 3 and all(0 < score <= 1 for score in scores)  # the held-out data scored every step
    before, after = _weights(tmp_path / "student.safetensors"), _weights(out)
    assert after.keys() == before.keys()
    frozen = [k for k in before if k.startswith("pooler.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert max((before[k] - after[k]).abs().max().item() for k in before if k not in frozen) > 1e-4
    lowrank_cli.load(str(out))

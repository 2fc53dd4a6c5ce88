"""`lrc recover` and `lrc eval` on real images: scikit-learn's handwritten digits written as an ImageFolder.

The teacher is a small ViT trained from scratch here (16x16 digits, 8x8 patches: 4 tokens + cls), saved in
timm's Hub layout so that it is a real MODEL source. The student is its factorization at kappa 16 with the
paper's ranks (2-3 of 64), which costs most of the accuracy; recovery must bring it back near the teacher.
Everything runs on one CPU thread: on a busy 2-core machine OpenMP's spinning threads slow tiny models down
by an order of magnitude.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from digits import write_corrupt_image
from helpers import error_lines, run_cli
from PIL import Image

import lowrank_cli
from lowrank_cli.checkpoint.format import read_info, record_source
from lowrank_cli.errors import InputError, Interrupted, OutputError, TrainingError, UsageError
from lowrank_cli.evaluation.accuracy import evaluate
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.structure import innermost_blocks
from lowrank_cli.training.features import BlockOutputs
from lowrank_cli.training.losses import (
    LossWeights,
    RecoveryLoss,
    feature_distillation,
    logit_distillation,
    weight_perturbation,
)
from lowrank_cli.training.metrics import metrics_path
from lowrank_cli.training.recovery import recover
from lowrank_cli.training.schedule import lr_factor
from lowrank_cli.training.state import read_train_state, train_state_path

TEACHER_ARGS = dict(img_size=16, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
FAST = dict(num_workers=0, device="cpu", log_every=1)  # tiny models: worker processes cost more than they save


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(digits_folder) -> Path:
    return digits_folder(16)


@pytest.fixture(scope="module")
def small_digits(digits_folder) -> Path:
    """40 training and 20 validation images."""
    return digits_folder(16, 6)


def _tensors(folder: Path, split: str, transform):
    from lowrank_cli.data.images import find_images

    images = find_images(folder, split)
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in images.samples])
    return x, torch.tensor([label for _, label in images.samples])


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory) -> Path:
    """The small ViT trained on the digits (8 epochs of plain supervised training), saved with save_for_hf."""
    import timm
    from timm.models import save_for_hf

    from lowrank_cli.data.images import make_transform

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TEACHER_ARGS)
    x, y = _tensors(digits, "train", make_transform(model, training=False))
    epochs, batch = 8, 64
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (len(x) // batch), pct_start=0.15)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    folder = tmp_path_factory.mktemp("teacher")
    save_for_hf(model.eval(), str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory) -> Path:
    """The teacher factorized hard (kappa 16, the paper's ranks), as an lrc checkpoint."""
    loaded = lowrank_cli.load_model(str(teacher))
    lowrank_cli.factorize(loaded.model, kappa=16, rank_multiple=1)
    record_source(loaded.model, loaded.source)
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    lowrank_cli.save(loaded.model, path)
    return path


@pytest.fixture(scope="module")
def recovered(student, teacher, digits, tmp_path_factory):
    """250 steps of 32 images (6 epochs). Crops of 8% of a digit and mirrored digits are not digits: no augment.
    The block outputs of this small model are small numbers, so the feature term gets a larger weight."""
    output = tmp_path_factory.mktemp("recovered") / "recovered.safetensors"
    return recover(str(student), str(teacher), digits, output=output, steps=250, batch_size=32, lr=3e-3, alpha=5.0,
                   augment=False, weight_decay=0.0, save_every=100, eval_every=50, **{**FAST, "log_every": 10})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- accuracy


def test_recovery_brings_accuracy_back_near_the_teacher(recovered) -> None:
    acc = recovered.accuracy
    teacher, before, after = acc["teacher"]["top1"], acc["before"]["top1"], acc["after"]["top1"]
    print(f"\ndigits top-1: teacher {teacher:.3f}, factorized {before:.3f}, recovered {after:.3f}")
    assert acc["teacher"]["images"] == 450 and acc["after"]["skipped"] == 0
    assert teacher > 0.85  # the teacher learnt the digits
    assert before < teacher - 0.3  # kappa 16 costs a lot
    assert after >= teacher - 0.05  # and recovery brings it back
    assert after > before + 0.3


def test_loss_terms_go_down_and_are_logged(recovered) -> None:
    losses = recovered.losses
    assert set(losses) == {"loss", "ce", "fd"}  # defaults: alpha=1, beta=0, gamma=0, labels present
    assert losses["fd"]["last"] < 0.7 * losses["fd"]["first"]
    assert losses["ce"]["last"] < losses["ce"]["first"]
    assert losses["loss"]["last"] < 0.5 * losses["loss"]["first"]
    lines = [json.loads(line) for line in recovered.metrics.read_text().splitlines()]
    assert recovered.metrics == metrics_path(recovered.output)
    assert [line["step"] for line in lines] == [1, *range(10, 251, 10)]
    assert {"step", "lr", "loss", "ce", "fd", "grad_norm", "images_per_s", "images", "skipped"} <= set(lines[-1])
    assert not {"windows_per_s", "windows", "texts_per_s", "texts"} & set(lines[-1])  # an image run counts images
    assert lines[-1]["images"] == 250 * 32 == recovered.images_seen
    peak = max(line["lr"] for line in lines)
    assert peak <= 3e-3 and lines[-1]["lr"] < 0.01 * peak  # warm-up, then cosine down to ~0


def test_output_keeps_student_metadata_and_records_recovery(recovered, student, capsys) -> None:
    before, _ = read_info(student)
    info, _ = read_info(recovered.output)
    assert info.ranks == before.ranks and info.provenance["kappa"] == 16 and info.layers == before.layers
    rec = info.recovery
    assert rec["steps"] == 250 and rec["lr"] == 3e-3 and rec["alpha"] == 5.0 and rec["beta"] == 0.0
    assert rec["images_per_step"] == 32 and rec["processes"] == 1 and rec["labels"] is True
    assert rec["accuracy"]["after"]["top1"] == recovered.accuracy["after"]["top1"]
    assert rec["accuracy"]["teacher"]["top1"] == recovered.accuracy["teacher"]["top1"]
    assert not train_state_path(recovered.output).exists()  # a finished run leaves no training state
    # `lrc eval` measures the same on the written file.
    code, out, err = run_cli(["eval", recovered.output, "--data", recovered.settings["data"], "--json",
                              "--workers", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["top1"] == pytest.approx(recovered.accuracy["after"]["top1"])
    assert result["images"] == 450


def test_eval_cli_table_and_errors(teacher, digits, tmp_path, capsys) -> None:
    code, out, err = run_cli(["eval", teacher, "--data", digits / "val", "--workers", "0"], capsys)
    assert code == 0 and "top-1" in out and "450 images" in out
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((digits / "val" / "3").iterdir())[:4]:
        shutil.copy(p, flat / p.name)
    code, out, err = run_cli(["eval", teacher, "--data", flat], capsys)
    assert code == 3 and "no class folders" in error_lines(err)[0]
    code, out, err = run_cli(["eval", teacher, "--data", tmp_path / "missing"], capsys)
    assert code == 3 and "does not exist" in error_lines(err)[0]


# ---------------------------------------------------------------------------------------------- resume


def _run(student, teacher, data, output, **kw):
    options = dict(steps=10, batch_size=8, grad_accum=2, lr=1e-3, alpha=1.0, beta=0.1, gamma=0.5, save_every=3,
                   evaluate_accuracy=False, seed=3, **FAST)
    options.update(kw)
    return recover(str(student), str(teacher), data, output=output, **options)


def test_resume_after_interruption_equals_uninterrupted_run(student, teacher, small_digits, tmp_path) -> None:
    # 40 images / 8 = 5 batches an epoch, 2 a step: steps 3, 5, 8 and 10 cross an epoch boundary; the stop at
    # step 4 falls between two saves.
    whole = _run(student, teacher, small_digits, tmp_path / "whole.safetensors")
    assert set(whole.losses) == {"loss", "ce", "fd", "rwp", "kd"}

    out = tmp_path / "parts.safetensors"
    stopped = r"interrupted by request at step 4/10.*Resume with: recover\(\.\.\., resume=True\)"
    with pytest.raises(Interrupted, match=stopped):
        _run(student, teacher, small_digits, out, on_step=lambda step, model: step == 4)
    state, _ = read_train_state(train_state_path(out))
    assert (state.step, state.epoch, state.batch) == (4, 1, 3)
    assert not out.exists()
    # The resumed half loads its images in two worker processes: augmentations are seeded per image.
    resumed = _run(student, teacher, small_digits, out, resume=True, num_workers=2)
    assert resumed.resumed_from == 4 and resumed.steps == 10
    a, b = _weights(whole.output), _weights(out)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    steps = [json.loads(line)["step"] for line in metrics_path(out).read_text().splitlines()]
    assert steps == list(range(1, 11))  # the metrics log continues where the run stopped


def test_resume_refusals(student, teacher, small_digits, tmp_path) -> None:
    out = tmp_path / "r.safetensors"
    with pytest.raises(InputError, match="no training state"):
        _run(student, teacher, small_digits, out, resume=True)
    with pytest.raises(Interrupted):
        _run(student, teacher, small_digits, out, on_step=lambda step, model: step == 1)
    with pytest.raises(OutputError, match="resume=True"):  # a fresh start would throw the saved state away
        _run(student, teacher, small_digits, out)
    with pytest.raises(UsageError, match="batch_size was 8 .* is 4"):
        _run(student, teacher, small_digits, out, resume=True, batch_size=4)
    with pytest.raises(UsageError, match="freeze_dense was False"):
        _run(student, teacher, small_digits, out, resume=True, freeze_dense=True)
    messages = []
    done = _run(student, teacher, small_digits, out, resume=True, lr=5e-4, steps=3, warn=messages.append)
    assert done.resumed_from == 1 and any("`lr` was 0.001" in m for m in messages)
    assert any("recorded in the checkpoint as `changed_on_resume`" in m for m in messages)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:  # the run is no longer the uninterrupted one: its record says so
        recorded = [v for v in f.metadata().values() if "changed_on_resume" in v]
    changes = {c["option"]: (c["then"], c["now"], c["at_step"]) for c in json.loads(recorded[0])["changed_on_resume"]}
    assert changes["lr"] == (1e-3, 5e-4, 1) and changes["steps"] == (10, 3, 1)
    assert done.settings["changed_on_resume"] == json.loads(recorded[0])["changed_on_resume"]


def test_sigterm_finishes_the_step_saves_and_stops(student, teacher, small_digits, tmp_path) -> None:
    out = tmp_path / "term.safetensors"
    before = signal.getsignal(signal.SIGTERM)

    def terminate(step, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler (SLURM, Kubernetes) sends before killing

    with pytest.raises(Interrupted, match="interrupted by SIGTERM at step 2/10"):
        _run(student, teacher, small_digits, out, on_step=terminate)
    assert read_train_state(train_state_path(out))[0].step == 2
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is only there while training


def test_non_finite_loss_stops_and_keeps_the_last_good_state(student, teacher, small_digits, tmp_path) -> None:
    out = tmp_path / "nan.safetensors"

    def poison(step, model):
        if step == 3:
            with torch.no_grad():
                model.blocks[1].mlp.fc1.first.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"loss.* is nan at step 4.*step 2.*lower lr"):
        _run(student, teacher, small_digits, out, save_every=2, on_step=poison)
    state, _ = read_train_state(train_state_path(out))
    assert state.step == 2
    assert all(torch.isfinite(t).all() for t in _weights(train_state_path(out)).values())
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- data


def test_unlabelled_folder_with_a_corrupt_image(student, teacher, digits, tmp_path) -> None:
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for p in sorted((digits / "train").rglob("*.png"))[::60][:16]:
        shutil.copy(p, flat / p.name)
    write_corrupt_image(flat / "broken.png")
    out = tmp_path / "u.safetensors"
    messages = []
    result = recover(str(student), str(teacher), flat, output=out, epochs=3, batch_size=8, log=messages.append,
                     **FAST)
    assert result.steps == 6  # 17 files, 2 whole batches of 8 an epoch
    assert result.skipped >= 1  # counted, not fatal
    assert set(result.losses) == {"loss", "fd"}  # no labels: distillation only
    assert result.accuracy == {"teacher": None, "before": None, "after": None}
    assert any("Frozen (the loss does not reach them): norm.weight" in m for m in messages)
    head_before, head_after = _weights(student)["head.weight"], _weights(out)["head.weight"]
    assert torch.equal(head_before, head_after)  # nothing reaches the head without labels or logit KD
    assert json.loads(metrics_path(out).read_text().splitlines()[-1])["skipped"] == result.skipped


def test_empty_or_missing_data_folder(student, teacher, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no images"):
        recover(str(student), str(teacher), tmp_path / "empty", output=tmp_path / "o.safetensors", steps=1)
    with pytest.raises(InputError, match="does not exist"):
        recover(str(student), str(teacher), tmp_path / "nowhere", output=tmp_path / "o.safetensors", steps=1)


def test_teacher_of_another_architecture_is_refused(student, teacher, small_digits, tmp_path) -> None:
    import timm
    from timm.models import save_for_hf

    other = tmp_path / "other_teacher"
    save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TEACHER_ARGS, "embed_dim": 32}),
                str(other), safe_serialization=True)
    with pytest.raises(InputError, match=r"the teacher .*other_teacher.* and the student .*student.safetensors.* do "
                                         r"not share the architecture: 'blocks.0.attn.qkv' is 192x64 in the student, "
                                         r"96x32 in the teacher"):
        recover(str(student), str(other), small_digits, output=tmp_path / "o.safetensors", steps=1, **FAST)


def test_student_must_be_low_rank_or_factorized_on_the_fly(teacher, small_digits, tmp_path) -> None:
    with pytest.raises(UsageError, match="no low-rank layers.*kappa"):
        recover(str(teacher), str(teacher), small_digits, output=tmp_path / "o.safetensors", steps=1, **FAST)
    result = recover(str(teacher), str(teacher), small_digits, output=tmp_path / "k.safetensors", steps=2,
                     batch_size=8, kappa=4, rank_multiple=1, evaluate_accuracy=False, **FAST)
    info, _ = read_info(result.output)
    assert info.provenance["kappa"] == 4 and info.provenance["source"]["kind"] == "local-dir"
    assert info.ranks and info.recovery["steps"] == 2


def test_option_errors(student, teacher, small_digits, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    with pytest.raises(UsageError, match="steps N or as epochs E"):
        recover(str(student), str(teacher), small_digits, output=out)
    with pytest.raises(UsageError, match="steps N or as epochs E"):
        recover(str(student), str(teacher), small_digits, output=out, steps=1, epochs=1)
    with pytest.raises(UsageError, match="alpha must be"):
        recover(str(student), str(teacher), small_digits, output=out, steps=1, alpha=-1)
    out.write_bytes(b"x")
    with pytest.raises(OutputError, match="force=True"):
        recover(str(student), str(teacher), small_digits, output=out, steps=1)


# ---------------------------------------------------------------------------------------------- processes


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _lrc() -> list[str]:
    """The installed `lrc` script, as a user runs it; `python -m lowrank_cli` where the project is only on
    PYTHONPATH (a borrowed GPU machine, benchmarks/gpu_session.sh)."""
    script = Path(sys.executable).with_name("lrc")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lowrank_cli"]


def test_ctrl_c_saves_and_the_printed_command_resumes(student, teacher, small_digits, tmp_path) -> None:
    out = tmp_path / "cli.safetensors"
    cmd = [*_lrc(), "recover", str(student), "--teacher", str(teacher), "--data", str(small_digits), "--steps", "80",
           "--batch-size", "8", "--workers", "0", "--no-eval", "--log-every", "1", "--save-every", "1000", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    metrics = metrics_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():  # training has started
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = error_lines(err)[0]
    assert "interrupted by SIGINT at step" in line and "/80" in line
    state, _ = read_train_state(train_state_path(out))
    assert 1 <= state.step < 80 and not out.exists()
    resume = shlex.split(line.split("Resume with: ", 1)[1])
    assert resume[0] == "lrc" and resume[-1] == "--resume"
    done = subprocess.run([*_lrc(), *resume[1:], "--json"], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["resumed_from"] == state.step and summary["steps"] == 80
    assert out.exists() and not train_state_path(out).exists()


def test_two_gloo_processes_write_one_output(teacher, small_digits, tmp_path) -> None:
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lowrank_cli",
           "recover", str(teacher), "--kappa", "4", "--rank-multiple", "1", "--teacher", str(teacher),
           "--data", str(small_digits), "--steps", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu",
           "--eval-batch-size", "8", "-o", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON document: only rank 0 prints
    assert summary["settings"]["processes"] == 2 and summary["settings"]["images_per_step"] == 8
    assert summary["images_seen"] == 4 * 8
    assert summary["accuracy"]["after"]["images"] == 20  # each rank evaluated its half, none twice
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    assert written == ["ddp.safetensors"]
    assert read_info(out)[0].recovery["processes"] == 2


# ---------------------------------------------------------------------------------------------- the loss


def test_loss_terms_by_hand() -> None:
    torch.manual_seed(0)
    layer = LowRankLinear(6, 4, 2)
    dense = layer.weight_product.detach().clone()
    dense[1, 2] += 0.5
    # (max|second@first - W| - eps)^2, the mean over layers
    assert weight_perturbation([(layer, dense)], eps=1e-3).item() == pytest.approx((0.5 - 1e-3) ** 2, rel=1e-5)
    feats = [torch.randn(2, 3, 4) for _ in range(3)]
    assert feature_distillation(feats, [f.clone() for f in feats]).item() == 0
    shifted = [f + 1 for f in feats]
    assert feature_distillation(shifted, feats).item() == pytest.approx(1.0)
    logits = torch.randn(5, 10)
    assert logit_distillation(logits, logits, 2.0).item() == pytest.approx(0, abs=1e-6)
    assert logit_distillation(logits, torch.randn(5, 10), 2.0).item() > 0
    loss = RecoveryLoss(LossWeights(alpha=2.0, beta=0.0, gamma=0.0), use_labels=False)
    terms = loss(student_out=None, teacher_out=None, student_blocks=shifted, teacher_blocks=feats, labels=None)
    assert set(terms) == {"loss", "fd"} and terms["loss"].item() == pytest.approx(2.0)
    with pytest.raises(UsageError, match="temperature"):
        LossWeights(temperature=0).check()


def test_innermost_blocks_and_hooks() -> None:
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(x)

    model = nn.Sequential(Stage(), Stage())  # Swin-like: stages of blocks
    names = innermost_blocks(model)
    assert names == ["0.blocks.0", "0.blocks.1", "1.blocks.0", "1.blocks.1"]
    with BlockOutputs(model, names) as outputs:
        model(torch.randn(2, 4))
        taken = outputs.take()
    assert len(taken) == 4 and taken[-1].shape == (2, 4)
    assert not model[0].blocks[0]._forward_hooks  # removed on exit




def test_compiled_recovery_computes_the_eager_losses(student, teacher, small_digits, tmp_path) -> None:
    # The real inductor path of `lrc recover --compile`: the feature term must be there (the block hooks ran
    # inside the compiled graphs) and every logged term must match an eager run of the same steps.
    import torch._dynamo

    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        out = tmp_path / f"{'compiled' if compiled else 'eager'}.safetensors"
        recover(str(student), str(teacher), small_digits, output=out, steps=3, batch_size=8, lr=1e-3, alpha=5.0,
                augment=False, evaluate_accuracy=False, compile=compiled, **FAST)
        runs[compiled] = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    torch._dynamo.reset()
    eager, compiled = runs[False], runs[True]
    assert [m["step"] for m in compiled] == [m["step"] for m in eager] == [1, 2, 3]
    for e, c in zip(eager, compiled):
        assert c["fd"] > 0
        for term in ("loss", "ce", "fd"):
            assert c[term] == pytest.approx(e[term], rel=2e-3, abs=1e-6), (term, e["step"])

def test_compiled_hooked_model_keeps_its_block_outputs_after_a_hookless_twin() -> None:
    # A graph traced for a twin without hooks must not be reused for the hooked model (dynamo skips hook
    # guards by default): the benchmark of a recovery step compiles exactly such a twin first.
    import copy

    import torch._dynamo
    from torch import nn

    from lowrank_cli.training.step import compile_hooked

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            return self.blocks(x).sum()

    torch._dynamo.reset()
    before = torch._dynamo.config.skip_nnmodule_hook_guards
    try:
        hooked = Net()
        twin = copy.deepcopy(hooked)
        x = torch.randn(3, 4)
        with BlockOutputs(hooked, ["blocks.0", "blocks.1"]) as outputs:
            compile_hooked(twin, backend="eager")(x)
            compile_hooked(hooked, backend="eager")(x)
            taken = outputs.take()
        assert torch.allclose(taken[1], hooked.blocks(x.detach()))
    finally:
        torch._dynamo.config.skip_nnmodule_hook_guards = before
        torch._dynamo.reset()

def test_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, 10, 100) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.01
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_evaluate_counts_unreadable_images(teacher, small_digits, tmp_path) -> None:
    data = tmp_path / "d"
    shutil.copytree(small_digits, data)
    write_corrupt_image(data / "val" / "0" / "broken.png", kind="garbage")
    model = lowrank_cli.load_model(str(teacher)).model
    result = evaluate(model, data, batch_size=7, num_workers=0)
    assert result["images"] == 20 and result["skipped"] == 1 and 0 <= result["top1"] <= result["top5"] <= 1


# ---------------------------------------------------------------------------------------------- held-out data


def test_held_out_evaluation_keeps_the_best_state_and_resumes_exactly(student, teacher, small_digits, tmp_path):
    """Accuracy on val/ every 2 steps, the best state kept; a run stopped at step 5 and resumed ends identical,
    best state included (it travels in the training state)."""
    kw = dict(evaluate_accuracy=True, eval_every=2, lr=3e-3)
    whole = _run(student, teacher, small_digits, tmp_path / "whole.safetensors", **kw)
    lines = [json.loads(line) for line in metrics_path(whole.output).read_text().splitlines()]
    scored = {line["step"]: line["val_top1"] for line in lines if "val_top1" in line}
    assert sorted(scored) == [2, 4, 6, 8, 10]
    kept = whole.settings["kept"]
    best_step = max(scored, key=lambda s: (scored[s], -s))
    assert kept == {"which": "best", "step": best_step, "value": scored[best_step], "metric": "val_top1"}
    assert whole.accuracy["after"]["top1"] == pytest.approx(scored[best_step])  # the kept state is the one scored
    assert whole.settings["after_is"].startswith("selection score: the held-out data that chose the kept step")
    assert whole.settings["held_out"]["data"].endswith("val") and whole.settings["held_out"]["every"] == 2

    out = tmp_path / "parts.safetensors"
    with pytest.raises(Interrupted):
        _run(student, teacher, small_digits, out, on_step=lambda step, model: step == 5, **kw)
    messages = []
    resumed = _run(student, teacher, small_digits, out, resume=True, warn=messages.append, **kw)
    assert resumed.settings["kept"] == kept and not messages  # same options: nothing to warn about
    a, b = _weights(whole.output), _weights(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_keep_best_labels_after_as_the_selection_score(student, teacher, small_digits, tmp_path, capsys):
    """keep best chooses the state on val/ and "after" is scored on the same images: the table says so."""
    code, stdout, err = run_cli(["recover", student, "--teacher", teacher, "--data", small_digits, "--steps", "4",
                                 "--eval-every", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                                 "-o", tmp_path / "r.safetensors"], capsys)
    assert code == 0 and "after (selection score)" in stdout, err
    assert read_info(tmp_path / "r.safetensors")[0].recovery["after_is"].startswith("selection score")


def test_defaults_fit_small_images_and_hold_out_data(student, teacher, digits_folder, tmp_path):
    """Digits (16 px) for a 16 px model: no random crops; no val/ split: a tenth of the training images held out."""
    flat = tmp_path / "classes"
    (digits_folder(16, 40) / "train").rename(flat)  # a class tree without a val/ split: 300 images
    result = recover(str(student), str(teacher), flat, output=tmp_path / "r.safetensors", steps=4, batch_size=16,
                     **FAST)
    s = result.settings
    assert s["augment"] == "none" and "input" in s["augment_reason"]
    assert s["train_images"] == 270 and s["held_out"]["samples"] == 30 and "seed 0" in s["held_out"]["data"]
    assert s["kept"]["which"] == "best" and s["kept"]["metric"] == "val_top1"


def test_held_out_bad_input(student, teacher, small_digits, tmp_path):
    with pytest.raises(UsageError, match=r"val_fraction must be in \(0, 0.5\], got 0.6"):
        _run(student, teacher, small_digits, tmp_path / "a.safetensors", val_fraction=0.6)
    with pytest.raises(UsageError, match="eval_every must be at least 1"):
        _run(student, teacher, small_digits, tmp_path / "b.safetensors", eval_every=0)
    with pytest.raises(UsageError, match="keep best needs held-out data"):
        _run(student, teacher, small_digits, tmp_path / "c.safetensors", keep="best")  # evaluate_accuracy=False
    other = tmp_path / "other"
    for digit in (1, 2, 3):
        (other / str(digit)).mkdir(parents=True)
        for p in list((small_digits / "val" / str(digit)).iterdir())[:2]:
            (other / str(digit) / p.name).write_bytes(p.read_bytes())
    with pytest.raises(InputError, match=r"has the classes \[1, 2, 3\] and the training data .* \[0, 1, 2, 3, 4"):
        _run(student, teacher, small_digits, tmp_path / "d.safetensors", evaluate_accuracy=True, val_data=other)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.jsonl"))


def test_changing_how_the_kept_state_is_chosen_on_resume_is_said():
    from lowrank_cli.training.options import RecoverOptions
    from lowrank_cli.training.state import changed_options

    then = RecoverOptions(steps=10, eval_every=2).changeable_on_resume(total=10, warmup=0, teacher="t", data="d")
    now = RecoverOptions(steps=10, eval_every=5, keep="last").changeable_on_resume(total=10, warmup=0, teacher="t",
                                                                                  data="d")
    assert [(name, a, b) for name, a, b in changed_options(then, now)] == [("`eval_every`", 2, 5),
                                                                          ("`keep`", None, "last")]

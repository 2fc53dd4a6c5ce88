"""`recover --shard fsdp` on a causal LM, the headline use: a random Llama with GQA (4 heads, 2 key/value heads),
saved with save_pretrained, factorized by lrc, distilled towards its dense teacher on a text file read as one
token stream (windows of 32 tokens), with the token-level KL (on by default for a causal LM) and the held-out
perplexity scored every 2 steps, as two FSDP2 processes (gloo, CPU) against one process.

One process with batch 8 and two with batch 4 see the same global batches of windows, so their loss terms, held-out
perplexities and weights agree up to the order of the float sums; a run stopped at step 3 and resumed from its DCP
state ends where the uninterrupted one does; the gathered lrc file loads and gives the logits that the sharded
model gave at its last step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fsdp_runs import assert_stopped_at, largest_difference, torchrun
from causal_fixtures import write_tiny_causal_lm, write_token_text
from safetensors.torch import load_file, save_file

import lowrank_cli
from lowrank_cli.checkpoint.format import read_info
from lowrank_cli.compress.factorize_source import factorize_file
from lowrank_cli.training.metrics import metrics_path
from lowrank_cli.training.recovery import recover

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
OPTIONS = dict(steps=STEPS, lr=3e-3, seq_len=32, save_every=2, eval_every=2, keep="last", seed=1, num_workers=0,
               device="cpu", log_every=1)
DRIVER = Path(__file__).with_name("fsdp_driver.py")




def _lines(output: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path(output).read_text().splitlines()]




@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> SimpleNamespace:
    """The teacher (tiny Llama, GQA), its lrc student at kappa 3, 1200 tokens of text (33 training windows of 32,
    4 held out), and 3 probe windows of token ids for the logits."""
    root = tmp_path_factory.mktemp("fsdp_causal")
    teacher = write_tiny_causal_lm(root / "llama", "llama", heads=4, kv_heads=2)
    assert json.loads((teacher / "config.json").read_text())["num_key_value_heads"] == 2
    student = root / "student.safetensors"
    factorize_file(str(teacher), str(student), kappa=3, rank_multiple=1)
    ids = torch.randint(0, 300, (3, 32), generator=torch.Generator().manual_seed(0))
    save_file({"ids": ids}, str(root / "probe.safetensors"))
    return SimpleNamespace(root=root, teacher=teacher, student=student, text=write_token_text(root / "text.txt", 1200),
                           probe=root / "probe.safetensors", ids=ids)


def _driver(lm: SimpleNamespace, output: Path, stop_at: int | None = None, **extra) -> subprocess.CompletedProcess:
    spec = {"student": str(lm.student), "teacher": str(lm.teacher), "data": str(lm.text), "output": str(output),
            "stop_at": stop_at, "options": {**OPTIONS, "batch_size": 4}, **extra}
    return torchrun(2, [str(DRIVER), json.dumps(spec)], output.parent)


@pytest.fixture(scope="module")
def runs(lm) -> SimpleNamespace:
    """The same recovery on one process (batch 8) and as two FSDP processes (batch 4 each)."""
    one = recover(str(lm.student), str(lm.teacher), str(lm.text), output=lm.root / "one.safetensors", batch_size=8,
                  warn=lambda msg: None, **OPTIONS)
    fsdp, gathered, logits = lm.root / "fsdp.safetensors", lm.root / "gathered.safetensors", lm.root / "logits"
    done = _driver(lm, fsdp, gathered=str(gathered), probe={"ids": str(lm.probe), "logits": str(logits)})
    assert done.returncode == 0, done.stderr[-3000:]
    return SimpleNamespace(one=one, fsdp=fsdp, gathered=gathered, logits=logits, log=done.stderr)


def test_two_fsdp_processes_follow_the_one_process_run(runs) -> None:
    one, two = _lines(runs.one.output), _lines(runs.fsdp)
    assert [line["step"] for line in two] == list(range(1, STEPS + 1))
    for term in ("loss", "fd", "kd"):  # the KL on the logits is on by default for a causal LM, and trains
        assert [line[term] for line in two] == pytest.approx([line[term] for line in one], rel=1e-5, abs=1e-7)
    assert two[-1]["kd"] < two[0]["kd"]
    # held-out perplexity under FSDP: every process scores all 4 windows in the same batches (a collective forward)
    scored = [(line["step"], line["val_perplexity"]) for line in two if "val_perplexity" in line]
    assert [step for step, _ in scored] == [2, 4, 6]
    expected = [line["val_perplexity"] for line in one if "val_perplexity" in line]
    assert [value for _, value in scored] == pytest.approx(expected, rel=1e-5)
    held, held_one = read_info(runs.fsdp)[0].recovery["held_out"], read_info(runs.one.output)[0].recovery["held_out"]
    assert held["samples"] == 4 and held["metric"] == "val_perplexity"
    assert held["teacher_perplexity"] == pytest.approx(held_one["teacher_perplexity"], rel=1e-6)
    for when in ("before", "after"):
        assert held[when]["val_perplexity"] == pytest.approx(held_one[when]["val_perplexity"], rel=1e-5)
    assert read_info(runs.fsdp)[0].recovery["processes"] == 2
    # AdamW divides by sqrt(v): float noise in a tiny gradient moves a weight by up to a few % of one step (lr)
    worst = largest_difference(load_file(str(runs.one.output)), load_file(str(runs.fsdp)))
    assert 0 < worst <= 0.05 * OPTIONS["lr"], worst  # > 0: two processes do not merely copy one
    assert not (runs.fsdp.parent / "fsdp.train").exists()  # a finished run leaves no training state


def test_the_gathered_file_loads_and_gives_the_logits_the_run_trained(lm, runs) -> None:
    written = load_file(str(runs.fsdp))
    assert largest_difference(written, load_file(str(runs.gathered))) == 0
    before = load_file(str(lm.student))
    assert written.keys() == before.keys() and largest_difference(written, before) > 1e-4  # the trained weights, not the input
    model = lowrank_cli.load(str(runs.fsdp)).eval()
    with torch.no_grad():
        logits = model(lm.ids, use_cache=False).logits
    sharded = load_file(str(runs.logits))["logits"]
    assert logits.shape == sharded.shape == (3, 32, 320)
    torch.testing.assert_close(logits, sharded, rtol=1e-5, atol=1e-5)


def test_resume_from_the_dcp_state_is_exact(lm, runs, tmp_path) -> None:
    parts = tmp_path / "parts.safetensors"
    stopped = _driver(lm, parts, stop_at=3)
    assert_stopped_at(stopped, parts, 3)
    cli = ["-m", "lowrank_cli", "recover", str(lm.student), "--teacher", str(lm.teacher), "--data", str(lm.text),
           "--steps", str(STEPS), "--lr", str(OPTIONS["lr"]), "--seq-len", "32", "--save-every", "2", "--eval-every",
           "2", "--keep", "last", "--seed", "1", "--workers", "0", "--device", "cpu", "--log-every", "1", "--resume",
           "--shard", "fsdp", "--batch-size", "4", "-o", str(parts)]
    done = torchrun(2, cli, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resuming at step 3/6" in done.stderr
    assert "FSDP: student and teacher sharded over 2 processes, 2 blocks each (fp32)" in done.stderr
    worst = largest_difference(load_file(str(runs.fsdp)), load_file(str(parts)))
    assert worst <= 1e-6, worst
    lines, expected = _lines(parts), _lines(runs.fsdp)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    for term in ("loss", "kd", "fd"):
        assert [line[term] for line in lines] == pytest.approx([line[term] for line in expected], rel=1e-6)
    scored = [(line["step"], line["val_perplexity"]) for line in lines if "val_perplexity" in line]
    assert [step for step, _ in scored] == [2, 4, 6]  # the resumed run scores its own steps 4 and 6 too
    assert [value for _, value in scored] == pytest.approx(
        [line["val_perplexity"] for line in expected if "val_perplexity" in line], rel=1e-6)
    assert not (tmp_path / "parts.train").exists()

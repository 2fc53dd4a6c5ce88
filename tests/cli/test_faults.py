"""The audit of issue 19, as a table: each bad input or fault ends with one `Error:` line, its exit code, and no
new file in the output folder. Faults of the disk are simulated at the writer (no root tricks)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from digits import write_corrupt_image, write_digits_imagefolder, write_huge_image
from helpers import error_lines, make_tiny_vit, run_cli
from hf_fixtures import write_corpus
from safetensors import safe_open
from safetensors.torch import save_file

import lowrank_cli


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_vit_folder, bert_folder):
    """A low-rank checkpoint, corrupt variants of its metadata, bad data folders and a malicious pickle."""
    root = tmp_path_factory.mktemp("faults")
    lr = root / "lr.safetensors"
    model = make_tiny_vit()
    lowrank_cli.factorize(model, kappa=2)
    lowrank_cli.save(model, lr)
    with safe_open(str(lr), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, key, value in [("ranks_text", "lrc.ranks", {"blocks.0.attn.qkv": "abc"}),
                             ("ranks_list", "lrc.ranks", [1, 2, 3]),
                             ("ranks_zero", "lrc.ranks", {"blocks.0.attn.qkv": 0}),
                             ("huge_args", "lrc.model_args", {"embed_dim": 100000000, "depth": 1000}),
                             ("args_list", "lrc.model_args", [1]),
                             ("layers_text", "lrc.layers", {"blocks.0.attn.qkv": "x"})]:
        save_file(tensors, str(root / f"{name}.safetensors"), metadata={**meta, key: json.dumps(value)})
    deep = 100_000  # past Python's recursion limit: json.loads itself gives up
    for name, key, text in [("layers_deep", "lrc.layers", '{"a": ' + "[" * deep + "]" * deep + "}"),
                            ("provenance_deep", "lrc.provenance", '{"a": ' + "[" * deep + "]" * deep + "}"),
                            ("provenance_nested", "lrc.provenance", '{"a": ' + "[" * 100 + "]" * 100 + "}"),
                            ("provenance_huge", "lrc.provenance", json.dumps({"note": "x" * 5_000_000}))]:
        save_file(tensors, str(root / f"{name}.safetensors"), metadata={**meta, key: text})
    odd = "blocks.0.mlp.fc2.second.weight"
    for dtype, name in ((torch.int8, "int8"), (torch.float16, "fp16")):
        save_file({**tensors, odd: tensors[odd].to(dtype)}, str(root / f"{name}_tensor.safetensors"), metadata=meta)
    nan = {**tensors, odd: tensors[odd].clone()}
    nan[odd][0, 0] = float("nan")
    save_file(nan, str(root / "nan.safetensors"), metadata=meta)
    for c in range(10):  # a class per output of the tiny ViT, every image past Pillow's limit
        for split in ("train", "val"):
            write_huge_image(root / "huge" / split / str(c) / "big.png")
    unreadable = root / "unreadable"
    for c in range(2):
        for i in range(6):
            write_corrupt_image(unreadable / "train" / str(c) / f"{i}.png", kind="garbage")
    for c in range(10):  # a val/ split of one unreadable image per class of the tiny ViT: eval has no sample
        write_corrupt_image(root / "unreadable_val" / "val" / str(c) / "0.png", kind="garbage")
    mismatched = write_digits_imagefolder(root / "mismatched", image_size=32, max_per_class=8)
    for split in ("train", "val"):  # 3 classes, for a model with 10 outputs
        for digit in range(3, 10):
            shutil.rmtree(mismatched / split / str(digit))

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"w": Payload()}, root / "evil.pt")
    torch.save({"w": Payload()}, root / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    (root / "README.md").write_text("# not data\n")
    return {"lr": lr, "root": root, "teacher": tiny_vit_folder, "bert": bert_folder, "unreadable": unreadable,
            "mismatched": mismatched, "corpus": write_corpus(root / "corpus.txt", n=16)}


def _case(args, code, message):
    return pytest.param(args, code, message, id=" ".join(str(a) for a in args)[:60])


CASES = [
    _case(["report", "{root}/ranks_text.safetensors"], 3, "lrc.ranks' gives 'blocks.0.attn.qkv' the rank \"abc\""),
    _case(["report", "{root}/ranks_list.safetensors"], 3, "lrc.ranks' is a list, not a JSON object"),
    _case(["report", "{root}/ranks_zero.safetensors"], 3, "the rank 0"),
    _case(["report", "{root}/huge_args.safetensors"], 3, "lrc.model_args are corrupt"),
    _case(["report", "{root}/args_list.safetensors"], 3, "lrc.model_args' is a list"),
    _case(["report", "{root}/layers_text.safetensors"], 3, "lrc.layers' gives 'blocks.0.attn.qkv' a str"),
    _case(["factorize", "{root}/evil.pt", "--arch", "vit_tiny_patch16_224", "-o", "{out}/x.safetensors"], 3,
          "pickled Python objects, which lrc never unpickles (posix.system)"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{unreadable}", "--steps", "2", "--batch-size", "4",
           "--workers", "0", "-o", "{out}/r.safetensors"], 3, "none of the"),
    _case(["factorize", "{teacher}", "--calib", "{unreadable}", "-o", "{out}/x.safetensors"], 3,
          "none of the 12 calibration images could be read"),
    _case(["recover", "{bert}", "--kappa", "2", "--teacher", "{bert}", "--data", "{root}/README.md", "--steps", "1",
           "-o", "{out}/r.safetensors"], 3, "is a file lrc does not read as data"),
    _case(["factorize", "deit_tinyy", "-o", "{out}/x.safetensors"], 3, "closest timm names: deit_tiny"),
    _case(["report", "{out}/missing.safetensors"], 3, "does not exist"),
    # issue 26
    _case(["report", "{root}/provenance_huge.safetensors"], 3, "metadata 'lrc.provenance' holds 5,000,012 characters"),
    _case(["report", "{root}/layers_deep.safetensors"], 3, "'lrc.layers' is nested deeper than JSON can be read"),
    _case(["report", "{root}/provenance_deep.safetensors"], 3, "'lrc.provenance' is nested deeper than JSON can be"),
    _case(["report", "{root}/provenance_nested.safetensors"], 3, "'lrc.provenance' is nested more than 64 levels"),
    _case(["report", "{root}/int8_tensor.safetensors"], 3,
          "tensor 'blocks.0.mlp.fc2.second.weight' is stored as int8, but the model's other weights are float32"),
    _case(["eval", "{root}/fp16_tensor.safetensors", "--data", "{mismatched}"], 3,
          "tensor 'blocks.0.mlp.fc2.second.weight' is stored as float16, but the model's other weights are float32"),
    _case(["factorize", "{root}/evil_legacy.pt", "--arch", "vit_tiny_patch16_224", "-o", "{out}/x.safetensors"], 3,
          "pickled Python objects, which lrc never unpickles (posix.system)"),
    _case(["eval", "{lr}", "--task", "sst\nx={root}/missing.jsonl"], 2, "task name 'sst\\nx' must be a word"),
    _case(["eval", "{teacher}", "--data", "{root}/huge", "--workers", "0"], 3,
          "big.png': it has 400 Mpx, more than Pillow's limit of"),
    _case(["factorize", "{teacher}", "--calib", "{root}/huge", "-o", "{out}/x.safetensors"], 3,
          "shrink the images (a model reads a few hundred pixels a side)"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{mismatched}", "--steps", "1", "--batch-size", "4",
           "--workers", "0", "--alpha", "0", "-o", "{out}/r.safetensors"], 2, "nothing to learn from"),
    # issue 26, second part
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{unreadable}", "--steps", "2", "--batch-size", "4",
           "--workers", "0", "-o", "{out}/r.safetensors"], 3, "is not an image Pillow reads"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{root}/huge", "--steps", "2", "--batch-size", "4",
           "--workers", "0", "--no-eval", "-o", "{out}/r.safetensors"], 3, "more than Pillow's limit"),
    _case(["factorize", "{teacher}", "--kappa", "2", "-o", "{out}/x.bin"], 2,
          "--output '{out}/x.bin' does not end in .safetensors, the format lrc writes: use -o {out}/x.safetensors"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{mismatched}", "--steps", "99999999999999999999",
           "-o", "{out}/r.safetensors"], 2, "--steps must be at most 2147483648 (2^31), got 99999999999999999999"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{mismatched}", "--epochs", "1e12",
           "-o", "{out}/r.safetensors"], 2, "--epochs must be at most 2147483648 (2^31), got 1e+12"),
    _case(["eval", "{root}/nan.safetensors", "--data", "{mismatched}", "--workers", "0"], 3,
          "nan.safetensors': tensor 'blocks.0.mlp.fc2.second.weight' holds 1 NaN or infinite value(s)"),
    _case(["recover", "{root}/nan.safetensors", "--teacher", "{teacher}", "--data", "{mismatched}", "--steps", "2",
           "--batch-size", "4", "--workers", "0", "-o", "{out}/r.safetensors"], 3,
          "the student: tensor 'blocks.0.mlp.fc2.second.weight' holds 1 NaN"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{mismatched}", "--steps", "3", "--lr", "1e30",
           "--batch-size", "4", "--workers", "0", "--no-eval", "-o", "{out}/r.safetensors"], 2,
          "--lr must be at most 2147483648 (2^31), got 1e+30"),
    _case(["recover", "{lr}", "--teacher", "{teacher}", "--data", "{mismatched}", "--steps", "4", "--lr", "1e9",
           "--batch-size", "4", "--workers", "0", "--no-eval", "-o", "{out}/r.safetensors"], 5, "lower"),
    _case(["eval", "{teacher}", "--data", "{root}/unreadable_val", "--workers", "0"], 3, "is not an image Pillow reads"),
    _case(["bench", "{lr}", "--threads", "100000"], 2, "--threads must be at most"),
    _case(["report", "{lr}", "--input-size", "3,200000,200000"], 2,
          "--input-size '3,200000,200000' makes 120,000,000,000 values per example, more than lrc accepts"),
]


@pytest.mark.parametrize(("args", "code", "message"), CASES)
def test_bad_input(files, tmp_path, capsys, args, code, message):
    out = tmp_path / "out"
    out.mkdir()
    names = {k: v for k, v in files.items() if isinstance(v, Path)}
    argv = [a.format(out=out, **names) for a in args]
    got, _, err = run_cli(argv, capsys)
    lines = error_lines(err)
    assert got == code and len(lines) == 1 and message.format(out=out) in lines[0], err
    assert err.splitlines()[-1] == lines[0]  # the Error line is the last word
    assert list(out.iterdir()) == []  # nothing written, nothing half-written


def test_read_only_output_folder_fails_before_the_work(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real_open = Path.open

    def refuse(self, mode="r", *a, **k):
        if self.parent == out and "x" in mode:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", refuse)
    started = time.perf_counter()
    code, _, err = run_cli(["factorize", files["teacher"], "-o", out / "x.safetensors"], capsys)
    assert code == 4 and error_lines(err) == [f"Error: cannot write in '{out}' (Read-only file system): choose a "
                                              "writable folder for the output"], err
    assert "Factorizing" not in err and time.perf_counter() - started < 30
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"),
                                             (errno.EACCES, "no permission")])
def test_a_failing_write_is_exit_4_and_leaves_nothing(files, tmp_path, capsys, monkeypatch, code, words):
    out = tmp_path / "full"
    out.mkdir()
    real_write = Path.write_bytes

    def fail_half_way(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(code, os.strerror(code))

    def fail_half_way_at(fd, data, offset):  # streaming factorize writes each tensor at its offset
        os.pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "write_bytes", fail_half_way)
    monkeypatch.setattr("lowrank_cli.checkpoint.shard_writer._write_at", fail_half_way_at)
    got, _, err = run_cli(["factorize", files["teacher"], "-o", out / "x.safetensors"], capsys)
    lines = error_lines(err)
    assert got == 4 and len(lines) == 1 and words in lines[0] and "x.safetensors" in lines[0], err
    assert list(out.iterdir()) == []


def test_recover_on_a_full_disk_leaves_no_metrics(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    out.mkdir()
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    got, _, err = run_cli(["recover", files["lr"], "--teacher", files["teacher"], "--data", files["corpus"].parent /
                           "mismatched", "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-eval",
                           "-o", out / "r.safetensors"], capsys)
    assert got == 4 and len(error_lines(err)) == 1, err
    assert list(out.iterdir()) == []


def test_a_kill_during_the_write_leaves_nothing_the_next_write_keeps(files, tmp_path):
    """SIGKILL in the middle of writing a checkpoint leaves lrc's temporary file; the next write removes it."""
    out = tmp_path / "k.safetensors"
    code = (
        "import os, signal, sys, pathlib, lowrank_cli\n"
        "real = pathlib.Path.write_bytes\n"
        "def die(self, data):\n"
        "    real(self, data[: len(data) // 2]); os.kill(os.getpid(), signal.SIGKILL)\n"
        "pathlib.Path.write_bytes = die\n"
        f"lowrank_cli.save(lowrank_cli.load({str(files['lr'])!r}), {str(out)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".k.safetensors.tmp-") and not out.exists()
    lowrank_cli.save(lowrank_cli.load(files["lr"]), out)
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


def test_a_file_name_in_another_encoding_is_read(files, tmp_path, capsys):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9_lr.safetensors"))
    odd.write_bytes(files["lr"].read_bytes())
    code, out, err = run_cli(["report", odd, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["params"]["total"] == sum(p.numel() for p in lowrank_cli.load(files["lr"]).parameters())


def test_val_split_that_does_not_fit_is_said_so(files, tmp_path, capsys):
    code, out, err = run_cli(["recover", files["lr"], "--teacher", files["teacher"], "--data", files["mismatched"],
                              "--steps", "1", "--batch-size", "4", "--workers", "0", "-o", tmp_path / "r.safetensors"],
                             capsys)
    assert code == 0, err
    assert "no labelled val/ split" not in out and "classes" in out  # the summary names the real cause


def test_unknown_name_fails_fast_without_network(tmp_path, capsys, monkeypatch):
    from lowrank_cli.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.hub_reachable.cache_clear()
    monkeypatch.setattr(hub.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    started = time.perf_counter()
    code, _, err = run_cli(["factorize", "not_a_model_at_all", "-o", tmp_path / "x.safetensors"], capsys)
    hub.hub_reachable.cache_clear()
    assert code == 3 and len(error_lines(err)) == 1 and "the Hub cannot be reached" in err, err
    assert time.perf_counter() - started < 5
    assert err.count("\n") == 1  # nothing before the Error line


@pytest.mark.parametrize("command", [["recover", "{lr}", "--teacher", "{teacher}"],
                                     ["finetune", "{lr}", "--method", "head"]], ids=["recover", "finetune"])
def test_a_folder_where_the_metrics_go_is_refused_before_the_run(files, tmp_path, capsys, command):
    out = tmp_path / "out"
    (out / "r.metrics.jsonl").mkdir(parents=True)
    names = {k: v for k, v in files.items() if isinstance(v, Path)}
    argv = [a.format(**names) for a in command] + ["--data", files["mismatched"], "--steps", "1", "--batch-size", "4",
                                                  "--workers", "0", "-o", out / "r.safetensors"]
    got, _, err = run_cli(argv, capsys)
    lines = error_lines(err)
    assert got == 4 and lines == err.splitlines()[-1:], err
    assert f"'{out / 'r.metrics.jsonl'}' is a folder, where the run writes its metrics log" in lines[0]
    assert "Data:" not in err  # refused before the data and the models are read
    assert [p.name for p in out.iterdir()] == ["r.metrics.jsonl"] and not any((out / "r.metrics.jsonl").iterdir())


def test_a_symlink_loop_in_the_data_is_skipped_and_labels_stay_true(files, tmp_path, capsys, caplog):
    """`ln -s .. val/0/up` once made 20 images several hundred and gave class 1's images label 0: each folder is
    read once (the loop is skipped with a warning) and a file keeps the class folder it really sits in."""
    data = write_digits_imagefolder(tmp_path / "loop", image_size=32, max_per_class=8)
    real = sorted((data / "val").rglob("*.png"))
    (data / "val" / "0" / "up").symlink_to("..")
    (data / "val" / "1" / "twos").symlink_to("../2")  # class 2's images, reached from class 1
    code, out, err = run_cli(["eval", files["teacher"], "--data", data, "--workers", "0", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["images"] == len(real) == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"'{data / 'val' / '0' / 'up'}' links back to '{(data / 'val').resolve()}'" in w for w in warnings)
    from lowrank_cli.data.images import find_images

    found = find_images(data, "val")
    assert len(found) == 20 and {p.resolve() for p, _ in found.samples} == {p.resolve() for p in real}
    assert all(found.classes[label] == p.resolve().parent.name for p, label in found.samples)


def test_every_error_message_is_one_line(files, capsys, monkeypatch):
    """A message that holds a newline, a tab or a terminal escape (a library's multi-line error, a name echoed back)
    is printed as one line with those characters escaped."""
    from lowrank_cli.evaluation import report

    def fail(*args, **kwargs):
        raise RuntimeError("first line\n\tsecond line \x1b[2J")

    monkeypatch.setattr(report, "build_report", fail)
    code, out, err = run_cli(["report", files["lr"]], capsys)
    assert code == 1 and err.splitlines() == [
        "Error: unexpected RuntimeError: first line\\n\\tsecond line \\x1b[2J (a bug in lrc: rerun with LRC_DEBUG=1 "
        "and report the traceback)"]


def test_runs_with_loader_workers_leave_nothing_in_the_temporary_folder(files, tmp_path, capsys):
    """Loader workers (multiprocessing's `pymp-*`) and timm's import of torch._dynamo (`torchinductor_<user>`)
    wrote into $TMPDIR; each lrc run now has its own temporary folder there, removed at its end."""
    import tempfile

    data = write_digits_imagefolder(tmp_path / "digits", image_size=32, max_per_class=4)
    scratch = Path(tempfile.mkdtemp())  # short: multiprocessing's sockets go below it (107 bytes at most)
    env = {**os.environ, "TMPDIR": str(scratch)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "lowrank_cli", "eval", str(files["teacher"]), "--data", str(data),
                           "--workers", "2", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 10 and list(scratch.iterdir()) == []
    before = (os.environ.get("TMPDIR"), tempfile.gettempdir(), os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    code, _, err = run_cli(["report", files["lr"], "--json"], capsys)
    assert code == 0, err
    assert (os.environ.get("TMPDIR"), tempfile.gettempdir(), os.environ.get("TORCHINDUCTOR_CACHE_DIR")) == before


LOCKED = {"recover": ["recover", "{lr}", "--teacher", "{teacher}", "--data", "{mismatched}", "--steps", "1"],
          "factorize": ["factorize", "{teacher}", "--kappa", "2"],
          "finetune": ["finetune", "{teacher}", "--data", "{mismatched}", "--steps", "1"]}


@pytest.mark.parametrize("command", sorted(LOCKED))
def test_a_second_run_with_the_same_output_fails_at_once_naming_the_first(files, tmp_path, capsys, command):
    """Another process holds the output (its lock next to it): the second run is exit 4 at once, with its pid, and
    leaves the other run's files alone."""
    out = tmp_path / "r.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lowrank_cli.atomic import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        names = {k: v for k, v in files.items() if isinstance(v, Path)}
        argv = [a.format(**names) for a in LOCKED[command]] + ["-o", out]
        started = time.perf_counter()
        code, _, err = run_cli(argv, capsys)
        lines = error_lines(err)
        assert code == 4 and len(lines) == 1 and f"is being written by another lrc run (pid {holder.pid};" in lines[0]
        assert "--output" in lines[0] and err.splitlines()[-1] == lines[0], err
        assert time.perf_counter() - started < 30 and [p.name for p in tmp_path.iterdir()] == [".r.safetensors.lock"]
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_cli(LOCKED["factorize"][:1] + [str(files["teacher"]), "--kappa", "2", "-o", out], capsys)
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"], err  # lock removed

"""Sequential calibration's hidden states on disk (compress.layer_inputs): over the memory budget (25 % of the
available memory) or with `calib_spill`, they are one file-backed tensor in a temporary folder beside the output;
the factorized tensors are bit for bit those of the in-memory run, in memory and streamed; the folder is gone
after success, an error and Ctrl-C; a disk that cannot hold them fails first, with one Error: line and nothing
left behind; the log and the record say where they were held."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from causal_fixtures import write_tiny_causal_lm, write_token_text
from helpers import error_lines, run_cli

import lowrank_cli
from lowrank_cli.checkpoint.shards import TensorSet
from lowrank_cli.compress import factorization, layer_inputs
from lowrank_cli.compress.factorize_source import factorize_file
from lowrank_cli.errors import OutputError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ, WINDOWS, HIDDEN = 32, 6, 32
HELD = WINDOWS * SEQ * HIDDEN * 4  # windows x tokens x hidden x float32


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("spill")
    return write_tiny_causal_lm(root / "llama", "llama", layers=3), write_token_text(root / "calib.txt", 400)


def _factorize(folder, text, **kw):
    model = lowrank_cli.load_model(str(folder)).model
    logs: list[str] = []
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=4, calib=str(text), calib_samples=WINDOWS,
                                   tokenizer=str(folder), input_size=(SEQ,), log=logs.append, **kw)
    return model, result.extra["calibration"], "\n".join(logs)


def _spilled(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{layer_inputs.PREFIX}*"))


def test_over_the_budget_in_memory_factorize_spills_bit_identical(llama, tmp_path, monkeypatch):
    folder, text = llama
    kept, kept_cal, kept_log = _factorize(folder, text)
    assert kept_cal["held"] == "memory" and kept_cal["held_bytes"] == HELD
    assert "are held in memory on cpu: 0.0 MiB (float32" in kept_log
    seen = []
    real = factorization.swap_planned

    def watching(*args, **kwargs):  # while the layers run, the file is there with its room reserved
        seen.extend((p, os.path.getsize(p / layer_inputs.FILE)) for p in _spilled(tmp_path))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_inputs, "memory_budget", lambda device: HELD - 1)  # one byte short
    monkeypatch.setattr(factorization, "swap_planned", watching)
    spilled, cal, log = _factorize(folder, text, calib_spill_dir=str(tmp_path))
    assert cal["held"] == "disk" and cal["held_bytes"] == HELD
    assert f"are spilled to disk in {tmp_path}{os.sep}{layer_inputs.PREFIX}" in log
    assert f"over the memory budget of {(HELD - 1) / 2**20:.1f} MiB, 25% of the available memory of cpu" in log
    assert len({p for p, _ in seen}) == 1 and {size for _, size in seen} == {HELD} and len(seen) == 3
    a, b = kept.state_dict(), spilled.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".first.weight") for k in a) and _spilled(tmp_path) == []


def test_the_budget_is_a_quarter_of_memavailable_and_unknown_keeps_memory(llama, monkeypatch):
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    budget = layer_inputs.memory_budget(torch.device("cpu"))
    assert abs(budget - available // 4) < 64 * 2**20  # read a moment apart
    with layer_inputs.HeldStates(torch.device("cpu"), budget=HELD) as held:  # just fits: memory
        assert held.place((WINDOWS, SEQ, HIDDEN), torch.float32) is None and held.held == "memory"

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(layer_inputs, "open", unreadable, raising=False)
    assert layer_inputs.available_memory(torch.device("cpu")) is None
    with layer_inputs.HeldStates(torch.device("cpu")) as held:
        assert held.place((10**6, 4096, 8192), torch.float32) is None and held.held == "memory"  # 128 TiB


def test_streamed_spill_is_bit_identical(llama, tmp_path):
    folder, text = llama
    options = {"ratio": 0.4, "calib": str(text), "calib_samples": WINDOWS, "seq_len": SEQ, "stream": True,
               "force": True}
    outputs = {}
    for spill in (None, True):
        out = tmp_path / str(spill)
        out.mkdir()
        logs: list[str] = []
        result = factorize_file(str(folder), str(out / "o.safetensors"), calib_spill=spill, log=logs.append,
                                **options)
        assert result.extra["streamed"] is True
        assert result.extra["calibration"]["held"] == ("disk" if spill else "memory")
        assert ("spilled to disk in " + str(out) if spill else "held in memory on cpu") in "\n".join(logs)
        assert [p.name for p in out.iterdir()] == ["o.safetensors"]  # the temporary folder, beside it, is gone
        outputs[spill] = TensorSet.open(out / "o.safetensors")
    kept, spilled = (outputs[s].mapped() for s in (None, True))
    assert sorted(kept) == sorted(spilled) and any(k.endswith(".first.weight") for k in kept)
    for name in kept:
        assert kept[name].dtype == spilled[name].dtype and torch.equal(kept[name], spilled[name]), name
    assert '"held": "disk"' in outputs[True].metadata["lrc.provenance"]


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_run_stopped_mid_way_leaves_nothing_beside_the_output(llama, tmp_path, monkeypatch, stream, error):
    folder, text = llama
    calls = []
    real = factorization.swap_planned

    def second_layer_fails(*args, **kwargs):
        calls.append(_spilled(tmp_path))
        if len(calls) == 2:
            raise error("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(factorization, "swap_planned", second_layer_fails)
    with pytest.raises(error, match="stopped"):
        factorize_file(str(folder), str(tmp_path / "o.safetensors"), ratio=0.4, calib=str(text),
                       calib_samples=WINDOWS, seq_len=SEQ, stream=stream, calib_spill=True)
    assert len(calls) == 2 and all(len(c) == 1 for c in calls)  # it was there while the layers ran
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_cannot_hold_them_fails_first_with_one_error(llama, tmp_path, capsys, monkeypatch):
    folder, text = llama
    seen: list[list[Path]] = []

    def full(fd, offset, length):
        seen.append(_spilled(tmp_path))
        assert length == HELD
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, _, err = run_cli(["factorize", folder, "--ratio", "0.4", "--calib", text, "--calib-samples", WINDOWS,
                            "--seq-len", SEQ, "--calib-spill", "-o", tmp_path / "o.safetensors"], capsys)
    lines = error_lines(err)
    assert code == OutputError.exit_code == 4 and len(lines) == 1, err
    assert f"on disk ({HELD / 2**20:.1f} MiB) in '{tmp_path}'" in lines[0] and "the disk is full" in lines[0]
    assert "--calib-spill-dir" in lines[0] and "--no-calib-spill" in lines[0]
    assert len(seen) == 1 and len(seen[0]) == 1  # its folder was made, then removed with the output's room
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match=r"0\.0 MiB\) in .*calib_spill_dir.*calib_spill=False"):
        _factorize(folder, text, calib_spill=True, calib_spill_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_mapped_is_one_error_and_nothing_left(llama, tmp_path, capsys, monkeypatch):
    folder, text = llama

    def no_mmap(*args, **kwargs):
        raise RuntimeError("unable to mmap 1048576 bytes: Cannot allocate memory (12)")

    monkeypatch.setattr(torch, "from_file", no_mmap)
    code, _, err = run_cli(["factorize", folder, "--ratio", "0.4", "--calib", text, "--calib-samples", WINDOWS,
                            "--seq-len", SEQ, "--calib-spill", "-o", tmp_path / "o.safetensors"], capsys)
    lines = error_lines(err)
    assert code == OutputError.exit_code and len(lines) == 1, err
    assert "cannot be mapped into memory" in lines[0] and "unable to mmap" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_a_killed_run_s_folder_is_removed_by_the_next(llama, tmp_path):
    """A run killed outright (SIGKILL, the OOM killer) runs no clean-up and leaves its folder, the size of the
    hidden states: the next run that spills there removes it (its process is gone), as atomic.py does with a killed
    write's temporary file; a live process's folder and anything else are left alone."""
    import subprocess

    folder, text = llama
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{layer_inputs.PREFIX}{gone.pid}-abcd1234"
    live = tmp_path / f"{layer_inputs.PREFIX}{os.getppid()}-efgh5678"
    for d in (dead, live):
        d.mkdir()
        (d / layer_inputs.FILE).write_bytes(bytes(HELD))
    (tmp_path / "keep.txt").write_text("x")
    _, cal, log = _factorize(folder, text, calib_spill=True, calib_spill_dir=str(tmp_path))
    assert cal["held"] == "disk" and f"{layer_inputs.PREFIX}{os.getpid()}-" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "keep.txt"])


def test_without_posix_fallocate_the_room_is_written(llama, tmp_path, monkeypatch):
    """macOS and Windows have no os.posix_fallocate: the file's room is reserved by writing it, the run is bit for
    bit the in-memory one, and a disk that fills while it is reserved is the same one OutputError, nothing left."""
    folder, text = llama
    kept, _, _ = _factorize(folder, text)
    monkeypatch.delattr(os, "posix_fallocate")
    sizes: list[int] = []
    real = factorization.swap_planned

    def watching(*args, **kwargs):
        sizes.extend(os.path.getsize(p / layer_inputs.FILE) for p in _spilled(tmp_path))
        return real(*args, **kwargs)

    monkeypatch.setattr(factorization, "swap_planned", watching)
    spilled, cal, _ = _factorize(folder, text, calib_spill=True, calib_spill_dir=str(tmp_path))
    assert cal["held"] == "disk" and sizes == [HELD] * 3
    a, b = kept.state_dict(), spilled.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _spilled(tmp_path) == []
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(layer_inputs.FILE):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputError, match=r"on disk \(0\.0 MiB\) in .* and the disk is full"):
        _factorize(folder, text, calib_spill=True, calib_spill_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,where", [
    ([], "held in memory on cpu"),
    (["--no-calib-spill"], "held in memory on cpu"),
    (["--calib-spill"], "spilled to disk in {out}"),
    (["--calib-spill", "--no-stream"], "spilled to disk in {out}"),
    (["--calib-spill-dir", "{other}"], "spilled to disk in {other}"),  # the budget made one byte short, below
])
def test_the_log_says_where_they_are_held(llama, tmp_path, capsys, monkeypatch, args, where):
    folder, text = llama
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    other.mkdir()
    if "--calib-spill-dir" in args:
        monkeypatch.setattr(layer_inputs, "memory_budget", lambda device: HELD - 1)
    args = [a.format(other=other) for a in args]
    code, _, err = run_cli(["factorize", folder, "--ratio", "0.4", "--calib", text, "--calib-samples", WINDOWS,
                            "--seq-len", SEQ, *args, "-o", out / "o.safetensors"], capsys)
    assert code == 0, err
    text_err = " ".join(err.split())  # the console wraps long lines
    assert where.format(out=out, other=other) in text_err, err
    assert ("over the memory budget" in text_err) == ("--calib-spill-dir" in args)
    assert [p.name for p in out.iterdir()] == ["o.safetensors"] and list(other.iterdir()) == []


def test_spill_options_where_they_do_not_apply(llama, tmp_path):
    folder, text = llama
    model = lowrank_cli.load_model(str(folder)).model
    with pytest.raises(UsageError, match="calib_spill applies to the calib data"):
        lowrank_cli.factorize(model, kappa=2, calib_spill=True)
    with pytest.raises(UsageError, match="calib_spill and calib_spill_dir say where .* parallel holds none"):
        lowrank_cli.factorize(model, kappa=2, calib=str(text), calib_mode="parallel", calib_spill=False)
    with pytest.raises(UsageError, match="a rank budget calibrates every layer in one pass .*: drop them"):
        lowrank_cli.factorize(model, budget=0.5, calib=str(text), tokenizer=str(folder), calib_spill=True)


def test_spill_dir_on_a_model_calibrated_in_one_pass(tiny_vit_folder, digits_folder, tmp_path, capsys):
    images = digits_folder(32, 2)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(["factorize", tiny_vit_folder, "--calib", images, "--calib-spill-dir", tmp_path,
                            "-o", out / "v.safetensors"], capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "(its family's default) calibrates every layer in one pass" in lines[0]
    assert "--calib-spill-dir" in lines[0] and list(out.iterdir()) == []
    code, _, err = run_cli(["factorize", tiny_vit_folder, "--calib", images, "-o", out / "v.safetensors"], capsys)
    assert code == 0, err  # the output's folder given as the default spill folder is no option of the user's

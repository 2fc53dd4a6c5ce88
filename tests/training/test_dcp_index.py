"""The DCP index of a sharded training state is unpickled with an allow-list before DCP reads it."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from lowrank_cli.errors import InputError
from lowrank_cli.training.dcp_index import check_index


def _real_state(folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with pytest.warns(UserWarning):  # no process group: DCP says it saves as one process
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder), no_dist=True)


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-ran",))


def test_an_index_dcp_wrote_passes(tmp_path):
    _real_state(tmp_path)
    check_index(tmp_path)  # no error


def test_an_index_that_would_run_code_is_refused_unrun(tmp_path, monkeypatch):
    _real_state(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"index": _Planted()}))
    with pytest.raises(InputError, match=r"names posix\.system|names os\.system"):
        check_index(tmp_path)
    assert not (tmp_path / "planted-ran").exists()


def test_a_function_of_dcp_s_own_modules_is_refused_too(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(torch.distributed.checkpoint.state_dict.get_state_dict))
    with pytest.raises(InputError, match="get_state_dict"):
        check_index(tmp_path)


def test_a_damaged_index_is_named(tmp_path):
    _real_state(tmp_path)
    (tmp_path / ".metadata").write_bytes((tmp_path / ".metadata").read_bytes()[:20])
    with pytest.raises(InputError, match="damaged DCP index"):
        check_index(tmp_path)

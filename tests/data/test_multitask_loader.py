"""Several tasks' batches as one stream (data/multitask_loader.py): the three schedules' orders, a stream stopped
anywhere and resumed with fresh objects that goes on exactly as the uninterrupted one, and ranks that take the same
task at the same position."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from lowrank_cli.data.images import Batch
from lowrank_cli.data.labelled_texts import labelled_text_loader, read_labelled_texts
from lowrank_cli.data.multitask_loader import SCHEDULES, MultiTaskLoader, TaskBatch
from lowrank_cli.data.sampling import EpochSampler, epoch_loader
from lowrank_cli.errors import UsageError


def _numbers(texts, pairs=None, **_):
    """A tokenizer whose one token is the text's number: every batch says which records it holds."""
    ids = torch.tensor([[int(t)] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _text_task(path, n, *, rank=0, world_size=1, seed=0):
    path.write_text("".join(json.dumps({"text": str(i), "label": "ab"[i % 2]}) + "\n" for i in range(n)))
    return labelled_text_loader(read_labelled_texts(path), _numbers, batch_size=2, max_length=4, shuffle=True,
                                seed=seed, rank=rank, world_size=world_size)


def _tensor_task(n, *, rank=0, world_size=1, seed=0):
    """An image-like task: sample i is a (1, 2, 2) image labelled i."""
    data = TensorDataset(torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(n))
    return epoch_loader(data, lambda rows: Batch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                                                 0),
                        batch_size=2, shuffle=True, seed=seed + 7, rank=rank, world_size=world_size, drop_last=True,
                        num_workers=0, what="tensors", unit="samples")


def _stream(tmp_path, schedule, *, seed=0, rank=0, world_size=1):
    """Three tasks of 5, 3 and 2 batches (per rank, with one process)."""
    return MultiTaskLoader({"long": _text_task(tmp_path / "long.jsonl", 10, rank=rank, world_size=world_size),
                            "images": _tensor_task(6, rank=rank, world_size=world_size),
                            "short": _text_task(tmp_path / "short.jsonl", 4, rank=rank, world_size=world_size,
                                                seed=3)},
                           schedule=schedule, seed=seed)


def _key(batch: TaskBatch) -> tuple:
    inputs, labels, _ = batch.parts()
    ids = labels if batch.task == "images" else inputs[:, 0]
    return batch.task, tuple(ids.tolist()), tuple(labels.tolist())


def _consume(stream, epoch, start, count):
    """`count` batches from (epoch, start) the way trainer.Trainer._batches and _step walk them; the batches and the
    position to resume from."""
    seen = []
    while True:
        stream.set_epoch(epoch)
        stream.set_start_batch(start)
        for position, batch in enumerate(stream, start + 1):
            seen.append(_key(batch))
            if len(seen) == count:
                if position >= stream.batches_per_epoch:
                    return seen, (epoch + 1, 0)
                return seen, (epoch, position)
        epoch, start = epoch + 1, 0


def test_sequential_runs_each_task_in_a_block(tmp_path):
    stream = _stream(tmp_path, "sequential")
    assert stream.sizes == {"long": 5, "images": 3, "short": 2} and stream.batches_per_epoch == 10
    assert stream.order(0) == stream.order(4) == ["long"] * 5 + ["images"] * 3 + ["short"] * 2
    seen, _ = _consume(stream, 0, 0, 20)
    assert [task for task, _, _ in seen] == stream.order(0) + stream.order(1)
    texts = [i for task, ids, _ in seen if task == "long" for i in ids]
    sampler = EpochSampler(10, 2, shuffle=True, seed=0)
    sampler.set_epoch(1)
    # one whole epoch of the task a combined epoch, each record once; the next in the task's next order
    assert sorted(texts[:10]) == list(range(10)) and texts[10:] == sampler.epoch_indices() != texts[:10]


def test_interleaved_gives_every_task_equal_turns_and_wraps_the_short_ones(tmp_path):
    stream = _stream(tmp_path, "interleaved")
    assert stream.batches_per_epoch == 15 and stream.order(0) == ["long", "images", "short"] * 5
    seen, _ = _consume(stream, 0, 0, 15)
    assert Counter(task for task, _, _ in seen) == {"long": 5, "images": 5, "short": 5}
    short = [ids for task, ids, _ in seen if task == "short"]
    # 2 batches an epoch: turns 1-2 are its epoch 0, 3-4 its epoch 1 (another permutation), 5 the start of epoch 2
    sampler = EpochSampler(4, 2, shuffle=True, seed=3)
    epochs = []
    for e in range(3):
        sampler.set_epoch(e)
        epochs.append(sampler.epoch_indices())
    assert [i for ids in short for i in ids] == epochs[0] + epochs[1] + epochs[2][:2]
    assert epochs[0] != epochs[1]  # so the wrap is visible in the check above
    assert stream.positions(1, 0) == {"long": (1, 0), "images": (1, 2), "short": (2, 1)}


def test_proportional_takes_each_batch_once_in_a_seeded_order(tmp_path):
    stream = _stream(tmp_path, "proportional", seed=0)
    orders = [stream.order(e) for e in range(3)]
    assert all(Counter(order) == {"long": 5, "images": 3, "short": 2} for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert _stream(tmp_path, "proportional", seed=1).order(0) != orders[0]
    assert _stream(tmp_path, "proportional", seed=0).order(2) == orders[2]  # a pure function: fresh object, same
    seen, _ = _consume(stream, 0, 0, 10)
    assert [task for task, _, _ in seen] == orders[0]
    images = sorted(i for task, ids, _ in seen if task == "images" for i in ids)
    assert images == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stopped_anywhere_and_resumed_it_goes_on_as_before(schedule, tmp_path):
    per_epoch = _stream(tmp_path, schedule).batches_per_epoch
    total = per_epoch * 5 // 2  # 2.5 combined epochs
    straight, _ = _consume(_stream(tmp_path, schedule), 0, 0, total)
    stops = [1, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch + 1, total]
    resumed, where, done = [], (0, 0), 0
    for stop in stops:
        seen, where = _consume(_stream(tmp_path, schedule), *where, stop - done)  # fresh loaders and samplers
        resumed += seen
        done = stop
    assert resumed == straight
    assert len({ids for _, ids, _ in straight}) > 3  # batches differ, so a misplaced sampler would show


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_rank_takes_the_same_task_at_the_same_position(schedule, tmp_path):
    ranks = [_stream(tmp_path, schedule, seed=5, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].sizes == ranks[1].sizes == {"long": 2, "images": 1, "short": 1}
    assert ranks[0].order(3) == ranks[1].order(3)
    seen = [_consume(stream, 3, 0, 2 * stream.batches_per_epoch)[0] for stream in ranks]
    assert [t for t, _, _ in seen[0]] == [t for t, _, _ in seen[1]]
    for (_, ids0, _), (_, ids1, _) in zip(*seen):
        assert not set(ids0) & set(ids1)  # each rank its own shard of the same task's batch


def test_a_task_batch_is_the_wrapped_batch_with_its_task(tmp_path):
    stream = _stream(tmp_path, "sequential")
    stream.set_epoch(0)
    stream.set_start_batch(5)
    assert len(stream) == 5
    batch = next(iter(stream))
    assert batch.task == "images" and len(batch) == 2 and batch.skipped == 0
    assert batch.parts()[0].shape == (2, 1, 2, 2) and batch.to("cpu").task == "images"


def test_refusals(tmp_path):
    with pytest.raises(UsageError, match="schedule 'random' is not .*sequential, interleaved, proportional"):
        MultiTaskLoader({"a": _tensor_task(4)}, schedule="random")
    with pytest.raises(UsageError, match="no task to train on"):
        MultiTaskLoader({})
    stream = _stream(tmp_path, "interleaved")
    with pytest.raises(UsageError, match="cannot resume at batch 16: a combined epoch of the tasks has 15"):
        stream.set_start_batch(16)

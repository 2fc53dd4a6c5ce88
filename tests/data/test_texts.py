from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hf_fixtures import corpus_sentences, vocab_size, write_corpus

from lowrank_cli.data.texts import (
    TextBatch,
    TextCollate,
    TextDataset,
    TextSet,
    find_texts,
    load_tokenizer,
    text_loader,
)
from lowrank_cli.errors import EnvironmentProblem, InputError, UsageError
from lowrank_cli.models.inputs import default_max_length


@pytest.fixture(scope="module")
def tokenizer(bert_folder: Path):
    return load_tokenizer(bert_folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> TextSet:
    return find_texts(write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n=40))


def _batches(loader) -> list[torch.Tensor]:
    return [batch.input_ids for batch in loader]


# ----------------------------------------------------------------------------------------------- reading


def test_txt_one_text_per_line_blank_lines_ignored(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("first text  \n\n   \nsecond one\t\n  third keeps its indent\n\n", encoding="utf-8")
    found = find_texts(path)
    assert found.texts == ["first text", "second one", "  third keeps its indent"]
    assert len(found) == 3 and found.skipped == 0 and found.files == [path] and found.root == path


def test_corpus_round_trip(tmp_path: Path) -> None:
    assert find_texts(write_corpus(tmp_path / "c.txt", n=17, seed=3)).texts == corpus_sentences(17, seed=3)
    as_jsonl = find_texts(write_corpus(tmp_path / "c.jsonl", n=17, seed=3, jsonl=True))
    assert as_jsonl.texts == corpus_sentences(17, seed=3) and as_jsonl.skipped == 0


def test_jsonl_bad_records_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        json.dumps({"text": "good one", "label": 1}),
        "{not json",
        json.dumps({"sentence": "no text field"}),
        "",
        json.dumps({"text": 42}),
        json.dumps(["text", "a list"]),
        json.dumps({"text": "  "}),
        json.dumps({"text": "good two, ünïcode"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    found = find_texts(path)
    assert found.texts == ["good one", "good two, ünïcode"]
    assert found.skipped == 5  # the blank line is not a record


def test_folder_recursive_sorted_hidden_skipped(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "2.txt").write_text("b2\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a"}) + "\nbroken\n")
    (tmp_path / "c.TXT").write_text("c\n")
    (tmp_path / ".secret.txt").write_text("hidden file\n")
    (tmp_path / ".hidden" / "x.txt").write_text("hidden folder\n")
    (tmp_path / "notes.md").write_text("not text data\n")
    found = find_texts(tmp_path)
    assert found.files == [tmp_path / "a.jsonl", tmp_path / "b" / "2.txt", tmp_path / "c.TXT"]
    assert found.texts == ["a", "b2", "c"] and found.skipped == 1 and found.root == tmp_path


def test_limit_stops_reading(tmp_path: Path) -> None:
    write_corpus(tmp_path / "1.txt", n=10, seed=1)
    write_corpus(tmp_path / "2.txt", n=10, seed=2)
    (tmp_path / "3.txt").write_bytes(b"\xff\xfe not utf-8\n")  # never opened
    first = find_texts(tmp_path, limit=4)
    assert first.texts == corpus_sentences(10, seed=1)[:4] and first.files == [tmp_path / "1.txt"]
    spanning = find_texts(tmp_path, limit=13)
    assert spanning.texts == corpus_sentences(10, seed=1) + corpus_sentences(10, seed=2)[:3]
    assert spanning.files == [tmp_path / "1.txt", tmp_path / "2.txt"]
    with pytest.raises(UsageError, match="at least 1"):
        find_texts(tmp_path, limit=0)


def test_utf8_bom_and_invalid_utf8(tmp_path: Path) -> None:
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n")
    assert find_texts(bom).texts == ["first"] and find_texts(bom).skipped == 0
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not valid UTF-8 .* on line 2") as info:
        find_texts(latin)
    assert str(latin) in str(info.value) and "save it as UTF-8" in str(info.value)


def test_errors_name_cause_and_fix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist") as info:
        find_texts(tmp_path / "missing.txt")
    assert "missing.txt" in str(info.value)

    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(InputError, match=r"expected \.txt or \.jsonl") as info:
        find_texts(csv)
    assert "'.csv'" in str(info.value) and str(csv) in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=r"has no \.txt or \.jsonl files") as info:
        find_texts(empty)
    assert str(empty) in str(info.value)

    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(InputError, match="no text, only blank lines"):
        find_texts(blank)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x"}\nnope\n\n{"text": null}\n')
    with pytest.raises(InputError, match=r"all 3 line\(s\) were skipped") as info:
        find_texts(bad)
    assert '"text" field' in str(info.value) and "one text per line" in str(info.value)


# --------------------------------------------------------------------------------------------- tokenizer


def test_load_tokenizer_from_tiny_bert(bert_folder: Path, tokenizer) -> None:
    assert len(tokenizer) == vocab_size() and tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 0
    ids = tokenizer("the water is 7")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids  # every word is in the vocabulary
    assert len(load_tokenizer(str(bert_folder))) == vocab_size()


def test_missing_tokenizer_files(tmp_path: Path, bert_folder: Path) -> None:
    # transformers 5 would build a 5-token tokenizer from config.json alone; that must not pass silently.
    no_tok = tmp_path / "model"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((bert_folder / "config.json").read_text())
    with pytest.raises(InputError, match="has no tokenizer files") as info:
        load_tokenizer(no_tok)
    assert "tokenizer DIR_OR_REPO" in str(info.value) and str(no_tok) in str(info.value)

    with pytest.raises(InputError, match="is a file"):
        load_tokenizer(bert_folder / "config.json")
    with pytest.raises(InputError, match="has no tokenizer files") as info:
        load_tokenizer("lrc-test/no-such-repo")  # offline, not cached
    assert "lrc-test/no-such-repo" in str(info.value)


def test_tokenizer_without_pad_gets_eos(tmp_path: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>"
                                         ).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "</s>" and tok.pad_token_id == 1 and len(tok) == 4
    batch = TextCollate(tok, 8)(["hello world hello", "world"])
    assert batch.input_ids.tolist() == [[2, 3, 2], [3, 1, 1]] and batch.attention_mask.sum().item() == 4


def test_missing_transformers_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch, bert_folder: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(EnvironmentProblem, match=r"pip install 'lowrank-cli\[transformers\]'"):
        load_tokenizer(bert_folder)


# ----------------------------------------------------------------------------------------------- batches


def test_collate_pads_to_longest_and_truncates(tokenizer) -> None:
    texts = ["the", "the water is 7 and 8", "one two three"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert lengths == [3, 8, 5]

    batch = TextCollate(tokenizer, max_length=32)(texts)
    assert isinstance(batch, TextBatch) and batch.skipped == 0
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, 8)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert batch.input_ids[0, 3:].eq(tokenizer.pad_token_id).all()

    short = TextCollate(tokenizer, max_length=4)(texts)
    assert short.input_ids.shape == (3, 4) and short.attention_mask.sum(1).tolist() == [3, 4, 4]
    assert short.input_ids[:, -1].tolist() == [0, tokenizer.sep_token_id, tokenizer.sep_token_id]

    # Picklable for DataLoader workers, and the same result after the round trip.
    again = pickle.loads(pickle.dumps(TextCollate(tokenizer, 32)))(texts)
    assert torch.equal(again.input_ids, batch.input_ids) and torch.equal(again.attention_mask, batch.attention_mask)
    moved = batch.to("cpu")
    assert isinstance(moved, TextBatch) and torch.equal(moved.input_ids, batch.input_ids)

    with pytest.raises(UsageError, match="max_length"):
        TextCollate(tokenizer, 0)


def test_dataset_returns_strings(corpus: TextSet) -> None:
    dataset = TextDataset(corpus)
    assert len(dataset) == 40 and dataset[5] == corpus.texts[5]


# ------------------------------------------------------------------------------------------------ loader


def test_loader_deterministic_and_resumable(corpus: TextSet, tokenizer) -> None:
    def make(seed: int = 0):
        return text_loader(corpus, tokenizer, batch_size=6, max_length=16, shuffle=True, seed=seed)

    loader, sampler = make()
    assert sampler.batches_per_epoch == 6 == len(loader)  # 40 texts -> 6 whole batches of 6
    sampler.set_epoch(2)
    full = _batches(loader)
    assert len(full) == 6 and all(b.shape[0] == 6 and b.shape[1] <= 16 for b in full)

    other_loader, other_sampler = make()
    other_sampler.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(full, _batches(other_loader), strict=True))
    other_sampler.set_epoch(3)
    assert not all(torch.equal(a, b) for a, b in zip(full, _batches(other_loader), strict=True))

    resumed_loader, resumed = make()
    resumed.set_epoch(2)
    resumed.set_start_batch(4)
    rest = _batches(resumed_loader)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(full[4:], rest, strict=True))


def test_loader_ranks_and_drop_last(corpus: TextSet, tokenizer) -> None:
    order = []
    for rank in range(2):
        loader, sampler = text_loader(corpus, tokenizer, batch_size=4, max_length=64, shuffle=True, rank=rank,
                                      world_size=2)
        order.append(list(sampler))
        assert len(_batches(loader)) == 5  # 40 texts = 5 global batches of 4 x 2
    assert not set(order[0]) & set(order[1]) and len(order[0] + order[1]) == 40

    loader, _ = text_loader(corpus, tokenizer, batch_size=16, max_length=64, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [b.input_ids.shape[0] for b in batches] == [16, 16, 8]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    assert tokens == sum(len(tokenizer(t)["input_ids"]) for t in corpus.texts)


def test_loader_too_few_texts(tmp_path: Path, tokenizer) -> None:
    small = find_texts(write_corpus(tmp_path / "small.txt", n=5))
    with pytest.raises(InputError, match="has 5 texts, fewer than one batch of 4 x 2") as info:
        text_loader(small, tokenizer, batch_size=4, max_length=16, shuffle=True, world_size=2)
    assert "small.txt" in str(info.value) and "lower batch_size or add texts" in str(info.value)
    with pytest.raises(UsageError, match="batch_size"):
        text_loader(small, tokenizer, batch_size=0, max_length=16, shuffle=True)
    loader, _ = text_loader(small, tokenizer, batch_size=8, max_length=16, shuffle=False, drop_last=False)
    assert [b.input_ids.shape[0] for b in loader] == [5]


# -------------------------------------------------------------------------------------------- max length


def test_default_max_length(bert_folder: Path, tokenizer) -> None:
    import transformers

    config = transformers.AutoConfig.from_pretrained(bert_folder)
    assert config.max_position_embeddings == 64
    assert default_max_length(config) == 64
    assert default_max_length(SimpleNamespace(config=config), tokenizer) == 64  # tokenizer: 1e30, no limit
    assert default_max_length({"model_type": "bert", "max_position_embeddings": 2048}) == 512
    assert default_max_length({"model_type": "roberta", "max_position_embeddings": 514}) == 512
    assert default_max_length({"model_type": "xlm-roberta", "max_position_embeddings": 130}) == 128
    assert default_max_length({"model_type": "camembert", "max_position_embeddings": 66}) == 64
    assert default_max_length({"model_type": "t5"}) == 512  # relative positions: no table to run off
    assert default_max_length(config, SimpleNamespace(model_max_length=32)) == 32
    assert default_max_length({}, SimpleNamespace(model_max_length=int(1e30))) == 512


def test_a_symlink_loop_in_a_text_folder_is_read_once(tmp_path: Path, caplog) -> None:
    (tmp_path / "corpus" / "more").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("the first sentence\n")
    (tmp_path / "corpus" / "more" / "b.txt").write_text("the second sentence\n")
    (tmp_path / "corpus" / "more" / "up").symlink_to("..")
    assert find_texts(tmp_path / "corpus").texts == ["the first sentence", "the second sentence"]
    assert "links back to" in caplog.text

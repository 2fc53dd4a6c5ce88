"""Sentence-transformers folders: the embedding the folder defines is read, refused when lrc cannot compute it,
recorded in the checkpoint, computed exactly as sentence-transformers computes it, and what recovery distils."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import error_lines, run_cli
from hf_fixtures import corpus_sentences, write_corpus, write_sentence_transformers

import lowrank_cli
from lowrank_cli.errors import InputError
from lowrank_cli.models.sentence import embed, embedding_of, read_embedding
from lowrank_cli.models.sources import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    return write_sentence_transformers(tmp_path_factory.mktemp("st") / "tiny-st", seed=3, dropout=0.0,
                                       initializer_range=0.2, normalize=True, max_seq_length=48)


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len"])
def test_embedding_is_the_one_sentence_transformers_computes(tmp_path, mode):
    st = pytest.importorskip("sentence_transformers")
    folder = write_sentence_transformers(tmp_path / "st", seed=1, dropout=0.0, initializer_range=0.2,
                                         pooling_mode=mode, normalize=mode != "max")
    emb = read_embedding(folder)
    assert emb == {"modules": ["transformer", "pooling"] + (["normalize"] if mode != "max" else []),
                   "pooling": [mode], "normalize": mode != "max", "max_seq_length": 64,
                   "similarity_fn_name": "cosine"}  # from its config_sentence_transformers.json (empty prompts: none)
    texts = corpus_sentences(6, seed=2)  # different lengths: padding must not count
    reference = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    model = load_model(str(folder)).model
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = embed(model(**batch).last_hidden_state, batch["attention_mask"], emb)
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference.float(), atol=1e-5), (ours - reference).abs().max()


def _modules(folder, types):
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": "" if i == 0 else f"{i}_M", "type": t} for i, t in enumerate(types)]))


def test_unknown_module_and_missing_pooling_mode_are_refused(tmp_path, capsys):
    folder = write_sentence_transformers(tmp_path / "st")
    _modules(folder, ["sentence_transformers.models.Transformer", "my_package.CustomPooling"])
    with pytest.raises(InputError, match="module type 'my_package.CustomPooling', which lrc does not know"):
        load_model(str(folder))
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["factorize", folder, "--kappa", "2", "-o", out], capsys)
    assert code != 0 and len(error_lines(err)) == 1 and "my_package.CustomPooling" in err and not out.exists()
    bare = write_sentence_transformers(tmp_path / "nomode", pooling_mode="")
    with pytest.raises(InputError, match="sets no pooling mode"):
        load_model(str(bare))


def _factorize(folder, out, capsys, kappa="2"):
    code, _, err = run_cli(["factorize", folder, "--kappa", kappa, "--rank-multiple", "1", "-o", out], capsys)
    assert code == 0, err
    return out


def test_embedding_is_recorded_in_the_checkpoint(st_folder, tmp_path, capsys):
    expected = {"modules": ["transformer", "pooling", "normalize"], "pooling": ["mean"], "normalize": True,
                "max_seq_length": 48, "similarity_fn_name": "cosine"}
    assert embedding_of(load_model(str(st_folder))) == expected
    out = _factorize(st_folder, tmp_path / "lr.safetensors", capsys)
    assert embedding_of(load_model(str(out))) == expected
    assert embedding_of(lowrank_cli.load(out)) == expected
    from hf_fixtures import write_tiny_bert

    plain = write_tiny_bert(tmp_path / "plain", head=None)  # a plain transformers folder: no embedding, as before
    assert embedding_of(load_model(str(plain))) is None
    assert embedding_of(lowrank_cli.load(_factorize(plain, tmp_path / "plain.safetensors", capsys))) is None


def test_recovery_distils_and_scores_the_embedding(st_folder, tmp_path, capsys, one_thread):
    student = _factorize(st_folder, tmp_path / "lr.safetensors", capsys, kappa="4")
    corpus = write_corpus(tmp_path / "c.txt", n=64)
    result = lowrank_cli.recover(str(student), str(st_folder), str(corpus), output=tmp_path / "r.safetensors",
                                 steps=8, batch_size=8, lr=5e-3, log_every=1, seed=0, device="cpu",
                                 val_fraction=0.25, eval_every=4, warn=lambda m: None)
    assert result.settings["delta"] == 1.0  # on by default for a sentence-transformers model
    held = result.settings["held_out"]
    assert held["metric"] == "val_cosine" and "val_pool" in held["before"]
    # The held-out cosine is the one of the normalized mean-pooled embeddings, recomputed here
    tokenizer = transformers.AutoTokenizer.from_pretrained(st_folder)
    emb = embedding_of(load_model(str(st_folder)))
    teacher, after = load_model(str(st_folder)).model, lowrank_cli.load(tmp_path / "r.safetensors")
    texts = corpus_sentences(16, seed=9)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        t = embed(teacher(**batch).last_hidden_state, batch["attention_mask"], emb)
        s = embed(after(**batch).last_hidden_state, batch["attention_mask"], emb)
    cosine = (t * s).sum(-1).mean().item()
    assert 0.5 < held["after"]["val_cosine"] <= 1 and 0.5 < cosine <= 1
    assert held["after"]["val_cosine"] > held["before"]["val_cosine"]


def test_recovery_lr_defaults_by_model_and_a_given_lr_wins(st_folder, tmp_path, capsys, one_thread):
    from lowrank_cli.training.options import RECOVER_LR, SENTENCE_LR

    corpus = write_corpus(tmp_path / "c.txt", n=32)
    student = _factorize(st_folder, tmp_path / "lr.safetensors", capsys, kappa="4")
    from hf_fixtures import write_tiny_bert

    plain = write_tiny_bert(tmp_path / "plain", head=None)  # the same BERT without modules.json: no embedding
    plain_lr = _factorize(plain, tmp_path / "plain_lr.safetensors", capsys, kappa="4")

    def run(student_, teacher, name, **kw):
        out = tmp_path / f"{name}.safetensors"
        result = lowrank_cli.recover(str(student_), str(teacher), str(corpus), output=out, steps=4, batch_size=8,
                                     seed=0, device="cpu", log_every=1, warn=lambda m: None, **kw)
        rows = [json.loads(line) for line in (tmp_path / f"{name}.metrics.jsonl").read_text().splitlines()]
        return result.settings["lr"], next(r["lr"] for r in rows if r.get("step") == 2)  # what the schedule ran

    assert SENTENCE_LR != RECOVER_LR
    (lr, ran), (plain_lr_, plain_ran) = run(student, st_folder, "sentence"), run(plain_lr, plain, "plain")
    assert (lr, plain_lr_) == (SENTENCE_LR, RECOVER_LR)
    assert ran / plain_ran == pytest.approx(SENTENCE_LR / RECOVER_LR)  # same schedule, scaled by the peak
    given, given_ran = run(student, st_folder, "given", lr=2e-4)
    assert given == 2e-4 and given_ran / plain_ran == pytest.approx(2e-4 / RECOVER_LR)


def test_sentence_transformer_runs_the_compressed_model_with_the_original_modules(st_folder, tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    out = _factorize(st_folder, tmp_path / "lr.safetensors", capsys)
    model = lowrank_cli.sentence_transformer(out)
    assert isinstance(model, st.SentenceTransformer)
    assert [type(m).__name__ for m in model] == ["LowRankTransformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 48
    from lowrank_cli.layers.lowrank_linear import LowRankLinear

    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 12
    texts = corpus_sentences(5, seed=4)
    got = model.encode(texts, convert_to_tensor=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(st_folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        expected = embed(lowrank_cli.load(out)(**batch).last_hidden_state, batch["attention_mask"],
                         read_embedding(st_folder))
    assert torch.allclose(got.float(), expected, atol=1e-5)
    dense = st.SentenceTransformer(str(st_folder), device="cpu").encode(texts, convert_to_tensor=True)
    assert not torch.allclose(got, dense, atol=1e-3)  # the low-rank layers run, not the dense ones
    with pytest.raises(InputError, match="which is not here: pass .?source"):
        import shutil

        moved = tmp_path / "moved"
        shutil.copytree(st_folder, moved)
        out2 = _factorize(moved, tmp_path / "lr2.safetensors", capsys)
        shutil.rmtree(moved)
        lowrank_cli.sentence_transformer(out2)
    assert lowrank_cli.sentence_transformer(out2, source=st_folder)[0].max_seq_length == 48


def test_sentence_pairs_feed_both_texts_and_missing_pairs_are_counted(tmp_path, caplog):
    from lowrank_cli.data.texts import find_texts

    path = tmp_path / "pairs.jsonl"
    rows = [{"text": "the sun is up", "text_pair": "it is day"}, {"text": "a tree grows"},
            {"text": "the city sleeps", "text_pair": "it is night"}, {"text": "water", "text_pair": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        found = find_texts(path)
    assert found.texts == ["the sun is up", "it is day", "a tree grows", "the city sleeps", "it is night", "water"]
    assert (found.pairs, found.unpaired) == (2, 2)
    assert "2 of 4 records" in caplog.text and "text_pair" in caplog.text
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    assert (find_texts(plain).pairs, find_texts(plain).unpaired) == (0, 0)


def test_eval_measures_embedding_cosine_and_pair_top1(st_folder, tmp_path, capsys):
    out = _factorize(st_folder, tmp_path / "lr.safetensors", capsys, kappa="4")
    texts = write_corpus(tmp_path / "t.txt", n=24)
    code, stdout, err = run_cli(["eval", out, "--data", texts, "--against", st_folder, "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["texts"] == 24 and 0.3 < result["cosine"] < 0.999
    code, stdout, err = run_cli(["eval", st_folder, "--data", texts, "--against", st_folder, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["cosine"] == pytest.approx(1.0, abs=1e-5)
    pairs = tmp_path / "p.jsonl"
    lines = corpus_sentences(12, seed=8)
    pairs.write_text("\n".join(json.dumps({"text": a, "text_pair": a}) for a in lines) + "\n", encoding="utf-8")
    code, stdout, err = run_cli(["eval", st_folder, "--data", pairs, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["pairs"] == 12 and json.loads(stdout)["top1"] == pytest.approx(1.0)
    code, _, err = run_cli(["eval", out, "--data", texts], capsys)
    assert code != 0 and len(error_lines(err)) == 1 and "against" in err

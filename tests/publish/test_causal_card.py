"""The card and the push of a causal LM (issue 24): pipeline_tag text-generation, the held-out perplexity that
`lrc recover` / `lrc finetune` measured and an `lrc eval --json` perplexity in the model-index and in the body, the
tokenizer files uploaded next to the checkpoint (the Hub mocked at its network boundary only), and the pushed
folder loads back into a model that generates."""

from __future__ import annotations

import json

import pytest
import torch
from causal_fixtures import write_tiny_causal_lm, write_token_text
from helpers import run_cli

import lowrank_cli
from lowrank_cli.compress.factorize_source import factorize_file
from lowrank_cli.publish.card import build_card
from lowrank_cli.publish.push import push

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_card")
    folder = write_tiny_causal_lm(root / "llama", "llama")
    text = write_token_text(root / "wiki.txt", 1500)
    factorize_file(str(folder), str(root / "lr.safetensors"), kappa=3, rank_multiple=1)
    result = lowrank_cli.recover(str(root / "lr.safetensors"), str(folder), str(text), output=root / "rec.safetensors",
                                 steps=4, batch_size=8, seq_len=32, eval_every=2, device="cpu", warn=lambda m: None)
    return root, folder, text, result


def _model_index(card) -> dict:
    return {(r.dataset_name, r.dataset_split, r.metric_type): r.metric_value for r in card.card.data.eval_results}


def test_card_of_a_recovered_causal_lm_quotes_its_perplexities(recovered, tmp_path, capsys):
    root, folder, text, result = recovered
    code, stdout, err = run_cli(["eval", result.output, "--data", text, "--seq-len", 32, "--json"], capsys)
    assert code == 0, err
    (tmp_path / "eval.json").write_text(stdout)
    measured = json.loads(stdout)["perplexity"]
    card = build_card(result.output, repo_id="acme/llama-lr", evals=[tmp_path / "eval.json"])
    data = card.card.data
    assert data.pipeline_tag == "text-generation" and data.metrics == ["perplexity"]
    held = result.settings["held_out"]
    assert _model_index(card) == {("wiki.txt", "held-out", "perplexity"): round(held["after"]["val_perplexity"], 3),
                                  ("wiki.txt", None, "perplexity"): round(measured, 3)}
    assert all(r.task_type == "text-generation" for r in data.eval_results)
    body = card.card.text
    assert "## Perplexity" in body and f"| wiki.txt | held-out | original | {held['teacher_perplexity']:.3f} |" in body
    assert f"| wiki.txt | - | this model (lrc eval) | {measured:.3f} |" in body
    assert "model.generate(ids, max_new_tokens=20)" in body  # the usage snippet generates
    code, stdout, err = run_cli(["card", result.output], capsys)
    assert code == 0 and "pipeline_tag: text-generation" in stdout and "type: perplexity" in stdout, err


def test_card_of_a_finetuned_causal_lm_quotes_before_and_after(recovered, tmp_path):
    root, folder, text, _ = recovered
    pytest.importorskip("peft")
    tuned = lowrank_cli.finetune(str(root / "lr.safetensors"), str(text), output=tmp_path / "ft.safetensors",
                                 steps=4, batch_size=8, seq_len=32, lr=1e-2, device="cpu", warn=lambda m: None)
    card = build_card(tuned.output)
    after = tuned.scores["after"]["val_perplexity"]
    assert _model_index(card) == {("wiki.txt", "held-out", "perplexity"): round(after, 3)}
    assert f"| wiki.txt | held-out | this model | {after:.3f} |" in card.card.text
    assert "before fine-tuning" in card.card.text


def test_push_uploads_the_tokenizer_and_the_folder_generates(recovered, tmp_path, fake_hub, capsys):
    root, folder, text, result = recovered
    pushed = push(result.output, "acme/llama-lr")
    assert {"README.md", "lrc_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(fake_hub.uploaded)
    assert fake_hub.uploaded["tokenizer.json"] == (folder / "tokenizer.json").read_bytes()
    readme = fake_hub.uploaded["README.md"].decode()
    assert "pipeline_tag: text-generation" in readme and "type: perplexity" in readme
    assert sorted(fake_hub.uploaded) == pushed.files
    out = tmp_path / "dry"
    code, stdout, err = run_cli(["push", result.output, "acme/llama-lr", "--dry-run", out], capsys)
    assert code == 0, err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    source = AutoTokenizer.from_pretrained(str(folder))
    sentence = "the low rank model reads a text"
    assert tokenizer(sentence)["input_ids"] == source(sentence)["input_ids"]
    model = lowrank_cli.load(f"local-dir:{out}")
    ids = torch.tensor([tokenizer(sentence)["input_ids"]])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                                   do_sample=False)
        expected = lowrank_cli.load(result.output).generate(ids, attention_mask=torch.ones_like(ids),
                                                            max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected) and generated.shape[1] == ids.shape[1] + 5

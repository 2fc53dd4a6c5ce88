"""One-shot SVD vs PELA recovery vs progressive compression (PC-LoRA, both starts), measured in one run (issue 14).

    python benchmarks/progressive_vs_pela.py [--steps 300] [--batch-size 16] [--epochs 15] [--workdir DIR]
        [--models vit,bert] [--decay linear] [--decay-end 0.8]

Two models, each at two sizes (kappa 2, and rank 8 for every target layer), four ways to get there:
- one-shot SVD: `factorize`, no training;
- `recover(method="pela")`: the same SVD, then distillation;
- `recover(method="progressive", init="lora")`: the paper's PC-LoRA (W_res = W, random / zero factors);
- `recover(method="progressive", init="svd")`: the SVD start with the dense remainder fading out.
Every trained variant gets the same steps, batch, learning rate, loss weights, data and seed.

Models (built here, no download):
- a small timm ViT (embed 128, depth 4, 16x16 images, 4x4 patches) trained on scikit-learn's digits (1,347
  training scans); metric: top-1 on the 450 held-out scans; loss: labels CE + block features (alpha 1) +
  logit KD (gamma 1), no augmentation;
- a random-weight BERT encoder (tests/hf_fixtures.write_tiny_bert: hidden 128, 4 layers, intermediate 512,
  initializer range 0.1 so that the layers matter, no dropout) recovered on 512 unlabelled sentences;
  metrics on 128 held-out sentences: relative error of the last hidden state (real tokens) and cosine of the
  mean-pooled embeddings against the dense model; loss: hidden states (alpha 1) + pooled output (delta 1).
Single CPU thread; about 4 minutes on a quiet 2-core machine.

Measured (defaults; the metrics are deterministic, two runs gave the same digits):

    model       size     method              params  low-rank  top-1  rel err  cosine
    digits ViT  dense    -                   803.2k      0.0k  0.956        -       -
    digits ViT  kappa 2  one-shot SVD        393.6k    381.4k  0.951        -       -
    digits ViT  kappa 2  pela                393.6k    381.4k  0.953        -       -
    digits ViT  kappa 2  progressive lora    393.6k    381.4k  0.638        -       -
    digits ViT  kappa 2  progressive svd     393.6k    381.4k  0.962        -       -
    digits ViT  rank 8   one-shot SVD         82.3k     70.1k  0.867        -       -
    digits ViT  rank 8   pela                 82.3k     70.1k  0.951        -       -
    digits ViT  rank 8   progressive lora     82.3k     70.1k  0.344        -       -
    digits ViT  rank 8   progressive svd      82.3k     70.1k  0.958        -       -
    BERT        kappa 2  one-shot SVD        440.1k    381.4k      -   1.2098  0.2894
    BERT        kappa 2  pela                440.1k    381.4k      -   0.2936  0.9676
    BERT        kappa 2  progressive lora    440.1k    381.4k      -   0.3589  0.9529
    BERT        kappa 2  progressive svd     440.1k    381.4k      -   0.3007  0.9676
    BERT        rank 8   one-shot SVD        137.0k     78.3k      -   1.3728  0.0782
    BERT        rank 8   pela                137.0k     78.3k      -   0.3592  0.9479
    BERT        rank 8   progressive lora    137.0k     78.3k      -   0.3762  0.9473
    BERT        rank 8   progressive svd     137.0k     78.3k      -   0.4514  0.9189

With `--models bert --decay-end 0.5` (the pure low-rank model gets half the steps, while the learning rate is
still high), progressive svd reaches rel err 0.2866 / 0.3585 (cosine 0.9699 / 0.9508) at kappa 2 / rank 8, and
progressive lora 0.3405 / 0.3626: at 300 steps, a fade that ends at 80 % leaves the low-rank model too little of
the cosine learning-rate schedule on the hardest case. The LoRA start, which must learn every layer from zero,
needs far more steps than this on the ViT.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # digits.py, hf_fixtures.py

import lowrank_cli  # noqa: E402
from lowrank_cli.evaluation.counting import count_params  # noqa: E402

SIZES = {"kappa 2": dict(kappa=2.0), "rank 8": dict(rank=8)}
METHODS = {"pela": dict(method="pela"), "progressive lora": dict(method="progressive", init="lora"),
           "progressive svd": dict(method="progressive", init="svd")}


def train_vit(work: Path, epochs: int) -> tuple[Path, Path]:
    import timm
    from digits import train_classifier, write_digits_imagefolder
    from timm.models import save_for_hf

    from lowrank_cli.data.images import find_images, make_loader, make_transform

    data = write_digits_imagefolder(work / "digits", image_size=16)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=10,
                              embed_dim=128, depth=4, num_heads=4)
    loader, _ = make_loader(find_images(data, split="train"), make_transform(model, training=False), 64,
                            shuffle=True, seed=0)
    train_classifier(model, loader, epochs)
    save_for_hf(model.eval(), str(work / "vit"), safe_serialization=True)
    return work / "vit", data


def write_bert(work: Path) -> tuple[Path, Path, list[str]]:
    from hf_fixtures import corpus_sentences, write_corpus, write_tiny_bert

    folder = write_tiny_bert(work / "bert", head=None, hidden=128, layers=4, heads=4, intermediate=512,
                             dropout=0.0, initializer_range=0.1)
    return folder, write_corpus(work / "corpus.txt", n=512, seed=0), corpus_sentences(128, seed=1)


class TextProbe:
    """The dense model's last hidden states on held-out sentences, and how far a student's are from them."""

    def __init__(self, folder: Path, sentences: list[str]):
        from lowrank_cli.data.texts import load_tokenizer

        batch = load_tokenizer(folder)(sentences, padding=True, return_tensors="pt")
        self.ids, self.mask = batch["input_ids"], batch["attention_mask"]
        self.dense = self.hidden(lowrank_cli.load_model(str(folder)).model)

    @torch.no_grad()
    def hidden(self, model) -> torch.Tensor:
        return model.eval()(input_ids=self.ids, attention_mask=self.mask).last_hidden_state * self.mask[..., None]

    def score(self, model) -> dict[str, float]:
        h = self.hidden(model)
        m = self.mask[..., None]
        pooled_s, pooled_t = h.sum(1) / m.sum(1), self.dense.sum(1) / m.sum(1)
        cosine = torch.nn.functional.cosine_similarity(pooled_s, pooled_t, dim=-1).mean()
        return {"rel_err": ((h - self.dense).norm() / self.dense.norm()).item(), "cosine": cosine.item()}


def one_shot(source: Path, size: dict) -> torch.nn.Module:
    model = lowrank_cli.load_model(str(source)).model
    options = {"rank_pattern": [f".*={size['rank']}"]} if "rank" in size else {"kappa": size["kappa"]}
    lowrank_cli.factorize(model, rank_multiple=8, **options)
    return model


def rows_for(name: str, source: Path, data: Path, score, train: dict, work: Path, schedule: dict) -> list[tuple]:
    rows = []
    for size_name, size in SIZES.items():
        model = one_shot(source, size)
        params = count_params(model)
        rows.append((name, size_name, "one-shot SVD", params.total, params.lowrank, score(model), 0.0))
        for method_name, method in METHODS.items():
            out = work / f"{name}-{size_name}-{method_name}.safetensors".replace(" ", "_")
            started = time.perf_counter()
            extra = schedule if method["method"] == "progressive" else {}
            lowrank_cli.recover(str(source), None, data, output=out, force=True, rank_multiple=8, **size, **method,
                                **extra, **train)
            seconds = time.perf_counter() - started
            model = lowrank_cli.load(out)
            params = count_params(model)
            rows.append((name, size_name, method_name, params.total, params.lowrank, score(model), seconds))
            print(f"  {name} {size_name} {method_name}: {rows[-1][5]} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--models", default="vit,bert", help="vit, bert or both")
    parser.add_argument("--decay", default="linear", choices=["linear", "sine", "cosine"])
    parser.add_argument("--decay-end", type=float, default=0.8)
    args = parser.parse_args()
    schedule = dict(decay=args.decay, decay_end=args.decay_end)
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lrc-progressive-"))
    work.mkdir(parents=True, exist_ok=True)
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0, num_workers=0, device="cpu",
                  save_every=10**6, log_every=50, evaluate_accuracy=False)

    rows = []
    if "vit" in args.models:
        rows += vit_rows(work, args, common, schedule)
    if "bert" in args.models:
        rows += bert_rows(work, common, schedule)
    print(f"\n{args.steps} steps x {args.batch_size}, lr {args.lr:g}, same data and seed for every trained row; "
          f"progressive: {args.decay} decay to 0 at {args.decay_end:g} of the steps; 1 CPU thread")
    print(f"{'model':11} {'size':8} {'method':17} {'params':>8} {'low-rank':>9} {'top-1':>6} {'rel err':>8} "
          f"{'cosine':>7} {'train s':>8}")
    for model, size, method, total, lowrank, score, seconds in rows:
        top = f"{score['top1']:.3f}" if "top1" in score else "-"
        err = f"{score['rel_err']:.4f}" if "rel_err" in score else "-"
        cos = f"{score['cosine']:.4f}" if "cosine" in score else "-"
        print(f"{model:11} {size:8} {method:17} {total / 1e3:7.1f}k {lowrank / 1e3:8.1f}k {top:>6} {err:>8} "
              f"{cos:>7} {seconds:8.1f}")
    print(f"\nfiles in {work}")


def vit_rows(work: Path, args, common: dict, schedule: dict) -> list[tuple]:
    started = time.perf_counter()
    vit, digits = train_vit(work, args.epochs)
    dense_vit = lowrank_cli.load_model(str(vit)).model

    def top1(model) -> dict[str, float]:
        return {"top1": lowrank_cli.evaluate(model, digits, batch_size=256, num_workers=0)["top1"]}

    vit_dense_score = top1(dense_vit)
    print(f"digits ViT trained {args.epochs} epochs in {time.perf_counter() - started:.0f} s: top-1 "
          f"{vit_dense_score['top1']:.3f}", file=sys.stderr, flush=True)
    rows = [("digits ViT", "dense", "-", count_params(dense_vit).total, 0, vit_dense_score, 0.0)]
    return rows + rows_for("digits ViT", vit, digits, top1, dict(common, alpha=1.0, gamma=1.0, augment=False), work,
                           schedule)


def bert_rows(work: Path, common: dict, schedule: dict) -> list[tuple]:
    bert, corpus, held_out = write_bert(work)
    probe = TextProbe(bert, held_out)
    dense_bert = lowrank_cli.load_model(str(bert)).model
    rows = [("BERT", "dense", "-", count_params(dense_bert).total, 0, probe.score(dense_bert), 0.0)]
    return rows + rows_for("BERT", bert, corpus, probe.score, dict(common, alpha=1.0, delta=1.0), work, schedule)


if __name__ == "__main__":
    main()

"""Data-aware truncation, calibration statistics and rank budgets: properties on random and structured data."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from lowrank_cli.compress.budget import LayerSpectrum, allocate_ranks, budget_cost, kept_energy, uniform_ranks
from lowrank_cli.compress.calibration import collect_second_moments
from lowrank_cli.compress.whitened_svd import data_aware_factors, output_rel_error, plain_factors
from lowrank_cli.errors import InputError, UsageError

F64 = torch.float64
SHAPES = [(24, 40), (40, 24), (32, 32)]  # (d_out, d_in): wide, tall, square
WELL_CONDITIONED = ["iid", "anisotropic", "correlated"]
SINGULAR = ["dead_and_constant", "few_tokens"]
ALL_INPUTS = [*WELL_CONDITIONED, "lowrank_noise", *SINGULAR]


# many small float64 LAPACK calls: threads gain nothing, and on a busy machine OpenMP waits make them crawl
pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(kind: str, d_in: int, seed: int = 0, tokens: int = 256) -> torch.Tensor:
    """tokens x d_in calibration inputs with a given structure."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, d_in, generator=g, dtype=F64)
    if kind == "iid":
        return z
    if kind == "anisotropic":  # feature scales over two decades: cond(C) ~ 1e4
        return z * torch.logspace(0, -2, d_in, dtype=F64)
    if kind == "correlated":  # a shared factor and a mean offset, like post-GELU activations
        return z + 3 * z[:, :1] + 2
    if kind == "lowrank_noise":  # 4 directions carry almost everything
        mix = torch.randn(4, d_in, generator=g, dtype=F64)
        return z[:, :4] @ mix + 0.01 * torch.randn(tokens, d_in, generator=g, dtype=F64)
    if kind == "dead_and_constant":  # a feature that is always 0 (C singular) and one that is always 1
        z[:, 0] = 0
        z[:, 1] = 1
        return z
    if kind == "few_tokens":  # fewer tokens than features: rank(C) = d_in // 2
        return z[: d_in // 2]
    raise ValueError(kind)


def make_weight(kind: str, d_out: int, d_in: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    if kind == "decaying":  # a trained-like spectrum
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        w = u @ torch.diag(0.8 ** torch.arange(min(d_out, d_in), dtype=F64)) @ vh
    return w


def whitened_tail(w: torch.Tensor, c: torch.Tensor, rank: int) -> float:
    """Eckart-Young in the whitened space, computed independently: the eigenvalues of W C W^T are the
    squared singular values of W C^{1/2}."""
    sq = torch.linalg.eigvalsh(w @ c @ w.T).flip(0).clamp_min(0)[: min(w.shape)]  # the rest is rounding noise
    return math.sqrt(float(sq[rank:].sum() / sq.sum()))


def ranks_for(d_out: int, d_in: int) -> list[int]:
    d = min(d_out, d_in)
    return [1, d // 4, d // 2, d - 1, d]


# --- data-aware SVD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_kind", ["gaussian", "decaying"])
@pytest.mark.parametrize("input_kind", ALL_INPUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_data_aware_never_worse_than_plain(shape, input_kind, weight_kind):
    d_out, d_in = shape
    w = make_weight(weight_kind, d_out, d_in)
    x = make_inputs(input_kind, d_in)
    c = x.T @ x
    for rank in ranks_for(d_out, d_in):
        first, second, info = data_aware_factors(w, c, rank)
        assert first.shape == (rank, d_in) and second.shape == (d_out, rank)
        assert torch.isfinite(first).all() and torch.isfinite(second).all()
        da = output_rel_error(w, second @ first, c)
        # the output error measured on the inputs themselves, not through C
        direct = float(torch.linalg.norm((w - second @ first) @ x.T) / torch.linalg.norm(w @ x.T))
        assert da == pytest.approx(direct, rel=1e-6, abs=1e-9)
        assert info["output_rel_error"] == pytest.approx(da, rel=1e-9, abs=1e-9)
        p_first, p_second, p_info = plain_factors(w, rank, second_moment=c)
        plain = output_rel_error(w, p_second @ p_first, c)
        assert p_info["output_rel_error"] == pytest.approx(plain, rel=1e-9, abs=1e-9)
        assert da <= plain * (1 + 1e-6) + 1e-9
        if rank == min(d_out, d_in):
            assert da < 1e-6 and plain < 1e-6


@pytest.mark.parametrize("input_kind", WELL_CONDITIONED)
@pytest.mark.parametrize("shape", SHAPES)
def test_error_is_the_whitened_eckart_young_tail(shape, input_kind):
    d_out, d_in = shape
    w = make_weight("decaying", d_out, d_in)
    x = make_inputs(input_kind, d_in)
    c = x.T @ x
    sq = torch.linalg.eigvalsh(w @ c @ w.T).flip(0).clamp_min(0)[: min(d_out, d_in)]
    for rank in ranks_for(d_out, d_in):
        _, _, info = data_aware_factors(w, c, rank)
        assert info["method"] == "cholesky"
        tail = whitened_tail(w, c, rank)
        assert info["output_rel_error"] == pytest.approx(tail, rel=1e-6, abs=1e-8)
        assert info["kept_energy"] == pytest.approx(1 - tail**2, abs=1e-9)
        s = info["singular_values"]
        assert s.dtype == torch.float32 and s.device.type == "cpu" and len(s) == min(d_out, d_in)
        assert torch.all(s[:-1] >= s[1:])
        # whitened sigma^2 relative to their sum equal the (scale-free) eigenvalues of W C W^T
        torch.testing.assert_close((s.double().square() / s.double().square().sum()), sq / sq.sum(),
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("input_kind", SINGULAR)
@pytest.mark.parametrize("shape", SHAPES)
def test_singular_second_moment(shape, input_kind):
    d_out, d_in = shape
    w = make_weight("gaussian", d_out, d_in)
    c = (x := make_inputs(input_kind, d_in)).T @ x
    rank = min(d_out, d_in) // 3
    first, second, info = data_aware_factors(w, c, rank)
    assert info["method"].startswith("cholesky+jitter=")
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    # the ridge from the jitter keeps the weight small along directions the data never excites
    assert float((second @ first).abs().max()) < 10 * float(w.abs().max())
    # without jitter, the eigendecomposition fallback reaches the exact optimum of the singular problem
    e_first, e_second, e_info = data_aware_factors(w, c, rank, jitter=0)
    assert e_info["method"] == "eigh"
    exact = whitened_tail(w, c, rank)
    assert e_info["output_rel_error"] == pytest.approx(exact, rel=1e-6, abs=1e-9)
    assert exact - 1e-9 <= info["output_rel_error"] <= exact * (1 + 1e-4) + 1e-9
    _, _, p_info = plain_factors(w, rank, second_moment=c)
    assert info["output_rel_error"] <= p_info["output_rel_error"] * (1 + 1e-6)


def test_indefinite_second_moment_falls_back_to_eigh():
    w = make_weight("gaussian", 40, 24)
    c = (x := make_inputs("iid", 24)).T @ x
    v = torch.linalg.eigh(c).eigenvectors[:, -1:]
    indefinite = c - 2 * float(torch.linalg.eigvalsh(c)[-1]) * (v @ v.T)  # top eigenvalue flipped negative
    first, second, info = data_aware_factors(w, indefinite, 6)
    assert info["method"] == "eigh" and torch.isfinite(first).all() and torch.isfinite(second).all()
    # clamping the negative eigenvalue at 0 means: optimise on the positive part of C
    evals, q = torch.linalg.eigh(indefinite)
    positive = (q * evals.clamp_min(0)) @ q.T
    p_first, p_second, _ = data_aware_factors(w, positive, 6, jitter=0)
    torch.testing.assert_close(second @ first, p_second @ p_first)


def test_factors_are_balanced_and_independent_of_the_activation_scale():
    w = make_weight("decaying", 40, 24)
    c = (x := make_inputs("correlated", 24)).T @ x
    first, second, _ = data_aware_factors(w, c, 8)
    # like the plain split: both factors carry sqrt of the singular values of their product
    torch.testing.assert_close(torch.linalg.svdvals(first), torch.linalg.svdvals(second))
    first2, second2, _ = data_aware_factors(w, c * 1e6, 8)
    torch.testing.assert_close(second2 @ first2, second @ first)
    torch.testing.assert_close(torch.linalg.svdvals(first2), torch.linalg.svdvals(first))
    # with isotropic inputs data-aware is plain SVD
    p_first, p_second, p_info = plain_factors(w, 8)
    i_first, i_second, i_info = data_aware_factors(w, torch.eye(24, dtype=F64) * 7, 8)
    torch.testing.assert_close(i_second @ i_first, p_second @ p_first)
    assert i_info["output_rel_error"] == pytest.approx(p_info["output_rel_error"], rel=1e-9)
    assert p_info["method"] == "svd" and set(p_info) == set(i_info)


def test_bad_inputs_raise():
    w = make_weight("gaussian", 8, 6)
    c = torch.eye(6, dtype=F64)
    with pytest.raises(InputError, match="not finite"):
        data_aware_factors(w, c * float("nan"), 2)
    with pytest.raises(InputError, match="zero"):
        data_aware_factors(w, torch.zeros(6, 6, dtype=F64), 2)
    with pytest.raises(UsageError, match="rank 7"):
        data_aware_factors(w, c, 7)
    with pytest.raises(UsageError, match="rank 0"):
        plain_factors(w, 0)


# --- calibration ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def captured_second_moments(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X per layer from inputs captured by our own hooks."""
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: captured[n].append(a[0].detach()))
               for n in names]
    try:
        model.eval()
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[n]]).double()
        out[n] = x.T @ x
    return out


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


NAMES = ["blocks.0.attn.qkv", "blocks.5.attn.proj", "blocks.11.mlp.fc1", "blocks.11.mlp.fc2", "head"]


def test_second_moments_equal_captured_inputs(vit):
    batches = [images(4, s) for s in range(3)]
    vit.train()
    stats = collect_second_moments(vit, NAMES, batches, device="cpu")
    assert vit.training and no_hooks(vit)
    expected = captured_second_moments(vit, NAMES, torch.cat(batches))
    tokens_per_image = 17  # 4x4 patches + class token
    for n in NAMES:
        assert stats[n].second_moment.dtype == F64
        torch.testing.assert_close(stats[n].second_moment, expected[n], rtol=1e-9, atol=1e-9)
        assert stats[n].samples == 12
        assert stats[n].tokens == 12 * (1 if n == "head" else tokens_per_image)


def test_max_samples_batch_kinds_and_progress(vit):
    served = []

    def batches():
        for s, wrap in enumerate([SimpleNamespace, lambda t: (t, torch.zeros(4)), lambda t: t]):
            served.append(s)
            yield wrap(images=images(4, s)) if wrap is SimpleNamespace else wrap(images(4, s))

    done = []
    stats = collect_second_moments(vit, NAMES[:2], batches(), device="cpu", max_samples=6, progress=done.append)
    assert done == [4, 6] and served == [0, 1]  # stops without asking for a third batch
    expected = captured_second_moments(vit, NAMES[:2], torch.cat([images(4, 0), images(4, 1)[:2]]))
    for n in NAMES[:2]:
        assert stats[n].samples == 6 and stats[n].tokens == 6 * 17
        torch.testing.assert_close(stats[n].second_moment, expected[n], rtol=1e-9, atol=1e-9)


def test_hooks_removed_on_error_and_bad_names(vit):
    with pytest.raises(Exception):
        collect_second_moments(vit, NAMES, [torch.randn(2, 1, 32, 32)], device="cpu")  # wrong channels
    assert no_hooks(vit)
    with pytest.raises(UsageError, match="no module named"):
        collect_second_moments(vit, ["blocks.99.mlp.fc1"], [images(2, 0)], device="cpu")
    with pytest.raises(UsageError, match="not an nn.Linear"):
        collect_second_moments(vit, ["blocks.0.norm1"], [images(2, 0)], device="cpu")
    with pytest.raises(InputError, match="no calibration images"):
        collect_second_moments(vit, NAMES, [], device="cpu")
    assert no_hooks(vit)


# --- rank budgets -----------------------------------------------------------------------------------------


def random_layers(seed: int, count: int = 8, lo: int = 16, hi: int = 200, costs: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for k in range(count):
        d_in, d_out = (int(v) for v in torch.randint(lo, hi, (2,), generator=g))
        n = min(d_in, d_out)
        decay = float(torch.rand(1, generator=g)) * 0.2
        s = (torch.rand(n, generator=g) * torch.exp(-decay * torch.arange(n))).sort(descending=True).values
        cost = float(torch.randint(1, 5, (1,), generator=g)) if costs else 1.0
        layers[f"layer{k}"] = LayerSpectrum(d_in, d_out, s, cost)
    return layers


def check_valid(layers: dict, ranks: dict, multiple: int) -> None:
    assert set(ranks) == set(layers)
    for n, r in ranks.items():
        if r is not None:
            d_in, d_out = layers[n].d_in, layers[n].d_out
            assert r > 0 and r % multiple == 0 and r * (d_in + d_out) < d_in * d_out


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("costs", [False, True], ids=["params", "macs"])
def test_allocation_respects_the_budget(multiple, costs):
    for seed in range(5):
        layers = random_layers(seed, costs=costs)
        dense = budget_cost(layers, {})
        for fraction in (0.3, 0.5, 0.8, 0.95):
            ranks = allocate_ranks(layers, keep_fraction=fraction, rank_multiple=multiple)
            check_valid(layers, ranks, multiple)
            assert budget_cost(layers, ranks) <= fraction * dense * (1 + 1e-9)
            # the budget is used: no layer has a next choice (rank + multiple, or dense) that still fits
            left = fraction * dense - budget_cost(layers, ranks)
            for n, layer in layers.items():
                r = ranks[n]
                if r is not None:
                    nxt = [budget_cost({n: layer}, {n: r + multiple}) if (r + multiple) * (layer.d_in + layer.d_out)
                           < layer.dense_params else math.inf, budget_cost({n: layer}, {})]
                    assert min(nxt) - budget_cost({n: layer}, {n: r}) > left - 1e-6


def test_flat_spectrum_gets_more_rank():
    n = 256
    layers = {
        "fast": LayerSpectrum(n, n, torch.exp(-torch.arange(n) / 8.0)),
        "flat": LayerSpectrum(n, n, torch.linspace(1.0, 0.9, n)),
    }
    for fraction in (0.2, 0.4, 0.6):
        ranks = allocate_ranks(layers, keep_fraction=fraction)
        flat = n if ranks["flat"] is None else ranks["flat"]
        fast = n if ranks["fast"] is None else ranks["fast"]
        assert flat > fast, (fraction, ranks)


@pytest.mark.parametrize("multiple", [1, 8])
def test_at_least_as_good_as_uniform(multiple):
    for seed in range(12):
        for shape_kind in ("small", "transformer"):
            if shape_kind == "small":
                layers = random_layers(seed, costs=seed % 2 == 1)
            else:  # ViT-like shapes, where rank steps are fine
                g = torch.Generator().manual_seed(seed)
                layers = {f"{k}{i}": LayerSpectrum(d_in, d_out, torch.rand(min(d_in, d_out), generator=g)
                                                   .pow(1 + 3 * i).sort(descending=True).values)
                          for i in range(3) for k, (d_in, d_out) in
                          {"qkv": (192, 576), "proj": (192, 192), "fc1": (192, 768), "fc2": (768, 192)}.items()}
            for kappa in (1.2, 1.5, 2, 3, 4):
                uniform = uniform_ranks(layers, kappa, multiple)
                cost = budget_cost(layers, uniform)
                ranks = allocate_ranks(layers, target_cost=cost, rank_multiple=multiple)
                check_valid(layers, ranks, multiple)
                assert budget_cost(layers, ranks) <= cost * (1 + 1e-9)
                assert kept_energy(layers, ranks) >= kept_energy(layers, uniform) - 1e-9, (seed, kappa)


def test_budget_errors_and_edges():
    layers = {"a": LayerSpectrum(64, 64, torch.ones(64)), "b": LayerSpectrum(64, 128, torch.ones(64))}
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(UsageError, match="keep fraction"):
            allocate_ranks(layers, keep_fraction=bad)
    with pytest.raises(UsageError, match="exactly one"):
        allocate_ranks(layers)
    with pytest.raises(UsageError, match="exactly one"):
        allocate_ranks(layers, keep_fraction=0.5, target_cost=100)
    minimum = 8 * (64 + 64) + 8 * (64 + 128)
    with pytest.raises(UsageError, match=f"target unreachable.*{minimum}"):
        allocate_ranks(layers, target_cost=minimum - 1)
    assert allocate_ranks(layers, target_cost=minimum) == {"a": 8, "b": 8}
    assert allocate_ranks(layers, target_cost=10**9) == {"a": None, "b": None}
    with pytest.raises(UsageError, match="kappa"):
        uniform_ranks(layers, 1.0)


def test_uniform_ranks_rule():
    layers = {"sq": LayerSpectrum(768, 768, [1.0]), "mlp": LayerSpectrum(768, 3072, [1.0]),
              "tiny": LayerSpectrum(8, 8, [1.0])}
    assert uniform_ranks(layers, 2, 8) == {"sq": 192, "mlp": 304, "tiny": None}
    assert uniform_ranks(layers, 2, 1) == {"sq": 192, "mlp": 307, "tiny": 2}


# --- end to end (layer level) -----------------------------------------------------------------------------


def test_calibrated_budgeted_beats_uniform_plain_on_held_out_images(vit):
    # three blocks keep the test fast; 64 images give 1088 tokens per layer
    names = [n for n, m in vit.named_modules() if isinstance(m, nn.Linear) and n.split(".")[:2] in
             [["blocks", str(b)] for b in range(3)]]
    calib = collect_second_moments(vit, names, [images(32, s) for s in range(2)], device="cpu")
    held = collect_second_moments(vit, names, [images(32, s) for s in range(10, 12)], device="cpu")
    weights = {n: vit.get_submodule(n).weight.detach().double() for n in names}

    uniform = uniform_ranks({n: LayerSpectrum(w.shape[1], w.shape[0], [1.0]) for n, w in weights.items()}, 2, 8)
    plain_err = 0.0
    for n, w in weights.items():
        first, second, _ = plain_factors(w, uniform[n])
        plain_err += output_rel_error(w, second @ first, held[n].second_moment)

    spectra = {}
    for n, w in weights.items():
        _, _, info = data_aware_factors(w, calib[n].second_moment, 1)
        spectra[n] = LayerSpectrum(w.shape[1], w.shape[0], info["singular_values"])
    cost = budget_cost(spectra, uniform)
    ranks = allocate_ranks(spectra, target_cost=cost)
    assert budget_cost(spectra, ranks) <= cost
    aware_err = 0.0
    for n, w in weights.items():
        if ranks[n] is not None:
            first, second, _ = data_aware_factors(w, calib[n].second_moment, ranks[n])
            aware_err += output_rel_error(w, second @ first, held[n].second_moment)
    print(f"sum of held-out relative output errors: data-aware + budget {aware_err:.3f}, uniform plain {plain_err:.3f}")
    assert aware_err < plain_err


def test_whitened_spectrum_is_the_spectrum_the_factors_truncate() -> None:
    from lowrank_cli.compress.whitened_svd import whitened_spectrum

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 16, generator=gen)
    x = torch.randn(16, 200, generator=gen) * torch.linspace(0.1, 3.0, 16)[:, None]  # anisotropic inputs
    c = x @ x.T
    spectrum = whitened_spectrum(weight, c)
    info = data_aware_factors(weight, c, 5)[2]
    assert torch.allclose(spectrum, torch.as_tensor(info["singular_values"]).float(), rtol=1e-5, atol=1e-6)
    assert bool((spectrum[:-1] >= spectrum[1:]).all())

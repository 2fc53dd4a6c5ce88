"""`lrc report --plot FILE`: for each group of factorized layers (qkv, proj, fc1, fc2, ...), the normalised
singular-value spectrum of every layer with the kept rank marked, and the kept energy of every layer.

matplotlib is an optional extra (`pip install 'lowrank-cli[plot]'`), imported here only; pyplot is never used,
so drawing changes no global matplotlib state (backend, open figures) of a notebook that calls it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lowrank_cli.errors import EnvironmentProblem, UsageError

INSTALL_HINT = "pip install 'lowrank-cli[plot]'"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise EnvironmentProblem(f"`plot` needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def check_plot_output(path: str | Path) -> Path:
    """Refuse early (before loading any model) a missing matplotlib, a missing folder or an unknown format."""
    from lowrank_cli.atomic import check_output

    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    path = check_output(path, force=True)  # a figure is overwritten, like a report
    supported = FigureCanvasBase.get_supported_filetypes()
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in supported:
        raise UsageError(
            f"`plot` '{path}': cannot tell the image format from the extension '{path.suffix}': "
            f"use one of {', '.join('.' + k for k in sorted(supported))} (e.g. spectrum.png)"
        )
    return path


def _group(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plot_report(report: Any, path: str | Path) -> Path:
    """Draw the figure of a `lowrank_cli.evaluation.report.Report` into `path` (format from the extension), atomically."""
    from lowrank_cli.atomic import atomic_path

    path = check_plot_output(path)
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    doc = report.document
    rows = [r for r in doc["layers"] if r["kind"] == "lowrank"]
    if not rows:
        raise UsageError(
            "`plot` draws the spectra of factorized layers, and this model has none: report an lrc checkpoint "
            "(lrc factorize MODEL -o FILE first)"
        )
    spectra = dict(getattr(report.checkpoint, "spectra", None) or {})
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group(r["name"]), []).append(r)

    ncols = 2 if len(groups) > 1 else 1
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.4 * (nrows + 1)), layout="constrained")
    grid = fig.add_gridspec(nrows + 1, ncols)
    cmap = colormaps["viridis"]
    for i, (group, layers) in enumerate(groups.items()):
        _spectra_panel(fig, fig.add_subplot(grid[i // ncols, i % ncols]), group, layers, spectra, cmap)
    _energy_panel(fig.add_subplot(grid[nrows, :]), groups, rows)

    arch = (doc.get("model") or {}).get("architecture") or doc["source"]["argument"]
    fig.suptitle(f"{arch}: singular value spectra and kept rank", fontsize=12)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=110)
    return path


def _spectra_panel(fig: Any, ax: Any, group: str, layers: list[dict], spectra: dict[str, list[float]],
                   cmap: Any) -> None:
    """One group's normalised spectra (coloured by depth) with the kept rank(s) marked."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm = Normalize(0, max(len(layers) - 1, 1))
    drawn = 0
    for j, r in enumerate(layers):
        values = spectra.get(r["name"])
        if not values:
            continue
        top = max(values) or 1.0
        ax.plot(range(1, len(values) + 1), [v / top for v in values], color=cmap(norm(j)), lw=0.9, alpha=0.85)
        drawn += 1
    ranks = sorted({r["rank"] for r in layers})
    for rank in ranks:
        ax.axvline(rank, color="black", ls="--", lw=1)
    ax.axvspan(0, max(ranks), color="tab:green", alpha=0.07, lw=0)
    label = f"kept rank {ranks[0]}" if len(ranks) == 1 else f"kept ranks {ranks[0]}..{ranks[-1]}"
    ax.text(max(ranks), 0.97, f" {label}", va="top", ha="left", fontsize=9, transform=ax.get_xaxis_transform())
    if not drawn:
        ax.text(0.5, 0.5, "no spectrum stored in this file", ha="center", va="center", transform=ax.transAxes)
    first = layers[0]
    ax.set_title(f"{group}: {len(layers)} layer(s), {first['d_out']}x{first['d_in']}", fontsize=10)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("sigma / sigma_max")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, max(len(spectra.get(r["name"]) or []) for r in layers) or max(ranks) * 2)
    if len(layers) > 1:
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, pad=0.01)
        bar.set_label("depth (layer order)", fontsize=8)


def _energy_panel(ax: Any, groups: dict[str, list[dict]], rows: list[dict]) -> None:
    """The kept energy of every factorized layer, in model order, one colour per group."""
    from matplotlib import colormaps

    colors = {g: colormaps["tab10"](k % 10) for k, g in enumerate(groups)}
    energies = [(k, r) for k, r in enumerate(rows) if r["kept_energy"] is not None]
    for group in groups:
        pts = [(k, r["kept_energy"]) for k, r in energies if _group(r["name"]) == group]
        if pts:
            ax.bar([k for k, _ in pts], [e for _, e in pts], color=colors[group], label=group, width=0.8)
    if not energies:
        ax.text(0.5, 0.5, "no kept energy stored in this file", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(ncols=min(len(groups), 8), fontsize=8, loc="upper right")
    ax.set_ylim(0, 1.16)  # room above 1.0 for the legend
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("factorized layer (model order)")
    ax.set_ylabel("kept energy")
    ax.set_title("fraction of spectral energy kept per layer (sum of kept sigma^2 / sum of all)", fontsize=10)

"""Figures of a report with matplotlib's object API (no pyplot: no global state in a server).

Every function returns a matplotlib ``Figure``; :func:`figure_to_image` turns one into a
ComfyUI IMAGE (1, H, W, 3) and :func:`save_figure` writes a PNG.
"""
from __future__ import annotations


import numpy as np
import torch

from .formatting import format_value


def _figure(w: float, h: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"evaluation plots need matplotlib: pip install matplotlib ({e})") from e
    return Figure(figsize=(w, h), dpi=100)


def figure_to_image(fig) -> torch.Tensor:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba(), dtype=np.float32)[..., :3] / 255.0
    return torch.from_numpy(rgba.copy()).unsqueeze(0)


def stack_figures(figs) -> torch.Tensor:
    """Figures -> one IMAGE batch, each padded with white to the largest size."""
    imgs = [figure_to_image(f)[0] for f in figs]
    h = max(i.shape[0] for i in imgs)
    w = max(i.shape[1] for i in imgs)
    out = torch.ones(len(imgs), h, w, 3)
    for k, i in enumerate(imgs):
        out[k, :i.shape[0], :i.shape[1]] = i
    return out


def save_figure(fig, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    fig.savefig(str(path), dpi=100, bbox_inches="tight")


def table_figure(title: str, header: list[str], rows: list[list]):
    """A table as a figure (for the evaluation node's IMAGE output)."""
    import textwrap
    header = [textwrap.fill(str(h), 14) for h in header]  # long column names on two lines
    fig = _figure(max(6.0, 1.4 * len(header)), 1.3 + 0.32 * (len(rows) + 2))
    ax = fig.add_subplot(111)
    ax.axis("off")
    ax.set_title(title, fontsize=11, loc="left")
    if rows:
        t = ax.table(cellText=[[format_value(v) for v in r] for r in rows], colLabels=header, loc="upper center",
                     cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(9)
        t.scale(1, 1.4)
        for (row, _), cell in t.get_celld().items():
            if row == 0:
                cell.set_height(cell.get_height() * 1.8)
    return fig


def distance_histogram(name: str, distances: list[float], threshold: float, recovered: list[float] | None = None):
    """Original-vs-protected identity distances with the recognizer's threshold."""
    fig = _figure(6, 3.5)
    ax = fig.add_subplot(111)
    if distances:
        ax.hist(distances, bins=20, alpha=0.7, label="protected vs original")
    if recovered:
        ax.hist(recovered, bins=20, alpha=0.7, label="recovered vs original")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel(f"{name} identity distance")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tsne_embeddings(embeddings: np.ndarray, labels: list, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of (N, D) embeddings (scikit-learn), perplexity suited to small sets."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise ImportError(f"the t-SNE plot needs scikit-learn: pip install scikit-learn ({e})") from e
    n = embeddings.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 embeddings, got {n}")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(embeddings, dtype=np.float64))


def tsne_figure(name: str, embeddings: np.ndarray, labels: list, markers: list[str] | None = None):
    """Paper Fig. 9: identities of a set of outputs in 2-D, coloured by the source identity.
    ``markers`` ("o" protected, "x" original, ...) per point."""
    xy = tsne_embeddings(embeddings, labels)
    fig = _figure(5.5, 5)
    ax = fig.add_subplot(111)
    import re
    natural = lambda t: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", t)]  # noqa: E731  id2 < id10
    uniq = sorted({str(lab) for lab in labels}, key=natural)
    markers = markers or ["o"] * len(labels)
    for ci, lab in enumerate(uniq):
        for mk in sorted(set(markers)):
            idx = [i for i, (l, m) in enumerate(zip(labels, markers)) if str(l) == lab and m == mk]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], s=22, marker=mk, color=_tab20(ci),
                           label=lab if mk == "o" else None)
    ax.set_title(f"t-SNE of {name} identity embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(uniq) <= 20:
        ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    return fig


def _tab20(i: int):
    from matplotlib import colormaps
    return colormaps["tab20"](i % 20)


def image_grid_figure(title: str, images: list[tuple[str, torch.Tensor]], captions: list[str] | None = None):
    """A row of images with titles (key-security figure, paper Fig. 7)."""
    n = len(images)
    fig = _figure(2.6 * n, 3.2)
    for i, (label, img) in enumerate(images):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(img.detach().float().clamp(0, 1).cpu().numpy())
        ax.set_title(label, fontsize=9)
        if captions:
            ax.set_xlabel(captions[i], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig

"""Plotly figures for attention inspection (notebooks/attention.ipynb).

Self-contained (plotly, numpy and torch only) so it can be merged into npp.viz as is. Inputs are
plain arrays, e.g. from npp.attention.query_heatmap, so the figures need no model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().float().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def images_figure(images: Mapping[str, np.ndarray | torch.Tensor], title: str) -> go.Figure:
    """Side-by-side uint8 images (H × W × 3), one subplot per name."""
    fig = make_subplots(rows=1, cols=len(images), subplot_titles=list(images))
    for col, image_HW3 in enumerate(images.values(), start=1):
        fig.add_trace(go.Image(z=_as_numpy(image_HW3)), row=1, col=col)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig.update_layout(title=title, height=320, width=280 * len(images) + 40,
                             margin=dict(l=20, r=20, t=80, b=20))


def attention_heatmaps_figure(maps: Mapping[str, np.ndarray | torch.Tensor], title: str, *,
                              query_cell: tuple[int, int] | None = None) -> go.Figure:
    """Side-by-side (side, side) attention heatmaps, one per name, on one shared colour scale.

    NaN cells (keys the causal mask hides) stay blank. Row 0 is at the top, as in the image. The
    query's own cell, when given, is outlined in every panel; the grids must then share a side.
    One colour scale makes the panels comparable: the same colour is the same probability.
    """
    fig = make_subplots(rows=1, cols=len(maps), subplot_titles=list(maps), horizontal_spacing=0.08)
    for col, cells in enumerate(maps.values(), start=1):
        fig.add_trace(go.Heatmap(z=_as_numpy(cells), coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}: %{z:.3f}<extra></extra>"),
                      row=1, col=col)
        if query_cell is not None:
            row, column = query_cell
            fig.add_trace(go.Scatter(x=[column], y=[row], mode="markers", showlegend=False,
                                     name="query", hoverinfo="name",
                                     marker=dict(symbol="square-open", size=14, color="red",
                                                 line=dict(width=3))),
                          row=1, col=col)
    # Square cells whatever the figure's size: shrink the plot area rather than widen the range.
    fig.update_xaxes(constrain="domain")
    fig.update_yaxes(autorange="reversed", constrain="domain")
    for col in range(1, len(maps) + 1):
        fig.update_yaxes(scaleanchor=f"x{'' if col == 1 else col}", row=1, col=col)
    return fig.update_layout(title=title, coloraxis=dict(colorscale="Viridis"),
                             coloraxis_colorbar_title="p", height=380, width=330 * len(maps) + 100,
                             plot_bgcolor="white")


def attention_distance_figure(distances: Mapping[str, Sequence[float]], *,
                              title: str = "Mean attention distance per layer") -> go.Figure:
    """One line per model: mean attention distance (grid cells) against layer index."""
    fig = go.Figure()
    for name, per_layer in distances.items():
        values = [float(v) for v in per_layer]
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=name))
    return fig.update_layout(title=title, xaxis_title="layer", yaxis_title="mean distance (tokens)",
                             xaxis=dict(dtick=1), height=380, width=640)

"""Plotly figures shared by the notebooks and the app; they read run directories (npp.runs), nothing else.

    runs = {"NTP": RunDir("runs/quickstart-ntp"), "NPP": RunDir("runs/quickstart-npp")}
    training_figure(runs, "loss", x="flops")      # loss against training FLOPs, stage switches marked
    eval_figure(runs, "fid", x="flops")           # FID curves from the periodic evaluations
    cost_quality_figure(runs, "fid")              # the paper's Figure 1 from our runs
    paper_results_figure()                        # docs/method.md §4: ImageNet 256 results of the paper

Every builder takes plain rows (dicts as in metrics.jsonl) or RunDirs, so tests feed them synthetic
metrics; every figure can be shown in JupyterLab, exported to HTML, or written as a PNG by kaleido.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from npp.runs import RunDir, evaluation_rows, training_rows

Rows = Sequence[Mapping[str, Any]]
RunsLike = Mapping[str, "RunDir | Rows"]

X_AXES = {"step": ("step", "training step"), "flops": ("flops_seen", "training FLOPs"),
          "tokens": ("tokens_seen", "image tokens seen")}
LABELS = {"loss": "training loss (nats/token)", "lr": "learning rate", "imgs_per_s": "images/s",
          "fid": "FID ↓", "is": "Inception score ↑", "precision": "precision ↑", "recall": "recall ↑",
          "class_accuracy": "class accuracy ↑", "kid": "KID ↓"}
PAPER_RESULTS = [
    # model, FID, IS, relative training cost, imgs/s (the paper's ImageNet 256×256 table, 50k samples)
    ("LlamaGen-B", 5.46, 193.6, 1.0, 5888), ("NPP-B", 4.47, 229.3, 0.63, 7625),
    ("LlamaGen-L", 3.80, 248.3, 1.0, 2201), ("NPP-L", 2.76, 266.3, 0.57, 3469),
    ("LlamaGen-XL", 3.39, 227.1, 1.0, 922), ("NPP-XL", 2.65, 281.0, 0.53, 1613),
    ("LlamaGen-XXL", 3.10, 253.6, 1.0, 448), ("NPP-XXL", 2.54, 286.1, 0.53, 640),
    ("NPP-2B", 2.28, 290.2, None, None),
]


def _rows(run: RunDir | Rows) -> Rows:
    return run.read_metrics() if isinstance(run, RunDir) else run


def train_rows(run: RunDir | Rows) -> list[Mapping[str, Any]]:
    return training_rows(_rows(run))


def eval_rows(run: RunDir | Rows) -> list[Mapping[str, Any]]:
    return evaluation_rows(_rows(run))


def stage_switches(rows: Rows) -> list[dict[str, Any]]:
    """Where the patch size changes: the first row of each new stage, with the sizes on both sides."""
    switches, previous = [], None
    for row in rows:
        if previous is not None and row["patch_size"] != previous["patch_size"]:
            switches.append({"step": previous["step"], "flops_seen": previous["flops_seen"],
                             "tokens_seen": previous["tokens_seen"],
                             "from": previous["patch_size"], "to": row["patch_size"]})
        previous = row
    return switches


def _mark_switches(fig: go.Figure, rows: Rows, x_key: str, color: str) -> None:
    for s in stage_switches(rows):
        fig.add_vline(x=s[x_key], line_dash="dot", line_color=color, opacity=0.6)
        fig.add_annotation(x=s[x_key], y=1, yref="paper", showarrow=False, yanchor="bottom",
                           text=f"{s['from']}×{s['from']}→{s['to']}×{s['to']}", font={"size": 10, "color": color})


PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
"""Colours of runs, in order: every figure of npp shows the i-th run in the same colour."""


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _check_x(x: str) -> str:
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: choose one of {', '.join(X_AXES)}")
    return X_AXES[x][0]


def training_figure(runs: RunsLike, y: str = "loss", *, x: str = "step", log_y: bool = False) -> go.Figure:
    """One line per run of a training column (loss, lr, imgs_per_s) against step, FLOPs or tokens,
    with each run's stage switches as dotted lines in its colour."""
    x_key = _check_x(x)
    fig = go.Figure()
    for i, (name, run) in enumerate(runs.items()):
        rows = train_rows(run)
        fig.add_trace(go.Scatter(x=[r[x_key] for r in rows], y=[r[y] for r in rows], mode="lines", name=name,
                                 line={"color": _color(i)}))
        _mark_switches(fig, rows, x_key, _color(i))
    fig.update_layout(xaxis_title=X_AXES[x][1], yaxis_title=LABELS.get(y, y), template="plotly_white",
                      legend={"orientation": "h", "y": -0.2})
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def training_dashboard(runs: RunsLike) -> go.Figure:
    """Loss by step and by FLOPs, LR and throughput by step: the train notebook's overview."""
    panels = [("loss", "step"), ("loss", "flops"), ("lr", "step"), ("imgs_per_s", "step")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[f"{LABELS[y]} by {X_AXES[x][1]}" for y, x in panels])
    for p, (y, x) in enumerate(panels):
        row, col, x_key = p // 2 + 1, p % 2 + 1, X_AXES[x][0]
        for i, (name, run) in enumerate(runs.items()):
            rows = train_rows(run)
            fig.add_trace(go.Scatter(x=[r[x_key] for r in rows], y=[r[y] for r in rows], mode="lines", name=name,
                                     legendgroup=name, showlegend=p == 0, line={"color": _color(i)}),
                          row=row, col=col)
            for s in stage_switches(rows):
                fig.add_vline(x=s[x_key], line_dash="dot", line_color=_color(i), opacity=0.6, row=row, col=col)
        fig.update_xaxes(title_text=X_AXES[x][1], row=row, col=col)
    fig.update_layout(template="plotly_white", height=650, legend={"orientation": "h", "y": -0.12})
    return fig


def eval_figure(runs: RunsLike, metric: str = "fid", *, x: str = "step") -> go.Figure:
    """A periodic-evaluation metric (fid, is, precision, recall, class_accuracy) against step or FLOPs,
    with stage switches; runs without evaluation rows are skipped."""
    x_key = _check_x(x)
    fig = go.Figure()
    for i, (name, run) in enumerate(runs.items()):
        rows = [r for r in eval_rows(run) if metric in r]
        if not rows:
            continue
        fig.add_trace(go.Scatter(x=[r[x_key] for r in rows], y=[r[metric] for r in rows], mode="lines+markers",
                                 name=name, line={"color": _color(i)}))
        _mark_switches(fig, train_rows(run), x_key, _color(i))
    fig.update_layout(xaxis_title=X_AXES[x][1], yaxis_title=LABELS.get(metric, metric), template="plotly_white",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def final_point(run: RunDir | Rows, metric: str = "fid") -> dict[str, Any] | None:
    """The last evaluation row with this metric, or for a RunDir its newest `npp evaluate` results.json."""
    if isinstance(run, RunDir):
        results = sorted(run.path.glob("eval/*/results.json"), key=os.path.getmtime)
        if results:
            import json

            data = json.loads(Path(results[-1]).read_text())
            rows = train_rows(run)
            if metric in data["metrics"] and rows:
                return {metric: data["metrics"][metric], "flops_seen": rows[-1]["flops_seen"],
                        "num_samples": data["num_samples"]}
    rows = [r for r in eval_rows(run) if metric in r]
    return dict(rows[-1]) if rows else None


def cost_quality_figure(runs: RunsLike, metric: str = "fid", *, baseline: str | None = None) -> go.Figure:
    """The paper's Figure 1 from our runs: final metric against training cost, relative to a baseline
    run (default: the most expensive run, usually NTP)."""
    points = {name: p for name, run in runs.items() if (p := final_point(run, metric)) is not None}
    if not points:
        raise ValueError(f"no run has a {metric!r} value: evaluate them (npp evaluate RUN) or train with --eval_every")
    base = points[baseline]["flops_seen"] if baseline else max(p["flops_seen"] for p in points.values())
    fig = go.Figure()
    for i, (name, p) in enumerate(points.items()):
        fig.add_trace(go.Scatter(x=[p["flops_seen"] / base], y=[p[metric]], mode="markers+text", name=name,
                                 text=[name], textposition="top center",
                                 marker={"size": 14, "color": _color(i)}))
    fig.update_layout(xaxis_title="training cost (relative FLOPs)", yaxis_title=LABELS.get(metric, metric),
                      template="plotly_white", showlegend=False)
    return fig


TABLE_ROW_PX, TABLE_HEADER_PX, TABLE_MARGIN = 26, 30, {"t": 60, "b": 10, "l": 10, "r": 10}


def paper_results_figure() -> go.Figure:
    """The paper's ImageNet 256 results (50k samples, ADM evaluator) as a table, tall enough for every row:
    a plotly table clips the rows its figure has no room for."""
    columns = list(zip(*[(m, f"{fid:.2f}", f"{is_:.1f}", "" if c is None else f"{c:.2f}",
                          "" if t is None else f"{t:,}") for m, fid, is_, c, t in PAPER_RESULTS]))
    fig = go.Figure(go.Table(header={"values": ["model", "FID ↓", "IS ↑", "training cost", "imgs/s"],
                                     "height": TABLE_HEADER_PX},
                             cells={"values": columns, "height": TABLE_ROW_PX}))
    height = TABLE_MARGIN["t"] + TABLE_HEADER_PX + TABLE_ROW_PX * len(PAPER_RESULTS) + TABLE_MARGIN["b"] + 10
    fig.update_layout(title="Next Patch Prediction, ImageNet 256×256 (the paper, arXiv 2412.15321)",
                      height=height, margin=TABLE_MARGIN)
    return fig


def paper_cost_quality_figure() -> go.Figure:
    """The paper's own cost-versus-FID points, one line per model size (LlamaGen → NPP)."""
    fig = go.Figure()
    for i in range(0, 8, 2):
        (ntp, f0, _, c0, _), (npp_, f1, _, c1, _) = PAPER_RESULTS[i], PAPER_RESULTS[i + 1]
        fig.add_trace(go.Scatter(x=[c0, c1], y=[f0, f1], mode="lines+markers+text", text=[ntp, npp_],
                                 textposition="top center", name=ntp.split("-")[1], line={"color": _color(i // 2)}))
    fig.update_layout(xaxis_title="training cost (relative)", yaxis_title="FID ↓ (ImageNet 256)",
                      template="plotly_white")
    return fig


def image_figure(image_HW3: np.ndarray, title: str = "") -> go.Figure:
    """An RGB uint8 image (a sample grid) as a figure without axes."""
    fig = go.Figure(go.Image(z=np.asarray(image_HW3)))
    fig.update_layout(title=title, margin={"l": 0, "r": 0, "t": 40 if title else 0, "b": 0})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def token_grid_figure(codes_hw: np.ndarray, patch_sizes: Sequence[int], title: str = "") -> go.Figure:
    """The token grid as a heatmap of code ids, one panel per patch size with its p×p squares outlined
    (patch n is the n-th square in row-major order)."""
    codes_hw = np.asarray(codes_hw)
    side = codes_hw.shape[0]
    fig = make_subplots(rows=1, cols=len(patch_sizes), subplot_titles=[
        f"{p}×{p} patches: {(side // p) ** 2} positions" if p > 1 else f"tokens: {side * side} positions"
        for p in patch_sizes])
    for c, p in enumerate(patch_sizes, start=1):
        fig.add_trace(go.Heatmap(z=codes_hw, colorscale="Viridis", showscale=c == len(patch_sizes),
                                 hovertemplate="row %{y}, col %{x}: code %{z}<extra></extra>"), row=1, col=c)
        for edge in range(0, side + 1, p):
            style = {"line": {"color": "white", "width": 2 if p > 1 else 0.5}, "row": 1, "col": c}
            fig.add_shape(type="line", x0=edge - 0.5, x1=edge - 0.5, y0=-0.5, y1=side - 0.5, **style)
            fig.add_shape(type="line", y0=edge - 0.5, y1=edge - 0.5, x0=-0.5, x1=side - 0.5, **style)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{c if c > 1 else ''}", row=1, col=c)
    fig.update_layout(title=title, template="plotly_white", height=360)
    return fig


def stage_cost_figure(stages: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Sequence length and training FLOPs per image of each stage (bars), from
    [{"name", "positions", "flops_per_image", "steps"}]."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["positions per image", "training FLOPs per image"])
    names = [s["name"] for s in stages]
    fig.add_trace(go.Bar(x=names, y=[s["positions"] for s in stages], showlegend=False), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[s["flops_per_image"] for s in stages], showlegend=False), row=1, col=2)
    fig.update_layout(template="plotly_white", height=320)
    return fig


# ---- attention (notebooks/attention.ipynb; npp.attention computes the maps) ----------------------

def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().float().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def images_figure(images: Mapping[str, np.ndarray | torch.Tensor], title: str = "") -> go.Figure:
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


def use_notebook_renderer() -> None:
    """Explicit renderers: the plotly MIME bundle for JupyterLab plus inline HTML with plotly.js
    embedded, so figures show in JupyterLab and in exported HTML without a network."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"


def save_figure_png(fig: go.Figure, path: str | os.PathLike, *, width: int = 900,
                    height: int | None = None) -> Path | None:
    """A static PNG through kaleido when a chromium is available; None (and nothing written) otherwise."""
    try:
        fig.write_image(str(path), width=width, height=height or fig.layout.height or 450)
    except Exception:  # noqa: BLE001 (kaleido without a browser raises several kinds of errors)
        return None
    return Path(path)

"""npp.viz figure builders on synthetic metrics."""

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from npp import viz
from npp.runs import RunDir


def npp_rows(steps=10, switch=5, evals=(4, 5, 8, 10)):
    """An NPP run: 2×2 patches (cheap steps) up to `switch`, then NTP; evaluation rows at `evals`."""
    rows, flops = [], 0.0
    for step in range(1, steps + 1):
        p = 2 if step <= switch else 1
        flops += 1.0 if p == 2 else 4.0
        rows.append({"step": step, "stage": int(p == 1), "patch_size": p, "loss": 5.0 - 0.1 * step,
                     "lr": 1e-3, "tokens_seen": 64 * step, "flops_seen": flops, "imgs_per_s": 100.0 * p})
        if step in evals:
            rows.append({"step": step, "patch_size": p, "eval": True, "fid": 100.0 / step, "is": float(step),
                         "flops_seen": flops, "tokens_seen": 64 * step})
    return rows


def ntp_rows(steps=10):
    return [{**row, "patch_size": 1, "stage": 0, "flops_seen": 4.0 * row["step"]}
            for row in npp_rows(steps, switch=0, evals=(5, 10))]


def vlines(fig: go.Figure) -> list[float]:
    return [shape.x0 for shape in fig.layout.shapes if shape.x0 == shape.x1 and shape.yref == "y domain"
            or (shape.x0 == shape.x1 and shape.type == "line" and shape.y0 == 0 and shape.y1 == 1)]


def test_stage_switches_are_found_between_rows():
    switches = viz.stage_switches(viz.train_rows(npp_rows()))
    assert switches == [{"step": 5, "flops_seen": 5.0, "tokens_seen": 320, "from": 2, "to": 1}]
    assert viz.stage_switches(viz.train_rows(ntp_rows())) == []


def test_training_figure_plots_each_run_and_marks_its_stage_switch():
    fig = viz.training_figure({"NTP": ntp_rows(), "NPP": npp_rows()}, "loss", x="flops")
    assert [t.name for t in fig.data] == ["NTP", "NPP"]
    assert list(fig.data[1].x) == [r["flops_seen"] for r in viz.train_rows(npp_rows())]
    assert len(fig.data[1].y) == 10  # evaluation rows are not training points
    assert vlines(fig) == [5.0]
    assert fig.layout.annotations[0].text == "2×2→1×1"
    assert fig.layout.xaxis.title.text == "training FLOPs"
    with pytest.raises(ValueError, match="choose one of step, flops, tokens"):
        viz.training_figure({"NPP": npp_rows()}, x="epochs")


def test_eval_figure_uses_evaluation_rows_and_skips_runs_without_them():
    fig = viz.eval_figure({"NTP": ntp_rows(), "NPP": npp_rows(), "none": npp_rows(evals=())}, "fid")
    assert [t.name for t in fig.data] == ["NTP", "NPP"]
    assert list(fig.data[1].x) == [4, 5, 8, 10] and fig.data[1].y[0] == pytest.approx(25.0)


def test_dashboard_has_four_panels_and_one_legend_entry_per_run():
    fig = viz.training_dashboard({"NTP": ntp_rows(), "NPP": npp_rows()})
    assert len(fig.data) == 8 and sum(bool(t.showlegend) for t in fig.data) == 2
    assert len(fig.layout.annotations) == 4  # subplot titles


def test_cost_quality_is_relative_to_the_most_expensive_run(tmp_path):
    fig = viz.cost_quality_figure({"NTP": ntp_rows(), "NPP": npp_rows()}, "fid")
    xs = {t.name: t.x[0] for t in fig.data}
    assert xs == {"NTP": 1.0, "NPP": pytest.approx(25.0 / 40.0)}
    # A run directory's newest `npp evaluate` results count as its final point.
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.append_metrics(npp_rows(evals=()))
    (run.path / "eval" / "n1000").mkdir(parents=True)
    (run.path / "eval" / "n1000" / "results.json").write_text(json.dumps({"metrics": {"fid": 7.5},
                                                                         "num_samples": 1000}))
    assert viz.final_point(run, "fid") == {"fid": 7.5, "flops_seen": 25.0, "num_samples": 1000}
    with pytest.raises(ValueError, match="npp evaluate"):
        viz.cost_quality_figure({"x": npp_rows(evals=())})


def test_paper_figures_carry_the_papers_table_whole():
    table = viz.paper_results_figure()
    assert table.data[0].cells.values[0][1] == "NPP-B" and table.data[0].cells.values[1][1] == "4.47"
    assert table.data[0].cells.values[0][-1] == "NPP-2B"
    # room for the title, the header and every row: a plotly table clips the rows that do not fit
    layout, cells = table.layout, table.data[0]
    needed = layout.margin.t + cells.header.height + cells.cells.height * len(viz.PAPER_RESULTS) + layout.margin.b
    assert layout.height >= needed
    lines = viz.paper_cost_quality_figure()
    assert len(lines.data) == 4 and list(lines.data[0].y) == [5.46, 4.47]


def test_token_grid_outlines_the_patches_of_each_level():
    codes = np.arange(64).reshape(8, 8)
    fig = viz.token_grid_figure(codes, [1, 2, 4])
    assert len(fig.data) == 3
    # 9 + 5 + 3 vertical and as many horizontal lines.
    assert len(fig.layout.shapes) == 2 * (9 + 5 + 3)
    assert fig.layout.annotations[1].text == "2×2 patches: 16 positions"


def test_images_and_stage_costs():
    image = np.zeros((8, 8, 3), np.uint8)
    assert len(viz.images_figure({"a": image, "b": image}).data) == 2
    assert isinstance(viz.image_figure(image, "x").data[0], go.Image)
    fig = viz.stage_cost_figure([{"name": "2×2", "positions": 16, "flops_per_image": 1.0},
                                 {"name": "1×1", "positions": 64, "flops_per_image": 4.0}])
    assert list(fig.data[0].y) == [16, 64]

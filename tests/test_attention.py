"""Attention maps (npp.attention), their figures (npp.viz) and notebooks/attention.ipynb."""

import json
import math
import sys
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
import torch

import npp
from conftest import random_weights
from npp.attention import (attention_maps, mean_attention_distance, mean_attention_distance_by_layer,
                           patch_position, query_heatmap)
from npp.tokenizer import load_embedded_tokenizer
from npp.viz import attention_distance_figure, attention_heatmaps_figure, images_figure

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "attention.ipynb"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


# --------------------------------------------------------------------------------------------
# npp.attention
# --------------------------------------------------------------------------------------------

def _attention_io(model: npp.GPT, tokens_BL, labels_B, patch_size: int) -> list[tuple]:
    """Each Attention module's (input, rope, output) in the model's own forward."""
    seen = []
    hooks = [layer.attention.register_forward_hook(lambda _m, args, out: seen.append((args[0], args[1], out)))
             for layer in model.layers]
    try:
        with torch.no_grad():
            model(tokens_BL, labels_B, patch_size=patch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("n_kv_head", [None, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_maps_reproduce_the_attention_output(tiny_config, patch_size, n_kv_head):
    config = npp.ModelConfig.from_dict({**tiny_config.to_dict(), "n_kv_head": n_kv_head})
    model = random_weights(npp.GPT(config)).eval()
    tokens_BL, labels_B = torch.randint(64, (3, 64)), torch.tensor([0, 4, 10])
    maps = attention_maps(model, tokens_BL, labels_B, patch_size=patch_size)

    N, H, d = (8 // patch_size) ** 2, config.n_head, config.head_dim
    io = _attention_io(model, tokens_BL, labels_B, patch_size)
    assert len(maps) == len(io) == config.n_layer
    for probs_BHNN, (x_BND, _rope, out_BND), layer in zip(maps, io, model.layers):
        attn = layer.attention
        assert probs_BHNN.shape == (3, H, N, N)
        v = attn.wqkv(x_BND)[..., (H + attn.n_kv_head) * d:]
        v_BHNd = v.view(3, N, attn.n_kv_head, d).transpose(1, 2).repeat_interleave(H // attn.n_kv_head, dim=1)
        mixed_BND = (probs_BHNN @ v_BHNd).transpose(1, 2).reshape(3, N, H * d)
        assert out_BND.abs().max() > 0.1  # random weights: a real signal, not one under atol
        torch.testing.assert_close(attn.wo(mixed_BND), out_BND, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs_BHNN.sum(-1), torch.ones(3, H, N))
        assert (probs_BHNN.triu(1) == 0).all()


def test_maps_run_in_eval_mode_and_restore_the_mode(tiny_config):
    model = random_weights(npp.GPT(tiny_config))
    tokens_BL, labels_B = torch.randint(64, (2, 64)), torch.tensor([1, 2])
    model.train()
    in_training = attention_maps(model, tokens_BL, labels_B)
    assert model.training
    for a, b in zip(in_training, attention_maps(model.eval(), tokens_BL, labels_B)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_maps_reject_a_partial_grid(tiny_config):
    with pytest.raises(ValueError, match="full token grid"):
        attention_maps(npp.GPT(tiny_config), torch.zeros(1, 63, dtype=torch.long), torch.tensor([0]))


def _two_by_two_probs() -> torch.Tensor:
    """(1, 2, 4, 4) on a 2×2 grid: position 1 = cell (0, 0), 2 = (0, 1), 3 = (1, 0)."""
    head0 = [[1.0, 0, 0, 0],
             [0.5, 0.5, 0, 0],   # only itself among image keys: distance 0
             [0.2, 0.8, 0, 0],   # (0, 1) -> (0, 0): distance 1, whatever the class token takes
             [0.0, 0.5, 0.5, 0]]  # (1, 0) -> (0, 0) and (0, 1): 1 and √2, half each
    head1 = torch.eye(4).tolist()  # every query on itself: distance 0
    return torch.tensor([[head0, head1]])


def test_mean_attention_distance_on_a_hand_made_map():
    probs_BHNN = _two_by_two_probs()
    expected_head0 = (0 + 1 + (1 + math.sqrt(2)) / 2) / 3
    torch.testing.assert_close(mean_attention_distance(probs_BHNN, 2), torch.tensor([expected_head0, 0.0]))
    by_layer = mean_attention_distance_by_layer([probs_BHNN, probs_BHNN.flip(1)], 2)
    torch.testing.assert_close(by_layer, torch.tensor([[expected_head0, 0.0], [0.0, expected_head0]]))
    with pytest.raises(ValueError, match="2×2 grid"):
        mean_attention_distance(probs_BHNN, 4)


def test_query_heatmap_lays_a_row_on_the_grid():
    probs_HNN = _two_by_two_probs()[0]
    heat = query_heatmap(probs_HNN, 2, head=0)
    np.testing.assert_allclose(heat.cells, [[0.8, 0.0], [np.nan, np.nan]])
    assert heat.class_weight == pytest.approx(0.2) and heat.query_cell == (0, 1)

    last = query_heatmap(probs_HNN, -1, head=0)
    np.testing.assert_allclose(last.cells, [[0.5, 0.5], [0.0, np.nan]])  # the last patch is never an input
    assert last.query_cell == (1, 0)

    cls = query_heatmap(probs_HNN, 0, head=1)
    assert np.isnan(cls.cells).all() and cls.class_weight == 1.0 and cls.query_cell is None
    with pytest.raises(ValueError, match="head=2"):
        query_heatmap(probs_HNN, 1, head=2)
    with pytest.raises(ValueError, match="query=4"):
        query_heatmap(probs_HNN, 4, head=0)


def test_patch_position_maps_tokens_to_their_patch():
    # 4×4 tokens in 2×2 patches: coarse positions 1..3 hold patches 0..2.
    assert patch_position(0, 4, 2) == 0                     # the class token
    assert patch_position(1, 4, 2) == 1                     # token (0, 0) in patch 0
    assert patch_position(4, 4, 2) == 2                     # token (0, 3) in patch 1
    assert patch_position(6, 4, 2) == 1                     # token (1, 1) in patch 0
    assert patch_position(-1, 4, 2) == 3                    # last patch: the last coarse position
    assert patch_position(5, 4, 1) == 5                     # p = 1 changes nothing


# --------------------------------------------------------------------------------------------
# npp.viz
# --------------------------------------------------------------------------------------------

def test_heatmaps_figure_has_one_panel_per_model_and_marks_the_query():
    cells = np.full((4, 4), np.nan)
    cells.flat[:5] = 0.2
    fig = attention_heatmaps_figure({"NTP": cells, "NPP": torch.tensor(cells)}, "layer 1", query_cell=(1, 0))
    assert [t.type for t in fig.data] == ["heatmap", "scatter", "heatmap", "scatter"]
    assert [a.text for a in fig.layout.annotations] == ["NTP", "NPP"]
    assert fig.layout.title.text == "layer 1"
    assert {t.coloraxis for t in fig.data if t.type == "heatmap"} == {"coloraxis"}  # one shared scale
    assert (fig.data[1].x, fig.data[1].y) == ((0,), (1,))
    assert len(attention_heatmaps_figure({"NPP": cells}, "no query").data) == 1


def test_distance_figure_has_one_line_per_model():
    fig = attention_distance_figure({"NTP": [1.0, 2.0, 3.0], "NPP": torch.tensor([0.5, 1.5, 2.5]).tolist()})
    assert [t.name for t in fig.data] == ["NTP", "NPP"]
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[1].y) == [0.5, 1.5, 2.5]


def test_images_figure_shows_each_image():
    image_HW3 = np.zeros((8, 8, 3), dtype=np.uint8)
    fig = images_figure({"NTP": image_HW3, "NPP": torch.from_numpy(image_HW3)}, "samples")
    assert [t.type for t in fig.data] == ["image", "image"]
    assert [a.text for a in fig.layout.annotations] == ["NTP", "NPP"]


# --------------------------------------------------------------------------------------------
# notebooks/attention.ipynb
# --------------------------------------------------------------------------------------------

def test_committed_notebook_has_no_outputs_and_documented_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    params = papermill.inspect_notebook(str(NOTEBOOK))
    assert list(params) == ["ntp_run", "npp_run", "class_label", "seed", "layer", "head", "query",
                            "patch_size", "cfg_scale", "interactive"]
    assert all(p["help"] and p["inferred_type_name"] != "None" for p in params.values())


def _write_run(run: Path, seed: int) -> Path:
    """A run directory as the trainer's export leaves it, with a random-weight debug GPT."""
    torch.manual_seed(seed)
    model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=8))
    torch.nn.init.normal_(model.output.weight, std=0.02)
    model.save_pretrained(run / "export")
    vq = load_embedded_tokenizer("mnist-8x8")
    info = {"data": "mnist-8x8", "fingerprint": vq.fingerprint(), "config": vq.config.to_dict(),
            "path": None, "source": None}
    (run / "export" / "tokenizer.json").write_text(json.dumps(info))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("runs")
    return {"ntp_run": str(_write_run(root / "ntp-run", 0)), "npp_run": str(_write_run(root / "npp-run", 1))}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernel spec that runs this interpreter, found first on JUPYTER_PATH.

    Whatever python3 spec a machine has (another Python's, a user-level one), the notebook then runs
    with the packages of the Python running the tests.
    """
    data = tmp_path_factory.mktemp("jupyter")
    spec = data / "kernels" / "npp-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "npp tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(data))
        yield "npp-test"


def _execute(kernel: str, tmp_path: Path, **parameters) -> nbformat.NotebookNode:
    out = tmp_path / "attention-out.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters, kernel_name=kernel,
                               cwd=str(tmp_path), progress_bar=False)
    return nbformat.read(out, as_version=4)


@pytest.mark.heavy  # test_notebooks and the README run this notebook by default
def test_notebook_runs_and_draws_every_figure(runs, kernel, tmp_path):
    nb = _execute(kernel, tmp_path, **runs, class_label=3, layer=1, head=1, query=20, patch_size=2)
    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if PLOTLY_MIME in o.get("data", {})]
    # Images, NTP-vs-NPP heatmaps, the patch-stage heatmap, distances per layer.
    assert len(figures) == 4
    titles = [f.data[PLOTLY_MIME]["layout"]["title"]["text"] for f in figures]
    assert titles[1] == "Layer 1, head 1, query position 20"
    distance_lines = figures[3].data[PLOTLY_MIME]["data"]
    assert [line["name"] for line in distance_lines] == ["NTP", "NPP", "NPP on 2×2 patches"]
    assert all(len(line["y"]) == 2 for line in distance_lines)  # the debug preset's two layers


@pytest.mark.parametrize("bad, message", [
    ({"ntp_run": "missing-run"}, "'missing-run' has no export/model.safetensors: run `make quickstart`"),
    ({"layer": 2}, "layer=2: the NTP model has 2 layers; use 0..1 or -1 for the last"),
], ids=["missing-run", "layer"])
def test_notebook_stops_at_the_check_with_a_clear_message(runs, kernel, tmp_path, bad, message):
    with pytest.raises(papermill.PapermillExecutionError) as error:
        _execute(kernel, tmp_path, **{**runs, **bad})
    assert error.value.ename == "ValueError" and message in error.value.evalue
    nb = nbformat.read(tmp_path / "attention-out.ipynb", as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    failed = next(i for i, cell in enumerate(code) if any(o.output_type == "error" for o in cell.outputs))
    assert "def export_config" in code[failed].source
    assert all(cell.execution_count is None for cell in code[failed + 1:])  # nothing heavy ran

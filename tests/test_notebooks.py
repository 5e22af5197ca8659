"""The notebooks, executed by papermill with tiny parameters against runs trained in this session."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"
STEPS = 12
"""The notebook pair's length; it evaluates as the quickstart does (npp.recipes), at the same fractions of the run."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private cache, inherited by the papermill kernels, and codes of the first digits by the shipped
    mnist-8x8 tokenizer (named in the manifest, so samples can be decoded and judged)."""
    from npp.crops import CropConfig
    from npp.data import MnistSource
    from npp.extract import extract_codes
    from npp.files import ASSETS
    from npp.tokenizer import load_embedded_tokenizer

    root = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NPP_CACHE", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        codes = root / "codes"
        extract_codes(MnistSource("train", 256), load_embedded_tokenizer("mnist-8x8"), codes,
                      CropConfig("none", size=32), tokenizer_path=ASSETS / "mnist-8x8", progress=False)
        yield root, codes


def execute(notebook: str, out: Path, /, **parameters) -> nbformat.NotebookNode:
    pm.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(out), parameters=parameters, kernel_name="python3",
                        cwd=str(ROOT), progress_bar=False)
    return nbformat.read(str(out), as_version=4)


def figures(notebook: nbformat.NotebookNode) -> int:
    return sum(PLOTLY in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def plotted(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output["data"][PLOTLY] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if PLOTLY in output.get("data", {})]


def quickstart_eval_every() -> int:
    """The quickstart's evaluation interval scaled to STEPS: evaluations at its quarters and stage ends."""
    from npp.quickstart import quickstart_config

    config = quickstart_config("quickstart-npp")
    assert config.schedule.total_steps % config.eval_every == 0
    return STEPS * config.eval_every // config.schedule.total_steps


def errors(notebook: nbformat.NotebookNode) -> list[str]:
    return [output.get("ename", "") for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]


@pytest.fixture(scope="module")
def trained(env):
    """train.ipynb with tiny parameters: an NPP run and its NTP twin, with periodic evaluations shaped as the
    quickstart's (its quarters and stage ends), on 20 samples."""
    root, codes = env
    notebook = execute("train", root / "train.ipynb", name="nb", runs_dir=str(root / "runs"), model="debug",
                       model_overrides="{}", data=str(codes), steps=STEPS, batch_size=16, warmup_steps=2,
                       eval_every=quickstart_eval_every(), eval_samples=20, fid_samples=20, ckpt_every=100, progress=False,
                       png_dir=str(root / "png"))
    return root, notebook


def test_train_notebook_trains_the_pair_and_draws_its_figures(trained):
    root, notebook = trained
    assert errors(notebook) == []
    for kind in ("npp", "ntp"):
        run = root / "runs" / f"nb-{kind}"
        assert (run / "export" / "model.safetensors").is_file()
        assert list(run.glob("eval/*/results.json"))
    # Dashboard, loss by FLOPs, FID and class accuracy curves, two sample grids.
    assert figures(notebook) == 6
    text = printed(notebook)
    assert "NPP: " in text and "fid" in text and "no periodic evaluations" not in text
    fid = next(f for f in plotted(notebook) if f["layout"].get("yaxis", {}).get("title", {}).get("text") == "FID ↓")
    # One curve per run through its quarters, stage ends included (the NPP run's 2×2 stage ends at 6).
    assert {trace["name"]: len(trace["x"]) for trace in fid["data"]} == {"NPP": 4, "NTP": 4}
    # Static PNGs through kaleido and the chromium that `make test` installs.
    assert [p.name for p in sorted((root / "png").iterdir())] == ["loss_by_flops.png", "training.png"]
    assert (root / "png" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_notebook_reuses_finished_runs(trained, tmp_path):
    root, _ = trained
    notebook = execute("train", tmp_path / "again.ipynb", name="nb", runs_dir=str(root / "runs"), model="debug",
                       model_overrides="{}", data=str(root / "codes"), steps=STEPS, batch_size=16, warmup_steps=2,
                       eval_every=quickstart_eval_every(), eval_samples=20, fid_samples=0, ckpt_every=100, progress=False)
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert text.count("is trained: reusing it") == 2


def test_fid_notebook_compares_the_runs(trained, tmp_path):
    root, _ = trained
    runs = [str(root / "runs" / "nb-ntp"), str(root / "runs" / "nb-npp")]
    notebook = execute("fid", tmp_path / "fid.ipynb", runs=runs)
    assert errors(notebook) == []
    # 4 metrics × 2 axes, loss by FLOPs, cost vs quality, the paper's table and its cost plot.
    assert figures(notebook) == 12
    text = printed(notebook)
    assert "no periodic evaluations" not in text and "needs periodic evaluations" not in text
    assert "training cost" in text and text.count(" FID at ") == 2  # the equal-cost comparison, both runs
    table = next(f for f in plotted(notebook) if f["data"][0]["type"] == "table")
    assert table["data"][0]["cells"]["values"][0][-1] == "NPP-2B"  # the paper's table whole, to its last row


@pytest.mark.heavy  # the README's fid command does this by default
def test_fid_notebook_takes_the_runs_as_papermill_command_line_json(trained, tmp_path):
    """`-p runs '[...]'` reaches the notebook as the text of the list, not the list."""
    root, _ = trained
    runs = json.dumps([str(root / "runs" / "nb-ntp"), str(root / "runs" / "nb-npp")])
    out = tmp_path / "fid.ipynb"
    papermill = Path(sys.executable).with_name("papermill")
    done = subprocess.run([str(papermill), str(NOTEBOOKS / "fid.ipynb"), str(out), "-p", "runs", runs],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    notebook = nbformat.read(str(out), as_version=4)
    assert errors(notebook) == [] and figures(notebook) == 12


def test_patches_notebook_shows_levels_costs_switches_and_stage_samples(trained, tmp_path):
    root, _ = trained
    notebook = execute("patches", tmp_path / "patches.ipynb", run=str(root / "runs" / "nb-npp"), window=5,
                       num_samples=4)
    assert errors(notebook) == []
    # Token grid, decoded averages, stage costs, one switch, two stage-end sample grids.
    assert figures(notebook) == 6


def test_attention_notebook_reads_the_patch_stage_checkpoint_of_a_trained_run(trained, tmp_path):
    root, _ = trained
    notebook = execute("attention", tmp_path / "attention.ipynb", ntp_run=str(root / "runs" / "nb-ntp"),
                       npp_run=str(root / "runs" / "nb-npp"), class_label=1, layer=0, query=20)
    assert errors(notebook) == []
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "coarse grid: the checkpoint that ends its 2×2 stage (step-00000006)" in text
    assert figures(notebook) == 4


@pytest.mark.parametrize("name,parameters,message", [
    ("train", {"model": "huge"}, "TrainConfig.model='huge': choose one of"),
    ("fid", {"runs": ["runs/does-not-exist"]}, "not run directories"),
    # A kernel start each (~10 s): the other two under -m heavy.
    pytest.param("fid", {"runs": "runs/quickstart-npp"}, "give a JSON list of run directories",
                 marks=pytest.mark.heavy),
    pytest.param("patches", {"run": "runs/does-not-exist"}, "has no export/model.safetensors",
                 marks=pytest.mark.heavy),
])
def test_a_bad_parameter_stops_at_the_first_cell(name, parameters, message, tmp_path, env):
    with pytest.raises(pm.PapermillExecutionError, match=message):
        execute(name, tmp_path / "bad.ipynb", **parameters)
    notebook = nbformat.read(str(tmp_path / "bad.ipynb"), as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    # The parameters, papermill's injected cell, then the check that failed: nothing after it ran.
    first_check = next(i for i, c in enumerate(code) if "parameters" not in c.metadata.get("tags", [])
                       and "injected-parameters" not in c.metadata.get("tags", []))
    assert code[first_check].outputs[-1].output_type == "error"
    assert all(c.execution_count is None for c in code[first_check + 1:])


def test_notebooks_are_committed_without_outputs_and_document_their_parameters():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert all(c["outputs"] == [] and c["execution_count"] is None for c in code), path.name
        tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, path.name
        lines = [line for line in "".join(tagged[0]["source"]).splitlines() if line.strip()]
        assert all(": " in line.split("=")[0] and "  # " in line for line in lines), path.name
        documented = pm.inspect_notebook(str(path))
        assert len(documented) == len(lines) and all(p["help"] for p in documented.values()), path.name


def test_train_notebook_defaults_are_the_quickstart_pair():
    """The parameters and the checking cell, run as they are: the defaults give the quickstart pair."""
    from npp.quickstart import quickstart_config

    notebook = nbformat.read(str(NOTEBOOKS / "train.ipynb"), as_version=4)
    code = [c.source for c in notebook.cells if c.cell_type == "code"]
    namespace: dict = {}
    exec(code[0], namespace)
    exec(code[1], namespace)
    for kind in ("ntp", "npp"):
        config = namespace["configs"][kind]
        assert config.name == f"quickstart-{kind}"
        assert config.changes_from(quickstart_config(config.name).to_dict()) == []
        # Evaluated as the quickstart is (fields a resume may change, so changes_from leaves them out).
        quickstart = quickstart_config(config.name)
        assert (config.eval_every, config.eval_samples) == (quickstart.eval_every, quickstart.eval_samples) == (300, 300)
    assert namespace["configs"]["npp"].schedule.levels == 2

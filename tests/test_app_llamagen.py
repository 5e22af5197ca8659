"""Released LlamaGen checkpoints in the app: a 384-px GPT draws 384-px images, its panel says what npp inferred
about it, and the Advanced boxes hold each model's own sampling defaults (LlamaGen's FID CFG for its GPTs,
the recipe's for a run of ours), following the model just chosen.

Stand-ins, no download: c2i_XL_384.pt and c2i_B_384.pt in LlamaGen's DDP layout with their real widths and
one layer (tests/test_llamagen_zoo.py), decoded by a small VQ with VQ-16's downsampling and their 64 codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import npp
from app.backend import Backend, advanced_label
from app.sources import find_sources
from app.turns import Settings, stream
from npp.config import PAPER_SAMPLER, SamplerConfig
from npp.sampling import sample_generators
from test_app import CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, generate_and_wait, make_run, tiny_model
from test_llamagen_zoo import VOCAB, stand_in_state, write

XL_LINE = ("c2i_XL_384.pt: 1 layer × 1280, 20 heads of 64 (LlamaGen preset XL by width 1280 alone: the file has 1 "
           "of its 36 layers), grid 24×24 (file name _384, VQ-16)")
XL_LABEL = ("Advanced (defaults of c2i_XL_384.pt: CFG 1.75 from LlamaGen's FID protocol for its released GPT-XL at "
            "384 px")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """c2i_XL_384.pt, c2i_B_384.pt (no stored args: the name tells the grid) and vq16/, a VQ-16-shaped tokenizer
    folder (five levels: 16 px a code) with the stand-ins' 64 codes, small enough to decode 384 px quickly."""
    folder = tmp_path_factory.mktemp("zoo")
    write(folder / "c2i_XL_384.pt", stand_in_state(1280, seed=1), "ddp")
    write(folder / "c2i_B_384.pt", stand_in_state(768, seed=2), "ddp")
    torch.manual_seed(0)
    npp.VQModel(npp.VQConfig(base_channels=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32,
                             codebook_size=VOCAB)).save_pretrained(folder / "vq16")
    return folder


@pytest.fixture(scope="module")
def backend(zoo, tmp_path_factory) -> Backend:
    """The two stand-ins, a run of ours without a recipe and one whose recipe samples at CFG 1.5."""
    runs = tmp_path_factory.mktemp("runs")
    make_run(runs, "plain", [1, 1], fid=90.0, seed=1)
    recipe = make_run(runs, "recipe", [1, 1], fid=80.0, seed=2)
    (recipe / "config.json").write_text(json.dumps({"eval_sampler": {**PAPER_SAMPLER.to_dict(), "cfg_scale": 1.5}}))
    return Backend(find_sources(runs, [zoo / "c2i_XL_384.pt", zoo / "c2i_B_384.pt"]), tokenizer=zoo / "vq16",
                   device="cpu", keep=4)


def test_a_384px_checkpoint_draws_384px_rows_and_its_panel_says_what_was_inferred(backend):
    xl = backend.load("c2i_XL_384.pt")
    assert (xl.pipe.grid, xl.pipe.image_size, xl.pipe.model.config.n_head) == (24, 384, 20)
    facts, inferred = xl.describe().split("\n\n")
    assert "24×24 tokens" in facts and "384×384 px" in facts
    assert inferred.replace("\\", "") == f"Inferred: {XL_LINE}"  # escaped for markdown, shown as written
    assert "Inferred" not in backend.load("plain").describe()  # a run of ours has nothing inferred

    frames = stream([xl], Settings(class_index=1, num_images=2, seed=3, sampler=xl.sampler_defaults()).validated())
    first = next(frames)[0]  # one token row: 16 px of each 384-px image drawn, the rest still black
    frames.close()
    assert first.rows == 1 and first.images_BHW3.shape == (2, 384, 384, 3)
    assert first.images_BHW3[:, :16].max() > 0 and first.images_BHW3[:, 16:].max() == 0


def test_each_model_brings_its_own_sampling_defaults(backend):
    own = {name: backend.load(name).sampler_defaults() for name in ("c2i_XL_384.pt", "c2i_B_384.pt", "plain", "recipe")}
    assert {name: s.cfg_scale for name, s in own.items()} == {"c2i_XL_384.pt": 1.75, "c2i_B_384.pt": 2.0,
                                                              "plain": 2.0, "recipe": 1.5}
    for sampler in own.values():  # the other knobs are the paper's, as in npp evaluate
        assert {**sampler.to_dict(), "cfg_scale": 2.0} == PAPER_SAMPLER.to_dict()
    xl, b, recipe = (backend.load(name) for name in ("c2i_XL_384.pt", "c2i_B_384.pt", "recipe"))
    assert advanced_label(xl, b) == (f"{XL_LABEL}; c2i_B_384.pt's own: CFG 2 from LlamaGen's FID protocol for its "
                                     f"released GPT-B at 384 px)")
    assert advanced_label(recipe, None) == ("Advanced (defaults of recipe: CFG 1.5 from the run's recipe "
                                            "(config.json: eval_sampler))")  # the server's folders left out
    assert advanced_label(None, None) == "Advanced (the paper's defaults)"


def test_the_advanced_boxes_follow_the_model_just_chosen(backend):
    from app.demo import build_demo
    from app.handlers import make_describe

    checkpoints = Backend([s for s in backend.sources.values() if s.kind == "checkpoint"],
                          tokenizer=backend.tokenizer, device="cpu")
    demo = build_demo(checkpoints)  # the default pair: the two checkpoints, XL on the left
    props = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"]}
    assert (props["left-model"]["value"], props["right-model"]["value"]) == ("c2i_XL_384.pt", "c2i_B_384.pt")
    assert props["sampler-cfg_scale"]["value"] == 1.75 and props["advanced"]["label"].startswith(XL_LABEL)

    def shown(chosen: int, left: str, right: str) -> tuple[str, float]:
        *_, label, cfg, interval, temperature, top_k, top_p = make_describe(backend, SamplerConfig, chosen)(
            left, right, "class 1")
        assert (interval["value"], temperature["value"], top_k["value"], top_p["value"]) == (-1, 1.0, 0, 1.0)
        return label["label"], cfg["value"]

    assert shown(1, "c2i_XL_384.pt", "recipe") == (
        "Advanced (defaults of recipe: CFG 1.5 from the run's recipe (config.json: eval_sampler); c2i_XL_384.pt's "
        "own: CFG 1.75 from LlamaGen's FID protocol for its released GPT-XL at 384 px)", 1.5)
    assert shown(0, "c2i_B_384.pt", "recipe")[1] == 2.0
    assert shown(0, "plain", "plain") == ("Advanced (defaults of plain: CFG 2 from the paper's sampler "
                                          "(PAPER_SAMPLER))", 2.0)


def test_the_pipeline_steps_row_by_row_through_the_same_loop():
    """Pipeline.stepped, the app's way to draw in turns: one row per advance, and at the end the codes a plain
    call draws with the same generators."""
    from npp.tokenizer import load_embedded_tokenizer

    pipe = npp.Pipeline(tiny_model(5), load_embedded_tokenizer("mnist-8x8"))
    labels_B, sampler = torch.tensor([2, 7]), SamplerConfig(cfg_scale=1.5, top_k=50)
    stepper = pipe.stepped(labels_B, sampler, generator=sample_generators(range(2), 9), warm_rows=1)
    steps = []
    while not stepper.done:
        steps.append(stepper.advance())
    stepper.close()
    assert [tokens_BT.shape[1] for tokens_BT in steps] == [pipe.grid * (row + 1) for row in range(pipe.grid)]
    codes_Bhw = pipe(labels_B, sampler, generator=sample_generators(range(2), 9), output="codes")
    assert torch.equal(steps[-1], codes_Bhw.flatten(1))  # the warm-up rows used generators of their own


# ------------------------------------------------------------------------------------------------
# In the browser
# ------------------------------------------------------------------------------------------------

@pytest.mark.heavy
def test_the_browser_shows_384px_images_the_inferred_line_and_the_models_own_cfg(zoo, tmp_path):
    """`python app/demo.py --checkpoint c2i_XL_384.pt c2i_B_384.pt --tokenizer vq16` as a user starts it."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "app/demo.py", "--runs", str(tmp_path / "none"), "--checkpoint",
               str(zoo / "c2i_XL_384.pt"), str(zoo / "c2i_B_384.pt"), "--tokenizer", str(zoo / "vq16"),
               "--port", str(port), "--device", "cpu"]
    with open(tmp_path / "server.err", "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            url = wait_for(f"http://127.0.0.1:{port}/", process, tmp_path / "server.err")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    browse(browser.new_page(viewport={"width": 1400, "height": 1100}), url)
                finally:
                    browser.close()
        finally:
            process.terminate()
            process.wait(timeout=30)


def wait_for(url: str, process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return url
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer within 120 s:\n{log.read_text()}")


def browse(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#left-info p", timeout=60_000)
    assert f"Inferred: {XL_LINE}" in page.inner_text("#left-info")
    assert "384×384 px" in page.inner_text("#left-info")
    advanced = page.locator("#advanced")
    assert XL_LABEL in advanced.inner_text()
    advanced.get_by_text("Advanced").first.click()  # open it: its boxes hold the XL's CFG, not the paper's 2
    assert page.input_value("#sampler-cfg_scale input") == "1.75"
    generate_and_wait(page, 1, 240_000)
    for side in ("left", "right"):
        image = page.locator(f"#{side}-gallery .thumbnail-item img").first
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [384, 384]

    page.click("#left-model input")  # the B on both sides now: the boxes follow it
    page.get_by_role("option", name="c2i_B_384.pt").click()
    page.wait_for_function("document.querySelector('#advanced').innerText.includes('defaults of c2i_B_384.pt')",
                           timeout=60_000)
    assert page.input_value("#sampler-cfg_scale input") == "2"

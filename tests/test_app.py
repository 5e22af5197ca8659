"""The Gradio app: its backend in-process, then app/demo.py served for real to a browser and to gradio_client.

The runs are made here the way the trainer exports them (tiny debug GPTs on the shipped mnist-8x8
tokenizer), named like the quickstart pair so that the app's defaults pick them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import npp
from app.backend import Backend, LoadError, parse_class, shared_classes
from app.sources import default_pair, find_sources
from app.turns import SAMPLER_THREAD, Settings, stream
from npp.config import PAPER_SAMPLER, SamplerConfig
from npp.errors import check
from npp.sampling import sample_generators
from npp.files import ASSETS
from npp.flags import field_docs
from npp.tokenizer import load_embedded_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
GRID = 8


def tiny_model(seed: int) -> npp.GPT:
    torch.manual_seed(seed)
    model = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=256, num_classes=10, grid=GRID))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the head starts at zero: give it real logits
    return model


def llamagen_pt(model: npp.GPT) -> dict:
    """A .pt as LlamaGen's train script writes it: the weights and the arguments, whose image size (32 px, the
    mnist-8x8 tokenizer's 4-px codes: GRID) is what tells npp the model's grid."""
    return {"model": model.state_dict(), "args": argparse.Namespace(gpt_model="debug", image_size=32, downsample_size=4)}


def make_run(runs: Path, name: str, patch_sizes: list[int], fid: float, seed: int) -> Path:
    """A run directory as the trainer leaves it: export/ with its tokenizer reference, metrics.jsonl."""
    run = runs / name
    tiny_model(seed).save_pretrained(run / "export")
    vq = load_embedded_tokenizer("mnist-8x8")
    reference = {"data": "mnist-8x8", "fingerprint": vq.fingerprint(), "config": vq.config.to_dict(),
                 "path": None, "source": None}
    (run / "export" / "tokenizer.json").write_text(json.dumps(reference))
    rows = [{"step": step, "stage": int(p == 1 and 2 in patch_sizes), "patch_size": p, "loss": 5.0 - 0.4 * step,
             "lr": 1e-3, "tokens_seen": 64 * 32 * step, "flops_seen": 2.5e11 * step / p ** 2,
             "imgs_per_s": 100.0, "time": 1.0 * step} for step, p in enumerate(patch_sizes, start=1)]
    rows.append({"step": len(patch_sizes), "stage": rows[-1]["stage"], "patch_size": 1, "eval": True, "fid": fid,
                 "is": 2.0, "tokens_seen": rows[-1]["tokens_seen"], "flops_seen": rows[-1]["flops_seen"]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """quickstart-ntp, quickstart-npp (patch size 2, then 1) and a broken export (truncated weights)."""
    runs = tmp_path_factory.mktemp("app") / "runs"
    make_run(runs, "quickstart-ntp", [1, 1, 1, 1], fid=90.0, seed=1)
    make_run(runs, "quickstart-npp", [2, 2, 1, 1], fid=60.0, seed=2)
    broken = runs / "broken"
    shutil.copytree(runs / "quickstart-ntp", broken)
    weights = broken / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return runs


# ------------------------------------------------------------------------------------------------
# The backend, in-process
# ------------------------------------------------------------------------------------------------

def test_stream_takes_turns_row_by_row_and_draws_what_generate_draws(runs_dir):
    backend = Backend(find_sources(runs_dir), device="cpu")
    left, right = backend.load("quickstart-ntp"), backend.load("quickstart-npp")
    settings = Settings(class_index=7, num_images=3, seed=11).validated()
    assert settings.sampler == PAPER_SAMPLER
    down, rounds = left.pipe.vq.config.downsample, []
    for frames in stream([left, right], settings):
        rounds.append([(f.rows, f.done) for f in frames])
        for f in frames:  # the rows drawn so far show; those below the frontier are still black
            assert f.images_BHW3[:, :f.rows * down].max() > 0 and f.images_BHW3[:, f.rows * down:].max(initial=0) == 0
    assert rounds == [[(r, r == GRID)] * 2 for r in range(1, GRID + 1)]
    for side, frame in zip([left, right], frames):
        tokens_BL = npp.generate(side.pipe.model, torch.full((3,), 7), cfg_scale=2.0,
                                 generator=sample_generators(range(3), 11))
        np.testing.assert_array_equal(frame.images_BHW3, side.pipe.decode_rows(tokens_BL))
        stats = frame.stats(settings)
        assert "wall time" in stats and "tokens/s" in stats and "n/a on CPU" in stats and "FLOPs" in stats


def test_a_cancelled_stream_stops_its_workers(runs_dir):
    backend = Backend(find_sources(runs_dir), device="cpu")
    frames = stream([backend.load("quickstart-ntp")], Settings(class_index=1, num_images=1).validated())
    assert next(frames)[0].rows == 1 and SAMPLER_THREAD in {t.name for t in threading.enumerate()}
    frames.close()
    assert SAMPLER_THREAD not in {t.name for t in threading.enumerate()}


def test_sources_defaults_classes_and_settings(runs_dir, tmp_path):
    sources = find_sources(runs_dir)
    assert [s.name for s in sources] == ["broken", "quickstart-npp", "quickstart-ntp"]
    backend = Backend(sources, device="cpu")
    assert default_pair(sources, backend.loads) == ("quickstart-ntp", "quickstart-npp")
    renamed = tmp_path / "runs"
    for name, new in [("quickstart-ntp", "b-plain"), ("quickstart-npp", "a-patches")]:
        shutil.copytree(runs_dir / name, renamed / new)
    assert default_pair(find_sources(renamed), lambda name: True) == ("b-plain", "a-patches")  # from the metrics

    with pytest.raises(LoadError, match="could not load broken"):
        backend.load("broken")
    names = shared_classes([backend.load("quickstart-ntp")])
    assert names[7] == "7 – seven"
    assert [parse_class(v, names) for v in ("7 – seven", "7", 7, "class 7", "Seven")] == [7] * 5
    with pytest.raises(ValueError, match="not one of the 10 classes"):
        parse_class("12", names)
    with pytest.raises(ValueError, match="num_images=17: .*; seed=-1: "):
        Settings(class_index=0, num_images=17, seed=-1).validated()
    assert Settings(class_index=3.0, num_images=2.0).validated().num_images == 2


def test_a_llamagen_checkpoint_loads_with_its_tokenizer(tmp_path):
    torch.save(llamagen_pt(tiny_model(3)), tmp_path / "c2i.pt")
    sources = find_sources(None, [tmp_path / "c2i.pt"])
    with pytest.raises(LoadError, match="needs its tokenizer: start the app with --tokenizer"):
        Backend(sources, device="cpu").load("c2i.pt")
    loaded = Backend(sources, tokenizer=ASSETS / "mnist-8x8", device="cpu").load("c2i.pt")
    assert loaded.pipe.grid == GRID and loaded.train_flops is None  # grid from the stored args: 32 px / 4
    assert loaded.class_names[3] == "class 3" and "FLOPs unknown" in loaded.describe()

    other_codes = npp.GPT(npp.ModelConfig.preset("debug", vocab_size=64, num_classes=10, grid=GRID))
    torch.save(llamagen_pt(other_codes), tmp_path / "c2i-64.pt")
    backend = Backend(find_sources(None, [tmp_path / "c2i-64.pt"]), tokenizer=ASSETS / "mnist-8x8", device="cpu")
    with pytest.raises(LoadError, match="has 256 codes but the model predicts 64: pass the tokenizer"):
        backend.load("c2i-64.pt")


def test_the_default_pair_skips_models_that_do_not_load(runs_dir, tmp_path):
    from app.demo import build_demo

    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "quickstart-ntp", runs / "plain")
    shutil.copytree(runs_dir / "quickstart-npp", runs / "patches")
    for name in ("quickstart-ntp", "quickstart-npp"):  # first in line, and their exports are damaged
        shutil.copytree(runs_dir / "broken", runs / name)
    backend = Backend(find_sources(runs), device="cpu")
    assert default_pair(list(backend.sources.values()), backend.loads) == ("plain", "patches")
    chosen = {c["props"]["elem_id"]: c["props"]["value"] for c in build_demo(backend).config["components"]
              if c["props"].get("elem_id") in ("left-model", "right-model")}
    assert chosen == {"left-model": "plain", "right-model": "patches"}

    shutil.rmtree(runs / "plain")  # one model loads: it stands on both sides
    assert default_pair(find_sources(runs), Backend(find_sources(runs), device="cpu").loads) == ("patches",) * 2


def test_load_errors_name_the_model_and_leave_the_paths_to_the_console(tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        torch.save(llamagen_pt(tiny_model(3)), tmp_path / folder / "c2i.pt")
    sources = find_sources(None, [tmp_path / "a" / "c2i.pt", tmp_path / "b" / "c2i.pt"])
    assert [s.name for s in sources] == ["c2i.pt", "b/c2i.pt"]  # told apart without the server's folders
    backend = Backend(sources, tokenizer=tmp_path / "tokenizers" / "vq.pt", device="cpu")
    for _ in range(2):
        with pytest.raises(LoadError) as raised:
            backend.load("b/c2i.pt")
        message = str(raised.value)
        assert message.startswith("could not load b/c2i.pt: ") and "vq.pt" in message and str(tmp_path) not in message
    console = capsys.readouterr().err  # the full error, once however often it happens
    assert console.count(f"could not load b/c2i.pt ({tmp_path / 'b' / 'c2i.pt'})") == 1
    assert str(tmp_path / "tokenizers" / "vq.pt") in console


@dataclasses.dataclass(frozen=True)
class MinPSampler(SamplerConfig):
    """A sampler with one knob more, as a researcher would add one."""

    min_p: float = 0.0
    """Min-p: drop tokens less likely than this fraction of the most likely one (0: off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.min_p <= 1.0, f"MinPSampler.min_p={self.min_p!r}: use a value in [0, 1]")


def test_the_advanced_widgets_are_the_sampler_fields_and_a_new_field_gets_one(runs_dir):
    import gradio as gr

    from app.demo import build_demo

    demo = build_demo(Backend(find_sources(runs_dir), device="cpu"), sampler=MinPSampler)
    boxes = {c["props"]["elem_id"].removeprefix("sampler-"): c["props"] for c in demo.config["components"]
             if c["type"] == "number" and (c["props"].get("elem_id") or "").startswith("sampler-")}
    assert list(boxes) == [f.name for f in dataclasses.fields(MinPSampler)]
    docs = field_docs(MinPSampler)
    assert {name: box["label"] for name, box in boxes.items()} == docs
    assert {name: box["value"] for name, box in boxes.items()} == {**PAPER_SAMPLER.to_dict(), "min_p": 0.0}
    assert [name for name, box in boxes.items() if box.get("precision") == 0] == ["cfg_interval", "top_k"]

    # The handler builds the sampler from the boxes by field name: the new knob reaches MinPSampler's check.
    handler = next(f for f in demo.fns.values() if f.api_name == "generate")
    values = {block.elem_id: block.value for block in handler.inputs}
    with pytest.raises(gr.Error, match=r"MinPSampler.min_p=2\b"):
        next(handler.fn(*{**values, "sampler-min_p": 2}.values()))
    with pytest.raises(gr.Error, match=r"SamplerConfig.top_p=0\b"):
        next(handler.fn(*{**values, "sampler-top_p": 0}.values()))
    left, right, *_ = list(handler.fn(*{**values, "num-images": 1}.values()))[-1]
    assert len(left) == len(right) == 1


# ------------------------------------------------------------------------------------------------
# The app, served
# ------------------------------------------------------------------------------------------------

def test_the_command_line_says_what_is_missing(tmp_path):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.run([sys.executable, "app/demo.py", "--runs", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no exported runs under" in run.stderr and "make quickstart" in run.stderr
    assert "Traceback" not in run.stderr


def generate_and_wait(page, num_images: int, timeout_ms: int) -> None:
    """Ask the page for `num_images` per side and wait until both sides report their wall time."""
    page.fill("#num-images input[type=number]", str(num_images))
    page.press("#num-images input[type=number]", "Enter")
    page.click("#generate")
    page.wait_for_function("['#left-stats', '#right-stats'].every("
                           "s => document.querySelector(s).innerText.includes('wall time'))", timeout=timeout_ms)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs_dir, tmp_path_factory):
    """`python app/demo.py --runs RUNS --checkpoint c2i.pt junk.pt --tokenizer mnist-8x8 --port PORT` as a user
    starts it (no --host); stdout goes to server.log, stderr to server.err."""
    folder = tmp_path_factory.mktemp("server")
    torch.save(llamagen_pt(tiny_model(3)), folder / "c2i.pt")
    (folder / "junk.pt").write_text("<html>404 Not Found</html>")  # a download that went wrong
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(folder / "gradio"),
           "OMP_NUM_THREADS": "1"}
    log, err = open(folder / "server.log", "w"), open(folder / "server.err", "w")
    command = [sys.executable, "app/demo.py", "--runs", str(runs_dir), "--checkpoint", str(folder / "c2i.pt"),
               str(folder / "junk.pt"), "--tokenizer", str(ASSETS / "mnist-8x8"), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=err)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"the app exited with {process.returncode}:\n{(folder / 'server.err').read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the app did not answer within 120 s:\n{(folder / 'server.err').read_text()}")
        time.sleep(0.5)
    yield url, port, process, folder
    process.terminate()
    process.wait(timeout=30)
    log.close()
    err.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    url, _, _, folder = server
    return Client(url, verbose=False, download_files=str(folder / "downloads"))


def request(*, left="quickstart-ntp", right="quickstart-npp", cls="3 – three", n=2, seed=5, randomize=False,
            **sampler) -> tuple:
    """The /generate arguments: the sampler's fields follow the other inputs, in field order."""
    return left, right, cls, n, seed, randomize, *{**PAPER_SAMPLER.to_dict(), **sampler}.values()


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(item["image"]).convert("RGB"))


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on port, from /proc/net/tcp{,6} (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


def test_the_app_binds_loopback_only(server):
    url, port, process, folder = server
    assert process.poll() is None
    assert listening_addresses(port) == {"127.0.0.1"}
    assert f"http://127.0.0.1:{port}" in (folder / "server.log").read_text()


def test_start_up_warns_of_each_checkpoint_that_cannot_be_loaded(server):
    _, _, process, folder = server
    warnings = [line for line in (folder / "server.err").read_text().splitlines()
                if line.startswith("app/demo.py: warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("app/demo.py: warning: junk.pt cannot be loaded: /")
    assert process.poll() is None


def test_uploads_are_refused_beyond_a_small_limit(server):
    import httpx

    upload = server[0] + "gradio_api/upload"
    assert httpx.post(upload, files={"files": ("small.bin", b"0" * 1000)}).status_code == 200
    refused = httpx.post(upload, files={"files": ("large.bin", b"0" * 2_000_000)})
    assert refused.status_code == 413


def test_browser_generates_both_galleries(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run `make test`, which installs it"
    url, *_ = server
    shots = [tmp_path / "app.png"]
    if os.environ.get("NPP_ARTIFACTS"):
        shots.append(Path(os.environ["NPP_ARTIFACTS"]) / "app.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.wait_for_selector("#left-info p", timeout=60_000)
            assert "quickstart-ntp" in page.inner_text("#left-info")
            assert "quickstart-npp" in page.inner_text("#right-info")
            page.click("#class input")
            page.keyboard.press("Control+A")
            page.keyboard.type("sev")  # the dropdown is searchable
            page.get_by_role("option", name="7 – seven").click()
            generate_and_wait(page, 4, 60_000)
            for side in ("left", "right"):
                assert page.locator(f"#{side}-gallery .thumbnail-item img").count() == 4
                stats = page.inner_text(f"#{side}-stats")
                for expected in ("wall time", "tokens/s", "parameters", "FLOPs", "peak memory"):
                    assert expected in stats, stats
                assert "Traceback" not in stats
            assert "7 – seven" in page.inner_text("#status") and "seed 0" in page.inner_text("#status")
            for shot in shots:
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)

            page.get_by_role("tab", name="Training").click()  # loss and FID of both runs against FLOPs
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= 4",
                                   timeout=30_000)
            assert page.locator(".js-plotly-plot").count() == 2
            for shot in shots:
                page.screenshot(path=str(shot.with_name("app-training.png")), full_page=True)

            page.click("#right-model input")  # a broken export: a message in its panel, not a traceback
            page.get_by_role("option", name="broken").click()
            page.wait_for_function("document.querySelector('#right-info').innerText.includes('could not load')",
                                   timeout=30_000)
            assert "Traceback" not in page.inner_text("#right-info")
        finally:
            browser.close()
    assert shots[0].stat().st_size > 10_000


def test_api_streams_both_sides_reproducibly(client):
    job = client.submit(*request(n=2, seed=5), api_name="/generate")
    left, right, left_stats, right_stats, seed, status = job.result(timeout=120)
    assert len(left) == len(right) == 2 and seed == 5 and "seed 5" in status
    assert {item["caption"] for item in left + right} == {"3 – three"}
    assert "wall time" in left_stats and "tokens/s" in right_stats and "FLOPs" in right_stats
    updates = job.outputs()
    assert len(updates) == GRID  # one update per token row, both sides in each
    first = pixels(updates[0][0][0])
    assert first[:4].max() > 0 and first[4:].max() == 0  # one row of tokens drawn, the rest black
    again = client.predict(*request(n=2, seed=5), api_name="/generate")
    for before, after in zip(left + right, again[0] + again[1]):
        np.testing.assert_array_equal(pixels(before), pixels(after))
    random_seed = client.predict(*request(n=1, randomize=True), api_name="/generate")[4]
    assert isinstance(random_seed, (int, float)) and 0 <= random_seed < 2**31


@pytest.mark.parametrize("bad, message", [
    (dict(cls="12"), "not one of the 10 classes"),
    (dict(n=17), "greater than maximum value 16"),
    (dict(temperature=-0.5), r"temperature=-0.5: use a finite value ≥ 0"),
    (dict(top_p=0), "top_p=0"),
])
def test_api_rejects_bad_inputs_with_a_message(client, server, bad, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message) as raised:
        client.predict(*request(**bad), api_name="/generate")
    assert "Traceback" not in str(raised.value)
    assert server[2].poll() is None
    assert len(client.predict(*request(n=1), api_name="/generate")[0]) == 1


def test_concurrent_requests_are_all_answered(client):
    jobs = [client.submit(*request(n=1 + i % 2, seed=100 + i), api_name="/generate") for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: job.result(timeout=180), jobs))
    assert [len(r[0]) for r in results] == [1, 2, 1, 2] and [r[4] for r in results] == [100, 101, 102, 103]


def test_a_broken_export_is_a_message_and_the_other_side_still_draws(client):
    left, right, left_stats, right_stats, *_ = client.predict(*request(right="broken", n=2), api_name="/generate")
    assert len(left) == 2 and right == []
    assert "could not load broken" in right_stats and "Traceback" not in right_stats
    assert "wall time" in left_stats
    described = client.predict("broken", "quickstart-npp", "3", api_name="/describe")
    assert "could not load broken" in described[0] and "quickstart-npp" in described[1]


def test_load_errors_show_no_server_path_and_still_say_the_fix(client, server, runs_dir):
    from gradio_client.exceptions import AppError

    *_, right_stats, _, _ = client.predict(*request(right="broken", n=1), api_name="/generate")
    described = client.predict("broken", "junk.pt", "3", api_name="/describe")
    with pytest.raises(AppError) as raised:
        client.predict(*request(left="broken", right="junk.pt", n=1), api_name="/generate")
    for message in (right_stats, described[0], described[1], str(raised.value)):
        assert str(runs_dir) not in message and str(server[3]) not in message and "/tmp/" not in message, message
    assert "could not load broken: broken/export/model.safetensors" in right_stats  # what is wrong
    assert "npp export" in right_stats  # and how to mend it
    assert "could not load junk.pt: junk.pt" in described[1]
    console = (server[3] / "server.err").read_text()  # the full error, once however often it happens
    assert console.count(f"could not load broken ({runs_dir / 'broken'})") == 1


def test_the_speed_shown_leaves_out_the_first_row_that_pays_the_warm_ups():
    from app.turns import Frame

    frame = Frame(side=None, images_BHW3=np.zeros((1, 1, 1, 3), np.uint8))
    # First row: 16 tokens in 1 s (warm-up); then 48 tokens in 0.5 s: 96 tokens/s, not 64 / 1.5 = 43.
    frame.first_row_s, frame.first_row_tokens, frame.sampling_s, frame.tokens = 1.0, 16, 1.5, 64
    assert frame.tokens_per_s == 96.0
    frame.first_row_s, frame.first_row_tokens, frame.sampling_s, frame.tokens = 0.5, 16, 0.5, 16  # one row only
    assert frame.tokens_per_s == 32.0

"""`fairage serve`: the real server on 127.0.0.1 answers health, predictions, the card and every bad upload.

A uvicorn server runs in a thread on a socket the test has already bound and put in listening
state, so clients can connect at once (the kernel queues them until the server accepts).
"""

from __future__ import annotations

import io
import re
import socket
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import GRACE_HOPPER, group_photo, jpeg_bytes
from PIL import Image

from fairage.inference.predictor import AgePredictor
from fairage.serve import ServeLimits, create_app

#: three copies of the one-face photo side by side: three faces, one per 512 px tile
TILES = [(0, 0), (512, 0), (1024, 0)]


class LiveServer:
    """A uvicorn server for ``app`` in a thread, listening on 127.0.0.1 at a free port."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return AgePredictor(tiny_run)


@pytest.fixture(scope="module")
def server(predictor):
    live = LiveServer(create_app(predictor))
    yield live
    live.close()


@pytest.fixture(scope="module")
def small_limits_server(predictor):
    """Same model, tight limits: 200 kB uploads, 1 megapixel."""
    live = LiveServer(create_app(predictor, limits=ServeLimits(max_upload_bytes=200_000, max_pixels=1_000_000)))
    yield live
    live.close()


@pytest.fixture(scope="module")
def group_jpeg() -> bytes:
    return jpeg_bytes(group_photo(TILES, (1536, 600)))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels, with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_health(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_predict_finds_each_pasted_face(server, predictor, group_jpeg):
    r = httpx.post(f"{server.url}/predict", files={"file": ("group.jpg", group_jpeg, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 1536, "height": 600}
    assert body["model"] == "M2"
    # one face per tile: the box centre lies where the face sits in the single photo, shifted by the tile offset
    single = predictor.predict_image(GRACE_HOPPER.read_bytes()).faces
    assert len(single) == 1
    sx, sy, sw, sh = single[0].box
    centre = np.array([sx + sw / 2, sy + sh / 2])
    found = sorted(body["faces"], key=lambda f: f["box"][0])
    assert len(found) == len(TILES)
    for face, (ox, oy) in zip(found, TILES):
        x, y, w, h = face["box"]
        assert np.abs(np.array([x + w / 2, y + h / 2]) - (centre + [ox, oy])).max() < 0.25 * max(sw, sh)
        assert 0.0 <= face["age"] <= 100.0  # sigmoid output: years in [0, 100]
    # over HTTP exactly what the library gives for the same bytes
    direct = predictor.predict_image(group_jpeg)
    assert sorted((tuple(f["box"]), round(f["age"], 4)) for f in body["faces"]) == sorted(
        (tuple(f.box), round(f.age, 4)) for f in direct.faces
    )


def test_predict_raw_body_equals_multipart(server, group_jpeg):
    multipart = httpx.post(f"{server.url}/predict", files={"file": ("g.jpg", group_jpeg)}, timeout=60).json()
    raw = httpx.post(
        f"{server.url}/predict", content=group_jpeg, headers={"content-type": "image/jpeg"}, timeout=60
    ).json()
    octet = httpx.post(
        f"{server.url}/predict", content=group_jpeg, headers={"content-type": "application/octet-stream"}, timeout=60
    ).json()
    assert raw == multipart == octet


def test_exif_orientation_is_applied(server):
    photo = Image.open(GRACE_HOPPER)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to view"
    sideways = photo.transpose(Image.Transpose.ROTATE_90)
    r = httpx.post(
        f"{server.url}/predict",
        content=encoded(sideways, "JPEG", exif=exif.tobytes(), quality=95),
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert r.status_code == 200
    assert r.json()["image"] == {"width": 512, "height": 600}  # upright again
    assert len(r.json()["faces"]) == 1


def test_faces_only_treats_the_upload_as_one_crop(server):
    r = httpx.post(
        f"{server.url}/predict?faces_only=true",
        content=GRACE_HOPPER.read_bytes(),
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert r.status_code == 200
    assert [f["box"] for f in r.json()["faces"]] == [[0, 0, 512, 600]]


def test_sixteen_concurrent_requests_are_all_served(server, group_jpeg):
    def post(_):
        with httpx.Client(timeout=120) as client:
            return client.post(f"{server.url}/predict", files={"file": ("g.jpg", group_jpeg, "image/jpeg")})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    first = responses[0].json()
    for r in responses:
        got = r.json()
        assert {k: v for k, v in got.items() if k != "faces"} == {k: v for k, v in first.items() if k != "faces"}
        assert [f["box"] for f in got["faces"]] == [f["box"] for f in first["faces"]]
        # the requests' crops share forward passes of different sizes, and float32 convolutions sum in
        # another order for another batch size (on AVX-512 CPUs about 1e-5 years apart)
        for key in ("age", "age_lo", "age_hi"):
            assert [f[key] for f in got["faces"]] == pytest.approx([f[key] for f in first["faces"]], abs=1e-4)
    assert len(responses[0].json()["faces"]) == len(TILES)


@pytest.mark.parametrize(
    "name, content, content_type, status",
    [
        ("empty body", b"", "image/jpeg", 400),
        ("text declared as text", b"hello, world", "text/plain", 415),
        ("json", b'{"image": "x"}', "application/json", 415),
        ("text declared as an image", b"hello, world" * 100, "image/png", 415),
        ("random bytes", bytes(range(256)) * 40, "application/octet-stream", 415),
        ("truncated jpeg", GRACE_HOPPER.read_bytes()[:20_000], "image/jpeg", 400),
        ("decompression bomb: 50000 x 50000 header", png_header_only(50_000, 50_000), "image/png", 413),
        ("just over 40 megapixels", png_header_only(8000, 5001), "image/png", 413),
        ("png header with no pixel data", png_header_only(64, 64)[:-12], "image/png", 400),
    ],
)
def test_bad_raw_uploads_get_a_clear_4xx(server, name, content, content_type, status):
    r = httpx.post(f"{server.url}/predict", content=content, headers={"content-type": content_type}, timeout=60)
    assert r.status_code == status, (name, r.text)
    assert r.json()["detail"]


def test_bad_multipart_uploads_get_a_clear_4xx(server):
    url = f"{server.url}/predict"
    no_file = httpx.post(url, files={"photo": ("a.jpg", GRACE_HOPPER.read_bytes(), "image/jpeg")})
    assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]
    text_field = httpx.post(url, data={"file": "not a file"}, files={"other": ("x.txt", b"x", "text/plain")})
    assert text_field.status_code == 400
    not_image = httpx.post(url, files={"file": ("notes.txt", b"just some text", "text/plain")})
    assert not_image.status_code == 415
    broken = httpx.post(
        url,
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert broken.status_code == 400
    form = httpx.post(url, data={"a": "b"})  # application/x-www-form-urlencoded
    assert form.status_code == 415


def test_oversized_uploads_get_413(server):
    url = f"{server.url}/predict"
    big = GRACE_HOPPER.read_bytes() + b"\0" * (10 * 1024 * 1024)  # a real JPEG padded past 10 MiB
    raw = httpx.post(url, content=big, headers={"content-type": "image/jpeg"}, timeout=60)
    assert raw.status_code == 413
    multipart = httpx.post(url, files={"file": ("big.jpg", big, "image/jpeg")}, timeout=60)
    assert multipart.status_code == 413

    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "image/jpeg"}, timeout=60)
    assert chunked.status_code == 413
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_configured_limits(small_limits_server):
    url = f"{small_limits_server.url}/predict"
    over_bytes = httpx.post(
        url, content=GRACE_HOPPER.read_bytes() + b"\0" * 200_000, headers={"content-type": "image/jpeg"}
    )
    assert over_bytes.status_code == 413
    over_pixels = httpx.post(
        url, content=encoded(Image.new("L", (1001, 1000)), "PNG"), headers={"content-type": "image/png"}
    )
    assert over_pixels.status_code == 413 and "1001 x 1000" in over_pixels.json()["detail"]
    at_limit = httpx.post(
        url, content=encoded(Image.new("L", (1000, 1000)), "PNG"), headers={"content-type": "image/png"}, timeout=60
    )
    assert at_limit.status_code == 200 and at_limit.json()["faces"] == []


@pytest.mark.parametrize(
    "mode, fmt, size",
    [
        ("1", "PNG", (1, 1)),
        ("L", "PNG", (40, 30)),
        ("LA", "PNG", (40, 30)),
        ("RGBA", "PNG", (40, 30)),
        ("P", "GIF", (40, 30)),
        ("I;16", "PNG", (40, 30)),
        ("CMYK", "JPEG", (40, 30)),
        ("RGB", "WEBP", (40, 30)),
        ("RGB", "BMP", (3000, 2)),
        ("RGB", "TIFF", (2, 3000)),
    ],
)
def test_odd_but_valid_images_are_answered(server, mode, fmt, size):
    image = Image.new(mode, size)
    r = httpx.post(
        f"{server.url}/predict", content=encoded(image, fmt), headers={"content-type": "image/*"}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": size[0], "height": size[1]}


class BlockingPredictor:
    """The real predictor, held at the start of each prediction until the test releases it."""

    def __init__(self, predictor):
        self.loaded = predictor.loaded
        self.predictor = predictor
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict_image(self, image, faces_only=False):
        self.entered.set()
        assert self.release.wait(timeout=60)
        return self.predictor.predict_image(image, faces_only=faces_only)


def test_inference_runs_off_the_event_loop_and_the_queue_is_bounded(predictor):
    blocking = BlockingPredictor(predictor)
    live = LiveServer(create_app(blocking, limits=ServeLimits(max_pending=1)))
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                httpx.post,
                f"{live.url}/predict",
                content=GRACE_HOPPER.read_bytes(),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            )
            assert blocking.entered.wait(timeout=60)
            # the model is busy: the server still answers, and refuses a second upload instead of queueing it
            assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
            busy = httpx.post(
                f"{live.url}/predict", content=GRACE_HOPPER.read_bytes(), headers={"content-type": "image/jpeg"}
            )
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            blocking.release.set()
            assert first.result().status_code == 200
        assert (
            httpx.post(
                f"{live.url}/predict",
                content=GRACE_HOPPER.read_bytes(),
                headers={"content-type": "image/jpeg"},
                timeout=60,
            ).status_code
            == 200
        )
    finally:
        blocking.release.set()
        live.close()


def test_server_still_answers_after_every_bad_upload(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_model_card_endpoints(server, tiny_run):
    card = httpx.get(f"{server.url}/model").json()
    assert card["name"] == "M2" and card["kind"] == "run"
    assert set(card["evaluation"]["bias"]) == {
        "age",
        "gender",
        "ethnicity",
        "expression",
        "age*ethnicity",
        "gender*ethnicity",
    }
    assert card["data"]["synthetic"] is True
    md = httpx.get(f"{server.url}/model.md")
    assert md.headers["content-type"].startswith("text/markdown")
    assert md.text.startswith("# Model card: M2")
    page = httpx.get(f"{server.url}/")
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "http://" not in page.text and "https://" not in page.text  # self-contained


def test_cli_serve_runs_the_real_command(tiny_run, group_jpeg):
    """`fairage serve RUN --port 0` in its own process: it prints where it listens, then answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairage.cli", "serve", str(tiny_run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        for line in proc.stdout:  # uvicorn logs its address once the socket listens
            if "Uvicorn running on" in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
                break
        assert url, "the server exited before listening"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        r = httpx.post(f"{url}/predict", content=group_jpeg, headers={"content-type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["faces"]) == len(TILES)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_bad_model_exits_2(tmp_path):
    from typer.testing import CliRunner

    from fairage.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "missing" in result.output


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).is_file()), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); cannot test the page")
def test_web_page_in_headless_chromium(server, group_jpeg, tmp_path):
    """Upload a photo through the page; read the ages, the boxes on the canvas and the card back from it."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    expected = httpx.post(
        f"{server.url}/predict", content=group_jpeg, headers={"content-type": "image/jpeg"}, timeout=60
    ).json()
    card = httpx.get(f"{server.url}/model").json()
    photo = tmp_path / "group.jpg"
    photo.write_bytes(group_jpeg)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server.url}/")
            page.wait_for_selector("#card-scores")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("body[data-result=ready]", timeout=60_000)
            ages = [float(t) for t in page.locator("#faces td.age").all_inner_texts()]
            assert ages == [round(f["age"], 1) for f in expected["faces"]]
            # a regression head gives no spread: no spread column; the run is calibrated: each face's interval
            assert "spread" not in expected["faces"][0] and page.locator("#faces td.spread").count() == 0
            assert not page.is_visible("#spread-head")
            assert page.locator("#faces td.interval").all_inner_texts() == [
                f"{f['age_lo']:.1f} to {f['age_hi']:.1f}" for f in expected["faces"]
            ]
            assert page.inner_text("#status").startswith(f"group.jpg: {len(TILES)} faces")
            # the card beside it: test MAE and the four biases with their intervals, one table per attribute
            ev = card["evaluation"]
            scores = page.locator("#card-scores tbody tr").all_inner_texts()
            assert scores[0].split("\t")[:3] == [
                "MAE",
                f"{ev['mae']['value']:.2f}",
                f"[{ev['mae']['ci'][0]:.2f}, {ev['mae']['ci'][1]:.2f}]",
            ]
            assert [s.split("\t")[0] for s in scores[1:]] == [f"{a} bias" for a in ev["bias"]]
            # each bias's permutation p in the fourth column
            assert [float(s.split("\t")[3]) for s in scores[1:]] == [
                pytest.approx(b["p"], rel=5e-3) for b in ev["bias"].values()
            ]
            for attr, groups in ev["groups"].items():
                # an intersection's table id has its "*" made a "-" (card-groups-age-ethnicity)
                rows = page.locator(f"#card-groups-{re.sub(r'[^A-Za-z0-9_-]', '-', attr)} tbody tr").all_inner_texts()
                assert [r.split("\t")[:3] for r in rows] == [
                    [g["group"], str(g["n"]), f"{g['mae']:.2f}"] for g in groups
                ]
            assert page.is_visible("#synthetic")
            # each box is drawn where the server put it: the middle of its top edge is the box colour
            canvas = page.evaluate(
                "() => [document.querySelector('#photo').width, document.querySelector('#photo').height]"
            )
            assert canvas == [1536, 600]
            for face in expected["faces"]:
                x, y, w, _h = face["box"]
                edge = page.evaluate(
                    f"() => Array.from(document.querySelector('#photo').getContext('2d')"
                    f".getImageData({x + w // 2}, {y}, 1, 1).data)"
                )
                assert edge[0] > 200 and edge[1] > 160 and edge[2] < 90, edge  # yellow
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def dex_model_folder(tmp_path_factory) -> Path:
    """A model folder with a DEX head (random weights, 32 px) and a conformal calibration:
    its faces carry a spread and an interval."""
    import pandas as pd
    import torch
    from safetensors.torch import save_file

    from fairage.config.files import dump_config
    from fairage.config.presets import load_preset
    from fairage.fairness.conformal import CONFORMAL, fit_calibration, write_calibration
    from fairage.models.regressor import AgeRegressor

    folder = tmp_path_factory.mktemp("dex-model")
    cfg = load_preset("M1", "tiny", ["model.output=dex"])
    torch.manual_seed(0)
    model = AgeRegressor(cfg.model)
    (folder / "config.yaml").write_text(dump_config(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    rng = np.random.default_rng(0)
    ages = rng.uniform(5, 80, 200)
    cal, _ = fit_calibration(pd.DataFrame({"age": ages, "prediction": ages + rng.normal(0, 4, 200)}), alpha=0.1)
    write_calibration(folder / CONFORMAL, cal)
    return folder


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); cannot test the page")
def test_web_page_shows_each_faces_spread_and_interval(dex_model_folder, group_jpeg, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    live = LiveServer(create_app(AgePredictor(dex_model_folder, device="cpu")))
    try:
        expected = httpx.post(
            f"{live.url}/predict", content=group_jpeg, headers={"content-type": "image/jpeg"}, timeout=60
        ).json()
        assert len(expected["faces"]) == len(TILES) and expected["interval_level"] == pytest.approx(0.9)
        assert all(f["spread"] > 0 and f["age_lo"] <= f["age"] <= f["age_hi"] for f in expected["faces"])
        photo = tmp_path / "group.jpg"
        photo.write_bytes(group_jpeg)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{live.url}/")
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("body[data-result=ready]", timeout=60_000)
                assert page.is_visible("#spread-head")
                assert page.inner_text("#interval-head") == "90% interval (years)"
                assert page.locator("#faces td.spread").all_inner_texts() == [
                    f"\u00b1 {f['spread']:.1f}" for f in expected["faces"]
                ]
                assert page.locator("#faces td.interval").all_inner_texts() == [
                    f"{f['age_lo']:.1f} to {f['age_hi']:.1f}" for f in expected["faces"]
                ]
                # the row's cells in order: face, age, spread, interval, box, score
                first = page.locator("#faces tbody tr").first.inner_text().split("\t")
                f0 = expected["faces"][0]
                assert first[:4] == [
                    "1",
                    f"{f0['age']:.1f}",
                    f"\u00b1 {f0['spread']:.1f}",
                    f"{f0['age_lo']:.1f} to {f0['age_hi']:.1f}",
                ]
            finally:
                browser.close()
    finally:
        live.close()

"""`fairage serve` shares forward passes between concurrent requests: answers equal the unbatched ones.

The batcher is tested alone with a forward pass whose answer is known (each crop's mean pixel),
then through the real app on uvicorn on 127.0.0.1, with events and barriers (no sleeps) to make
the requests meet in one pass.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import GRACE_HOPPER, group_photo, invoke, jpeg_bytes
from PIL import Image

from fairage.errors import ConfigError
from fairage.inference.predictor import AgePredictor
from fairage.serve import CropBatcher, ServeLimits, create_app
from fairage.serve.app import limits_from_environment, limits_to_environment

#: ages agree to this many years between a shared pass and a pass of one request's crops alone:
#: float32 convolutions sum in a different order for other batch sizes (about 1e-5 years apart)
AGE_TOLERANCE = 1e-4


@contextmanager
def served(app):
    """uvicorn serving ``app`` in a thread on a socket already listening on 127.0.0.1; yields the URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def mean_forward(calls: list[int], gate: threading.Event | None = None, entered: threading.Event | None = None):
    """A forward pass whose ages are each crop's mean pixel value and spreads twice that; records batch sizes."""

    def forward(crops: np.ndarray):
        calls.append(len(crops))
        if entered is not None:
            entered.set()
        if gate is not None:
            assert gate.wait(timeout=60)
        means = crops.reshape(len(crops), -1).mean(axis=1)
        return means, 2 * means

    return forward


def crops_of(*values: int) -> np.ndarray:
    return np.stack([np.full((4, 4, 3), v, np.uint8) for v in values])


def test_batcher_takes_whole_requests_up_to_max_batch_and_gives_each_its_rows():
    calls: list[int] = []
    gate, entered = threading.Event(), threading.Event()
    batcher = CropBatcher(mean_forward(calls, gate, entered), max_batch=6, max_wait=0.0)
    try:
        first = batcher.submit(crops_of(1, 2))
        assert entered.wait(timeout=60)  # the first pass is running: the next requests queue behind it
        b, c, d = (
            batcher.submit(crops_of(10, 11, 12)),
            batcher.submit(crops_of(20, 21, 22)),
            batcher.submit(crops_of(30, 31)),
        )
        gate.set()
        results = [f.result(timeout=60) for f in (first, b, c, d)]
    finally:
        gate.set()
        batcher.close()
    # b and c fill a pass of 6 faces; d would make 8, so it starts the next pass
    assert calls == [2, 6, 2]
    expected = [[1, 2], [10, 11, 12], [20, 21, 22], [30, 31]]
    for (ages, spreads), want in zip(results, expected):
        assert ages.tolist() == want and spreads.tolist() == [2 * v for v in want]
    assert (batcher.passes, batcher.faces) == (3, 10)


def test_a_request_larger_than_max_batch_runs_alone():
    calls: list[int] = []
    batcher = CropBatcher(mean_forward(calls), max_batch=2, max_wait=0.0)
    try:
        ages, _ = batcher.submit(crops_of(5, 6, 7)).result(timeout=60)
    finally:
        batcher.close()
    assert calls == [3] and ages.tolist() == [5, 6, 7]


def test_a_failed_pass_fails_its_requests_and_the_batcher_serves_on():
    fail = threading.Event()
    fail.set()

    def forward(crops):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("out of memory")
        return crops.reshape(len(crops), -1).mean(axis=1), None

    batcher = CropBatcher(forward, max_batch=8, max_wait=0.0)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(crops_of(1)).result(timeout=60)
        ages, spreads = batcher.submit(crops_of(9)).result(timeout=60)
    finally:
        batcher.close()
    assert ages.tolist() == [9] and spreads is None
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(crops_of(1))


class MeetingPredictor:
    """The real predictor, whose ``prepare_image`` calls wait for each other at a barrier (so every
    request of a burst is ready before the first pass) and whose forward passes are recorded."""

    def __init__(self, predictor: AgePredictor, parties: int):
        self.predictor, self.loaded = predictor, predictor.loaded
        self.barrier = threading.Barrier(parties)
        self.passes: list[int] = []

    def predict_image(self, image, faces_only=False):
        return self.predictor.predict_image(image, faces_only=faces_only)

    def prepare_image(self, image, faces_only=False):
        prepared = self.predictor.prepare_image(image, faces_only=faces_only)
        self.barrier.wait(timeout=120)
        return prepared

    def finish_image(self, prepared, ages, spreads=None):
        return self.predictor.finish_image(prepared, ages, spreads)

    def predict_crops_spread(self, crops):
        self.passes.append(len(crops))
        return self.predictor.predict_crops_spread(crops)


def burst_uploads() -> list[tuple[bytes, bool, int]]:
    """(upload, faces_only, faces expected): group photos of 1-3 faces at other places and sizes,
    two face crops of different sizes, and a photo without a face."""
    face = Image.open(GRACE_HOPPER).convert("RGB")
    small = jpeg_bytes(np.asarray(face.resize((256, 300))))
    return [
        (jpeg_bytes(group_photo([(0, 0)], (700, 640))), False, 1),
        (jpeg_bytes(group_photo([(0, 0), (560, 30)], (1100, 640))), False, 2),
        (jpeg_bytes(group_photo([(0, 0), (512, 0), (1024, 0)], (1536, 600))), False, 3),
        (GRACE_HOPPER.read_bytes(), True, 1),
        (small, True, 1),
        (jpeg_bytes(np.full((300, 400, 3), 128, np.uint8)), False, 0),
    ]


@pytest.fixture(scope="module")
def card(tiny_run) -> dict:
    from fairage.outputs.modelcard import build_model_card

    return build_model_card(tiny_run)


def test_a_concurrent_burst_shares_one_pass_and_each_answer_equals_the_unbatched_one(tiny_run, card):
    predictor = AgePredictor(tiny_run, device="cpu")
    uploads = burst_uploads()
    meeting = MeetingPredictor(predictor, len(uploads))
    faces = sum(n for *_, n in uploads)
    # a pass closes when it holds every face of the burst (max_batch), long before the wait ends
    limits = ServeLimits(prepare_threads=len(uploads), max_batch=faces, batch_wait_ms=1000)
    with served(create_app(meeting, limits=limits, card=card)) as url:

        def post(item):
            data, faces_only, _ = item
            with httpx.Client(timeout=120) as client:
                return client.post(
                    f"{url}/predict",
                    params={"faces_only": str(faces_only).lower()},
                    content=data,
                    headers={"content-type": "image/jpeg"},
                )

        with ThreadPoolExecutor(len(uploads)) as pool:
            answers = list(pool.map(post, uploads))
    assert [a.status_code for a in answers] == [200] * len(uploads)
    assert meeting.passes == [faces]  # every face of the burst in one forward pass
    ages = []
    for answer, (data, faces_only, n) in zip(answers, uploads):
        body = answer.json()
        alone = predictor.predict_image(data, faces_only=faces_only)  # its crops in a pass of their own
        assert body["image"] == {"width": alone.width, "height": alone.height}
        assert len(body["faces"]) == len(alone.faces) == n
        for got, want in zip(body["faces"], alone.faces):
            assert got["box"] == list(want.box) and got["score"] == pytest.approx(want.score, abs=1e-12)
            assert got["age"] == pytest.approx(want.age, abs=AGE_TOLERANCE)
            assert [got["age_lo"], got["age_hi"]] == pytest.approx([want.age_lo, want.age_hi], abs=AGE_TOLERANCE)
            ages.append(got["age"])
    # the requests' faces differ, so a face given another request's age would have been noticed
    assert max(ages) - min(ages) > 100 * AGE_TOLERANCE


class CountedPasses:
    """The real predictor (its detector settings too, so the app prepares uploads in worker
    processes) whose forward passes are recorded; the first waits until ``expected`` requests
    have queued their crops, so a burst meets in at most two passes."""

    def __init__(self, predictor: AgePredictor, expected: int):
        self.predictor, self.loaded = predictor, predictor.loaded
        self.detector_name, self.detector_threads = predictor.detector_name, predictor.detector_threads
        self.image_size = predictor.image_size
        self.expected, self.submitted, self.all_queued = expected, 0, threading.Event()
        self.passes: list[int] = []

    def predict_image(self, image, faces_only=False):
        return self.predictor.predict_image(image, faces_only=faces_only)

    def prepare_image(self, image, faces_only=False):
        raise AssertionError("uploads are prepared in the worker processes, not in the server")

    def finish_image(self, prepared, ages, spreads=None):
        return self.predictor.finish_image(prepared, ages, spreads)

    def predict_crops_spread(self, crops):
        assert self.all_queued.wait(timeout=120)
        self.passes.append(len(crops))
        return self.predictor.predict_crops_spread(crops)

    def watch(self, batcher: CropBatcher) -> None:
        """Count the requests ``batcher`` is given."""
        submit = batcher.submit

        def counted(crops):
            future = submit(crops)
            self.submitted += 1
            if self.submitted == self.expected:
                self.all_queued.set()
            return future

        batcher.submit = counted


def test_a_burst_prepared_in_worker_processes_equals_the_unbatched_answers(tiny_run, card):
    import multiprocessing

    predictor = AgePredictor(tiny_run, device="cpu")
    uploads = burst_uploads()
    faces = sum(n for *_, n in uploads)
    counted = CountedPasses(predictor, sum(n > 0 for *_, n in uploads))  # a photo without faces queues none
    app = create_app(counted, limits=ServeLimits(prepare_processes=2, max_batch=faces, batch_wait_ms=1000), card=card)
    counted.watch(app.state.batcher)
    before = set(multiprocessing.active_children())
    with served(app) as url:
        assert httpx.get(f"{url}/health", timeout=120).status_code == 200  # answered once the app has started
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2  # started with the app, before its first request

        def post(item):
            data, faces_only, _ = item
            with httpx.Client(timeout=120) as client:
                return client.post(
                    f"{url}/predict",
                    params={"faces_only": str(faces_only).lower()},
                    content=data,
                    headers={"content-type": "image/jpeg"},
                )

        with ThreadPoolExecutor(len(uploads)) as pool:
            answers = list(pool.map(post, uploads))
    assert not workers & set(multiprocessing.active_children())  # the app's shutdown stopped them
    assert [a.status_code for a in answers] == [200] * len(uploads)
    assert sum(counted.passes) == faces and len(counted.passes) <= 2  # at least 4 of the 5 requests shared one
    ages = []
    for answer, (data, faces_only, n) in zip(answers, uploads):
        body = answer.json()
        alone = predictor.predict_image(data, faces_only=faces_only)  # in this process, its crops alone
        assert body["image"] == {"width": alone.width, "height": alone.height}
        assert len(body["faces"]) == len(alone.faces) == n
        for got, want in zip(body["faces"], alone.faces):
            assert got["box"] == list(want.box) and got["score"] == pytest.approx(want.score, abs=1e-12)
            assert got["age"] == pytest.approx(want.age, abs=AGE_TOLERANCE)
            assert [got["age_lo"], got["age_hi"]] == pytest.approx([want.age_lo, want.age_hi], abs=AGE_TOLERANCE)
            ages.append(got["age"])
    assert max(ages) - min(ages) > 100 * AGE_TOLERANCE


def test_bad_uploads_get_the_same_answer_from_a_worker_process_as_from_a_thread(tiny_run, card):
    photo = GRACE_HOPPER.read_bytes()
    bad = {
        "truncated": photo[: len(photo) // 3],  # a sound header, then the pixel data stops
        "empty": b"",
        "not an image": b"plain text, no image format " * 20,
        "too many pixels": jpeg_bytes(np.zeros((1100, 1000, 3), np.uint8)),
    }
    answers = {}
    for processes in (0, 1):
        limits = ServeLimits(prepare_processes=processes, max_pixels=1_000_000)
        with served(create_app(AgePredictor(tiny_run, device="cpu"), limits=limits, card=card)) as url:
            for name, data in bad.items():
                r = httpx.post(f"{url}/predict", content=data, headers={"content-type": "image/jpeg"}, timeout=120)
                answers[processes, name] = (r.status_code, r.json()["detail"])
            # the worker lives on after bad uploads
            good = httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=120)
            assert good.status_code == 200 and len(good.json()["faces"]) == 1
    for name in bad:
        assert answers[1, name] == answers[0, name], name
    assert answers[1, "truncated"][0] == 400 and answers[1, "truncated"][1].startswith("upload: ")
    assert answers[1, "not an image"][0] == 415 and answers[1, "too many pixels"][0] == 413
    assert "1100000 pixels is over the limit of 1000000" in answers[1, "too many pixels"][1]


def test_prepare_workers_crop_like_predict_without_importing_torch():
    import subprocess
    import sys

    from fairage.inference import predictor as predict
    from fairage.serve import prepare

    # one crop convention for both paths, and the worker module stays light enough to spawn quickly
    assert prepare.crop_face is predict.crop_face
    code = "import sys, fairage.serve.prepare; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_pool_stops_its_workers_and_refuses_work_once_closed():
    import multiprocessing

    from fairage.serve.prepare import PreparePool, PrepareSpec

    before = set(multiprocessing.active_children())
    pool = PreparePool(PrepareSpec("haar", 1, 32, 1_000_000), processes=1)
    pid = pool.start()[0].result(timeout=120)
    width, height, found, crops = pool.submit(GRACE_HOPPER.read_bytes(), True).result(timeout=120)
    assert (width, height, found) == (512, 600, [((0, 0, 512, 600), 1.0)]) and crops.shape == (1, 32, 32, 3)
    started = set(multiprocessing.active_children()) - before
    assert [p.pid for p in started] == [pid]
    pool.close()
    assert not started & set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(b"", False)


def test_a_smaller_detection_side_still_finds_the_group_photos_faces(tiny_run, card):
    photo = jpeg_bytes(group_photo([(0, 0), (512, 0), (1024, 0)], (1536, 600)))
    full = AgePredictor(tiny_run, device="cpu").predict_image(photo)  # detection at 960 x 375
    limits = ServeLimits(prepare_processes=1, detect_side=640)
    with served(create_app(AgePredictor(tiny_run, device="cpu"), limits=limits, card=card)) as url:
        faces = httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=120).json()[
            "faces"
        ]
    assert len(faces) == len(full.faces) == 3
    # the same faces (the photo's three copies of one face, 512 px apart), boxes within a few pixels
    for got in faces:
        want = min(full.faces, key=lambda f: abs(f.box[0] - got["box"][0]))
        assert np.abs(np.subtract(got["box"], want.box)).max() <= 16
    assert sorted(round(f["box"][0] / 512) for f in faces) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"detect_side \(--detect-side\) applies to the prepare processes"):
        create_app(AgePredictor(tiny_run, device="cpu"), limits=ServeLimits(detect_side=640), card=card)


def test_a_pool_whose_worker_died_starts_afresh():
    import os
    import signal
    from concurrent.futures.process import BrokenProcessPool

    from fairage.serve.prepare import PreparePool, PrepareSpec

    pool = PreparePool(PrepareSpec("haar", 1, 32, 1_000_000), processes=1)
    try:
        os.kill(pool.start()[0].result(timeout=120), signal.SIGKILL)
        outcomes = []
        for _ in range(2):  # the task in flight when the pool noticed fails; the next runs in a new pool
            try:
                outcomes.append(pool.submit(GRACE_HOPPER.read_bytes(), True).result(timeout=120)[:2])
                break
            except BrokenProcessPool:
                outcomes.append("broken")
        assert outcomes[-1] == (512, 600)
    finally:
        pool.close()


class HeldForward:
    """The real predictor whose forward passes wait until the test releases them."""

    def __init__(self, predictor: AgePredictor):
        self.predictor, self.loaded = predictor, predictor.loaded
        self.entered, self.release = threading.Event(), threading.Event()

    def predict_image(self, image, faces_only=False):
        return self.predictor.predict_image(image, faces_only=faces_only)

    def prepare_image(self, image, faces_only=False):
        return self.predictor.prepare_image(image, faces_only=faces_only)

    def finish_image(self, prepared, ages, spreads=None):
        return self.predictor.finish_image(prepared, ages, spreads)

    def predict_crops_spread(self, crops):
        self.entered.set()
        assert self.release.wait(timeout=60)
        return self.predictor.predict_crops_spread(crops)


def test_a_full_queue_answers_503_with_retry_after(tiny_run, card):
    held = HeldForward(AgePredictor(tiny_run, device="cpu"))
    photo = GRACE_HOPPER.read_bytes()
    with served(create_app(held, limits=ServeLimits(max_pending=1), card=card)) as url:
        try:
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(
                    httpx.post, f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
                )
                assert held.entered.wait(timeout=60)  # the first request is in the model's pass
                assert httpx.get(f"{url}/health", timeout=20).json() == {"status": "ok"}
                busy = httpx.post(f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert "1 uploads are waiting" in busy.json()["detail"]
                held.release.set()
                assert first.result().status_code == 200
            # its place is free again
            assert (
                httpx.post(
                    f"{url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=60
                ).status_code
                == 200
            )
        finally:
            held.release.set()


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_batch", 0),
        ("max_batch", 5000),
        ("max_batch", 2.5),
        ("max_batch", True),
        ("batch_wait_ms", -1.0),
        ("batch_wait_ms", 1500.0),
        ("batch_wait_ms", float("nan")),
        ("prepare_threads", 0),
        ("prepare_threads", 65),
        ("prepare_processes", -1),
        ("prepare_processes", 65),
        ("prepare_processes", 1.5),
        ("detect_side", -1),
        ("detect_side", 10_000),
    ],
)
def test_bad_batch_settings_name_their_key(key, value):
    with pytest.raises(ConfigError, match=rf"serve setting {key} \(--{key.replace('_', '-')}\) must be"):
        ServeLimits(**{key: value})


def test_settings_travel_to_worker_processes_and_bad_ones_are_refused(monkeypatch):
    limits = ServeLimits(
        max_batch=7, batch_wait_ms=2.5, prepare_threads=3, prepare_processes=5, detect_side=480, max_pixels=1234
    )
    for name, value in limits_to_environment(limits).items():
        monkeypatch.setenv(name, value)
    assert limits_from_environment() == limits
    monkeypatch.setenv("FAIRAGE_SERVE_MAX_BATCH", "many")
    with pytest.raises(ConfigError, match="FAIRAGE_SERVE_MAX_BATCH='many' is not a number"):
        limits_from_environment()


@pytest.mark.parametrize(
    "option, value, key",
    [
        ("--max-batch", "0", "max_batch"),
        ("--batch-wait-ms", "2000", "batch_wait_ms"),
        ("--prepare-threads", "0", "prepare_threads"),
        ("--detector-threads", "-1", "detector_threads"),
        ("--prepare-processes", "65", "prepare_processes"),
        ("--detect-side", "9000", "detect_side"),
        ("--detect-side", "640 --prepare-processes 0", "detect_side"),
    ],
)
def test_cli_serve_bad_batch_settings_exit_2_naming_the_key(tiny_run, option, value, key, monkeypatch):
    import uvicorn

    def never(*args, **kwargs):
        raise AssertionError("the bad setting was not refused: the server started")

    monkeypatch.setattr(uvicorn, "run", never)
    result = invoke("serve", str(tiny_run), "--port", "0", option, *value.split())
    assert result.exit_code == 2, result.output
    assert key in result.output


def test_yunet_threads_change_nothing_but_speed():
    from fairage.inference.detect import YuNetDetector, detect_faces, set_yunet_threads

    pytest.importorskip("yuface")
    photo = group_photo([(0, 0), (512, 0), (1024, 0)], (1536, 600))
    one, default = YuNetDetector(threads=1), YuNetDetector(threads=0)
    boxes = detect_faces(one, photo)
    assert len(boxes) == 3 and detect_faces(default, photo) == boxes
    assert set_yunet_threads(1)  # yuface's OpenMP runtime was found
    with pytest.raises(ConfigError, match="detector threads must be an integer >= 0"):
        YuNetDetector(threads=-1)


def test_onnxruntime_gives_the_torch_ages_and_auto_picks_a_runtime(tiny_run):
    pytest.importorskip("onnxruntime")
    torch_ages = AgePredictor(tiny_run, device="cpu")
    on_ort = AgePredictor(tiny_run, device="cpu", batch_size=8)
    assert on_ort.use_runtime("onnxruntime") == "onnxruntime" and on_ort.runtime == "onnxruntime"
    crops = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    expected = torch_ages.predict_crops(crops)
    assert on_ort.predict_crops(crops) == pytest.approx(expected, abs=AGE_TOLERANCE)
    assert np.ptp(expected) > 100 * AGE_TOLERANCE  # the crops' ages differ: a mix-up would show
    times = on_ort.time_runtimes(repeats=1)
    assert set(times) == {"torch", "onnxruntime"} and all(t > 0 for t in times.values())
    assert on_ort.use_runtime("auto") in ("torch", "onnxruntime")
    with pytest.raises(ConfigError, match="unknown runtime 'tensorflow'"):
        on_ort.use_runtime("tensorflow")

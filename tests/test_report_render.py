"""report.html renders in headless Chromium: the table is there and every image decodes.

Skipped (with the reason) only where no chromium binary exists; ``make test``
installs Debian's chromium package first when apt can.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_report import make_run

from fairage.outputs import report

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
        if p and Path(p).is_file()
    ),
    None,
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium); cannot render report.html"
)

# appended to a copy of the report: after the load event, record each image's
# decode state and natural width in the DOM so --dump-dom shows it
PROBE = """
<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('img').forEach(function (im) { out.push(im.complete + ':' + im.naturalWidth); });
  var p = document.createElement('p'); p.id = 'probe'; p.textContent = out.join(',');
  document.body.appendChild(p);
});
</script>
"""


def test_report_renders_in_chromium(tmp_path):
    runs = [
        make_run(tmp_path / "runs", "M1", "M1", 9.5, {"age": 5.0, "gender": 0.25, "ethnicity": 2.5, "expression": 1.5}),
        make_run(tmp_path / "runs", "M3", "M3", 7.0, {"age": 3.5, "gender": 0.5, "ethnicity": 2.0, "expression": 1.0}),
    ]
    page = report.build_report(runs, tmp_path / "out")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    # the comparison table with its header and one row per model
    table = re.search(r'<table id="comparison">(.*?)</table>', dom, re.DOTALL)
    assert table, dom[:2000]
    assert "Ethnicity bias" in table.group(1)
    assert len(re.findall(r"<tr>", table.group(1))) == 3  # header + M1 + M3
    assert ">M1<" in table.group(1) and ">M3<" in table.group(1)
    # every image decoded at the pixel width of the PNG written next to the report
    probe_text = re.search(r'<p id="probe">([^<]*)</p>', dom).group(1)
    widths = [
        Image.open(io.BytesIO((tmp_path / "out" / name).read_bytes())).size[0]
        for name in ("training_curves.png", "group_mae.png", "bias_vs_mae.png")
    ]
    assert probe_text == ",".join(f"true:{w}" for w in widths)

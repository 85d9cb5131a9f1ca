"""The report and the index page in a real browser: Debian's Chromium, headless.

Chromium is installed with apt when absent (as root). Each page is loaded from a copy that
carries one line of test instrumentation: on load it counts the images that did not decode.
Console messages (script errors included) come from Chromium's log. The screenshots are kept in
``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import ROOT
from tests.test_report import CONFIG, TASKS, THRESHOLDS, write_experiment

ARTIFACTS = ROOT / "test-artifacts"
# The flags that keep a headless Chromium off the network (this machine's network is closed,
# and background connections would be refused by the dozen) and away from the user's profile.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
]
COUNT_BROKEN_IMAGES = """<script>
window.addEventListener("load", () => {
  document.body.dataset.brokenImages =
    [...document.images].filter(image => !image.complete || image.naturalWidth === 0).length;
});
</script>"""


def render(chromium: str, page: Path, tmp_path: Path, screenshot: str) -> tuple[str, int, list]:
    """Loads ``page`` headless: its DOM after load, its broken-image count, console messages."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", COUNT_BROKEN_IMAGES + "</body>"))
    profile = ["--user-data-dir=" + str(tmp_path / "chromium-profile")]
    dump = subprocess.run(
        [chromium, *FLAGS, *profile, "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dump.returncode == 0, dump.stderr[-2000:]
    broken = re.search(r'data-broken-images="(\d+)"', dump.stdout)
    assert broken, "the page never finished loading"
    console = [line for line in dump.stderr.splitlines() if ":CONSOLE" in line]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = subprocess.run(
        [chromium, *FLAGS, *profile, "--window-size=1280,2000"]
        + [f"--screenshot={ARTIFACTS / screenshot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0 and (ARTIFACTS / screenshot).stat().st_size > 10_000
    return dump.stdout, int(broken.group(1)), console


def test_the_checker_sees_broken_images_and_console_errors(chromium, tmp_path):
    # A check that cannot fail proves nothing: a page with both faults must be caught.
    page = tmp_path / "faulty.html"
    page.write_text(
        '<html><body><img src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    _, broken, console = render(chromium, page, tmp_path, "faulty.png")
    assert broken == 1 and any("boom" in line for line in console)


def test_report_renders_with_every_image_and_no_console_message(chromium, tmp_path, png):
    from pipeline.report import build_report, write_report

    experiment = write_experiment(tmp_path / "results" / "tiny", png)
    html = build_report(
        experiment, list(TASKS), config=CONFIG, thresholds=THRESHOLDS, title="Tiny experiment"
    )
    write_report(html, experiment / "report.html")
    dom, broken, console = render(chromium, experiment / "report.html", tmp_path, "report.png")
    assert broken == 0 and console == []
    assert dom.count("<img") >= 4 * len(TASKS)
    for section in ("summary", "task-two_moons", "task-sn_cosmology", "provenance"):
        assert f'id="{section}"' in dom
    assert "<script>alert" not in dom  # the config's markup stays text


def test_index_renders_and_links_each_report(chromium, tmp_path, png):
    from pipeline.report.build import load_results
    from pipeline.report.index import build_index, experiment_summary, write_summary

    results = tmp_path / "results"
    for name in ("first", "second"):
        experiment = write_experiment(results / name, png)
        results_of = load_results(experiment, list(TASKS))
        summary = experiment_summary(
            experiment, results_of, config=CONFIG, thresholds=THRESHOLDS, title=name
        )
        write_summary(summary, experiment / "summary.json")
        (experiment / "report.html").write_text("<html><body>report</body></html>")
    (results / "index.html").write_text(build_index(results))
    dom, broken, console = render(chromium, results / "index.html", tmp_path, "index.png")
    assert broken == 0 and console == []
    assert dom.count('<tr class="experiment">') == 2
    assert 'href="first/report.html"' in dom and 'href="second/report.html"' in dom

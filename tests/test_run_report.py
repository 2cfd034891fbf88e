"""`report.html` of a run: built from a short real run (and its `evaluate --generate`), rendered in headless Chromium
with every image loaded and no request leaving the page; untrusted text is escaped and nothing in it runs.

The browser is Debian's Chromium through Playwright, as in test_chat.py (skipped without them unless
VLM_ORPO_REQUIRE_UI is set). Set VLM_ORPO_REPORT_SCREENSHOT=PATH to save the page (docs/report.png comes from it).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest

from conftest import QUICKSTART
from vlm_orpo.run_report import write_report

REQUIRE_UI = bool(os.environ.get("VLM_ORPO_REQUIRE_UI"))
CHROMIUM = os.environ.get("VLM_ORPO_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if REQUIRE_UI:
            pytest.fail(f"VLM_ORPO_REQUIRE_UI is set but {CHROMIUM} is missing (bash scripts/setup_ui_test_env.sh)")
        pytest.skip(f"no Chromium at {CHROMIUM} (bash scripts/setup_ui_test_env.sh)")
    if REQUIRE_UI:
        sync_api = importlib.import_module("playwright.sync_api")
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="bash scripts/setup_ui_test_env.sh")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        yield chromium
        chromium.close()


def render(browser, report: Path, screenshot: str | None = None):
    """Open the report; returns (page, every image as [frame url, src head, complete, naturalWidth], requests that
    left the page). Every request but the report's own file is aborted and recorded."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    own, left = report.resolve().as_uri(), []

    def guard(route):
        if route.request.url.startswith("data:") or route.request.url == own:
            return route.continue_()
        left.append(route.request.url)
        route.abort()

    page.route("**/*", guard)
    page.on("request", lambda r: None if r.url.startswith("data:") or r.url == own else left.append(r.url))
    page.goto(own, wait_until="load")
    images = []
    for frame in page.frames:
        images += [[frame.url, *i] for i in frame.eval_on_selector_all(
            "img", "els => els.map(e => [e.getAttribute('src').slice(0, 30), e.complete, e.naturalWidth])")]
    if screenshot:
        for frame in page.locator("iframe").all():  # Chromium paints a frame once it has been on screen
            frame.scroll_into_view_if_needed()
            page.wait_for_timeout(300)
        page.screenshot(path=screenshot, full_page=True)
    return page, images, left


def no_remote_links(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, flags=re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()


@pytest.mark.slow
def test_report_of_a_short_run_renders_in_chromium(asset_cache, tmp_path, capsys, browser):
    from test_cli import main_in_process
    from test_train_e2e import train_in_process

    run = tmp_path / "quickstart"
    result = train_in_process(capsys, "training.max_steps=4", "training.eval_steps=2", "data.eval_limit=16",
                              "training.logging_steps=1", "training.save_strategy=no", f"training.output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = main_in_process(capsys, "evaluate", "--config", QUICKSTART, "--adapters", str(run / "final"),
                             "--out", str(run / "eval"), "--generate", "2", "--limit", "4")
    assert result.returncode == 0, result.stderr[-3000:]

    path = write_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    no_remote_links(text)
    summary = (run / "summary.md").read_text()
    for row in ("base (step 0)", "best (step 4)", "final (step 4)"):
        line = next(line for line in summary.splitlines() if line.startswith(f"| {row} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in text  # summary.md's table, as HTML
    assert "<th>ORPO loss (λ = 1)</th>" in text and "Wall time:" in text
    assert "<li>kept train 250, validation 16 (34 more held out but not scored: limit)</li>" in text
    assert "<li>no rows skipped</li>" in text
    curves = re.findall(r"<img src='data:image/png;base64,[^']+' alt='(\w+)'", text)
    assert {"orpo_loss", "sft_loss", "or_loss", "preference_accuracy", "results"} <= set(curves)
    assert "Greedy generations" in text and "srcdoc=" in text and "ORPO LoRA adapter of bundled" in text
    assert "<h4>Command</h4>" in text and "<h4>Evaluation</h4>" not in text  # the card, less its table

    shot = os.environ.get("VLM_ORPO_REPORT_SCREENSHOT")
    page, images, left = render(browser, path, shot)
    assert left == [], f"requests left the page: {left}"
    assert len(images) >= 5 + 2  # 4 curves and evaluate's plot; 2 generation images in the frame
    assert all(complete and width > 0 for _, _, complete, width in images), images
    generations = next(f for f in page.frames if f != page.main_frame)
    assert generations.locator("table tr").count() == 2 and "hallucinat" in generations.inner_text("body")
    assert page.locator("h2", has_text="Evaluation: eval").count() == 1
    page.close()

    before = text
    assert write_report(run).read_text() == before, "regenerable: the same files give the same page"


def fake_run(run: Path, hostile: str, remote: str = "http://127.0.0.1:1/leak.png") -> None:
    """A run folder as train and evaluate leave it, with hostile text where answers and names can reach."""
    keys = ("loss", "nll_loss", "or_loss", "rewards/accuracies")
    records = [{"step": 0, **{f"eval_{k}": 0.5 for k in keys}}, {"step": 1, **{k: 0.6 for k in keys}},
               {"step": 2, **{k: 0.7 for k in keys}, **{f"eval_{k}": 0.8 for k in keys}}]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.md").write_text(
        f"# Run summary: x\n\n| Name | Loss |\n|---|---|\n| {hostile} | 1.0000 |\n\n"
        f"Wall time: 3 s. data: kept train 10; skipped 2 (bad image: 1, {hostile}: 1)\n\n![orpo_loss](orpo_loss.png)\n")
    (run / "config.yaml").write_text(f"loss:\n  type: orpo\n  orpo_lambda: 1.0\nnote: '{hostile}'\n")
    (run / "eval").mkdir()
    (run / "eval" / "generations.html").write_text(
        f"<html><body><table><tr><td>{hostile}</td><td><img src='{remote}'></td></tr>"
        "<tr><td><script>parent.document.title = 'pwned'; window.pwned = 1</script></td></tr></table></body></html>")


def test_report_escapes_text_runs_nothing_and_replots_missing_curves(tmp_path, browser):
    """No PNGs in the run: the curves are plotted from metrics.jsonl. Hostile text stays text; the generations page
    (model output) runs no script in its sandbox and the page's policy stops its remote image before any request."""
    hostile = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    run = tmp_path / "run"
    hits, server = [], listening(lambda path: hits.append(path))
    fake_run(run, hostile, f"http://127.0.0.1:{server.server_port}/leak.png")
    text = write_report(run).read_text()
    assert "<script>" not in text and "<img src=x" not in text and html_escaped(hostile) in text
    assert not list(run.glob("*.png")), "replotted curves are inlined, not written into the run"
    assert "<li>skipped 2 (bad image: 1, " in text
    assert len(re.findall(r"<img src='data:image/png;base64,", text)) == 4  # ORPO's 4 curves, replotted

    page, images, left = render(browser, run / "report.html")
    server.shutdown()
    assert left == [] and hits == [], f"requests left the page: {left}, {hits}"
    main = [i for i in images if i[0] == page.main_frame.url]
    assert len(main) == 4 and all(complete and width > 0 for _, _, complete, width in main)
    assert page.title() == "vlm-orpo run report: run"
    frame = next(f for f in page.frames if f != page.main_frame)
    assert frame.evaluate("() => window.pwned") is None  # sandboxed: its script never ran
    assert hostile in page.locator("body").inner_text()  # shown as the text it is
    page.close()


def listening(on_get):
    """A local HTTP server that reports each GET: where a leaking page would send its request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            on_get(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def html_escaped(text: str) -> str:
    import html

    return html.escape(text)

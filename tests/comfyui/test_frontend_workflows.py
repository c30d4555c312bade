"""Every UI-format ``workflows/*.json`` opens in ComfyUI's real frontend (headless Chromium driven by playwright)
with no missing node type, is queued from the page (the frontend turns the graph into the prompt, as when a user
presses Queue) and runs to ``success``.

Needs playwright (``pip install playwright``) and a Chromium of the distribution (``apt-get install chromium``;
another binary through ``FSP_CHROMIUM``): playwright's own browser download is never used. Skipped, saying so,
without them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from .test_workflows_headless import LIMIT_S, _demo_available, _get, _ordered_workflows, server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    pytest.skip("playwright is not installed (pip install playwright): the frontend test is skipped",
                allow_module_level=True)
CHROMIUM = os.environ.get("FSP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("no Chromium found (apt-get install chromium, or FSP_CHROMIUM=/path/to/chrome): the frontend test "
                "is skipped", allow_module_level=True)

UI_DIR = Path(__file__).resolve().parents[2] / "workflows"

#: the page's view of the loaded graph: node types the frontend does not know (loaded as placeholder nodes without a
#: server class; the frontend's own nodes such as Note have none either). ``has_errors`` is not used: newer frontends
#: also set it on known nodes, e.g. for a combo value (a LoRA file) that is not in the list the page loaded.
MISSING_JS = """() => (app.graph.nodes ?? app.graph._nodes)
    .filter(n => !n.constructor.comfyClass && !FRONTEND_ONLY.includes(n.type)).map(n => n.type)"""
MISSING_JS = MISSING_JS.replace("FRONTEND_ONLY", json.dumps(["Note", "MarkdownNote", "Reroute", "PrimitiveNode"]))


def _graph(path: Path, demo: bool) -> dict:
    graph = json.loads(path.read_text())
    for node in graph["nodes"]:
        if node["type"] == "FSP_LoadDemoModel" and not demo:
            node["widgets_values"][0] = "tiny (test)"
    return graph


def _history_ids(url: str) -> set[str]:
    return set(_get(url + "/history"))


@pytest.fixture(scope="module")
def page(server):  # noqa: F811
    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        pg = browser.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(url)
        pg.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady !== false",
                             timeout=120_000)
        pg.wait_for_function("() => (app.graph.nodes ?? app.graph._nodes) !== undefined", timeout=60_000)
        pg.errors = errors
        yield pg
        browser.close()


def test_the_page_reports_a_missing_node_type(page):
    """The check below can fail: a graph with an unknown node type is seen as missing one."""
    graph = json.loads((UI_DIR / "train_concept_then_sample.json").read_text())
    graph["nodes"][0]["type"] = "FSP_NoSuchNode"
    page.evaluate("g => app.loadGraphData(g)", graph)
    assert page.evaluate(MISSING_JS) == ["FSP_NoSuchNode"]


def test_every_ui_workflow_loads_queues_and_succeeds_in_the_frontend(page, server):  # noqa: F811
    url, base = server
    demo = _demo_available()
    timings, page_errors = {}, {}
    for path in _ordered_workflows(UI_DIR):
        page.errors.clear()
        page.evaluate("() => app.refreshComboInNodes()")  # what pressing R does: files saved by earlier workflows
        page.evaluate("g => app.loadGraphData(g)", _graph(path, demo))
        assert page.evaluate(MISSING_JS) == [], f"{path.name}: node types the frontend does not know"
        before = _history_ids(url)
        start = time.perf_counter()
        with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as posted:
            page.evaluate("() => app.queuePrompt(0, 1)")
        response = posted.value
        assert response.ok, f"{path.name}: the prompt the frontend built was rejected: {response.text()[:2000]}"
        prompt_id = response.json()["prompt_id"]
        while True:
            hist = _get(f"{url}/history/{prompt_id}")
            status = hist.get(prompt_id, {}).get("status", {})
            if status.get("status_str") in ("success", "error"):
                break
            assert time.perf_counter() - start < 3 * LIMIT_S, f"{path.name} did not finish in {3 * LIMIT_S} s"
            time.sleep(0.5)
        assert status["status_str"] == "success", (path.name, status.get("messages"),
                                                   (base / "server.log").read_text()[-3000:])
        assert prompt_id not in before
        timings[path.name] = round(time.perf_counter() - start, 1)
        if page.errors:
            page_errors[path.name] = list(page.errors)
    print(json.dumps(timings))
    assert len(timings) == len(list(UI_DIR.glob("*.json")))
    assert not page_errors, page_errors  # script errors in the page while a workflow loaded, queued or ran

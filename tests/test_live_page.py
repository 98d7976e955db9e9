"""The live view (`GET /`) in a real headless Chromium against a running `apar serve`."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Browser

from cluster.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What are some tips for staying healthy?"  # the shipped tiny model answers it with a forked list


def _api_text(port: int, model: str) -> str:
    body = {"model": model, "max_tokens": 384, "messages": [{"role": "user", "content": PROMPT}]}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=180) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def test_page_shows_branches_filling_in_and_the_api_answer(apar_cluster):
    browser = Browser(free_port())
    try:
        browser.goto(f"http://127.0.0.1:{apar_cluster.http_port}/")
        assert browser.js("document.title").startswith("APAR Serve")
        browser.js(f"document.getElementById('prompt').value = {json.dumps(PROMPT)}")
        browser.js("document.getElementById('go').click()")
        most_live, deadline = 0, time.monotonic() + 240
        while time.monotonic() < deadline:
            panes = browser.js(
                "[...document.querySelectorAll('.pane')].map(p => [p.querySelector('.text').textContent.length,"
                " p.classList.contains('done')])"
            )
            # panes with text that are still being written: branches filling in side by side
            most_live = max(most_live, sum(1 for n, done in panes if n > 0 and not done))
            if "branches" in browser.js("document.getElementById('stats').textContent"):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the page never showed the final figures")
        panes = browser.js("document.querySelectorAll('.pane').length")
        answer = browser.js("document.getElementById('answer').textContent")
        stats = browser.js("document.getElementById('stats').textContent")
        shot = browser.screenshot(
            Path(os.environ.get("APAR_SCREENSHOT", ROOT / "results" / "tmp" / "live-view.png"))
        )
        assert shot.stat().st_size > 10_000
        assert browser.errors == [], browser.errors
    finally:
        browser.close()
    assert panes >= 3 and most_live >= 2, (panes, most_live)
    assert answer == _api_text(apar_cluster.http_port, apar_cluster.model)  # greedy: what the API answers
    assert "steps" in stats and "tokens/s" in stats

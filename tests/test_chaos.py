"""`apar bench chaos`, short form: load on a real 2-replica `apar serve` while replicas are
SIGKILLed and its Redis is killed once; then one request killed at 75 %, resumed vs replayed."""

from __future__ import annotations

import json

import pytest
from conftest import require_model

from cluster.cli import main as apar

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_chaos_short_form_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    rc = apar(["bench", "chaos", "--model", require_model(), "--duration", "24", "--rate", "1.5",
               "--kill-every", "6,9", "--max-tokens", "48", "--recovery-tokens", "256", "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    c = result["chaos"]
    assert rc == 0, c
    assert c["requests_sent"] >= 10 and c["completed"] == c["requests_sent"] and c["failed"] == 0
    assert c["lost_tokens"] == 0 and c["duplicated_tokens"] == 0 and c["text_mismatches"] == 0
    assert c["replica_kills"] >= 1 and c["redis_restarts"] == 1  # a kill waits for 2 live replicas
    rec = result["recovery"]
    assert rec["resume"]["killed_at_tokens"] >= 0.75 * 256
    # resume prefills what was sent and goes on; replay decodes those 192 tokens again first
    assert rec["resume_vs_replay"] <= 0.5, rec

"""Custom metrics defined in replica code appear in the gateway's scrape, tagged."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gateway import custom_metrics
from tests.conftest import PredictRequest, md, text_stub
from tests.metrics_util import scrape_until

COUNTED = {
    "name": "counted",
    "deployments": [{"name": "Counted", "num_replicas": 2,
                     "import_path": "examples.custom_metrics_model:CountedTextModel"}],
}


async def test_replica_custom_metrics_in_gateway_scrape(start_gateway: Any) -> None:
    async with start_gateway([COUNTED]) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        stub = text_stub(ch)
        texts = ["good", "great film", "bad", "love it", "awful", "good good"]
        for t in texts:
            await stub.Predict(PredictRequest(text=t), metadata=md("counted"))
        replicas = {s.replica_id for _, s in gw.controller.slots()}
        assert len(replicas) == 2

        def counted(s: Any) -> float:
            return sum(s.series("ray_predictions_total").values())

        s = await scrape_until(gw, lambda s: counted(s) == len(texts))
        assert s.types["ray_predictions"] == "counter"
        assert s.types["ray_last_score"] == "gauge"
        assert s.types["ray_text_length"] == "histogram"

        by_label: dict[str, float] = {}
        for labels, v in s.series("ray_predictions_total").items():
            d = dict(labels)
            assert set(d) == {"application", "deployment", "replica", "label"}
            assert (d["application"], d["deployment"]) == ("counted", "Counted")
            assert d["replica"] in replicas
            by_label[d["label"]] = by_label.get(d["label"], 0) + v
        assert by_label == {"positive": 4, "negative": 2}

        # Both replicas' families merge into one (the router spreads calls over both).
        seen = {dict(k)["replica"] for k in s.series("ray_text_length_count")}
        assert seen <= replicas and seen
        assert sum(s.series("ray_text_length_count").values()) == len(texts)
        inf = s.where("ray_text_length_bucket", le="+Inf")
        assert sum(inf.values()) == len(texts)
        assert sum(s.where("ray_text_length_bucket", le="1.0").values()) == 0
        scores = s.series("ray_last_score")
        assert scores and all(0 <= v <= 1 for v in scores.values())
        # One scrape is one valid exposition: each family is declared once.
        assert s.text.count("# TYPE ray_predictions_total counter") == 1
        # The gateway's own metrics are still there beside them.
        assert s.series("ray_serve_num_grpc_requests_total")


def test_custom_metric_api_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_APPLICATION", "app")
    monkeypatch.setenv("GATEWAY_DEPLOYMENT", "Dep")
    monkeypatch.setenv("GATEWAY_REPLICA_ID", "app#Dep#abc")
    with pytest.raises(ValueError, match="must match"):
        custom_metrics.Counter("bad name")
    with pytest.raises(ValueError, match="the gateway's own"):
        custom_metrics.Counter("serve_num_grpc_requests")
    with pytest.raises(ValueError, match="set automatically"):
        custom_metrics.Counter("c1", tag_keys=("replica",))
    with pytest.raises(ValueError, match="boundaries must increase"):
        custom_metrics.Histogram("h1", boundaries=[5, 1])

    c = custom_metrics.Counter("api_checks", description="d", tag_keys=("model",))
    with pytest.raises(ValueError, match="missing values for tags"):
        c.inc()
    with pytest.raises(ValueError, match="unknown tag keys"):
        c.inc(tags={"nope": "1"})
    with pytest.raises(ValueError, match="can only go up"):
        c.inc(-1, tags={"model": "a"})
    c.set_default_tags({"model": "m1"})
    c.inc()
    c.inc(2, tags={"model": "m2"})
    text = custom_metrics.exposition()
    assert ('ray_api_checks_total{application="app",deployment="Dep",model="m1",'
            'otel_scope_name="gateway.custom_metrics",otel_scope_schema_url="",'
            'otel_scope_version="",replica="app#Dep#abc"} 1.0') in text
    assert 'model="m2"' in text and "target_info" not in text

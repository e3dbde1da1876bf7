"""A model that defines its own metrics; the gateway's /metrics scrape shows them, tagged with
the replica's application, deployment and replica.

    applications:
      - name: counted
        deployments:
          - name: Counted
            import_path: examples.custom_metrics_model:CountedTextModel
"""

from __future__ import annotations

from typing import Any

from examples.models import TextModel
from gateway.custom_metrics import Counter, Gauge, Histogram
from gateway.pb import text_model_pb2


class CountedTextModel(TextModel):
    """The demo TextModel, counting its predictions by label."""

    def __init__(self) -> None:
        super().__init__()
        self.predictions = Counter(
            "predictions", description="Predictions made, by label.", tag_keys=("label",)
        )
        self.last_score = Gauge("last_score", description="Score of the latest prediction.")
        self.text_length = Histogram(
            "text_length", description="Length of the input text, in characters.",
            boundaries=[1, 10, 100, 1000],
        )

    async def Predict(
        self, request: text_model_pb2.PredictRequest, context: Any
    ) -> text_model_pb2.PredictResponse:
        resp = await super().Predict(request, context)
        self.predictions.inc(tags={"label": resp.label})
        self.last_score.set(resp.score)
        self.text_length.observe(len(request.text))
        return resp

"""A module-level multiplexed loader in its own module (a common layout)."""

import gateway


@gateway.multiplexed(max_num_models_per_replica=2)
async def load_model(model_id: str) -> str:
    return f"model:{model_id}"

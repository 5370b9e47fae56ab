"""GET /v1/models: the base, then every loaded adapter with the base as its parent."""

from __future__ import annotations

from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine_api import Engine
from lorafleet.serving.protocol import ModelCard, ModelList


class ModelsHandler:
    def __init__(self, config: ServingConfig, engine: Engine):
        self.config = config
        self.engine = engine

    def list(self) -> ModelList:
        config, engine = self.config, self.engine
        cards = [ModelCard(id=config.model_id, root=config.base, max_model_len=engine.max_model_len)]
        cards += [
            ModelCard(id=a.name, root=str(a.spec.path), parent=config.model_id, created=a.created)
            for a in engine.adapters()
        ]
        return ModelList(data=cards)

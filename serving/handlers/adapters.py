"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA updating)."""

from __future__ import annotations

from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException

from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine_api import Engine
from lorafleet.serving.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest


class AdaptersHandler:
    def __init__(self, config: ServingConfig, engine: Engine):
        self.config = config
        self.engine = engine

    async def load(self, body: LoadLoraAdapterRequest) -> Response:
        self._runtime_updates_on()
        await self.engine.load_adapter(body.lora_name, body.lora_path, replace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, body: UnloadLoraAdapterRequest) -> Response:
        self._runtime_updates_on()
        await self.engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _runtime_updates_on(self) -> None:
        if not self.config.runtime_lora_updating:
            raise HTTPException(404, "runtime LoRA updating is off (runtime_lora_updating: false)")

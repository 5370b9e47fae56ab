"""A small typed client for a server's admin side (the CPU engine or vLLM): health, models, adapters.

    with ServingClient("http://127.0.0.1:8000", api_key=key) as client:
        client.load_adapter("pricing", "/storage/adapters/pricing/v3")
        client.adapters()          # {"pricing": "/storage/adapters/pricing/v3"}
        client.unload_adapter("pricing")
        client.probe("pricing")    # a 1-token completion: does the adapter answer?

Generation goes through the official `openai` client (`base_url=<url>/v1`); this one is what adapter sync uses.
Errors raise `ServingAPIError` with the HTTP status and the server's OpenAI-shaped message.
"""

from __future__ import annotations

import httpx

from lorafleet.errors import LorafleetError
from lorafleet.serving.protocol import LoadLoraAdapterRequest, ModelList, UnloadLoraAdapterRequest


class ServingAPIError(LorafleetError):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.type, self.param = status, message, type_, param


class ServingClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def health(self) -> bool:
        try:
            return self.http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> ModelList:
        return ModelList.model_validate(self._check(self.http.get("/v1/models")).json())

    def base_model(self) -> str:
        return next(card.id for card in self.models().data if card.parent is None)

    def adapters(self) -> dict[str, str | None]:
        """Loaded adapters: name → the folder they were loaded from."""
        return {card.id: card.root for card in self.models().data if card.parent is not None}

    def load_adapter(self, name: str, path: str, *, load_inplace: bool = False) -> str:
        body = LoadLoraAdapterRequest(lora_name=name, lora_path=path, load_inplace=load_inplace)
        return self._check(self.http.post("/v1/load_lora_adapter", json=body.model_dump())).text

    def unload_adapter(self, name: str) -> str:
        body = UnloadLoraAdapterRequest(lora_name=name)
        return self._check(self.http.post("/v1/unload_lora_adapter", json=body.model_dump(exclude_none=True))).text

    def probe(self, model: str, prompt: str = "Hello", *, seed: int = 0) -> str:
        """A 1-token completion from `model`; returns its text, raises ServingAPIError if it does not answer.

        Sampled (temperature 1, fixed seed) rather than greedy: on the CPU engine, NaN/inf logits from a diverged
        adapter then fail the draw with a 500 instead of quietly yielding token 0.
        """
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "seed": seed}
        answer = self._check(self.http.post("/v1/completions", json=body)).json()
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices or not isinstance(choices[0], dict) or "text" not in choices[0]:
            raise ServingAPIError(502, f"the probe of {model!r} got no completion back: {str(answer)[:200]}")
        return choices[0]["text"]

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        message, type_, param = response.text, None, None
        try:
            error = response.json().get("error")
            if isinstance(error, dict):
                message, type_, param = error.get("message", message), error.get("type"), error.get("param")
            elif isinstance(error, str):  # vLLM's 401 body: {"error": "Unauthorized"}
                message = error
        except ValueError:
            pass
        raise ServingAPIError(response.status_code, message, type_, param)

"""POST /v1/completions: a text prompt (tokenized here) or a list of token ids."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from lorafleet.serving.handlers.generation import BadRequest, GenerationHandler
from lorafleet.serving.protocol import CompletionRequest


class CompletionsHandler(GenerationHandler):
    chat = False
    prompt_field = "prompt"

    async def create(self, body: CompletionRequest, request: Request) -> Response:
        prompt, engine = body.prompt_value, self.engine
        if isinstance(prompt, str):
            prompt_ids = engine.tokenizer(prompt).input_ids
        else:
            if any(not 0 <= token < engine.vocab_size for token in prompt):
                raise BadRequest(f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        return await self.generate(request, body, prompt_ids)

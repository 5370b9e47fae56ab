"""POST /v1/chat/completions: messages rendered with the base's chat template."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from lorafleet.serving.handlers.generation import BadRequest, GenerationHandler
from lorafleet.serving.protocol import ChatCompletionRequest


class ChatHandler(GenerationHandler):
    chat = True
    prompt_field = "messages"

    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("the base model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
            )
        except Exception as exc:  # the template's own checks (e.g. roles must alternate)
            raise BadRequest(f"the chat template rejected the messages: {exc}", param="messages") from None
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        return await self.generate(request, body, prompt_ids)

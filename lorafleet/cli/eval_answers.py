"""`lorafleet eval`'s answers from the CPU engine in this process: serving's batching and sampling for eval.

Every example is submitted at once; the engine decodes them in continuous batches, the k samples of a prompt
share its prefill (`submit_choices`), and each example's samples are seeded seed + k * index + i, so the same
settings give the same answers however the examples were batched. Used where the engine serves the eval (a CPU
device, a PEFT type the CPU engine serves); elsewhere eval falls back to transformers' `generate`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from lorafleet.registry.checks import read_adapter_config
from lorafleet.registry.contract import CPU_PEFT_TYPES, VLLM_LORA_RANKS
from lorafleet.serving.config import ServingConfig
from lorafleet.serving.engine import CPUEngine
from lorafleet.serving.engine_api import GenerationRequest
from lorafleet.serving.sampling import SamplingParams
from lorafleet.training.evaluate import EvalPlan
from lorafleet.training.evaluate_sampling import Decoding

BATCH_ROWS = 64  # sequences decoded together: k samples of several prompts


class EngineAnswers:
    """An `AnswerSource` (training.evaluate_generation) on a CPUEngine serving the base and the run's adapter."""

    def __init__(self, plan: EvalPlan):
        job, settings = plan.run.job, plan.settings
        adapter = plan.run.adapter_dir
        adapter_config = read_adapter_config(adapter)
        rank = int(adapter_config.get("r") or 1)
        virtual = int(adapter_config.get("num_virtual_tokens") or 0)  # prompt learning: positions before the prompt
        longest = max(len(example.prompt_ids) for example in plan.examples)
        samples = settings.samples if settings.decoding != "greedy" else 1
        config = ServingConfig(
            base=job.model.name_or_path,
            served_model_name="base",  # the engine serves `which` of answer() under its own name
            adapters={"finetuned": str(adapter)},
            adapter_roots=[str(adapter.parent)],
            max_batch_size=max(BATCH_ROWS, samples),
            max_queue=max(1, len(plan.examples) * samples),
            max_n=min(128, max(samples, 1)),
            max_loras=1,
            max_lora_rank=next(slot for slot in VLLM_LORA_RANKS if slot >= rank),
            max_tokens=settings.max_new_tokens,
            max_model_len=max(16, virtual + longest + settings.max_new_tokens + 1),
            dtype=plan.dtype,
        )
        self.engine = CPUEngine(config)
        self.engine.start()

    def answer(self, which: str, prompts: list[list[int]], decoding: Decoding) -> list[list[str]]:
        return asyncio.run(self._answer_all(which, prompts, decoding))

    async def _answer_all(self, model: str, prompts: list[list[int]], decoding: Decoding) -> list[list[str]]:
        from tqdm import tqdm

        loop = asyncio.get_running_loop()
        results: list[list[str]] = [[] for _ in prompts]
        sampled = decoding.mode == "sampled"
        bar = tqdm(total=len(prompts), desc=f"generate {model} ({decoding.mode})", unit="ex", file=sys.stderr)

        async def one(index: int) -> None:
            params = SamplingParams(
                max_tokens=decoding.max_new_tokens,
                temperature=decoding.temperature if sampled else 0.0,
                seed=decoding.seed + index * decoding.samples if sampled else None,
            )
            request = GenerationRequest(prompts[index], model, params)
            streams = self.engine.submit_choices(request, decoding.samples, loop)
            results[index] = [(await _text(stream)).strip() for stream in streams]
            bar.update(1)

        with bar:
            await asyncio.gather(*(one(index) for index in range(len(prompts))))
        return results

    def close(self) -> None:
        self.engine.shutdown(timeout=10)


async def _text(stream: Any) -> str:
    parts = []
    async for delta in stream:
        if delta.error is not None:
            raise delta.error
        parts.append(delta.text)
    return "".join(parts)


class EngineAnswersForEval:
    """The factory `evaluate_run` calls: an EngineAnswers where the CPU engine can serve the eval, else None."""

    def __init__(self) -> None:
        self.source: EngineAnswers | None = None

    def __call__(self, plan: EvalPlan) -> EngineAnswers | None:
        if plan.device.type != "cpu" or plan.dtype not in ("float32", "bfloat16"):
            return None
        if read_adapter_config(plan.run.adapter_dir).get("peft_type") not in CPU_PEFT_TYPES:
            return None
        self.source = EngineAnswers(plan)
        return self.source

    def close(self) -> None:
        if self.source is not None:
            self.source.close()

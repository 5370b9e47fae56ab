"""Choosing the next token, and turning token ids into streamed text that stops at stop strings.

Greedy when temperature is (nearly) 0; otherwise temperature, top-k and top-p, drawn from a generator seeded per request
(`seed`), so a seeded request gives the same text whatever else shares its batch. A row whose logits are not
finite (an adapter with NaN weights) gets no token (None): the engine fails that request alone.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import torch

GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice `index` of n: seed + index (vLLM's rule), so choice i equals a single request
        sent with that seed; unseeded choices draw their own seeds."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=(self.seed + index) % 2**64)

    @property
    def greedy(self) -> bool:
        # Below this, dividing the logits by the temperature overflows float32 (1e-300 → inf), and the draw is
        # greedy in all but name anyway; vLLM uses the same threshold.
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed((seed if seed is not None else secrets.randbits(63)) % (2**63))
    return generator


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int | None]:
    """One token per row of `logits` [batch, vocab] (float32); None for a row with a NaN or inf logit."""
    # One pass: a row's sum is NaN/inf iff one of its logits is (finite logits of a sane model never sum past 1e38).
    finite = torch.isfinite(logits.sum(dim=-1)).tolist()
    chosen: list[int | None] = logits.argmax(dim=-1).tolist()
    for row, (param, generator) in enumerate(zip(params, generators, strict=True)):
        if not finite[row]:
            chosen[row] = None
            continue
        if param.greedy:
            continue
        scores = logits[row] / param.temperature
        if 0 < param.top_k < scores.shape[-1]:
            kth = torch.topk(scores, param.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # overflow of huge logits / temperature: its mode, not an error
            continue
        if param.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs > param.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator))
    return chosen


@dataclass
class TextTracker:
    """The generated text of one sequence: what may be streamed now, and whether a stop string was hit.

    Text that could be the start of a stop string, or an incomplete UTF-8 character, is held back until the
    next tokens decide it; a stop string and everything after it never reach the client.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already streamed
    text: str = ""

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add a token; return (text to stream now, the stop string hit or None)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest)
            hits = [(index, s) for s in self.stop if (index := self.text.find(s, start)) >= 0]
            if hits:
                index, hit = min(hits)
                self.text = self.text[:index]
                return self._advance(len(self.text)), hit
        safe = len(self.text.rstrip("\ufffd"))
        if self.stop:
            safe = min(safe, len(self.text) - self._stop_prefix_len())
        return self._advance(max(safe, self.sent)), None

    def flush(self) -> str:
        """The held-back rest, when the sequence ends for another reason (eos, length)."""
        return self._advance(len(self.text))

    def _advance(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:size]):
                    best = size
                    break
        return best

"""The public Python API: Engine, SamplingParams, GenerateOutput.

(Skeleton: signatures are final; bodies land with the engine core.)
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

from .params import (  # noqa: F401  (re-exported)
    Choice,
    GenerateOutput,
    InvalidRequestError,
    PromptTooLongError,
    RequestMetrics,
    SamplingParams,
    StreamDelta,
    TokenLogprob,
    TopLogprob,
)

Prompt = "str | list[int] | list[dict]"  # text, token ids, or chat messages


class Engine:
    """An in-process inference engine; its loop runs on a background thread.

    Engine(model="smollm2-135m", device=None|"cpu"|"cuda", dtype=None|"float32"|"bfloat16"|"float16",
           max_model_len=None, kv_memory=None ("2GiB" or bytes), gpu_memory=None, max_running=None,
           chunk_size=None, attention_backend="auto", disable_cuda_graph=False, disable_overlap=False,
           disable_radix_cache=False, load_format="auto", schedule_policy="fcfs"|"lpm", seed=0,
           max_queue=None, tp=1)

    Attributes: tokenizer (transformers tokenizer or None for dummy weights), model_name (str),
    max_model_len (int), config (ModelConfig), plan (MemoryPlan), device (torch.device), dtype.
    """

    def generate(self, prompt, params: SamplingParams | None = None):
        """prompt: str | list[int] | list[str] | list[list[int]]. One prompt -> GenerateOutput,
        a list of prompts -> list[GenerateOutput] (in input order; run concurrently)."""
        raise NotImplementedError

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> GenerateOutput:
        """Apply the model's chat template (add_generation_prompt) and generate."""
        raise NotImplementedError

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield StreamDelta as tokens arrive; prompt may be text, token ids or chat messages
        (a list of {"role","content"} dicts).  Closing the iterator aborts the request."""
        raise NotImplementedError

    async def astream(self, prompt, params: SamplingParams | None = None) -> AsyncIterator[StreamDelta]:
        """asyncio version of stream; cancelling the consumer aborts the request."""
        raise NotImplementedError
        yield  # pragma: no cover

    def submit(self, prompt, params: SamplingParams | None = None, on_delta=None) -> str:
        """Low-level: enqueue and return a request id; on_delta(StreamDelta) is called from the
        engine thread.  Raises InvalidRequestError / PromptTooLongError synchronously."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    def encode_prompt(self, prompt) -> list[int]:
        """Text -> ids (no chat template), chat messages -> templated ids, ids -> ids."""
        raise NotImplementedError

    def stats(self) -> dict:
        """running, waiting, kv_slots_total, kv_slots_used, cache_hit_tokens, cache_query_tokens,
        prompt_tokens_total, generation_tokens_total, retractions_total."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

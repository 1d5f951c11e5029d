"""vLLM behind Corral's engine interface (`engine: vllm`, CUDA only).

The `Engine` protocol of `generate/types.py`, as `TransformersEngine` implements it:
`submit(prompt_ids, params, adapter)` returns a `Stream` of `TokenEvent`s, `generate()` blocks for a
batch. vLLM's asyncio engine runs on its own event loop in a background thread; each request is a
coroutine there that turns vLLM's delta outputs into our events. LoRA adapters of the base are
served as vLLM LoRA requests (one base in GPU memory).

vLLM is not a dependency (it brings its own CUDA torch); install it on GPU machines only.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from pathlib import Path

from corral.generate.sampling import SamplingParams, per_prompt
from corral.generate.types import (
    Completion,
    EngineStats,
    Stream,
    TokenEvent,
    TokenLogprob,
    check_adapter,
    pad_id_of,
)


def _require_vllm():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("engine=vllm needs a CUDA GPU; use engine=transformers on this machine")
    try:
        import vllm
    except ImportError:
        raise RuntimeError("engine=vllm needs the vllm package: pip install vllm (on a CUDA machine)") from None
    return vllm


# vLLM's `max_lora_rank` is one of these (vllm.config.lora.MaxLoRARanks); any other value fails its config check.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of rank `rank` (12 -> 16, 48 -> 64)."""
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


def adapter_rank(folder: str | Path) -> int:
    """The largest LoRA rank in a peft adapter folder (`r`, or a per-module `rank_pattern` above it)."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])


def engine_args(model_path: str, adapters: list[tuple[str, str]] = (), dtype: str = "auto", max_batch: int = 256,
                max_len: int | None = None, enable_lora: bool = False, max_lora_rank: int = 16,
                gpu_memory_utilization: float = 0.9) -> dict:
    """vLLM's AsyncEngineArgs as a dict. `max_lora_rank` is raised to the adapters' own ranks and rounded up to one vLLM
    accepts; `max_len` (None: the model's own context) caps the KV cache vLLM must fit in its memory share at
    start-up, which a long-context model's full length may not."""
    lora = enable_lora or bool(adapters)
    rank = max([max_lora_rank, *(adapter_rank(path) for _, path in adapters)])
    args = {"model": model_path, "dtype": dtype, "max_num_seqs": max_batch, "max_model_len": max_len,
            "enable_lora": lora, "gpu_memory_utilization": gpu_memory_utilization}  # fmt: skip
    if lora:
        args |= {"max_loras": max(1, len(adapters)), "max_lora_rank": vllm_lora_rank(rank)}
    return args


class VLLMEngine:
    def __init__(self, model_path: str, adapters: list[tuple[str, str]] = (), dtype: str = "auto",
                 max_batch: int = 256, max_len: int | None = None, enable_lora: bool = False,
                 max_lora_rank: int = 16, gpu_memory_utilization: float = 0.9):
        vllm = _require_vllm()
        from transformers import AutoTokenizer
        from vllm.lora.request import LoRARequest

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = pad_id_of(self.tokenizer)
        from transformers import AutoConfig

        context = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
        self.max_len = max_len or context or 4096  # vLLM's max_model_len: the model's own unless capped
        self._in_flight = 0  # replies submitted and not finished (vLLM queues and schedules them itself)
        self._loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters)}
        self._next_lora_id = len(adapters)
        args = vllm.AsyncEngineArgs(**engine_args(model_path, adapters, dtype, max_batch, max_len, enable_lora,
                                                  max_lora_rank, gpu_memory_utilization))  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="corral-vllm", daemon=True)
        self._thread.start()
        self._engine = asyncio.run_coroutine_threadsafe(self._make(vllm, args), self._loop).result()

    @staticmethod
    async def _make(vllm, args):
        return vllm.AsyncLLMEngine.from_engine_args(args)

    def adapters(self) -> list[str]:
        return list(self._loras)

    def stats(self) -> EngineStats:
        """Replies in flight. vLLM keeps its own waiting queue, so `waiting` is 0 here and the server's
        max_queue does not bound it: vLLM's scheduler does."""
        return EngineStats(running=self._in_flight, waiting=0)

    def load_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter saved at `path` as `name`, with a fresh id so vLLM reads the files. Give new weights a
        new name: vLLM's prefix cache is keyed by the adapter's name, so prompts cached under an adapter's old
        weights would be served to its new ones (PPO names each sync of its actor `actor-<step>`)."""
        from vllm.lora.request import LoRARequest

        self._next_lora_id += 1
        self._loras[name] = LoRARequest(name, self._next_lora_id, path)

    def remove_adapter(self, name: str) -> None:
        """Forget adapter `name` and drop it from vLLM's adapter cache."""
        lora = self._loras.pop(name)
        asyncio.run_coroutine_threadsafe(self._engine.remove_lora(lora.lora_int_id), self._loop).result(timeout=60)

    def _vllm_params(self, params: SamplingParams):
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import RequestOutputKind

        return VParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None, max_tokens=params.max_new_tokens, seed=params.seed,
            output_kind=RequestOutputKind.DELTA, logprobs=params.logprobs, **_structured(params.response_format),
        )  # fmt: skip

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        from vllm.inputs import TokensPrompt

        check_adapter(adapter, self.adapters())
        stream = Stream(params.n, len(prompt_ids), loop)
        request_id = uuid.uuid4().hex
        lora = self._loras.get(adapter) if adapter else None

        async def run():
            finished: set[int] = set()
            self._in_flight += params.n
            try:
                async for output in self._engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)),
                                                          self._vllm_params(params), request_id, lora_request=lora):
                    if stream.cancelled:
                        await self._engine.abort(request_id)
                        break
                    for choice in output.outputs:
                        tokens = list(choice.token_ids)
                        for k, token in enumerate(tokens):
                            last = k == len(tokens) - 1
                            reason = choice.finish_reason if last and choice.finish_reason else None
                            logprob = _logprob(choice.logprobs, k, token, params.logprobs)
                            stream._push(TokenEvent(choice.index, choice.text if last else "", token_id=token,
                                                    finish_reason=reason, logprob=logprob))
                        if choice.finish_reason and choice.index not in finished:
                            finished.add(choice.index)
                            if not tokens:
                                stream._push(TokenEvent(choice.index, choice.text, finish_reason=choice.finish_reason))
                            stream._finish_one()
            except Exception as e:  # noqa: BLE001 - reported to the waiting client
                for index in set(range(params.n)) - finished:
                    stream._push(TokenEvent(index, "", finish_reason="error", error=f"{type(e).__name__}: {e}"))
                    finished.add(index)
                    stream._finish_one()
                return
            finally:
                self._in_flight -= params.n
            for index in set(range(params.n)) - finished:  # aborted
                stream._push(TokenEvent(index, "", finish_reason="cancelled"))
                stream._finish_one()

        asyncio.run_coroutine_threadsafe(run(), self._loop)
        return stream

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapter: str | None = None) -> list[list[Completion]]:
        streams = [self.submit(p, q, adapter) for p, q in zip(prompts, per_prompt(params, len(prompts)))]
        return [s.collect() for s in streams]

    def close(self) -> None:
        """Shut vLLM down (its engine process and the GPU memory it holds), then our event loop: a second engine in
        this process, as the next stage of a pipeline or test starts one, finds the memory free."""

        async def shutdown():
            self._engine.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)


def _structured(fmt) -> dict:
    """A response format as vLLM's structured-output parameters (its xgrammar backend, as ours):
    `structured_outputs` in current vLLM, `guided_decoding` in older releases."""
    if fmt is None:
        return {}
    schema = {"type": "object"} if fmt.kind == "json_object" else json.loads(fmt.schema)
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(json=schema)}


def _logprob(logprobs, k: int, token: int, top: int | None) -> TokenLogprob | None:
    """Our TokenLogprob from vLLM's per-token {token id: Logprob} (the sampled token plus the top ones)."""
    if top is None or not logprobs or k >= len(logprobs) or token not in logprobs[k]:
        return None
    entries = logprobs[k]
    ranked = sorted(((i, e.logprob) for i, e in entries.items() if e.rank is not None and e.rank <= top),
                    key=lambda pair: -pair[1])
    return TokenLogprob(token, entries[token].logprob, tuple(ranked[:top]))

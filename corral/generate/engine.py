"""The batching generation engine: continuous batching over a transformers model with a KV cache.

Everything in Corral that generates text locally goes through here: the server, the terminal chat,
the quickstart, answer generation for the judge, and PPO rollouts on the live actor
(`train/ppo/rollout.py`). It implements the `Engine` protocol of `generate/types.py`; vLLM is the
other implementation (`generate/vllm.py`).

How it works. Running sequences share one batch. Their KV cache is a `SlotCache` (`generate/kv.py`):
pre-allocated per-row buffers that a decode step writes in place, each row its own columns, so a
step costs the same whatever joined or left before it; position ids are passed explicitly (the
count of real tokens before each one), so padding never shifts a position. Each `step()`:
  1. admits waiting requests: their prompts are prefilled together (identical prompts, e.g. the n
     replies of one request, are computed once and their cache rows copied), their first tokens
     sampled, and their cache rows copied into free rows of the slot cache;
  2. decodes one token for every running row in one forward pass, under a 4-D mask that shows each
     row only its own columns;
  3. retires finished or cancelled rows (stop token, stop string, max tokens, context length): the
     last rows move into their places.
Models whose attention takes no 4-D mask (flash-attention) keep transformers' `DynamicCache`,
left-padded under a 2-D mask, re-stacked as rows join and trimmed as they leave (`kv_cache`).
So a new request joins at the next step and a short request never waits for a long one.

Requests come in as token ids; callers render conversations with the chat template first
(`generate/chat.py`, the same template code SFT trained with). A request's `Stream` yields
`TokenEvent`s, from any thread or from asyncio. `start()` runs the loop in a background thread (the
server); without it, `generate()` runs the loop in the calling thread (batch jobs, PPO rollouts on
live weights).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from corral.generate.head import LastLogits
from corral.generate.kv import SlotCache
from corral.generate.packed import PackedLinear, packed_bytes
from corral.generate.sampling import RowParams, SamplingParams, apply_penalties, per_prompt, sample_next
from corral.generate.structured import Grammars
from corral.generate.types import (BASE_ADAPTER, Completion, EngineStats, Stream, TokenEvent, TokenLogprob,
                                   check_adapter, pad_id_of)

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    stream: Stream
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    stop_ids: frozenset[int]
    generator: torch.Generator
    matcher: object | None = None  # the xgrammar matcher of a reply constrained by a response format
    reply_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the reply text already emitted
    done: bool = False


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to emit yet: an unfinished UTF-8 character or a possible stop-string start."""
    keep = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = max(keep, k)
                break
    return keep


def _embedding_rows(model) -> int | None:
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    rows = getattr(embeddings, "num_embeddings", None)
    return rows or getattr(getattr(model, "config", None), "vocab_size", None)


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers 5 (which warn that `past_key_values` goes
    in 5.40), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        names = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in names else "past_key_values"


class TransformersEngine:
    """Continuous batching over a transformers causal LM (optionally a peft model with several LoRA adapters)."""

    def __init__(self, model, tokenizer, max_batch: int = 32, max_len: int | None = None,
                 stop_token_ids: tuple[int, ...] | None = None, kv_cache: str = "auto",
                 compile: bool | str | Callable = False, pack_weights: bool | str = False):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        config = getattr(model, "config", None)
        self.max_len = max_len or getattr(config, "max_position_embeddings", None) or 4096
        self.default_stop_ids = frozenset(
            stop_token_ids if stop_token_ids is not None
            else ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        )
        self.pad_id = pad_id_of(tokenizer)
        self.device = next(model.parameters()).device
        from corral.models.adapters import uses_prefix

        if uses_prefix(model):
            raise NotImplementedError(
                "prefix-tuning adapters feed their prefix as a KV cache, which the continuous-batching engine "
                "manages itself: serve a LoRA adapter or a full model instead"
            )
        self._head = LastLogits(model, self.device)  # on CPU, runs the output head itself (see generate/head.py)
        self._cache_kwarg = _cache_kwarg(model)
        self.packed_mb = 0.0  # memory the packed copies take (0 without)
        self._packed = self._packing(pack_weights)  # oneDNN-packed linear weights for eager steps (generate/packed.py)
        if self._packed is not None:
            self._head.linear = self._packed.linear
        self._slots = self._slot_cache(kv_cache)  # None: the DynamicCache path (re-stacked as rows come and go)
        self._compiled = self._compile_decode("inductor" if compile is True else compile) if compile else None
        # Steps of at most this many rows run compiled, larger ones eagerly: measured on SmolLM2-135M in bf16
        # (2 Zen 4 cores), compiled with freezing is 1.27x eager at 1 row and 1.23x at 2, equal at 4, and
        # slower from 8 rows (0.85x at 8, 0.46x at 16), where eager matmuls batch well already.
        self.compile_max_rows = 2
        self.vocab_size = _embedding_rows(model)  # token ids a prompt may hold (None: unknown, unchecked)
        self._grammars: Grammars | None = None  # built at the first constrained request
        self.last_batch = 0  # rows in the latest decode step (the server's metrics read it)
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._clear_batch()

    def _slot_cache(self, kv_cache: str) -> SlotCache | None:
        """The pre-allocated cache (generate/kv.py) where the model's attention takes our 4-D mask: SDPA (a
        boolean mask) and eager (an additive one); flash-attention takes only 2-D padding masks."""
        if kv_cache not in ("auto", "slots", "dynamic"):
            raise ValueError(f"kv_cache: {kv_cache!r} is not one of auto, slots, dynamic")
        attention = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if kv_cache == "dynamic" or (kv_cache == "auto" and attention not in ("sdpa", "eager")):
            return None
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"kv_cache: slots needs sdpa or eager attention, the model uses {attention}")
        self._additive_mask = attention == "eager"
        return SlotCache(self.device)

    def _packing(self, pack_weights: bool | str) -> PackedLinear | None:
        """`pack_weights`: True packs the linear weights on CPU (generate/packed.py); `auto` too, where the copies
        (about the linear weights' size) take at most half the memory still available; False never."""
        if pack_weights not in (True, False, "auto"):
            raise ValueError(f"pack_weights: {pack_weights!r} is not one of true, false, auto")
        if not pack_weights or self.device.type != "cpu":
            return None
        extra = packed_bytes(self.model)
        if pack_weights == "auto":
            import psutil

            free = psutil.virtual_memory().available
            if extra > free / 2:
                log.warning("pack_weights: auto leaves the weights unpacked: their packed copies (%.0f MB) would take "
                            "more than half the %.0f MB available", extra / 2**20, free / 2**20)
                return None
        self.packed_mb = extra / 2**20
        packed = PackedLinear(self.model)
        packed.pack_all()
        return packed

    @property
    def packs(self) -> bool:
        """Whether eager steps run on packed weights (`pack_weights=`)."""
        return self._packed is not None

    def _compile_decode(self, backend: str):
        """The decode step's forward and output head under torch.compile: `compile=True` is inductor (on CPU it
        builds C++ with the system compiler); anything else is a torch.compile backend (the tests use aot_eager,
        which traces without building, and backends of their own that count graphs).

        The model runs under `MatVec` (generate/compiled.py): its 1-2 row products become fused reductions that
        read the weights about twice as fast as torch's kernels on CPU. Rows are padded to a power of two, and the
        width and cache sizes are dynamic (`_dynamic_sizes`), so one graph per row bucket serves every step, each
        built once (40-50 s for SmolLM2-135M on 2 CPU cores; `warm_up` builds them before serving)."""
        if self._slots is None:
            raise ValueError("compile: needs the slot cache (a model with sdpa or eager attention)")
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # the row buckets

        from corral.generate.compiled import MatVec, matvec_linear

        def logits(ids, mask, positions):
            with MatVec():  # 1-2 row products as fused reductions (generate/compiled.py)
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{self._cache_kwarg: self._slots}, **self._head.forward_kwargs())
            return matvec_linear(out.hidden_states[-1][:, -1, :], self._head.weight).float()  # the head we checked

        return torch.compile(logits, backend=backend, dynamic=False)

    def _dynamic_sizes(self, *masks: torch.Tensor) -> None:
        """The step's width (the masks' last size) and the cache's allocated rows and columns are sizes of the
        compiled graph, not constants: one graph per row bucket serves every width and cache size."""
        for mask in masks:
            torch._dynamo.mark_dynamic(mask, 3)
        for buffer in (*self._slots.keys, *self._slots.values):
            torch._dynamo.mark_dynamic(buffer, 0)
            torch._dynamo.mark_dynamic(buffer, 2)

    @property
    def compiles(self) -> bool:
        """Whether small decode steps run compiled (`compile=`)."""
        return self._compiled is not None

    def warm_up(self) -> float:
        """Build the compiled step's graphs now, one per row bucket (1 and 2 rows), so that no request waits for
        them; returns the seconds taken (0 without compile). A graph that fails to build (inductor needs a C++
        compiler on CPU) raises ValueError here, once, rather than failing every request.

        Run it after `start()`, so the warm-up requests run in the engine's own thread, as served ones will: the
        compiled kernels' OpenMP threads then belong to that thread alone. Warmed up in the server's main thread,
        they left a second OpenMP team behind and `corral serve compile=true` decoded 27.7 tokens/s at one client
        against about 50 in one process (see "One OpenMP team" in docs/serving.md)."""
        if self._compiled is None:
            return 0.0
        started = time.perf_counter()
        stops, self.default_stop_ids = self.default_stop_ids, frozenset()  # three tokens each, whatever they are
        try:
            self.generate([[self.pad_id]] * 2, SamplingParams(max_new_tokens=3))  # 2-row steps
            self.generate([[self.pad_id]], SamplingParams(max_new_tokens=3))  # 1-row steps
        except RuntimeError as e:  # a failed step fails its rows: collect() raises with the step's error
            reason = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip() and "TORCHDYNAMO" not in ln)
            raise ValueError(f"compile: the decode step did not compile ({reason}); serve with compile=false") from None
        finally:
            self.default_stop_ids = stops
        if not isinstance(self._head.weight, torch.Tensor):  # the compiled step runs our head: never with its own
            log.warning("compile: this model computes its logits itself (scaled or capped), so its decode steps run "
                        "eagerly; compile gains nothing here")
        return time.perf_counter() - started

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        if not prompt_ids:
            raise ValueError("prompt: empty prompt")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens, the model's context is {self.max_len}")
        bad = next((t for t in prompt_ids if not 0 <= t < (self.vocab_size or 2**63)), None)
        if bad is not None:  # an id the embedding has no row for fails the whole prefill batch: refuse it here
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        check_adapter(adapter, self.adapters())
        stream = Stream(params.n, len(prompt_ids), loop)
        base_seed = params.seed if params.seed is not None else random.getrandbits(63)
        stops = self.default_stop_ids | frozenset(params.stop_token_ids)
        seqs = [
            _Sequence(stream, i, list(prompt_ids), params, adapter, stops,
                      torch.Generator().manual_seed(base_seed + i), self._matcher(params, stops))
            for i in range(params.n)
        ]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.extend(seqs)
            self._lock.notify()
        return stream

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 adapter: str | None = None) -> list[list[Completion]]:
        """Generate for all prompts (batched, continuously); returns n completions per prompt, in order.
        `params` is one for all prompts or one per prompt (e.g. a seed each)."""
        streams = [self.submit(p, q, adapter) for p, q in zip(prompts, per_prompt(params, len(prompts)))]
        if self._thread is None:  # no background loop: run it here until our requests are done
            was_training = self.model.training
            self.model.eval()
            try:
                while self.has_work():
                    self.step()
            finally:
                self.model.train(was_training)
        return [s.collect() for s in streams]

    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}) or {})

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=len(self._seqs), waiting=len(self._waiting), batch=self.last_batch)

    def _matcher(self, params: SamplingParams, stops: frozenset[int]):
        if params.response_format is None:
            return None
        if self._grammars is None:
            with self._lock:
                if self._grammars is None:
                    head = getattr(self.model, "get_output_embeddings", lambda: None)()
                    width = head.weight.shape[0] if head is not None else self.vocab_size  # the logits' width
                    self._grammars = Grammars(self.tokenizer, width)
        return self._grammars.matcher(params.response_format, stops)

    # ------------------------------------------------------------------ background loop
    def start(self) -> TransformersEngine:
        self.model.eval()
        self._thread = threading.Thread(target=self._loop, name="corral-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._seqs:
                    self._lock.wait()
                if self._closed:
                    break
            self.step()
        for seq in list(self._seqs) + list(self._waiting):
            self._finish(seq, "cancelled")

    def has_work(self) -> bool:
        return bool(self._waiting or self._seqs)

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests (prefill), decode one token for every running row, retire finished rows.

        A failure fails exactly the requests it belongs to and the loop keeps serving: a failed decode
        fails the running rows (they were one forward pass); a failed prefill is retried on halves of
        the admitted rows until the rows that fail alone are found, and only those fail."""
        with self._lock:
            room = self.max_batch - len(self._seqs)
            admitted = []
            while self._waiting and (len(admitted) < room or not (admitted or self._seqs)):
                seq = self._waiting.popleft()
                if seq.stream.cancelled:
                    self._finish(seq, "cancelled")
                else:
                    admitted.append(seq)
        if self._seqs:
            self.last_batch = len(self._seqs)
            try:
                self._decode()
            except Exception as e:
                self._fail(list(self._seqs), e)
                self._clear_batch()
        if admitted:
            self._admit(admitted)
        self._retire()

    def _admit(self, seqs: list[_Sequence]) -> None:
        try:
            self._prefill(seqs)  # changes nothing in the batch until it has succeeded
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs, e)
                return
            half = len(seqs) // 2
            self._admit(seqs[:half])
            self._admit(seqs[half:])

    def _fail(self, seqs: list[_Sequence], error: Exception) -> None:
        log.error("generation failed for %d rows", len(seqs), exc_info=error)
        for seq in seqs:
            self._finish(seq, "error", error=f"{type(error).__name__}: {error}")

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str | None]):
        kwargs = {}
        if any(a is not None for a in adapters):  # peft's mixed-batch LoRA: each row runs with its own adapter
            active = getattr(self.model, "active_adapter", BASE_ADAPTER)
            kwargs["adapter_names"] = [a or active for a in adapters]
        kwargs.update(self._head.forward_kwargs())  # the model builds no logits once we run the head
        with self._packed or contextlib.nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self._cache_kwarg: cache}, **kwargs)
        return self._head(out), out.past_key_values

    def _prefill(self, seqs: list[_Sequence]) -> None:
        # The n replies of a request share a prompt: compute each distinct (prompt, adapter) once.
        keys = [(tuple(s.prompt_ids), s.adapter) for s in seqs]
        unique = list(dict.fromkeys(keys))
        expand = torch.tensor([unique.index(k) for k in keys], device=self.device)
        width = max(len(p) for p, _ in unique)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p, _ in unique], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in unique], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None, [a for _, a in unique])
        self._check_cache(cache)
        if len(unique) != len(seqs):
            cache.batch_select_indices(expand)
            logits, mask = logits[expand], mask[expand]
        vocab = logits.shape[-1]
        seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=self.device)
        for row, seq in enumerate(seqs):
            seen[row, torch.tensor(seq.prompt_ids, device=self.device).clamp(max=vocab - 1)] = True
        counts = torch.zeros(len(seqs), vocab, dtype=torch.int32, device=self.device)
        tokens, logprobs = self._sample(logits, seqs, seen, counts)
        self._merge(seqs, cache, mask, seen, counts)
        first = len(self._seqs) - len(seqs)
        self._emit(tokens, logprobs, rows=range(first, len(self._seqs)))

    def _decode(self) -> None:
        """One token for every running row (rows admitted in this step get theirs from the prefill)."""
        seqs = self._seqs
        last = torch.tensor([[s.reply_ids[-1]] for s in seqs], device=self.device)
        if self._slots is not None:
            # Compiled once the head is checked (the first step runs eagerly) and for base-model rows only (peft's
            # per-row adapter_names would be one more thing to specialise on).
            compiled = (self._compiled is not None and isinstance(self._head.weight, torch.Tensor)
                        and len(seqs) <= self.compile_max_rows and all(s.adapter is None for s in seqs))
            rows = 1 << (len(seqs) - 1).bit_length() if compiled else None
            positions, mask = self._slots.begin_step(rows)
            if self._additive_mask:
                mask = torch.zeros(mask.shape, dtype=self.model.dtype, device=self.device).masked_fill(
                    ~mask, torch.finfo(self.model.dtype).min)
            if compiled:
                ids = F.pad(last, (0, 0, 0, rows - len(seqs)), value=self.pad_id)
                self._dynamic_sizes(mask, self._slots.step_mask)
                logits = self._compiled(ids, mask, positions)[: len(seqs)]
            else:
                logits, _ = self._forward(last, mask, positions, self._slots, [s.adapter for s in seqs])
            self._slots.end_step()
        else:
            positions = self._mask.sum(-1, keepdim=True)  # real tokens before the new one
            mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            logits, self._cache = self._forward(last, mask, positions, self._cache, [s.adapter for s in seqs])
            self._mask = mask
        tokens, logprobs = self._sample(logits, seqs, self._seen, self._counts)
        self._emit(tokens, logprobs, rows=range(len(seqs)))

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence], seen: torch.Tensor, counts: torch.Tensor):
        """Next token of each row (list), and its TokenLogprob where the request asked (else None).

        Log-probabilities are the model's own distribution (log-softmax of its logits), after a
        response format's mask, before penalties, temperature, top-k and top-p: what vLLM reports by
        default ("raw_logprobs")."""
        matchers = [s.matcher for s in seqs]
        if any(m is not None for m in matchers):
            logits = logits.contiguous()  # xgrammar masks in place assuming a plain layout (the head's is transposed)
            self._grammars.apply(logits, matchers)
        want = [r for r, s in enumerate(seqs) if s.params.logprobs is not None]
        raw = logits[want].log_softmax(dim=-1) if want else None
        params = RowParams.of([s.params for s in seqs], self.device)
        logits = apply_penalties(logits, params, seen, counts)
        tokens = sample_next(logits, params, [s.generator for s in seqs]).tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if want:
            k = max(seqs[r].params.logprobs for r in want)
            top_lp, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
            chosen = raw[torch.arange(len(want)), torch.tensor([tokens[r] for r in want])].tolist()
            for i, r in enumerate(want):
                top = tuple((t, v) for t, v in zip(top_ids[i].tolist(), top_lp[i].tolist())
                            if v != float("-inf"))[: seqs[r].params.logprobs]  # a masked-out token is no alternative
                logprobs[r] = TokenLogprob(tokens[r], chosen[i], top)
        return tokens, logprobs

    def _emit(self, tokens: list[int], logprobs: list[TokenLogprob | None], rows: range) -> None:
        index = (torch.tensor(rows, device=self.device), torch.tensor(tokens, device=self.device))
        self._seen[index] = True  # all rows in two tensor ops (a finished row's entries are never read again)
        self._counts[index] += 1
        for r, token, logprob in zip(rows, tokens, logprobs):
            seq = self._seqs[r]
            if seq.done:
                continue
            try:
                self._advance(seq, token, logprob)
            except Exception as e:  # e.g. a grammar refusing the token: this reply alone fails
                self._fail([seq], e)

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        seq.reply_ids.append(token)
        if token in seq.stop_ids:
            self._finish(seq, "stop", token_id=token)
            return
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"the response format's grammar refused token {token}")
        text = self.tokenizer.decode(seq.reply_ids, skip_special_tokens=True)
        stops = seq.params.stop
        if stops:
            start = max(0, seq.sent - max(map(len, stops)))  # a stop string can only end in the new text
            hits = [p for s in stops if (p := text.find(s, start)) >= 0]
            if hits:
                self._finish(seq, "stop", token_id=token, text=text[: min(hits)], logprob=logprob)
                return
        if len(seq.reply_ids) >= seq.params.max_new_tokens or len(seq.prompt_ids) + len(seq.reply_ids) >= self.max_len:
            self._finish(seq, "length", token_id=token, text=text, logprob=logprob)
            return
        safe = len(text) - _holdback(text, stops)
        delta = text[seq.sent:safe] if safe > seq.sent else ""
        seq.sent = max(seq.sent, safe)
        seq.stream._push(TokenEvent(seq.index, delta, token_id=token, logprob=logprob))

    def _finish(self, seq: _Sequence, reason: str, token_id: int | None = None, text: str | None = None,
                error: str | None = None, logprob: TokenLogprob | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        if text is None:
            text = self.tokenizer.decode([t for t in seq.reply_ids if t not in seq.stop_ids], skip_special_tokens=True)
        delta = text[seq.sent:]
        seq.stream._push(TokenEvent(seq.index, delta, token_id=token_id, finish_reason=reason, error=error,
                                    logprob=logprob))
        seq.stream._finish_one()

    # ------------------------------------------------------------------ batch bookkeeping
    def _clear_batch(self) -> None:
        self._seqs: list[_Sequence] = []
        self._cache = None  # the running rows' cache (the slot cache's buffers outlive a batch, for the next)
        if self._slots is not None:
            self._slots.clear()
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self._seen = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self._counts = torch.zeros(0, 0, dtype=torch.int32, device=self.device)

    @staticmethod
    def _check_cache(cache) -> None:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []})
            raise NotImplementedError(
                f"continuous batching needs a plain dynamic KV cache; this model uses {kinds or type(cache).__name__} "
                "(sliding-window or hybrid attention): serve it with engine=vllm on GPU"
            )

    def _merge(self, seqs, cache, mask, seen, counts) -> None:
        if self._slots is not None:
            self._slots.add(cache, mask)  # copied into free rows: the prefill's own cache is dropped
            cache = self._slots
        if not self._seqs:
            self._seqs, self._cache, self._mask, self._seen, self._counts = list(seqs), cache, mask, seen, counts
            return
        if self._slots is None:
            width = max(self._mask.shape[1], mask.shape[1])

            def left_pad(t, length_dim):
                missing = width - t.shape[length_dim]
                if missing == 0:
                    return t
                pad = [0, 0] * (t.dim() - 1 - length_dim) + [missing, 0]
                return F.pad(t, pad)

            for old, new in zip(self._cache.layers, cache.layers):
                old.keys = torch.cat([left_pad(old.keys, 2), left_pad(new.keys, 2)], dim=0)
                old.values = torch.cat([left_pad(old.values, 2), left_pad(new.values, 2)], dim=0)
            self._mask = torch.cat([left_pad(self._mask, 1), left_pad(mask, 1)], dim=0)
        vocab = max(self._seen.shape[1], seen.shape[1])
        self._seen = torch.cat([F.pad(self._seen, (0, vocab - self._seen.shape[1])), F.pad(seen, (0, vocab - seen.shape[1]))])
        self._counts = torch.cat([F.pad(self._counts, (0, vocab - self._counts.shape[1])), F.pad(counts, (0, vocab - counts.shape[1]))])
        self._seqs += seqs

    def _retire(self) -> None:
        for seq in self._seqs:
            if seq.stream.cancelled and not seq.done:
                self._finish(seq, "cancelled")
        keep = [r for r, s in enumerate(self._seqs) if not s.done]
        if len(keep) == len(self._seqs):
            return
        if not keep:
            self._clear_batch()
            return
        if self._slots is not None:
            order = self._slots.keep(keep)  # finished rows' places taken by the last rows
            index = torch.tensor(order, device=self.device)
            self._seen, self._counts = self._seen[index], self._counts[index]
            self._seqs = [self._seqs[r] for r in order]
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask, self._seen, self._counts = self._mask[index], self._seen[index], self._counts[index]
        self._seqs = [self._seqs[r] for r in keep]
        # Columns that are padding for every remaining row are dead weight in every later step.
        dead = int((self._mask.sum(0) == 0).long().cumprod(0).sum())
        if dead:
            self._mask = self._mask[:, dead:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, dead:], layer.values[:, :, dead:]


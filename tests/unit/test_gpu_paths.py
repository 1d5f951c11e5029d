"""The GPU, DeepSpeed and vLLM paths, reached on a CPU: each test pins one finding of a read of those paths against
the libraries (issue 21), through the device argument, a meta device, monkeypatched `torch.cuda` functions, a
plugin built from the shipped config, or a fake of the library's function at the exact call Corral makes. What only a
GPU can run is in scripts/gpu_check.sh; what has run where is in docs/scaling.md."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import build_model

ROOT = Path(__file__).resolve().parents[2]


# --- 1. on-policy rloo / grpo: rows of a mini-batch come from a CPU permutation -------------------------------------


def test_group_advantages_take_rows_from_the_cpu_onto_the_experience_device():
    """The meta device stands for CUDA: `index_copy` wants the index on the tensor's device, as on a GPU."""
    from corral.train.ppo.step import PPOSettings, compute_advantages

    n, k, T = 4, 2, 3
    meta = lambda *shape: torch.zeros(*shape, device="meta")  # noqa: E731
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # as ppo_update draws them
    advantages, returns, kl = compute_advantages(rows, meta(n, T), meta(n, T), meta(n), torch.ones(n, T, device="meta"),
                                                 n, k, PPOSettings(advantage="grpo"), 0.05)  # fmt: skip
    assert advantages.device.type == kl.device.type == "meta" and advantages.shape == (n, T) and returns is None


# --- 2. EMA after resume: accelerate loads custom state onto the CPU -----------------------------------------------


def test_ema_state_goes_back_onto_its_weights_device():
    from corral.train.ppo.ema import EMA

    model = torch.nn.Linear(3, 2, device="meta")
    ema = EMA(model, 0.9)
    saved = {"decay": 0.5, "shadow": {name: torch.ones_like(t, device="cpu") for name, t in ema.shadow.items()}}
    ema.load_state_dict(saved)  # what accelerate's load_custom_state hands it (map_location="cpu")
    assert ema.decay == 0.5
    assert {t.device.type for t in ema.shadow.values()} == {"meta"}
    ema.update(model)  # a CPU shadow would meet meta (CUDA) weights here
    assert {t.dtype for t in ema.shadow.values()} == {torch.float32}


# --- 3. flash-attention 2 only where it runs; 14. bf16 emulation does not count -------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU as far as Corral's choices look: compute capability and native bf16 set by the test."""
    gpu = types.SimpleNamespace(capability=(8, 0), native_bf16=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu.capability)
    # is_bf16_supported() says True on V100 / T4 through emulation; only including_emulation=False tells them apart.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or gpu.native_bf16)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    return gpu


def test_flash_attention_2_only_for_half_precision_on_ampere_and_later(fake_gpu):
    from corral.models.load import attention_implementation

    cuda = torch.device("cuda")
    assert attention_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert attention_implementation(cuda, torch.float16) == "flash_attention_2"
    assert attention_implementation(cuda, torch.float32) == "sdpa"  # FA2 refuses fp32 activations
    assert attention_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"
    fake_gpu.capability = (7, 5)  # T4: no FA2 kernels before Ampere
    assert attention_implementation(cuda, torch.float16) == "sdpa"


def test_flash_attention_2_needs_the_package(fake_gpu, monkeypatch):
    from corral.models.load import attention_implementation

    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    assert attention_implementation(torch.device("cuda"), torch.bfloat16) == "sdpa"


def test_the_loader_chooses_attention_for_the_dtype_it_loads(tiny_model_dir, monkeypatch):
    from corral.models import load

    asked = []
    monkeypatch.setattr(load, "attention_implementation",
                        lambda device, dtype: asked.append((device.type, dtype)) or "sdpa")
    load.load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert asked == [("cpu", torch.float32)]


def test_emulated_bf16_is_not_bf16(fake_gpu):
    from corral.models.load import resolve_dtype
    from corral.train.harness import auto_mixed_precision

    cuda = torch.device("cuda")
    assert resolve_dtype("auto", cuda) == torch.bfloat16 and auto_mixed_precision() == "bf16"
    fake_gpu.native_bf16 = False  # V100 / T4
    assert resolve_dtype("auto", cuda) == torch.float16
    assert auto_mixed_precision() == "fp16"  # fp16 autocast with loss scaling, not emulated bf16
    assert auto_mixed_precision("float16") == "fp16"


# --- 5. fp16 full fine-tuning; 13. fp32 master weights by default --------------------------------------------------


def test_full_finetuning_keeps_fp32_master_weights_unless_bf16_is_asked():
    from corral.models.load import master_dtype

    assert [master_dtype(d) for d in ("auto", "float16", "float32", "bfloat16")] == [
        "float32", "float32", "float32", "bfloat16"]  # fmt: skip


def test_fp16_full_finetune_gives_gradients_the_fp16_scaler_can_unscale(tiny_model_dir, tmp_path):
    """dtype=float16 with mixed_precision=fp16: the loss scaler unscales into the weights' dtype and refuses fp16
    gradients ('Attempting to unscale FP16 gradients'). The trained weights are fp32; fp16 is the autocast's."""
    from corral.config import SFTConfig
    from corral.recipes.sft import prepare_model

    def one_backward(model):
        scaler = torch.amp.GradScaler("cpu")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.tensor([[5, 17, 42, 99, 3]])
        scaler.scale(model(input_ids=ids, labels=ids).loss.float()).backward()
        scaler.unscale_(optimizer)

    full = prepare_model(SFTConfig(model=str(tiny_model_dir), method="full", dtype="float16"), "cpu")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    one_backward(full)
    # What the recipe loaded before: fp16 weights, whose gradients the scaler refuses.
    with pytest.raises(ValueError, match="unscale FP16 gradients"):
        one_backward(build_model(600).half())
    # LoRA keeps the fp16 base it was asked for (frozen); peft's adapters are fp32, which the scaler unscales.
    lora = prepare_model(SFTConfig(model=str(tiny_model_dir), method="lora", dtype="float16"), "cpu")
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.float16}
    assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}


def test_ppo_full_roles_train_fp32_master_weights(tiny_model_dir):
    from corral.train.ppo.roles import LoraSettings, build_roles

    roles = build_roles(str(tiny_model_dir), "tests.unit.test_ppo_recipe:vowel_share", method="full", dtype="float16",
                        lora=LoraSettings(4, 8, 0.0, "all-linear"), with_critic=True, pad_id=1, log=lambda *a: None)
    assert {p.dtype for p in roles.actor.parameters()} == {torch.float32}
    assert {p.dtype for p in roles.critic.parameters() if p.requires_grad} == {torch.float32}


# --- 4. / 10. DeepSpeed: the config accelerate hands it, one model per run, accumulation ----------------------------


def deepspeed_plugin_from(config_file: Path, monkeypatch):
    """The DeepSpeedPlugin `accelerate launch --config_file FILE` builds in each process (from the environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config_file),
                                                                                    "x.py"]))  # fmt: skip
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin()


class FakeDeepSpeedAccelerator:
    """What the harness reads of a DeepSpeed accelerator; `prepare` records the config accelerate would hand
    `deepspeed.initialize` (its `_prepare_deepspeed` refuses `train_micro_batch_size_per_gpu: auto` without a
    DataLoader, and keeps its own `gradient_accumulation_steps` over accelerate's)."""

    def __init__(self, plugin, world: int = 8):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED
        self.state = types.SimpleNamespace(deepspeed_plugin=plugin)
        self.num_processes, self.gradient_accumulation_steps, self.prepared = world, 1, []
        self.norm = None

    def prepare(self, model, optimizer):
        plugin = self.state.deepspeed_plugin
        if plugin.is_auto("train_micro_batch_size_per_gpu"):
            raise ValueError("When using DeepSpeed, `accelerate.prepare()` requires you to pass at least one of "
                             "training or evaluation dataloaders")  # accelerate's own words
        self.prepared.append(json.loads(json.dumps(plugin.deepspeed_config, default=str)))
        return model, optimizer

    def register_for_checkpointing(self, *objects):
        pass

    def clip_grad_norm_(self, params, max_norm):
        return self.norm  # DeepSpeedEngineWrapper.get_global_grad_norm(): a float, or None before a step


@pytest.mark.parametrize("config", ["accelerate_zero2.yaml", "accelerate_zero3.yaml"])
def test_deepspeed_gets_our_micro_batch_accumulation_and_clipping(config, monkeypatch, tmp_path):
    from corral.train.harness import Harness

    plugin = deepspeed_plugin_from(ROOT / "corral" / "configs" / config, monkeypatch)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")  # what the shipped config leaves to Corral
    accelerator = FakeDeepSpeedAccelerator(plugin)
    harness = Harness(accelerator, tmp_path, save_total_limit=1, resume="never")
    optim = dict(optimizer="adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), schedule="constant",
                 warmup_ratio=0.0)  # fmt: skip
    trained = harness.add("model", torch.nn.Linear(2, 2), save=lambda m, f: None, total_steps=3, max_grad_norm=0.5,
                          micro_batch=4, grad_accum=4, **optim)  # fmt: skip
    (config_seen,) = accelerator.prepared
    assert config_seen["train_micro_batch_size_per_gpu"] == 4
    assert config_seen["gradient_accumulation_steps"] == 4 == accelerator.gradient_accumulation_steps
    assert config_seen["train_batch_size"] == 4 * 4 * 8
    assert config_seen["gradient_clipping"] == 0.5
    assert config_seen["zero_optimization"]["stage"] == int(config[-6])
    # DeepSpeed clips in its own step and reports the norm; before any step it has none.
    accelerator.norm = 2.5
    assert float(trained.step()) == 2.5
    accelerator.norm = None
    assert torch.isnan(trained.step())
    with pytest.raises(ValueError, match="DeepSpeed trains one model per run"):
        harness.add("critic", torch.nn.Linear(2, 2), save=lambda m, f: None, total_steps=3, max_grad_norm=1.0, **optim)


def test_accumulation_syncs_gradients_on_the_last_micro_batch_only(tiny_tokenizer, tmp_path):
    """accelerate.accumulate() sets sync_gradients, which DDP, FSDP and DeepSpeed's engine (`backward(loss,
    sync_gradients=...)`: optimizer step on True only) follow; `no_sync` is a no-op under ZeRO >= 2."""
    from corral.config import TrainConfig
    from corral.data.pack import collate
    from corral.recipes.sft import sft_loss
    from corral.train.harness import make_accelerator
    from corral.train.loop import train
    from tests.unit.test_loop import rows_for

    accelerator = make_accelerator("no")
    synced, backward = [], accelerator.backward
    accelerator.backward = lambda loss: synced.append(accelerator.sync_gradients) or backward(loss)
    settings = TrainConfig(max_steps=2, batch_size=1, grad_accum=3, lr=1e-3, resume="never", max_grad_norm=0)
    train(build_model(len(tiny_tokenizer)), rows_for(tiny_tokenizer), collate_fn=lambda r: collate(r, 1),
          loss_fn=sft_loss, settings=settings, output_dir=tmp_path, save_model=lambda m, p: m.save_pretrained(p),
          accelerator=accelerator)  # fmt: skip
    assert synced == [False, False, True] * 2


# --- 6. / 11. / 12. vLLM: engine arguments, shutdown, one adapter name per sync, one process --------------------------


def write_adapter(folder: Path, r: int, rank_pattern: dict | None = None) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": rank_pattern or {}}))
    return str(folder)


def test_vllm_lora_rank_is_one_vllm_accepts_and_covers_every_adapter(tmp_path):
    from corral.generate.vllm import VLLM_LORA_RANKS, engine_args, vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 4, 8, 12, 16, 24, 48, 300, 512)] == [1, 8, 8, 16, 16, 32, 64, 320, 512]
    assert all(vllm_lora_rank(r) in VLLM_LORA_RANKS for r in range(1, 513))
    with pytest.raises(ValueError, match="above the largest"):
        vllm_lora_rank(600)
    assert engine_args("m", enable_lora=True, max_lora_rank=12)["max_lora_rank"] == 16
    served = [("a", write_adapter(tmp_path / "a", 8)), ("b", write_adapter(tmp_path / "b", 16, {"q_proj": 48}))]
    args = engine_args("m", served, max_len=1024)
    assert args["max_lora_rank"] == 64 and args["max_loras"] == 2 and args["enable_lora"]  # the default 16 failed
    assert args["max_model_len"] == 1024
    assert "max_lora_rank" not in engine_args("m")  # no LoRA: vLLM's own defaults


def test_ppo_vllm_engine_caps_its_context_and_rounds_the_rank(monkeypatch, tmp_path):
    import corral.generate.vllm as vllm_module
    from corral.config import PPOConfig
    from corral.recipes.ppo import AdapterSync, make_rollout_engine

    made = {}
    monkeypatch.setattr(vllm_module, "VLLMEngine", lambda path, **kw: made.update(kw) or types.SimpleNamespace())
    actor = types.SimpleNamespace(peft_config={"default": types.SimpleNamespace(r=24)})
    cfg = PPOConfig(reward="m:f", data={"max_prompt_len": 300}, rollout={"backend": "vllm", "max_new_tokens": 100})
    monkeypatch.setattr("corral.recipes.ppo.resolve_model", lambda name: types.SimpleNamespace(path="base"))
    with pytest.raises(ValueError, match="LoRA kernels have no float32"):  # dtype=auto on this CPU machine
        make_rollout_engine(cfg, actor, None, 8, tmp_path)
    cfg.dtype = "bfloat16"
    _, sync = make_rollout_engine(cfg, actor, None, 8, tmp_path)
    assert made["dtype"] == "bfloat16"  # the actor's own, never vLLM's auto (fp16 for a float32 checkpoint)
    assert made["max_len"] == 400  # prompts + replies: vLLM sizes its KV cache for this, not the model's context
    assert vllm_module.engine_args("base", enable_lora=True, max_lora_rank=made["max_lora_rank"])["max_lora_rank"] == 32
    assert made["gpu_memory_utilization"] == 0.3 and isinstance(sync, AdapterSync)


def test_vllm_close_shuts_the_engine_down():
    import asyncio
    import threading

    from corral.generate.vllm import VLLMEngine

    engine = object.__new__(VLLMEngine)  # no vLLM here: the engine object as __init__ leaves it, with a fake AsyncLLM
    engine._loop = asyncio.new_event_loop()
    engine._thread = threading.Thread(target=engine._loop.run_forever, daemon=True)
    engine._thread.start()
    engine._engine = types.SimpleNamespace(shutdown=lambda: shut.append(threading.current_thread()))
    shut: list = []
    engine.close()
    assert shut == [engine._thread]  # AsyncLLM.shutdown(), on the loop its tasks run on
    assert not engine._thread.is_alive()


class FakeVLLM:
    def __init__(self):
        self.loaded, self.removed = {}, []

    def load_adapter(self, name, path):
        self.loaded[name] = path

    def remove_adapter(self, name):
        self.removed.append(name)


def test_each_sync_loads_the_actor_under_a_new_name_and_keeps_two_folders(tmp_path):
    from peft import LoraConfig, get_peft_model

    from corral.recipes.ppo import AdapterSync

    actor = get_peft_model(build_model(600), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    folder = tmp_path / "rollout_adapter"
    staging = folder / "step-000001.tmp-4242"  # another process's folder being written
    staging.mkdir(parents=True)
    engine = FakeVLLM()
    sync = AdapterSync(engine, actor, folder)
    names = [sync(step) for step in (1, 2, 3, 4)]
    # vLLM's prefix cache is keyed by the adapter's name: a reused name serves prompts cached under old weights.
    assert names == ["actor-1", "actor-2", "actor-3", "actor-4"] == list(engine.loaded)
    assert engine.removed == ["actor-1", "actor-2", "actor-3"]
    assert engine.loaded["actor-4"] == str(folder / "step-000004")
    assert (folder / "step-000004" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001.tmp-4242", "step-000003", "step-000004"]


def test_vllm_rollouts_refuse_several_processes_and_ppo_refuses_sharded_weights():
    from accelerate.utils import DistributedType

    from corral.config import PPOConfig
    from corral.recipes.ppo import check_batch_shapes, check_scale_out

    cfg = PPOConfig(reward="m:f", rollout={"backend": "vllm", "prompts_per_step": 8}, update={"minibatch": 8})
    check_batch_shapes(cfg, 1)
    with pytest.raises(ValueError, match="rollout.backend=vllm runs in one process"):
        check_batch_shapes(cfg, 2)
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(ValueError, match="one unsharded copy of the base"):
            check_scale_out(cfg, types.SimpleNamespace(distributed_type=kind))
    check_scale_out(cfg, types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


# --- 7. the experience passes in micro-batches ---------------------------------------------------------------------


def test_experience_passes_run_a_few_rows_at_a_time(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from corral.train.ppo.advantages import KLController
    from corral.train.ppo.critic import Critic
    from corral.train.ppo.rollout import Samples
    from corral.train.ppo.step import PPOSettings, make_experience
    from transformers import AutoModelForSequenceClassification

    actor = get_peft_model(build_model(600), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                        task_type="CAUSAL_LM"))  # fmt: skip
    critic = Critic(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    replies = [[20, 21], [22], [23, 24, 25], [26, 27], [28]]
    samples = Samples(prompts, replies, [""] * 5, ["stop"] * 5, k=1)
    settings = PPOSettings(advantage="gae", epochs=2, minibatch=2)
    rows = []

    def count_rows(module, args, kwargs):  # the actor gets input_ids=..., the critic its tensors in order
        rows.append((args or [kwargs["input_ids"]])[0].shape[0])

    for module in (actor, critic):
        module.register_forward_pre_hook(count_rows, with_kwargs=True)
    exp = lambda size: make_experience(actor, samples, torch.arange(5.0), KLController(0.05), settings, 1,  # noqa: E731
                                       critic=critic, rows_per_forward=size)  # fmt: skip
    whole = exp(None)
    assert rows == [5, 5, 5]  # reference, old log-probs, values: the whole rollout in one forward each
    rows.clear()
    chunked = exp(2)
    assert rows == [2, 2, 1] * 3
    for name in ("ref_logprobs", "old_logprobs", "old_values", "advantages", "returns"):
        assert torch.allclose(getattr(chunked, name), getattr(whole, name), atol=1e-5), name


# --- 9. packed SFT under flash-attention 2 --------------------------------------------------------------------------


def fake_flash_attention(monkeypatch) -> list:
    """flash-attn's two kernels, in torch, with its signatures, behind transformers' own FA2 path: `flash_attn_func`
    is plain causal attention over each row, `flash_attn_varlen_func` causal attention within each segment of
    cu_seqlens. Returns the calls: ("dense", rows) or ("varlen", cu_seqlens)."""
    import transformers.modeling_flash_attention_utils as fa

    calls = []

    def causal(q, k, v, scale):  # (B, L, heads, dim), k / v with fewer heads (GQA)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal_=True, **kw):
        calls.append(("dense", q.shape[0]))
        return causal(q, k, v, softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=True, **kw):
        calls.append(("varlen", cu_seqlens_q.tolist()))
        bounds = cu_seqlens_q.tolist()
        return torch.cat([causal_attention(q, k, v, a, b, softmax_scale) for a, b in zip(bounds, bounds[1:])])

    def causal_attention(q, k, v, a, b, scale):
        return causal(q[None, a:b], k[None, a:b], v[None, a:b], scale)[0]

    process = fa._lazy_define_process_function(flash_attn_varlen_func)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: (
        (flash_attn_func, flash_attn_varlen_func, None, None, None), (process, process)))
    return calls


def test_packed_rows_under_flash_attention_2_keep_each_sample_to_itself(tiny_tokenizer, monkeypatch):
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.data.clean import conversations_to_samples
    from corral.data.pack import collate, pack_rows, single_rows
    from corral.models.forward import final_hidden
    from corral.recipes.sft import sft_loss
    from corral.train.losses import token_nll_sum

    template = get_template("chatml", tiny_tokenizer)
    convs = [Conversation.from_pairs(("user", f"Question {i}?"), ("assistant", "yes " * (2 + 3 * i))) for i in range(6)]
    samples, _ = conversations_to_samples(convs, template, 256)
    packed = collate(pack_rows(samples, max_len=80), pad_id=1)
    assert packed["input_ids"].shape[0] >= 2 and (packed["position_ids"][:, 1:] == 0).any()  # rows of several samples
    model = build_model(len(tiny_tokenizer)).eval()
    with torch.no_grad():
        one_by_one = [sft_loss(model, collate([row], pad_id=1)) for row in single_rows(samples)]  # SDPA, each alone
        want = sum(loss for loss, _ in one_by_one)
        calls = fake_flash_attention(monkeypatch)
        model.config._attn_implementation = "flash_attention_2"
        loss, count = sft_loss(model, packed)
        assert count == sum(n for _, n in one_by_one)
        assert loss == pytest.approx(want.item(), rel=1e-5)
        # What attention was handed: one segment per packed sample (the rows' samples, then each row's padding
        # with its last sample), for every layer.
        layers = model.config.num_hidden_layers
        assert [c[0] for c in calls] == ["varlen"] * layers
        starts = [r * packed["input_ids"].shape[1] + t for r, row in enumerate(packed["position_ids"].tolist())
                  for t, p in enumerate(row) if p == 0]  # fmt: skip
        assert calls[0][1] == [*starts, packed["input_ids"].numel()]
        # The rows as they are, batch size 2: transformers' FA2 runs plain causal attention over each row, so a row's
        # samples see the ones packed before them: a different loss. (What sft_loss did before.)
        calls.clear()
        hidden = final_hidden(model, packed["input_ids"], packed["position_ids"])
        leaked, _ = token_nll_sum(hidden, model.get_output_embeddings(), packed["targets"])
        assert calls[0][0] == "dense" and abs(leaked.item() - want.item()) > 1e-3


# --- 15. benchmarks: the same hardware on both sides, GPU memory recorded ------------------------------------------


def test_serve_bench_reads_the_server_process_gpu_memory(monkeypatch):
    import subprocess

    sys.path.insert(0, str(ROOT))
    from bench import serve

    out = "4242, 1536\n77, 100\n4242, 512\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(stdout=out))
    assert serve.gpu_memory_mb(4242) == 2048.0 and serve.gpu_memory_mb(5) is None


def test_ppo_bench_has_a_vllm_row_on_gpu_machines_only(monkeypatch):
    import importlib.util

    sys.path.insert(0, str(ROOT))
    from bench import ppo

    assert "corral-vllm" not in ppo.default_rows()  # this machine: no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "vllm" else None)
    assert ppo.default_rows()[-1] == "corral-vllm"
    assert ppo.parse_args([]).rows.split(",") == list(ppo.ROWS)


def test_ppo_summary_records_gpu_memory(monkeypatch, tmp_path):
    from corral.recipes.ppo import summarize

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    roles = types.SimpleNamespace(weight_bytes=2**20, base_bytes=2**20)
    metrics = types.SimpleNamespace(enabled=False)
    assert summarize(metrics, roles, tmp_path, False, print)["memory"]["peak_gpu_mib"] == 3.0


# --- CUDA only: what scripts/gpu_check.sh runs on a GPU machine (skipped here, with the reason) --------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (scripts/gpu_check.sh)")


def sft_run(model_dir, out, method: str, steps: int, dtype: str = "auto", lora: dict | None = None, **train):
    from corral.atomic import read_jsonl
    from corral.config import SFTConfig
    from corral.recipes import sft

    cfg = SFTConfig(model=str(model_dir), template="chatml", method=method, output_dir=str(out), dtype=dtype,
                    data={"path": "builtin:corral_identity"}, lora=lora or {"dropout": 0.0},
                    train={"max_steps": steps, "batch_size": 4, "max_len": 128, "lr": 5e-3, "warmup_ratio": 0.0,
                           "resume": "never"} | train)  # fmt: skip
    result = sft.run(cfg)
    return result, [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


@cuda_only
def test_cuda_qlora_sft_with_8bit_adamw(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from corral.models.load import load_model

    # r 64: bitsandbytes keeps 8-bit state only for tensors of at least 4096 values (a 64 x 64 lora_A).
    result, rows = sft_run(tiny_model_dir, tmp_path / "q", "qlora", 6, lora={"r": 64, "alpha": 64, "dropout": 0.0},
                           optimizer="adamw_8bit")  # fmt: skip
    assert rows[-1]["loss"] < rows[0]["loss"]
    state = torch.load(tmp_path / "q" / "checkpoints" / "step-000006" / "trainer_state" / "optimizer.bin",
                       weights_only=False)["state"]  # fmt: skip
    assert any(t.dtype == torch.uint8 for s in state.values() for t in s.values() if torch.is_tensor(t))
    model = load_model(str(result.model_dir), quant_bits=4)
    assert next(model.parameters()).device.type == "cuda"
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"


@cuda_only
def test_cuda_fp16_full_finetune_trains_fp32_master_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    result, rows = sft_run(tiny_model_dir, tmp_path / "f", "full", 4, dtype="float16")  # mixed precision auto: fp16
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(r["grad_norm"] < 1e3 for r in rows)  # unscaled: not x the loss scale (65536 at the start)
    assert {t.dtype for t in load_file(result.model_dir / "model.safetensors").values()} == {torch.float32}


@cuda_only
def test_cuda_flash_attention_2_packed_loss_equals_unpacked(tiny_model_dir, tiny_tokenizer):
    pytest.importorskip("flash_attn", reason="flash-attention 2 is not installed")
    from corral.chat.conversation import Conversation
    from corral.chat.templates import get_template
    from corral.data.clean import conversations_to_samples
    from corral.data.pack import collate, pack_rows, single_rows
    from corral.models.load import load_model
    from corral.recipes.sft import sft_loss

    model = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert model.config._attn_implementation == "flash_attention_2"
    template = get_template("chatml", tiny_tokenizer)
    convs = [Conversation.from_pairs(("user", f"Question {i}?"), ("assistant", "yes " * (2 + 3 * i))) for i in range(6)]
    samples, _ = conversations_to_samples(convs, template, 256)
    on_gpu = lambda batch: {k: v.cuda() for k, v in batch.items()}  # noqa: E731
    with torch.no_grad():
        packed, n = sft_loss(model, on_gpu(collate(pack_rows(samples, max_len=80), pad_id=1)))
        alone = [sft_loss(model, on_gpu(collate([row], pad_id=1))) for row in single_rows(samples)]
    assert n == sum(c for _, c in alone)
    assert packed.item() == pytest.approx(sum(loss.item() for loss, _ in alone), rel=1e-2)  # bf16 rounding only


@cuda_only
@pytest.mark.parametrize("config", ["accelerate_zero2.yaml", "accelerate_zero3.yaml"])
def test_cuda_deepspeed_accumulates_and_saves(config, tiny_model_dir, tmp_path):
    """The shipped ZeRO configs over the GPUs present, batch 2 x accumulation 2: one optimizer step per 2 micro-batches
    (the schedule's learning rates say so), close to one process without DeepSpeed; model/ loads."""
    import shutil
    import subprocess

    import yaml
    from transformers import AutoModelForCausalLM

    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    from tests.unit.test_distributed import free_port

    gpus = torch.cuda.device_count()
    settings = yaml.safe_load((ROOT / "corral" / "configs" / config).read_text()) | {"num_processes": gpus}
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(settings))
    args = ["sft", f"model={tiny_model_dir}", "template=chatml", "data.path=builtin:corral_identity", "method=full",
            "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2", "train.max_len=128", "train.lr=1e-3",
            "train.schedule=linear", "train.warmup_ratio=0", "train.resume=never"]  # fmt: skip
    command = ["accelerate", "launch", "--config_file", str(tmp_path / "ds.yaml"), "--main_process_port",
               str(free_port()), "-m", "corral.cli", *args, f"output_dir={tmp_path / 'ds'}"]  # fmt: skip
    launched = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    from corral.atomic import read_jsonl

    rows = [r for r in read_jsonl(tmp_path / "ds" / "metrics.jsonl") if "loss" in r]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * 2 / 3, 1e-3 / 3, 0.0])  # 3 optimizer steps, not 6
    _, plain = sft_run(tiny_model_dir, tmp_path / "plain", "full", 3, batch_size=2 * gpus, grad_accum=2, lr=1e-3,
                       schedule="linear")  # fmt: skip
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in plain], rel=2e-2)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ds" / "model")


@cuda_only
def test_cuda_ppo_on_policy_rloo_resumes_its_ema_onto_the_gpu(tiny_model_dir, tmp_path):
    """PPO's default shape (one epoch of one mini-batch: on-policy, rows drawn by a CPU permutation) with rloo on the
    GPU, checkpointed with its EMA; a longer run resumes from it (the EMA read back by accelerate onto the CPU, then
    updated with CUDA weights) and writes actor_ema/."""
    from corral.atomic import read_jsonl
    from corral.config import PPOConfig
    from corral.recipes.ppo import run

    def ppo(steps: int):
        return run(PPOConfig(model=str(tiny_model_dir), reward="tests.unit.test_ppo_recipe:vowel_share",
                             output_dir=str(tmp_path / "ppo"), advantage="rloo", steps=steps,
                             data={"path": "builtin:corral_identity"}, actor={"lr": 1e-3, "ema_decay": 0.9},
                             rollout={"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
                             update={"minibatch": 4}, train={"save_every": 1}))  # fmt: skip

    ppo(2)
    result = ppo(3)
    assert result.summary["last"]["step"] == 3 and result.summary["memory"]["peak_gpu_mib"] > 0
    assert [r["step"] for r in read_jsonl(tmp_path / "ppo" / "metrics.jsonl")] == [1, 2, 3]
    assert (tmp_path / "ppo" / "actor_ema" / "adapter_model.safetensors").is_file()


def test_preference_bench_runs_trl_where_it_runs_corral(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import preference

    args = preference.parse_args([])
    for cuda in (False, True):
        corral, trl = preference.corral_settings(args, tmp_path, cuda), preference.trl_settings(args, tmp_path, cuda)
        assert trl["use_cpu"] is not cuda and trl["bf16"] is cuda  # TRL was hard-wired to the CPU in fp32
        assert corral["dtype"] == ("bfloat16" if cuda else "float32")
        assert corral["train"]["mixed_precision"] == ("bf16" if cuda else "no")


def test_clipping_off_measures_a_step_without_gradients(tmp_path):
    """max_grad_norm=0 with no gradient on any trained weight (DeepSpeed ZeRO >= 2 keeps them in its own buffers):
    the norm is 0, not a crash on an empty torch.stack."""
    from corral.train.harness import Harness, make_accelerator

    harness = Harness(make_accelerator("no"), tmp_path, save_total_limit=1, resume="never")
    trained = harness.add("model", torch.nn.Linear(2, 2), save=lambda m, f: None, total_steps=1, optimizer="adamw",
                          lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), schedule="constant", warmup_ratio=0.0,
                          max_grad_norm=0.0)  # fmt: skip
    assert float(trained.step()) == 0.0

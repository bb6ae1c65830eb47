"""The vLLM engine without vLLM: its import error, the conversion of vLLM's outputs, the sampling parameters and
weight updates it asks for (checked against a fake `vllm` module); and, on a CUDA machine with vLLM, the real thing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors.engines import make_engine
from actors.engines import vllm as vllm_engine
from actors.engines.vllm import (VLLMEngine, WeightMeta, completion_from_output, completions_from_outputs,
                                 packed_checksum, request_seeds, stop_across, weight_group_ranks)
from actors.modeling import encode_prompts, load_tokenizer
from actors.records import Completion, SamplingParams
from actors.weights import pack_state_dict, weights_checksum

# ----------------------------------------------------------------------------- import


def test_importing_the_engines_never_imports_vllm():
    code = "import actors.engines, actors.engines.vllm, actors.rollout, sys; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_missing_vllm_is_an_import_error_that_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, as when not installed
    with pytest.raises(ImportError, match=r"pip install vllm==\d+\.\d+\.\d+ .*CUDA") as err:
        make_engine("vllm", model_path="/models/m", dtype="bfloat16", trust_remote_code=False, device="cuda")
    assert "rollout.engine: hf" in str(err.value)


def test_the_vllm_engine_refuses_a_cpu_worker():
    with pytest.raises(ValueError, match="rollout.num_gpus"):
        make_engine("vllm", model_path="/models/m", device="cpu")


def test_an_unknown_engine_names_the_allowed_ones():
    with pytest.raises(ValueError, match="'hf', 'vllm'"):
        make_engine("sglang", model_path="/models/m")


# ----------------------------------------------------------------------------- vLLM outputs -> our completions


def lp(value: float, rank: int = 1) -> SimpleNamespace:
    """Like `vllm.logprobs.Logprob`."""
    return SimpleNamespace(logprob=value, rank=rank, decoded_token=None)


def output(index: int, ids: list[int], text: str, logps: list[float], finish: str = "stop", extra=None):
    """Like `vllm.outputs.CompletionOutput` with logprobs=0: one {token_id: Logprob} per position (the sampled
    token; `extra` adds a top-1 alternative where the sampled token was not the most likely)."""
    positions = [{t: lp(v)} for t, v in zip(ids, logps)]
    for pos, (token, value) in (extra or {}).items():
        positions[pos][token] = lp(value)
    return SimpleNamespace(index=index, token_ids=tuple(ids), text=text, logprobs=positions, finish_reason=finish,
                           cumulative_logprob=sum(logps))


def request(*outputs) -> SimpleNamespace:
    """Like `vllm.outputs.RequestOutput`."""
    return SimpleNamespace(request_id="0", prompt=None, prompt_token_ids=[1, 2], outputs=list(outputs), finished=True)


def test_outputs_become_completions_in_sample_order_with_the_sampled_tokens_logprobs():
    reqs = [request(output(1, [7, 8], "#### 4", [-0.5, -0.25], "length", extra={0: (9, -0.1)}),
                    output(0, [5, 2], "4", [-1.0, -2.0], "stop")),
            request(output(0, [3], "x", [-0.125]), output(1, [4], "y", [-3.0]))]
    groups = completions_from_outputs(reqs, n=2)
    assert groups == [[Completion([5, 2], "4", [-1.0, -2.0], "stop"),
                       Completion([7, 8], "#### 4", [-0.5, -0.25], "length")],
                      [Completion([3], "x", [-0.125], "stop"), Completion([4], "y", [-3.0], "stop")]]


def test_flat_logprobs_which_index_like_a_list_of_dicts_work_too():
    class Flat(list):  # vLLM's FlatLogprobs supports `len` and `[i] -> {token_id: Logprob}`
        pass

    out = output(0, [5, 6], "ab", [-0.5, -0.75])
    out.logprobs = Flat(out.logprobs)
    assert completion_from_output(out).logprobs == [-0.5, -0.75]


@pytest.mark.parametrize("broken, message", [
    (dict(logprobs=None), "no log-probs"),
    (dict(logprobs=[{5: lp(-1.0)}]), "1 log-prob positions for 2 tokens"),
    (dict(logprobs=[{5: lp(-1.0)}, {9: lp(-1.0)}]), "sampled token 6 at position 1"),
    (dict(finish_reason="abort"), "finish_reason='abort'"),
])
def test_malformed_outputs_are_clear_errors(broken, message):
    out = output(0, [5, 6], "ab", [-0.5, -0.75])
    for key, value in broken.items():
        setattr(out, key, value)
    with pytest.raises(RuntimeError, match=message):
        completion_from_output(out)


def test_a_prompt_with_the_wrong_number_of_samples_is_an_error():
    with pytest.raises(RuntimeError, match="1 completions for a prompt; asked for 2"):
        completions_from_outputs([request(output(0, [1], "a", [-1.0]))], n=2)


def test_request_seeds_never_share_a_random_stream():
    seeds = request_seeds(1000, num_prompts=3, n=4)
    assert seeds == [1000, 1004, 1008]
    streams = {s + i for s in seeds for i in range(4)}  # vLLM seeds sample i of a request `seed + i`
    assert len(streams) == 12


# ----------------------------------------------------------------------------- the engine against a fake vLLM


def fake_token(context: list[int], version: str, seed: int, index: int) -> int:
    """The fake model's next token (the example tokenizer's: EOS = 1, digits 4-13): a function of the context, the
    weights (their version) and the request's random stream (its seed and how many tokens it has sampled)."""
    h = zlib.crc32(f"{context}|{version}|{seed}|{index}".encode())
    return 1 if h % 7 == 0 else 4 + h % 10


def fake_logprob(version: str) -> float:
    """The log-prob the fake model gives any token it samples under the weights of `version`."""
    return -0.5 - int(version)


class FakeLLMEngine:
    """`LLM.llm_engine` as the partial rollouts drive it (vLLM's `add_request` / `step` / `abort_request`): each
    `step` samples one token (`FakeLLM.model`) for every request and returns DELTA `RequestOutput`s; a request ends at
    EOS ("stop"), at a stop string in its own output text ("stop", the string kept) or after `max_tokens` ("length")."""

    def __init__(self, llm: "FakeLLM"):
        self.llm, self.requests, self.added, self.aborted, self.steps = llm, {}, [], [], 0

    def add_request(self, request_id, prompt, params, arrival_time=None, lora_request=None, tokenization_kwargs=None,
                    trace_headers=None, priority=0):
        from vllm.sampling_params import RequestOutputKind

        assert params.output_kind == RequestOutputKind.DELTA and params.n == 1, "the fake streams DELTA, n = 1"
        assert not self.llm.stale_cache, "a request added while the prefix cache holds KV of replaced weights"
        assert request_id not in self.requests and request_id not in [a[0] for a in self.added]
        self.added.append((request_id, prompt["prompt_token_ids"], params, lora_request))
        self.requests[request_id] = SimpleNamespace(context=list(prompt["prompt_token_ids"]), params=params, made=0,
                                                   text="")

    def step(self):
        self.steps += 1
        outs = []
        for request_id, r in list(self.requests.items()):
            token = FakeLLM.model(r.context, self.llm.version, r.params.seed, r.made)
            r.context.append(token)
            r.made += 1
            piece = self.llm.get_tokenizer().decode([token], skip_special_tokens=True)
            r.text += piece
            finish = ("stop" if token == 1 or any(s in r.text for s in r.params.stop or ()) else
                      "length" if r.made == r.params.max_tokens else None)
            outs.append(SimpleNamespace(request_id=request_id, finished=finish is not None, outputs=[
                output(0, [token], piece, [fake_logprob(self.llm.version)], finish)]))
            if finish:
                del self.requests[request_id]
        if FakeLLM.after_step is not None:
            FakeLLM.after_step(self)
        return outs

    def abort_request(self, request_ids, internal=False):
        for request_id in request_ids:
            self.aborted.append(request_id)
            self.requests.pop(request_id, None)

    def has_unfinished_requests(self):
        return bool(self.requests)


class FakeLLM:
    """Records what the engine asks of `vllm.LLM`; `generate` echoes one sample per requested `n`. A weight reload
    refuses requests in flight (their KV would mix two versions) and leaves the prefix cache stale until
    `reset_prefix_cache` (vLLM keeps cached blocks across weight updates); requests meeting a stale cache fail."""

    instances: list["FakeLLM"] = []
    model = staticmethod(fake_token)  # the partial rollouts' sampler (`FakeLLMEngine.step`)
    after_step = None  # called with the FakeLLMEngine after each step (a test's hook)

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.version = kwargs, [], "0"
        self.llm_engine, self.stale_cache, self.prefix_resets = FakeLLMEngine(self), False, 0
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True, **lora):
        assert not self.stale_cache, "generate with a prefix cache that holds KV of replaced weights"
        self.calls.append(("generate", prompts, params, *lora.values()))
        return [request(*[output(i, [3, 4], "ok", [-0.5, -0.5], "stop") for i in range(p.n)]) for p in params]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if method == "reload_weights":  # read the staged file now: the engine overwrites it on the next load
            from safetensors.torch import load_file

            assert not self.llm_engine.requests, "weights reloaded under requests in flight"
            kwargs = {**kwargs, "loaded": load_file(f"{kwargs['weights_path']}/model.safetensors")}
            self.stale_cache = True
        self.calls.append((method, kwargs))
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        """Kept out of `calls` (the tests of the weight protocols list those); counted in `prefix_resets`."""
        if self.llm_engine.requests:
            return False  # vLLM: blocks still in use are not freed
        self.stale_cache, self.prefix_resets = False, self.prefix_resets + 1
        return True

    def update_weight_version(self, version):
        self.calls.append(("update_weight_version", version))
        self.version = version

    def init_weight_transfer_engine(self, request):
        self.calls.append(("init_weight_transfer_engine", request))

    def start_weight_update(self):
        self.calls.append(("start_weight_update",))

    def update_weights(self, request):
        self.calls.append(("update_weights", request))

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish_weight_update", weight_version))
        self.version, self.stale_cache = weight_version, True

    def get_weight_version(self):
        return self.version

    def get_tokenizer(self):
        from actors.modeling import load_tokenizer

        return load_tokenizer(self.kwargs["model"])


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module with `SamplingParams` (keeps its keyword arguments), `LLM` (FakeLLM),
    `vllm.config.WeightTransferConfig` and `vllm.sampling_params.RequestOutputKind`, injected into sys.modules."""
    import enum

    module, config = types.ModuleType("vllm"), types.ModuleType("vllm.config")
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.RequestOutputKind = enum.IntEnum("RequestOutputKind", {"CUMULATIVE": 0, "DELTA": 1,
                                                                           "FINAL_ONLY": 2})
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.LLM = FakeLLM
    config.WeightTransferConfig = lambda backend: SimpleNamespace(backend=backend)
    module.config, module.sampling_params = config, sampling_params
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_params)
    monkeypatch.setattr(FakeLLM, "model", staticmethod(fake_token))
    monkeypatch.setattr(FakeLLM, "after_step", None)
    FakeLLM.instances.clear()
    return module


def test_the_llm_is_built_with_processed_logprobs_and_the_options_given(fake_vllm, tiny_model):
    make_engine("vllm", model_path=tiny_model, dtype="bfloat16", trust_remote_code=False, device="cuda")
    VLLMEngine(tiny_model, tensor_parallel_size=2, gpu_memory_utilization=0.3, enable_sleep_mode=True, seed=7,
               weight_sync="nccl")
    single, tp2 = (llm.kwargs for llm in FakeLLM.instances)
    assert single["logprobs_mode"] == "processed_logprobs" and tp2["logprobs_mode"] == "processed_logprobs"
    assert single["model"] == tiny_model and single["dtype"] == "bfloat16" and single["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in single and "weight_transfer_config" not in single
    assert tp2["distributed_executor_backend"] == "mp" and tp2["weight_transfer_config"].backend == "nccl"
    assert (tp2["gpu_memory_utilization"], tp2["enable_sleep_mode"], tp2["seed"]) == (0.3, True, 7)


def test_generate_sends_the_prompt_ids_it_is_given_and_sampling_that_matches_the_trainer(fake_vllm, tiny_model):
    engine = VLLMEngine(tiny_model)
    ids = encode_prompts(load_tokenizer(tiny_model), ["12+34=", "5+6="])  # tokenized once, as the driver does
    groups = engine.generate(ids, SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=9,
                                                 stop=("\n",)), seed=100)
    (_, sent, params), = [c for c in FakeLLM.instances[0].calls if c[0] == "generate"]
    assert sent == [{"prompt_token_ids": x} for x in ids]
    assert [p.seed for p in params] == [100, 103]
    p = params[0]
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.stop) == (3, 0.7, 0.9, -1, 9, ["\n"])
    assert p.logprobs == 0 and p.include_stop_str_in_output and p.skip_special_tokens
    assert [len(g) for g in groups] == [3, 3] and groups[0][0] == Completion([3, 4], "ok", [-0.5, -0.5], "stop")


def test_greedy_sampling_has_temperature_zero_and_no_stop_list(fake_vllm, tiny_model):
    engine = VLLMEngine(tiny_model)
    engine.generate([[5, 6, 7]], SamplingParams(n=1, temperature=0.0, top_p=0.5), seed=0)
    (_, _, (p,)), = [c for c in FakeLLM.instances[0].calls if c[0] == "generate"]
    assert (p.temperature, p.top_p, p.stop) == (0.0, 1.0, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_object_store_weights_are_staged_and_reloaded_in_place(fake_vllm, tiny_model, dtype):
    from transformers import AutoModelForCausalLM

    engine = VLLMEngine(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    packed = pack_state_dict(model)
    engine.load_weights(packed, version=3)

    llm = FakeLLM.instances[0]
    (method, kwargs), update = llm.calls[-2:]
    assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
    assert update == ("update_weight_version", "3")
    staged = kwargs["loaded"]
    assert staged.keys() == model.state_dict().keys()
    assert all(torch.equal(staged[k], v) and staged[k].dtype == dtype for k, v in model.state_dict().items())
    assert engine.checksum() == weights_checksum(model) == packed_checksum(packed)  # what the trainer reports


def test_the_checksum_before_any_update_is_the_checkpoints(fake_vllm, tiny_model):
    from transformers import AutoModelForCausalLM

    assert VLLMEngine(tiny_model).checksum() == weights_checksum(AutoModelForCausalLM.from_pretrained(tiny_model))


def test_nccl_receive_runs_the_weight_transfer_protocol_and_returns_the_version_served(fake_vllm, tiny_model):
    engine = VLLMEngine(tiny_model, weight_sync="nccl")
    engine.init_weight_group("10.0.0.1", 29555, rank_offset=1, world_size=3, packed=True)
    tensors = [("model.embed_tokens.weight", torch.zeros(5, 4, dtype=torch.bfloat16)), ("lm_head.bias", torch.zeros(5))]
    meta = WeightMeta.of(tensors)
    assert (meta.names, meta.dtype_names, meta.shapes) == (["model.embed_tokens.weight", "lm_head.bias"],
                                                            ["bfloat16", "float32"], [[5, 4], [5]])
    assert engine.receive_weights(meta, version=4, checksum="abc") == 4
    assert engine.checksum() == "abc"
    calls = FakeLLM.instances[0].calls
    assert calls[0] == ("init_weight_transfer_engine", {"init_info": dict(
        master_address="10.0.0.1", master_port=29555, rank_offset=1, world_size=3, packed=True)})
    assert [c[0] for c in calls[1:]] == ["start_weight_update", "update_weights", "finish_weight_update"]
    assert calls[2][1] == {"update_info": dict(names=meta.names, dtype_names=meta.dtype_names, shapes=meta.shapes)}
    assert calls[3][1] == "4"


def test_the_weight_group_puts_the_trainer_first_and_each_engines_tp_ranks_next():
    assert weight_group_ranks([2, 1, 4]) == (8, [1, 3, 4])
    assert weight_group_ranks([]) == (1, [])


def test_multi_turn_rollouts_feed_vllm_each_turns_whole_context_as_token_ids(fake_vllm, tiny_model):
    """Turn 2's prompt is turn 1's prompt ids + the sampled ids + the observation ids: nothing re-tokenized."""
    from actors.env_host import EnvHost
    from actors.multiturn import EnvClient, EnvLimits, rollout_trajectories
    from actors.records import PromptRequest
    from actors.turn_format import TurnFormat

    engine = VLLMEngine(tiny_model, device="cuda")
    tok = engine.tokenizer
    toy = Path(__file__).parent / "data" / "toy_envs.py"
    prompt = tok("12+3=")["input_ids"]
    groups = rollout_trajectories(engine, EnvClient([EnvHost(f"{toy}:Flaky", {"misbehave": False})]),
                                  TurnFormat(tok, "plain"), [PromptRequest("q", "12+3=", prompt, {})],
                                  SamplingParams(n=2, max_new_tokens=4), 0, EnvLimits(3, 64), 0, set())
    prompts = [[p["prompt_token_ids"] for p in call[1]] for call in FakeLLM.instances[0].calls if call[0] == "generate"]
    observation = tok("=1\n", add_special_tokens=False)["input_ids"]
    assert prompts[0] == [prompt]  # turn 1: the prompt once, n=2
    assert prompts[1] == [prompt + [3, 4] + observation] * 2  # turn 2: each trajectory's context, n=1
    assert prompts[2] == [prompt + ([3, 4] + observation) * 2] * 2
    assert [s.loss_mask for s in groups[0].samples] == [([1, 1] + [0] * len(observation)) * 2 + [1, 1]] * 2


def test_lora_adapters_reach_vllm_as_a_new_lora_request_per_version(fake_vllm, tiny_model, monkeypatch):
    """Under LoRA the engine asks for enable_lora, generates with the base until the first sync, then names each
    synced adapter (written in peft's format, the file names peft itself writes) in a LoRARequest with a new id."""
    import json
    from pathlib import Path

    from actors.lora import sync_state, wrap
    from actors.modeling import load_causal_lm
    from actors.weights import pack_state, state_checksum

    request_module = types.ModuleType("vllm.lora.request")
    request_module.LoRARequest = lambda name, int_id, path: SimpleNamespace(lora_name=name, lora_int_id=int_id,
                                                                           lora_path=path)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request_module)
    lora = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear", "reference": "trainer"}
    engine = VLLMEngine(tiny_model, lora=lora)
    llm = FakeLLM.instances[0]
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) == (True, 8, 1)
    policy = wrap(load_causal_lm(tiny_model), lora)
    paths = []
    for version in (None, 1, 2):
        if version is not None:
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if ".lora_B." in name:
                        p.add_(0.01)
            engine.load_weights(pack_state(sync_state(policy)), version=version)
        engine.generate([[5, 6]], SamplingParams(n=1), seed=0)
        request = llm.calls[-1][3]
        if version is None:
            assert request is None  # version 0: the base, which a fresh adapter (B = 0) computes
            continue
        assert (request.lora_name, request.lora_int_id) == (f"raylhf-policy-v{version}", version)
        paths.append(Path(request.lora_path))
        assert engine.checksum() == state_checksum(sync_state(policy))  # what the trainer reports
    assert not paths[0].exists() and paths[1].is_dir()  # the previous adapter's files are removed
    written = json.loads((paths[1] / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["base_model_name_or_path"] == tiny_model
    assert sorted(written["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
    peft_dir = paths[1].parent / "peft"
    policy.save_pretrained(str(peft_dir))  # peft's own writer names the tensors the same way
    from safetensors.torch import load_file

    ours = load_file(str(paths[1] / "adapter_model.safetensors"))
    theirs = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unknown_weight_sync_is_refused(fake_vllm, tiny_model):
    with pytest.raises(ValueError, match="'object_store', 'nccl'"):
        VLLMEngine(tiny_model, weight_sync="carrier-pigeon")


# ----------------------------------------------------------------------------- partial rollouts (fake vLLM)


def sample_by_hand(prompt: list[int], seed: int, budget: int, switch_after: int | None, rows: int):
    """(ids, versions, finish reason) of one sample simulated directly with the fake model: up to `switch_after`
    tokens from its first request (version 0, `seed`), the rest from a second request (version 1, seed + rows) whose
    context is the prompt + those tokens: what the engine must produce when new weights come after that step."""
    ids, versions = [], []
    segments = [("0", seed, budget if switch_after is None else switch_after), ("1", seed + rows, budget)]
    for version, request_seed, limit in segments:
        index = 0
        while len(ids) < limit:
            token = fake_token(prompt + ids, version, request_seed, index)
            index += 1
            ids.append(token)
            versions.append(int(version))
            if token == 1:
                return ids, versions, "stop"
    return ids, versions, "length"


def _loader(engine: VLLMEngine, model, at_call: int, version: int = 1):
    """A `refresh` like the rollout worker's: on its `at_call`-th call it loads `model`'s weights (as version
    `version`) into the engine and returns the version, else None."""
    packed, calls = pack_state_dict(model), []

    def refresh():
        calls.append(1)
        if len(calls) == at_call:
            engine.load_weights(packed, version)
            return version
        return None

    return refresh


def test_a_partial_rollout_takes_new_weights_between_steps_and_continues_the_same_sequences(fake_vllm, tiny_model):
    """Weights of version 1 come after step 3: each unfinished sample goes on as a new request whose prompt is its
    prompt + its 3 tokens, whose max_tokens is the rest of the budget and whose seed is its own; tokens 0-2 are
    version 0's (their log-probs the old weights'), the rest version 1's; the aborted requests were out of the engine
    before the reload and the prefix cache was reset before anything was added again."""
    from transformers import AutoModelForCausalLM

    engine = VLLMEngine(tiny_model)
    llm = FakeLLM.instances[0]
    prompts = encode_prompts(engine.tokenizer, ["12+345=", "7+8="])
    sampling, seed, rows = SamplingParams(n=3, temperature=0.7, max_new_tokens=8), 1000, 6
    refresh = _loader(engine, AutoModelForCausalLM.from_pretrained(tiny_model), at_call=3)
    groups = engine.generate(prompts, sampling, seed, refresh=refresh, version=0)

    resumed = 0
    for p, (prompt, group) in enumerate(zip(prompts, groups)):
        for i, c in enumerate(group):
            ids, versions, finish = sample_by_hand(prompt, seed + p * 3 + i, 8, 3, rows)
            assert (c.token_ids, c.versions, c.finish_reason) == (ids, versions, finish)
            assert c.logprobs == [fake_logprob(str(v)) for v in versions]  # each token's from its own version
            assert c.text == engine.tokenizer.decode(ids, skip_special_tokens=True) and len(ids) <= 8
            resumed += len(ids) > 3
    assert resumed >= 2  # several samples went on past the update (else this test proves little)
    first, again = llm.llm_engine.added[:rows], llm.llm_engine.added[rows:]
    assert [a[1] for a in first] == [p for p in prompts for _ in range(3)] and len(again) == resumed
    flat = [c for group in groups for c in group]
    resumed_rows = []
    for _, context, params, _ in again:
        j = params.seed - rows - seed  # row j's second request is seeded seed + j + rows
        resumed_rows.append(j)
        assert context == first[j][1] + flat[j].token_ids[:3]  # the same sequence, from where it was
        assert params.max_tokens == 8 - 3 and flat[j].versions[3:] and len(flat[j].token_ids) > 3
    assert sorted(llm.llm_engine.aborted) == sorted(first[j][0] for j in resumed_rows)  # the unfinished ones
    assert len({a[2].seed for a in llm.llm_engine.added}) == len(llm.llm_engine.added)  # no shared random stream
    assert llm.prefix_resets == 1 and not llm.llm_engine.requests and not engine._in_flight


def test_a_partial_rollout_whose_refresh_never_loads_is_one_request_per_sample_at_one_version(fake_vllm, tiny_model):
    engine = VLLMEngine(tiny_model)
    prompts = encode_prompts(engine.tokenizer, ["12+345=", "7+8="])
    groups = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6), 7, refresh=lambda: None, version=4)
    for p, (prompt, group) in enumerate(zip(prompts, groups)):
        for i, c in enumerate(group):
            ids, _, finish = sample_by_hand(prompt, 7 + p * 2 + i, 6, None, 4)
            assert (c.token_ids, c.versions, c.finish_reason) == (ids, [4] * len(ids), finish)
    llm = FakeLLM.instances[0]
    assert len(llm.llm_engine.added) == 4 and not llm.llm_engine.aborted and llm.prefix_resets == 0


def test_a_stop_string_split_by_a_weight_update_ends_the_sequence(fake_vllm, tiny_model, monkeypatch):
    """Stop "12": "1" is the last token before the update and "2" the first after, which the resumed request (its
    output text "2...") cannot see: the engine finds it, cuts after the "2" and aborts the request; a stop string
    inside one request is vLLM's own."""
    from transformers import AutoModelForCausalLM

    digits = {"0": [4, 5, 4, 4], "1": [6, 7, 8, 9, 10, 11]}  # version 0: "0100"; version 1: "234567"
    monkeypatch.setattr(FakeLLM, "model", staticmethod(lambda context, version, seed, index: digits[version][index]))
    engine = VLLMEngine(tiny_model)
    llm = FakeLLM.instances[0]
    sampling = SamplingParams(n=1, max_new_tokens=8, stop=("12",))
    refresh = _loader(engine, AutoModelForCausalLM.from_pretrained(tiny_model), at_call=2)
    ((c,),) = engine.generate([[2, 5]], sampling, 3, refresh=refresh, version=0)
    assert (c.token_ids, c.text, c.versions, c.finish_reason) == ([4, 5, 6], "012", [0, 0, 1], "stop")
    assert c.logprobs == [fake_logprob("0")] * 2 + [fake_logprob("1")]
    assert llm.llm_engine.aborted[-1] == llm.llm_engine.added[-1][0] and not llm.llm_engine.requests

    ((c,),) = engine.generate([[2, 5]], SamplingParams(n=1, max_new_tokens=8, stop=("34",)), 3,
                              refresh=lambda: None, version=1)
    assert (c.token_ids, c.text, c.finish_reason) == ([6, 7, 8], "234", "stop")  # vLLM's own stop (kept)


def test_stop_across_finds_only_a_stop_string_that_straddles_the_resume_point():
    assert stop_across("ab12cd", 3, ["12"]) and stop_across("ab12cd", 3, ["x", "b12c"])
    assert not stop_across("ab12cd", 2, ["12"])  # all of it after the resume: vLLM saw it
    assert not stop_across("ab12cd", 4, ["12"])  # all of it before: the sequence would have stopped there
    assert not stop_across("ab12cd", 3, ["13"])


def test_the_token_budget_counts_the_whole_sequence_across_resumes(fake_vllm, tiny_model, monkeypatch):
    """Never EOS: with weights updated after steps 2 and 4 each sample ends at exactly max_new_tokens, its three
    requests asked for 5, 3 and 1 tokens."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(FakeLLM, "model", staticmethod(lambda context, version, seed, index: 4 + index % 10))
    engine = VLLMEngine(tiny_model)
    llm = FakeLLM.instances[0]
    packed, calls = pack_state_dict(AutoModelForCausalLM.from_pretrained(tiny_model)), []

    def refresh():
        calls.append(1)
        if len(calls) in (2, 4):
            engine.load_weights(packed, len(calls) // 2)
            return len(calls) // 2
        return None

    groups = engine.generate([[2, 5], [2, 6, 7]], SamplingParams(n=2, max_new_tokens=5), 0, refresh=refresh)
    for group in groups:
        for c in group:
            assert (len(c.token_ids), c.finish_reason, c.versions) == (5, "length", [0, 0, 1, 1, 2])
    assert [a[2].max_tokens for a in llm.llm_engine.added] == [5] * 4 + [3] * 4 + [1] * 4
    assert llm.prefix_resets == 2


def test_a_partial_rollout_that_fails_leaves_nothing_running(fake_vllm, tiny_model):
    engine = VLLMEngine(tiny_model)
    llm = FakeLLM.instances[0]

    def refresh():
        raise RuntimeError("the board is gone")

    with pytest.raises(RuntimeError, match="board is gone"):
        engine.generate([[2, 5]], SamplingParams(n=2, max_new_tokens=30), 0, refresh=refresh)
    assert not llm.llm_engine.requests and not engine._in_flight


def test_a_vllm_rollout_worker_takes_weights_posted_on_the_board(fake_vllm, tiny_model, ray_local):
    """The Ray wiring of partial rollouts with the vllm engine: the worker hands `refresh` and `version` to it, the
    weights posted on a `WeightBoard` are loaded (the fake serves version 3) and every token carries version 3."""
    from transformers import AutoModelForCausalLM

    from actors.records import PromptRequest
    from actors.rollout import RolloutWorker
    from actors.weights import WeightBoard

    worker = RolloutWorker.serving(VLLMEngine(tiny_model), seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    board = ray_local.remote(WeightBoard).options(num_cpus=0).remote()
    ray_local.get(board.post.remote(3, [ray_local.put(pack_state_dict(model))]))
    prompts = encode_prompts(worker.engine.tokenizer, ["12+34="])
    (group,) = worker.generate([PromptRequest("u", "12+34=", prompts[0], {})], SamplingParams(n=2, max_new_tokens=6),
                               board=board)
    assert group.policy_version == 3 and worker.version == 3 and FakeLLM.instances[0].version == "3"
    assert all(s.versions == [3] * len(s.response_ids) and s.rollout_logp == [fake_logprob("3")] * len(s.response_ids)
               for s in group.samples)
    assert worker.engine.checksum() == weights_checksum(model)


# ----------------------------------------------------------------------------- the real engine (GPU)

needs_gpu_and_vllm = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
    reason="needs a CUDA GPU and vllm (pip install vllm==%s)" % vllm_engine.VLLM_VERSION)


def assert_logprobs_are_the_models(engine: VLLMEngine, model, prompts: list[str], sampling: SamplingParams):
    """vLLM's sampled-token log-probs equal log softmax(logits / T) of `model` under teacher forcing."""
    from actors.modeling import token_logprobs

    prompt_ids = encode_prompts(load_tokenizer(engine.model_path), prompts)
    groups = engine.generate(prompt_ids, sampling, seed=1)
    for ids, group in zip(prompt_ids, groups):
        for c in group:
            full = torch.tensor([ids + c.token_ids], device="cuda")
            with torch.no_grad():
                logits = model(full).logits[:, len(ids) - 1 : -1]  # [1, T, V]
            expect = token_logprobs(logits, full[:, len(ids):], sampling.temperature)[0].tolist()
            assert c.logprobs == pytest.approx(expect, abs=2e-3)


@pytest.mark.gpu
@needs_gpu_and_vllm
def test_real_vllm_logprobs_match_teacher_forcing_before_and_after_a_weight_update(tiny_model):
    """On a GPU: the log-probs vLLM reports are the trainer's (logits / T), from the checkpoint and, after
    `load_weights`, from the new weights."""
    from actors.modeling import load_causal_lm

    engine = VLLMEngine(tiny_model, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    model = load_causal_lm(tiny_model, "float32", device="cuda").eval()
    sampling = SamplingParams(n=4, temperature=0.7, max_new_tokens=8)
    assert_logprobs_are_the_models(engine, model, ["12+34=", "7+8="], sampling)

    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    engine.load_weights(pack_state_dict(model), version=1)
    assert_logprobs_are_the_models(engine, model, ["12+34=", "7+8="], sampling)
    assert engine.checksum() == weights_checksum(model)

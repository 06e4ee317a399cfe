"""vLLM rollout engine (GPU): the same interface as :class:`~posttrain.engines.rollout.HFRolloutEngine`.

vLLM is optional and imported only when this engine is built. Prompts go in as token ids, completions
come back as token ids with the sampled token's log-prob (``SamplingParams(logprobs=0)``).

Weight sync (:meth:`VLLMRolloutEngine.update_weights`) runs in the same process: the engine sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless the caller set it) so the model runner lives in this
process, then ``LLM.collective_rpc`` calls the runner's ``model.load_weights`` with the trainer's
``(name, tensor)`` pairs — vLLM maps HF parameter names onto its fused layers itself. The prefix cache
is reset afterwards, otherwise cached prompt KV from the old weights would be reused. With ``launcher=ray``
each Ray rollout worker builds its own engine on its GPU(s) (``ray.gpus_per_worker``) and loads every weight
version into it from its CPU copy of the policy (:mod:`posttrain.engines.ray_engine`; written for, not run).

Several trainer processes (torchrun, DDP or FSDP2): each process builds its own engine on its GPU, with
``distributed_executor_backend="external_launcher"`` (vLLM then takes its rank and device from the launcher's
variables, as TRL's colocated mode does), and samples its own share of the prompts.

Sleep mode (``sleep=1|2``, ``rollout.vllm_sleep``): colocated with the trainer on one GPU, vLLM sleeps after
every generation so training gets its memory back (``LLM(enable_sleep_mode=True)``, ``LLM.sleep``): level 1
offloads its weights to CPU and frees the KV cache; level 2 discards the weights too, which suits RL, where the
next generation needs the trainer's new weights anyway. ``update_weights`` wakes the weights alone, loads the
trainer's into them and only then does ``generate`` wake the KV cache, so the two never need the GPU at the same
time as a second copy. After a level-2 sleep, a generation without an ``update_weights`` first is refused
(vLLM would sample from discarded memory).

Log-probs: vLLM's default ``logprobs_mode`` reports the model's raw log-probs (before temperature and
top-k/top-p), which differs from the HF engine's sampling-distribution log-probs when temperature != 1
or a filter is on. Pass ``logprobs_mode="processed_logprobs"`` in ``llm_kwargs`` (recent vLLM) to get
the sampling-distribution semantics.
"""

from __future__ import annotations

import os

from posttrain.engines.rollout import Rollout, SamplingParams, prompt_seeds
from posttrain.errors import ConfigError, ModelError


def _load_weights(worker, weights):
    """Runs inside vLLM's worker: copy (name, tensor) pairs into the live model."""
    worker.model_runner.model.load_weights(weights=weights)
    return True


class VLLMRolloutEngine:
    """``VLLMRolloutEngine(model_path, sleep=0, **llm_kwargs)``: ``llm_kwargs`` go to ``vllm.LLM``
    (e.g. ``gpu_memory_utilization=0.3``, ``dtype="bfloat16"``, ``max_model_len=2048``); ``sleep``: the sleep
    level after every generation (0 = awake; see the module doc)."""

    def __init__(self, model_path: str, tokenizer=None, sleep: int = 0, **llm_kwargs):
        if sleep not in (0, 1, 2):
            raise ConfigError(f"vLLM sleep level {sleep}: vLLM has levels 1 and 2 (0 = no sleep)",
                              where="rollout.vllm_sleep", fix="rollout.vllm_sleep=0, 1 or 2")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process runner: see module doc
        try:
            import vllm
        except ImportError as e:
            raise ModelError("the vLLM rollout engine needs the vllm package, which is not installed",
                             fix="pip install 'posttrain[vllm]' on a CUDA machine, or use HFRolloutEngine") from e
        self._vllm = vllm
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # several trainer processes (torchrun): each builds its own vLLM on its own GPU, from the launcher's
            # RANK/LOCAL_RANK/WORLD_SIZE; vLLM's default in-process executor would take GPU 0 on every process
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        self.tokenizer, self.sleep = tokenizer, sleep
        self._asleep: list[str] = []     # what vLLM holds asleep ("weights", "kv_cache")
        self._weights_lost = False       # a level-2 sleep discarded them, and no update has loaded new ones
        self.llm = vllm.LLM(model=str(model_path), **({"enable_sleep_mode": True} if sleep else {}), **llm_kwargs)

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep = [t for t in self._asleep if t not in todo]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        params.validate()
        if any(len(p) == 0 for p in prompts):
            raise ConfigError("a prompt is empty", fix="every prompt needs at least one token")
        if self._weights_lost:
            raise ModelError("vLLM's weights were discarded by its level-2 sleep after the last generation, and no "
                             "update_weights has loaded new ones since: it would sample from freed memory",
                             where="rollout.vllm_sleep", fix="call update_weights before generate, or use "
                             "rollout.vllm_sleep=1 (offloads the weights to CPU instead)")
        self._wake("weights", "kv_cache")
        v = self._vllm
        sps = [v.SamplingParams(
            n=params.n, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, seed=seed, logprobs=0,
            stop_token_ids=list(params.stop_token_ids or []), stop=list(params.stop_strings) or None,
            # [] means "no EOS" in posttrain; None means the model's EOS (vLLM's default)
            ignore_eos=params.stop_token_ids is not None and not params.stop_token_ids,
            include_stop_str_in_output=True, skip_special_tokens=False)
            for seed in prompt_seeds(params, len(prompts))]  # one seed per prompt, as the local engine
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sps, use_tqdm=False)
        rollouts = []
        for prompt, out in zip(prompts, outs):
            for c in out.outputs:  # n completions of this prompt, in order
                ids = list(c.token_ids)
                lps = [step[t].logprob for t, step in zip(ids, c.logprobs or [])]
                if c.finish_reason == "length":
                    reason = "length"
                elif isinstance(c.stop_reason, str):
                    reason = "stop_string"
                else:
                    reason = "stop"
                rollouts.append(Rollout(list(prompt), ids, lps, reason))
        if self.sleep:  # training runs next: give the GPU memory back
            self.llm.sleep(level=self.sleep)
            self._asleep, self._weights_lost = ["weights", "kv_cache"], self.sleep == 2
        return rollouts

    def update_weights(self, model, version: int | None = None) -> None:
        """Load the trainer's weights (same architecture, HF parameter names) into the vLLM model."""
        from posttrain.models.loading import is_peft, merged_weights

        src = getattr(model, "module", model)
        state = merged_weights(src) if is_peft(src) else src.state_dict()  # LoRA: the adapters merged in
        weights = [(name, t.detach()) for name, t in state.items()]
        self._wake("weights")  # the KV cache stays asleep until generate needs it
        try:
            self.llm.collective_rpc(_load_weights, args=(weights,))
        except Exception as e:  # vLLM raises many kinds; name the step that failed
            raise ModelError(f"update_weights: vLLM could not load the trainer's weights: {e}",
                             fix="the trainer's model must have the architecture vLLM was started with") from e
        self._weights_lost = False
        self.llm.reset_prefix_cache()

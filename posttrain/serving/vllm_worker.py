"""A vLLM worker extension that lets ``rollout.engine=server`` reload a ``vllm serve`` process's weights.

Start vLLM with it (posttrain must be importable in vLLM's environment; this module imports nothing from
vLLM or from the rest of posttrain)::

    VLLM_SERVER_DEV_MODE=1 vllm serve <model> --worker-extension-cls posttrain.serving.vllm_worker.WeightReload \
        --logprobs-mode processed_logprobs

vLLM mixes the class into every GPU worker, and its dev-mode ``POST /collective_rpc`` endpoint calls a
worker method by name with string arguments on all workers: the trainer's client
(:mod:`posttrain.engines.server_engine`) calls ``posttrain_load_weights(path, version)`` after each
policy update and ``posttrain_weights_version()`` at start-up to check that the extension is there, then
``POST /reset_prefix_cache`` so no prompt KV computed with the old weights is reused. The file is the
trainer's ``safetensors.torch.save_model`` output with Hugging Face parameter names, which vLLM's
``model.load_weights`` maps onto its own (fused) layers, as ``LLM.collective_rpc`` does in
:mod:`posttrain.engines.vllm_engine`.
"""

from __future__ import annotations


class WeightReload:
    """Methods added to vLLM's worker (``--worker-extension-cls``); ``self`` is the worker."""

    def posttrain_load_weights(self, path: str, version: str) -> str:
        from safetensors.torch import load_file

        weights = load_file(path)  # CPU tensors; load_weights copies them into the worker's parameters
        self.model_runner.model.load_weights(weights=weights.items())
        self.posttrain_version = str(int(version))
        return self.posttrain_version

    def posttrain_weights_version(self) -> str:
        return getattr(self, "posttrain_version", "0")

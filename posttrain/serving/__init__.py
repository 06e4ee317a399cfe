"""Serving a local causal LM over the OpenAI-compatible HTTP protocol (``posttrain serve``).

The server lets any OpenAI client, and our own :class:`posttrain.judges.backends.OpenAIBackend`, talk
to a checkpoint produced by this framework. See :mod:`posttrain.serving.openai_server`.
"""

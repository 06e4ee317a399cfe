"""AI feedback: LLM judges (pairwise with position swap, single-answer grading), agreement with
human labels, and Constitutional AI critique → revision data.

- :mod:`~posttrain.judges.backends`: where text comes from (local HF model, OpenAI-compatible HTTP)
- :mod:`~posttrain.judges.pairwise`: A/B/tie verdicts, swap consistency, win rates, Cohen's κ
- :mod:`~posttrain.judges.grading`: 1–10 rubric scores
- :mod:`~posttrain.judges.constitution`: principle files and seeded sampling
- :mod:`~posttrain.judges.cai`: critique → revision chains and AI preference labels
- :mod:`~posttrain.judges.commands`: ``posttrain judge`` / ``posttrain cai``
"""

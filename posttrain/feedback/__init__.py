"""Human feedback: the labeling web app (``posttrain label ...``).

Modules: db (tables, engines), auth (passwords, tokens, sessions), deps (request plumbing),
assign (assignment and exactly-once labels), importing, export, agreement (κ, α), quality
(dashboard numbers), api (JSON), pages (HTML), app (FastAPI factory), generate, commands (CLI).
"""

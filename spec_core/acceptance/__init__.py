"""Acceptance measurement beside the evaluator (floor 2, next to ``spec_core.evaluate``):
``stats`` (tau, alpha_k, per-set results and their weighted summary, plots), ``depth`` (tau for
every drafting depth k = 1..K from one pass) and ``served`` (evaluation through a serving engine,
``evaluation.engine: vllm | sglang``). ``spec_core.evaluate`` imports these; they never import it.
"""

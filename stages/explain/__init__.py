"""The explain stage: ULTra explanation maps of latent tokens (PROTOCOL.md section 10).

``rollout`` computes the maps (a relevance rollout of attention gradients, batched over target
tokens); ``concepts`` clusters them into per-image concepts and segments and scores them;
``perturb`` is the perturbation test.
"""
from .stage import ExplainResult, is_done, run_explain

__all__ = ["ExplainResult", "is_done", "run_explain"]

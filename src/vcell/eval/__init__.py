"""Evaluation of predicted perturbation responses: the Virtual Cell Challenge metrics.

Submodules are imported on demand (``from vcell.eval.de import differential_expression``) so that
``import vcell.eval`` stays cheap.
"""

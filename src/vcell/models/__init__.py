"""Perturbation-response predictors: simple baselines and the STATE models, one interface."""

"""Adversarial distillation (Lion): pools, endpoint calls and budget, stages, filters, prompts, report.
`corral/recipes/distill.py` composes them into `corral distill`."""

"""Evaluation, its typed result, explanations, plots, the HTML report and prediction."""

"""Evaluation: metrics, inference, inputs, evaluate, predict, Grad-CAM."""

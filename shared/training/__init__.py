"""The learning core: local training, evaluation, metrics, explanations and model bundles (no Flower)."""

from shared.training.loop import (
    EvalResult,
    TrainConfig,
    TrainResult,
    build_task_model,
    evaluate_model,
    fit,
    model_inputs,
    predict_probs,
    train_epochs,
)

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "build_task_model",
    "evaluate_model",
    "fit",
    "model_inputs",
    "predict_probs",
    "train_epochs",
]

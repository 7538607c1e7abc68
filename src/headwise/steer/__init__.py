"""Steering through heads: soft injection of task embeddings, LoFiT offsets, ACT attention calibration.

    from headwise.steer import fit, save_steering, load_steering
    from headwise.tasks import load_task
    steering = fit(loaded, load_task("antonyms"), "lofit")
    save_steering(steering, "steer-antonyms", loaded.info.to_dict())

Each method is one file registered with `register_method`; `headwise steer` fits one from the
command line and `headwise generate --steer DIR` applies it.
"""

from __future__ import annotations

from . import act, lofit, soft_injection  # noqa: F401  (each registers its method)
from .base import METHODS, Steering, method_class, register_method
from .evaluate import fit, random_heads, steering_rows
from .files import load_steering, read_record, save_steering

__all__ = ["METHODS", "Steering", "fit", "load_steering", "method_class", "random_heads", "read_record",
           "register_method", "save_steering", "steering_rows"]

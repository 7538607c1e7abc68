"""The real default model: a LoFiT steering fitted on the antonyms task's training pairs answers far more
held-out pairs zero-shot than the unsteered model does, and survives saving and `generate --steer`."""

from __future__ import annotations

import pytest
import torch

from headwise.decode import greedy
from headwise.steer import fit, load_steering, save_steering
from headwise.tasks import encode, load_task, query, task_accuracy

pytestmark = pytest.mark.slow


def test_lofit_steers_zero_shot_antonyms_on_smollm2(smollm2, tmp_path):
    task = load_task("antonyms")
    steering = fit(smollm2, task, "lofit", seed=0)
    assert len(steering.heads) == 8 and steering.trained_parameters() == 8 * smollm2.geometry.head_dim
    zero = task_accuracy(smollm2, task, limit=30)
    steered = task_accuracy(smollm2, task, limit=30, edits=steering.edits())
    # Measured on 50 held-out pairs: 0.02 unsteered, 0.74 steered (bench/RESULTS.md).
    assert zero.accuracy <= 0.1 and steered.accuracy >= zero.accuracy + 0.3
    save_steering(steering, tmp_path / "s", smollm2.info.to_dict(), task=task.record())
    back = load_steering(tmp_path / "s", smollm2)
    ids = torch.tensor([encode(smollm2.tokenizer, query(task.test[0].prompt))])
    a = greedy(smollm2, ids, 4, edits=steering.edits()).texts
    assert greedy(smollm2, ids, 4, edits=back.edits()).texts == a
    assert greedy(smollm2, ids, 4, edits=back.with_strength(0).edits()).texts == greedy(smollm2, ids, 4).texts

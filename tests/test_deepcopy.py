"""Teachers made by copy.deepcopy of a hooked student never write into the student's captures."""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import SERError, attach_ser  # noqa: E402


def test_deepcopied_teacher_never_records_into_student():
    student = make_vit(0)
    ser = attach_ser(student, LAYER, photometric=None)
    teacher = copy.deepcopy(student)
    pair = make_pair(make_images(4, seed=1), seed=2)
    with ser.capture():
        student(pair.x1)
        with torch.no_grad():
            teacher(pair.x1), teacher(pair.x2)  # the teacher runs while the student's handle is armed
        student(pair.x2)
    caps = ser.captures
    assert len(caps) == 2, f"the student's handle recorded {len(caps)} maps for 2 student passes"
    assert all(c.requires_grad for c in caps), "a recorded map came from the no-grad teacher"
    ser.loss(pair).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_gets_its_own_handle_for_keys():
    """The documented MoCo/DINO pattern: a second handle on the copy produces no-grad keys."""
    student = make_vit(0)
    ser = attach_ser(student, LAYER, photometric=None)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    tser = attach_ser(teacher, LAYER, photometric=None)  # not 'already attached': it is another model
    pair = make_pair(make_images(4, seed=1), seed=2)
    with torch.no_grad():
        keys = (tser.encode(pair.x1), tser.encode(pair.x2))
    with ser.capture():
        student(pair.x1), student(pair.x2)
    assert len(ser.captures) == 2 and tser.captures == []
    loss = ser.loss(pair, keys=keys)
    loss.backward()
    assert torch.isfinite(loss)
    assert next(student.parameters()).grad is not None
    # teacher's keys equal the student's maps (same weights): same loss as the online keys
    with ser.capture():
        student(pair.x1), student(pair.x2)
    assert torch.allclose(ser.loss(pair).detach(), loss.detach(), rtol=1e-5)
    # EMA update of the teacher through state_dict works with both handles attached
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.mul_(0.99).add_(ps, alpha=0.01)
    tser.remove()
    assert ser.is_attached


def test_copy_made_inside_capture_is_inert():
    """Copying while armed (e.g. a lazily built EMA teacher in the first step) changes nothing."""
    student = make_vit(0)
    ser = attach_ser(student, LAYER, photometric=None)
    pair = make_pair(make_images(4, seed=1), seed=2)
    with ser.capture():
        teacher = copy.deepcopy(student)
        teacher(pair.x1)
        student(pair.x1), student(pair.x2)
    assert len(ser.captures) == 2
    ser.clear()


def test_handle_copy_is_detached_and_model_pickles():
    student = make_vit(0)
    ser = attach_ser(student, LAYER, photometric=None)
    dup = copy.deepcopy(ser)  # e.g. inside AveragedModel(module_holding_the_handle): detached, says to attach again
    assert not dup.is_attached
    with pytest.raises(SERError, match="attach again"):
        dup.capture().__enter__()
    buf = io.BytesIO()
    torch.save(student, buf)  # whole-model pickles (checkpoints) carry an inert hook
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    pair = make_pair(make_images(4, seed=1), seed=2)
    with ser.capture():
        clone(pair.x1)
    assert ser.captures == []
    # state_dict round trip is untouched by SER
    student.load_state_dict(clone.state_dict())

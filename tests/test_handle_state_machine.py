"""Random call orders on the SER handle (hypothesis RuleBasedStateMachine).

Rules: attach (with or without late [CLS]), views, capture (with or without an exception inside, complete or
partial), forward outside a capture, loss, encode (also inside a capture), forward_loss, deepcopy of the model
and of the handle, save/load of the model, a copy run inside an armed capture, remove, remove_ser, re-attach,
a step skipped after its captures (no loss), a step on an empty b2 batch (passes run or skipped).

Capture rule: an outermost capture block that begins while two or more captures are held drops them (a step
skipped after its captures); one held capture is kept (it may be the first view of a two-block step).

Invariants: after remove the model's outputs and state_dict equal the un-hooked model's and no ser_plugin hook
is left; every error raised by ser_plugin is a SERError; a correct step after any failure gives the same loss
as a fresh handle (photometric=None and fixed elements make the losses comparable).
"""

from __future__ import annotations

import copy
import io
import os
import sys

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import SERError, attach_ser, remove_ser  # noqa: E402
from ser_plugin.tap import is_ser_hook  # noqa: E402

_MODEL = make_vit(0).eval()
_X = make_images(4, seed=1)
_PAIR = make_pair(_X, seed=2)
_EMPTY = make_images(0, seed=3)
with torch.no_grad():
    _REF_OUT = _MODEL(_X).clone()
_REF_SD = {k: v.clone() for k, v in _MODEL.state_dict().items()}


def _fresh_loss(late: bool) -> float:
    ser = attach_ser(_MODEL, LAYER, photometric=None, late_cls=late)
    with ser.capture():
        _MODEL(_PAIR.x1), _MODEL(_PAIR.x2)
    out = ser.loss(_PAIR).item()
    ser.remove()
    return out


_REF_LOSS = {False: _fresh_loss(False), True: _fresh_loss(True)}


class Boom(RuntimeError):
    """The deliberate exception of a failed step (an OOM-skipped batch)."""


def _ser_hooks(model: torch.nn.Module) -> list:
    return [h for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values() if is_ser_hook(h)]


def _held_after_new_block(before: int) -> int:
    """Captures still held once a new outermost capture block has begun (the capture rule above)."""
    return 0 if before >= 2 else before


class HandleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = _MODEL
        remove_ser(self.model)
        self.ser = None
        self.late = False
        self.copies: list = []

    def attached(self) -> bool:
        return self.ser is not None and self.ser.is_attached

    def call(self, fn, *expected):
        """Runs fn; any exception must be a SERError (or one of ``expected``). Returns (ok, value)."""
        try:
            return True, fn()
        except SERError as e:
            assert len(str(e)) > 25
            return False, e
        except expected:
            return False, None

    # ------------------------------------------------------------------ rules
    @initialize(late=st.booleans())
    def start_attached(self, late):
        self.ser, self.late = attach_ser(self.model, LAYER, photometric=None, late_cls=late), late

    @rule(late=st.booleans())
    def attach(self, late):
        ok, ser = self.call(lambda: attach_ser(self.model, LAYER, photometric=None, late_cls=late))
        assert ok != self.attached(), "attach must work exactly when no handle is attached"
        if ok:
            self.ser, self.late = ser, late

    @precondition(lambda self: self.attached())
    @rule(seed=st.integers(0, 3))
    def views(self, seed):
        pair = self.ser.views(_X, generator=torch.Generator().manual_seed(seed))
        assert pair.x1.shape == _X.shape and len(pair.g1) == 4

    def _capture(self, passes: int, nested: bool, fail: bool) -> None:
        before = len(self.ser.captures)

        def step():
            with self.ser.capture():
                for i, x in enumerate((_PAIR.x1, _PAIR.x2)[:passes]):
                    if nested and i == 0:  # an inner capture around the first pass only: the outer must stay armed
                        with self.ser.capture():
                            self.model(x)
                    else:
                        self.model(x)
                if fail:
                    raise Boom("simulated OOM")

        self.call(step, Boom)
        want = _held_after_new_block(before) + (0 if fail else passes)
        assert len(self.ser.captures) == want, (passes, nested, fail, before, len(self.ser.captures))

    @precondition(lambda self: self.attached())
    @rule(nested=st.booleans())
    def capture_both_views(self, nested):
        self._capture(2, nested, fail=False)

    @precondition(lambda self: self.attached())
    @rule()
    def capture_one_view(self):
        self._capture(1, False, fail=False)  # leaves a stale capture: the next loss must refuse, then recover

    @precondition(lambda self: self.attached())
    @rule(passes=st.integers(0, 2), nested=st.booleans())
    def capture_that_fails(self, passes, nested):
        self._capture(passes, nested, fail=True)

    @rule()
    def forward_outside(self):
        before = len(self.ser.captures) if self.attached() else 0
        self.model(_X)
        assert (len(self.ser.captures) if self.attached() else 0) == before

    @precondition(lambda self: self.attached())
    @rule()
    def correct_step(self):
        stale = len(self.ser.captures)
        with self.ser.capture():
            self.model(_PAIR.x1), self.model(_PAIR.x2)
        ok, value = self.call(lambda: self.ser.loss(_PAIR))
        # after a skipped step (2+ held captures) the step works; one held capture is refused, naming ser.clear()
        assert ok == (stale != 1), f"stale={stale}: {value}"
        if not ok:
            assert "ser.clear()" in str(value)
        if ok:
            assert abs(value.item() - _REF_LOSS[self.late]) < 1e-5 * _REF_LOSS[self.late]
        assert self.ser.captures == []

    @precondition(lambda self: self.attached())
    @rule(inside=st.booleans())
    def encode(self, inside):
        before = len(self.ser.captures)
        if inside:
            with self.ser.capture():
                fmap = self.ser.encode(_PAIR.x1)
            before = _held_after_new_block(before)
        else:
            fmap = self.ser.encode(_PAIR.x1)
        assert fmap.shape == (4, 32, 4, 4) and len(self.ser.captures) == before

    @precondition(lambda self: self.attached())
    @rule()
    def forward_loss(self):
        before = len(self.ser.captures)
        value = self.ser.forward_loss(_PAIR)
        assert abs(value.item() - _REF_LOSS[self.late]) < 1e-5 * _REF_LOSS[self.late]
        assert len(self.ser.captures) == before

    @precondition(lambda self: self.attached())
    @rule(host_finite=st.booleans())
    def skipped_step(self, host_finite):
        """The host loss is not finite: the loop `continue`s after capturing both views, before ser.loss."""
        before = len(self.ser.captures)
        with self.ser.capture():
            self.model(_PAIR.x1), self.model(_PAIR.x2)
        assert len(self.ser.captures) == _held_after_new_block(before) + 2
        if host_finite:  # the same step not skipped: a correct step unless one stale capture was held
            ok, value = self.call(lambda: self.ser.loss(_PAIR))
            assert ok == (_held_after_new_block(before) == 0), (before, value)
            assert self.ser.captures == []

    @precondition(lambda self: self.attached())
    @rule(run_passes=st.booleans())
    def empty_step(self, run_passes):
        """A step with no b2 images: empty views; the passes run on them or are skipped; the loss is exactly 0."""
        before = len(self.ser.captures)
        pair = self.ser.views(_EMPTY)
        assert pair.x1.shape == (0, 3, 16, 16) and len(pair.g1) == 0
        if run_passes:
            with self.ser.capture():
                self.model(pair.x1), self.model(pair.x2)
            held = _held_after_new_block(before)
        else:
            held = before
        ok, value = self.call(lambda: self.ser.loss(pair))
        assert ok == (held == 0), (before, run_passes, value)
        if ok:
            assert value.item() == 0.0
            value.backward()
        assert self.ser.captures == []

    @rule()
    def bad_loss(self):
        ok, _ = self.call(lambda: self.ser.loss() if self.ser is not None else attach_ser(self.model, 99))
        assert not ok

    @rule(how=st.sampled_from(["deepcopy", "save_load"]))
    def copy_model(self, how):
        if how == "deepcopy":
            dup = copy.deepcopy(self.model)
        else:
            buf = io.BytesIO()
            torch.save(self.model, buf)
            buf.seek(0)
            dup = torch.load(buf, weights_only=False)
        self.copies.append(dup)
        if self.ser is not None:
            dup_ser = copy.deepcopy(self.ser)
            assert not dup_ser.is_attached
            self.call(lambda: dup_ser.encode(_X))

    @precondition(lambda self: self.attached() and self.copies)
    @rule()
    def copy_runs_inside_capture(self):
        before = len(self.ser.captures)
        with self.ser.capture():
            self.copies[-1](_PAIR.x1)
        assert len(self.ser.captures) == _held_after_new_block(before), "a copy recorded into the original handle"

    @rule(lost=st.booleans())
    def remove(self, lost):
        if lost:
            remove_ser(self.model)
        elif self.ser is not None:
            self.ser.remove()

    @precondition(lambda self: self.copies)
    @rule()
    def remove_ser_on_copy(self):
        dup = self.copies.pop()
        remove_ser(dup)
        assert _ser_hooks(dup) == []
        with torch.no_grad():
            assert torch.allclose(dup(_X), _REF_OUT, atol=1e-6)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def removed_means_untouched(self):
        if self.attached():
            return
        assert _ser_hooks(self.model) == [], "ser_plugin hooks left after remove"
        with torch.no_grad():
            assert torch.equal(self.model(_X), _REF_OUT)
        sd = self.model.state_dict()
        assert sd.keys() == _REF_SD.keys() and all(torch.equal(sd[k], _REF_SD[k]) for k in sd)

    def teardown(self) -> None:
        remove_ser(self.model)


HandleMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                           suppress_health_check=list(HealthCheck))
test_handle_state_machine = HandleMachine.TestCase

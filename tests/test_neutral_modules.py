"""The neutral low modules (gradcond.callbacks, gradcond.losses, gradcond.teleport.errors) are the one home of what
they hold: the old import paths give the same objects, and the one loss resolver refuses bad input clearly."""

import pytest
import torch

import gradcond.callbacks
import gradcond.losses
import gradcond.teleport as T
import gradcond.train
import gradcond.train.losses
from gradcond.teleport import errors
from gradcond.train.trainer import _RENAMED_CALLBACKS, _match_callback_states


def test_one_callback_base_and_one_loss_registry():
    assert gradcond.train.Callback is gradcond.callbacks.Callback
    assert gradcond.train.get_loss is gradcond.losses.get_loss is gradcond.train.losses.get_loss
    assert gradcond.train.losses.LOSSES is gradcond.losses.LOSSES
    for hook in gradcond.callbacks.HOOKS:
        assert callable(getattr(gradcond.callbacks.Callback, hook))


def test_get_loss_names_callables_and_bad_input():
    out, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
    ref = torch.nn.functional.cross_entropy(out, y)
    assert torch.equal(gradcond.losses.get_loss("cross_entropy")(out, y), ref)
    t = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(gradcond.losses.get_loss("dot")(out, t), -(out * t).sum(1).mean())
    f = lambda o, t: o.sum()  # noqa: E731
    assert gradcond.losses.get_loss(f) is f
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'; accepted: cross_entropy, dot, exp_ga, linear_mse, mse, pow3_ga\."):
        gradcond.losses.get_loss("hinge")
    with pytest.raises(TypeError, match="must be a loss name .* or a callable .* got int"):
        gradcond.losses.get_loss(3)


def test_one_teleport_error_class():
    from gradcond.teleport import level_set, nullspace, symmetry

    assert T.TeleportError is errors.TeleportError is nullspace.TeleportError is symmetry.TeleportError
    assert level_set.TeleportError is errors.TeleportError and T.TeleportRejected is errors.TeleportRejected
    assert issubclass(T.TeleportRejected, T.TeleportError) and issubclass(T.TeleportError, FloatingPointError)
    # the two callbacks now have different names: the CoB one and the base of the level-set ones
    assert T.TeleportCallback is not T.LevelSetTeleportCallback
    assert issubclass(T.NullSpaceTeleportCallback, T.LevelSetTeleportCallback)
    assert issubclass(T.SymmetryTeleportCallback, T.LevelSetTeleportCallback)


def test_checkpoint_of_the_renamed_cob_callback_module_still_resumes_its_state():
    cb = T.TeleportCallback(at_epoch=1)
    old_key = next(iter(_RENAMED_CALLBACKS))
    saved = [{"type": old_key, "state": {"done": [1]}}]
    assert _match_callback_states([cb], saved) == [(cb, {"done": [1]})]
    assert _match_callback_states([cb], [{"type": "gradcond.other.Thing", "state": {}}]) == []

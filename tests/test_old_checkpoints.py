"""Checkpoints written before the outer optimizer moved to torch's fused kernels (pymaml 0.1.0,
whose "sgd" / "adam" were torch.optim's default, non-fused ones) still load, and resume
bitwise: load_state_dict restores the saved param_group, fused=None included, so the resumed
run keeps torch.optim's non-fused step, which is what that version's steps were bitwise. It
runs on the per-iteration path (train_chunk only runs fused steps). The fixtures and how they
were made: tests/data/make_old_checkpoints.py."""

import os
import shutil

import pytest
import torch

import pymaml

from conftest import requires_fused

pytestmark = requires_fused

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
QUIET = dict(progress=False, log_every=0)


def load_fixture(tmp_path, name):
    path = tmp_path / f"{name}.ckpt"
    shutil.copy(os.path.join(DATA, f"{name}.ckpt"), path)  # resuming writes over it
    return path, torch.load(os.path.join(DATA, f"{name}.expected"), weights_only=True)


@pytest.mark.parametrize("name", ["seed_sgd", "sine_adam"])
def test_an_old_checkpoint_resumes_bitwise_on_torch_optims_unfused_step(tmp_path, name):
    # the fixture scripts' runs (threads do not change the fused op's results)
    kw = dict(seed_sgd=dict(), sine_adam=dict(task="sine", optimizer="adam", outer_lr=1e-3,
                                              meta_batch_size=3,
                                              optimizer_kwargs=dict(amsgrad=True)))[name]
    path, expected = load_fixture(tmp_path, name)
    saved = torch.load(path, weights_only=True)
    assert saved["pymaml_version"] == "0.1.0" and saved["iteration"] == 60
    assert saved["optimizer"]["param_groups"][0]["fused"] is None

    resumed = pymaml.train(iterations=120, checkpoint=path, resume=True, **kw, **QUIET)
    assert resumed.status == "completed" and resumed.iterations == 120
    assert torch.equal(resumed.model.params, expected["params"])
    assert torch.equal(resumed.losses, expected["losses"])
    assert resumed.fast_iterations == 0  # the per-iteration path
    # and the run stays on that step through later resumes
    assert torch.load(path, weights_only=True)["optimizer"]["param_groups"][0]["fused"] is None


"""A checkpoint loads to the CPU whatever device wrote it; the learner moves it to its own."""

import pytest
import torch

from dp_ops.engine.learner import Trainer, build_learner
from dp_ops.records.checkpoint import Checkpointer, load_checkpoint


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # (meta: no values)
def test_a_gpu_checkpoint_resumes_on_a_machine_without_one_and_on_the_learners_device(
    tiny_cfg, real, tmp_path, monkeypatch
):
    trainer = Trainer(build_learner(tiny_cfg.learner, 10, 1, seed=0), tiny_cfg.train, seed=0)
    trainer.train(real.val, 2)  # (an optimiser state too)
    state = {"records": [], "curve": [], "plateau": {"best": 0.5}, "trainer": trainer.state_dict()}
    with monkeypatch.context() as m:  # every tensor written as one living on cuda:0, as a GPU run writes it
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        Checkpointer(tmp_path / "state.pt").on_checkpoint(state)

    loaded = load_checkpoint(tmp_path / "state.pt")  # (this machine has no GPU)
    weights = loaded["trainer"]["model"]
    assert all(w.device.type == "cpu" and torch.equal(w, state["trainer"]["model"][k]) for k, w in weights.items())

    elsewhere = Trainer(build_learner(tiny_cfg.learner, 10, 1, seed=1), tiny_cfg.train, seed=0, device="meta")
    elsewhere.load_state_dict(loaded["trainer"])  # the state follows the learner to its device
    assert {p.device.type for p in elsewhere.model.parameters()} == {"meta"}
    moments = [v for s in elsewhere.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and {v.device.type for v in moments} == {"meta"}  # (torch keeps the step count on the CPU)
    assert elsewhere.iteration == 2

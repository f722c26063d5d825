"""The shared training step's safeguards: non-finite loss terms stop training (every DDP rank together), and each
term's pull on the student is measured as a gradient norm."""
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_protokd.training.base import NonFiniteLossError, stop_if_non_finite, term_gradient_norms

NAMES = ("loss", "seg_loss", "kd_loss", "proto_loss")


def trainer_stub(tmp_path, is_ddp=False, rank=0, network=None, grad_scaler=None):
    return SimpleNamespace(is_ddp=is_ddp, local_rank=rank, current_epoch=7, output_folder=str(tmp_path),
                           network=network, grad_scaler=grad_scaler,
                           __class__=SimpleNamespace(__name__="ProtoKDTrainer"))


def test_finite_values_come_back_on_the_host(tmp_path):
    values = stop_if_non_finite(trainer_stub(tmp_path), NAMES, torch.tensor([1.0, 0.5, 0.25, 0.125]))
    assert values.tolist() == [1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_term_stops_training_naming_term_and_epoch(tmp_path, bad):
    with pytest.raises(NonFiniteLossError, match=r"epoch 7: loss = .*proto_loss = .* is not finite"):
        stop_if_non_finite(trainer_stub(tmp_path), NAMES, torch.tensor([bad, 0.5, 0.25, bad]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, folder: str, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        values = torch.tensor([1.0, 0.5, 0.25, float("nan") if rank == 1 else 0.125])
        try:
            stop_if_non_finite(trainer_stub(folder, is_ddp=True, rank=rank), NAMES, values)
            results[rank] = "continued"
        except NonFiniteLossError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_rank_stops_when_one_rank_is_non_finite(tmp_path):
    """Rank 1's term is NaN, rank 0's are finite: both stop at the same step (a rank left waiting in the next
    collective would hang until the job's time limit)."""
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
    assert "proto_loss = nan" in results[1]
    assert "another rank's loss (this is rank 0)" in results[0]


def test_gradient_norm_of_each_weighted_term_at_the_parameters(tmp_path):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    output = network(torch.randn(5, 4))
    first, second = output[:, 0].square().mean(), output[:, 1].abs().mean()
    with torch.no_grad():
        ablated = output.sum()
    terms = {"seg_loss": (1.0, first), "kd_loss": (10.0, second), "proto_loss": (0.0, ablated)}
    norms = term_gradient_norms(trainer_stub(tmp_path, network=network), terms)
    for name, term in (("seg_loss", first), ("kd_loss", 10.0 * second)):
        gradients = torch.autograd.grad(term, list(network.parameters()), retain_graph=True, allow_unused=True)
        expected = torch.sqrt(sum((g ** 2).sum() for g in gradients if g is not None))
        assert norms[name] == pytest.approx(float(expected), rel=1e-5)
    assert norms["proto_loss"] == 0.0  # an ablated term (weight 0, no graph) does not pull
    # a GradScaler (float16 on CUDA) changes nothing but the underflow: the norms come out unscaled
    scaler = torch.amp.GradScaler("cpu")
    scaled = term_gradient_norms(trainer_stub(tmp_path, network=network, grad_scaler=scaler), terms)
    assert scaled == pytest.approx(norms, rel=1e-5)
    # the loss can still be backpropagated afterwards: the probe kept the graph
    (first + 10 * second).backward()

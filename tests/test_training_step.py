"""The shared training step's safeguards: non-finite loss terms stop training (every DDP rank together), and each
term's pull on the student is measured as a gradient norm."""
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_protokd.training import base as training_base
from nnunet_protokd.training.base import LossTermTraining, NonFiniteLossError, stop_if_non_finite, term_gradient_norms

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


class _RegionTrainer(LossTermTraining):
    """What probe_term_gradients reads of a trainer, with nnU-Net's region loss built and compiled as nnU-Net's
    _build_loss does when it compiles the network (loss.dc = torch.compile(loss.dc))."""
    logged_terms = ("seg_loss",)

    def __init__(self, network):
        self.network, self.device, self.grad_scaler = torch.compile(network), torch.device("cpu"), None
        self.loss = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                                    use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
        self.loss.dc = torch.compile(self.loss.dc)

    def weighted_loss_terms(self, data, target):
        return {"seg_loss": (1.0, self.loss(self.network(data), target))}


def test_the_gradient_probe_runs_through_no_compiled_graph(monkeypatch):
    """The per-term probe backpropagates each term over a retained graph. A compiled graph refuses that when it
    donates buffers (it stopped the first step of every trainer with compile on at a 24x40x40 patch, nnU-Net's
    Dice loss compiled with the network) and otherwise computes it wrong: so the probe's pass runs through the
    plain network and the plain Dice loss, whose norm equals the one computed without compiling; the compiled ones
    are back afterwards."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                                  torch.nn.Conv3d(4, 3, 3, padding=1))
    data, target = torch.randn(2, 1, 8, 12, 12), (torch.rand(2, 3, 8, 12, 12) > 0.7).float()
    trainer = _RegionTrainer(network)
    graphs = []

    def recording(trainer_, terms):
        graphs.append(_node_types(terms["seg_loss"][1].grad_fn))
        return term_gradient_norms(trainer_, terms)
    monkeypatch.setattr(training_base, "term_gradient_norms", recording)
    norms = trainer.probe_term_gradients(data, target)
    assert graphs and not [name for name in graphs[0] if "Compiled" in name], graphs[0]
    assert hasattr(trainer.network, "_orig_mod") and hasattr(trainer.loss.dc, "_orig_mod")  # restored

    plain = DC_and_BCE_loss({}, {"batch_dice": True, "do_bg": True, "smooth": 1e-5, "ddp": False},
                            use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    gradients = torch.autograd.grad(plain(network(data), target), list(network.parameters()))
    assert norms["seg_loss"] == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in gradients))), rel=1e-5)


def _node_types(grad_fn) -> set:
    seen, stack = set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}

"""LCKD: the fusion network, subsets, the cross-modal KD loss, teacher election and subset model folders."""
import json
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_protokd.channels import ChannelSubset, with_input_channel_check
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.lckd.election import elect_teachers, random_available, single_modality_dice, split_election_cases
from nnunet_protokd.lckd.network import FixedSubsetNetwork, ModalityFusionUNet, build_fusion_network
from nnunet_protokd.lckd.subsets import all_subsets, every_channel_subset, write_subset_model_folder
from nnunet_protokd.training.features import FeatureCapture
from nnunet_protokd.training.losses import cross_modal_kd_loss
from tests.test_student_settings import DATASET_JSON, make_plans, tiny_architecture

FUSIONS = ("slots", "mean")


def fusion_network(deep_supervision=False, fusion="slots", num_modalities=4, input_slots=None) -> ModalityFusionUNet:
    torch.manual_seed(0)
    unet = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision)
    return ModalityFusionUNet(unet, fusion, num_modalities, input_slots).eval()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_absent_modality_cannot_change_the_output_whatever_its_input(fusion):
    network = fusion_network(fusion=fusion)
    x = torch.randn(2, 4, 8, 16, 16)
    available = torch.tensor([[False, True, False, True], [True, True, True, False]])
    with torch.no_grad():
        reference = network(x, available)
        garbage = x.clone()
        garbage[0, 0], garbage[0, 2], garbage[1, 3] = float("nan"), 1e30, -float("inf")
        torch.testing.assert_close(network(garbage, available), reference, rtol=0, atol=0)
        # and the present ones do change it
        changed = x.clone()
        changed[0, 1] += 1
        assert not torch.allclose(network(changed, available)[0], reference[0])
        torch.testing.assert_close(network(changed, available)[1], reference[1])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_subset_model_given_only_its_files_predicts_what_training_predicted_with_a_mask(fusion):
    network = fusion_network(fusion=fusion)
    subset_network = fusion_network(fusion=fusion, input_slots=(1, 3))  # T1ce and FLAIR into their slots
    subset_network.load_state_dict(network.state_dict())
    x = torch.randn(1, 4, 8, 16, 16)
    with torch.no_grad():
        masked = FixedSubsetNetwork(network, torch.tensor([False, True, False, True]))(x)
        only_the_subset = subset_network(ChannelSubset(("T1ce", "FLAIR"), (1, 3)).select(x))
    torch.testing.assert_close(only_the_subset, masked)


def test_slot_fusion_fills_missing_slots_with_the_mean_and_concatenates_them_in_modality_order():
    """The authors' fusion: one slot per modality, a missing modality's slot holds the mean of the available ones."""
    network = fusion_network(deep_supervision=True, num_modalities=3)
    x = torch.randn(1, 3, 8, 16, 16)
    with torch.no_grad():
        skips = [network.encoder(x[:, [c]]) for c in (0, 2)]
        fused = [block(torch.cat([first, (first + third) / 2, third], dim=1))
                 for block, first, third in zip(network.fusion_blocks, *skips)]
        expected = network.decoder(fused)
        output = network(x, torch.tensor([True, False, True]))
    assert [block.conv.in_channels for block in network.fusion_blocks] == [12, 24, 48]  # 3 slots of 4, 8, 16
    for got, want in zip(output, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_slot_fusion_knows_which_modality_is_which_and_mean_fusion_does_not():
    x = torch.randn(1, 4, 8, 16, 16)
    swapped = x[:, [1, 0, 2, 3]]
    available = torch.tensor([True, True, False, False])
    with torch.no_grad():
        slots, mean = fusion_network(fusion="slots"), fusion_network(fusion="mean")
        assert not torch.allclose(slots(x, available), slots(swapped, available), atol=1e-4)
        torch.testing.assert_close(mean(x, available), mean(swapped, available))


def test_weights_of_the_other_fusion_are_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r"trained with 'mean' fusion but the model folder's plans.json asks for "
                                           r"'slots'.*\"LCKDTrainer\": \{\"fusion\": \"mean\"\}"):
        fusion_network(fusion="slots").load_state_dict(fusion_network(fusion="mean").state_dict())
    with pytest.raises(RuntimeError, match="trained with 'slots' fusion"):
        fusion_network(fusion="mean").load_state_dict(fusion_network(fusion="slots").state_dict())


def network_plans(fusion=None) -> dict:
    """Plans with a tiny PlainConvUNet that nnU-Net can build (and the LCKD fusion, if given)."""
    plans = make_plans()
    plans["configurations"]["3d_fullres"]["architecture"] = tiny_architecture()
    if fusion is not None:
        plans["configurations"]["3d_fullres"]["protokd"] = {"LCKDTrainer": {"fusion": fusion}}
    return plans


def network_of(plans: dict, num_input_channels: int):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    manager = PlansManager(plans)
    torch.manual_seed(0)
    return build_fusion_network(manager, manager.get_configuration("3d_fullres"), num_input_channels, 3, False).eval()


@pytest.mark.parametrize("fusion", [None, "mean"])
def test_every_subset_model_folder_network_predicts_what_the_trained_network_predicts_with_a_mask(fusion):
    """What nnUNetv2_predict builds from each of the 15 subset folders' plans (ChannelSubset.plans), loaded with the
    trained weights, given only the subset's files."""
    trained = network_of(network_plans(fusion), 4)
    assert trained.fusion == (fusion or "slots")  # slots by default
    x = torch.randn(1, 4, 8, 16, 16)
    subsets = every_channel_subset(DATASET_JSON)
    assert len(subsets) == 15
    for subset in subsets:
        network = network_of(subset.plans(network_plans(fusion)), len(subset.channel_indices))
        network.load_state_dict(trained.state_dict())
        available = torch.zeros(4, dtype=torch.bool)
        available[list(subset.channel_indices)] = True
        with torch.no_grad():
            torch.testing.assert_close(network(subset.select(x)), FixedSubsetNetwork(trained, available)(x))


def test_mean_fusion_is_the_mean_of_the_available_encodings_at_every_level():
    network = fusion_network(deep_supervision=True, fusion="mean", num_modalities=3)
    x = torch.randn(1, 3, 8, 16, 16)
    with torch.no_grad():
        skips = [network.encoder(x[:, [c]]) for c in (0, 2)]
        expected = network.decoder([(a + b) / 2 for a, b in zip(*skips)])
        output = network(x, torch.tensor([True, False, True]))
    for got, want in zip(output, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bottlenecks_per_modality_and_a_clear_error_for_an_empty_subset():
    network = fusion_network(num_modalities=3)
    available = torch.tensor([[True, False, True], [False, True, False]])
    x = torch.randn(2, 3, 8, 16, 16)
    with FeatureCapture(network) as capture, capture.recording() as features, torch.no_grad():
        network(x, available)
    dense = ModalityFusionUNet.per_modality(features["bottleneck"], available)
    assert dense.shape == (2, 3, 16, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(dense[0, 2], network.encoder(x[0:1, 2:3])[-1][0])
    assert torch.all(dense[0, 1] == 0) and torch.all(dense[1, 0] == 0)
    with pytest.raises(ValueError, match="at least one available modality"):
        network(x, torch.tensor([[True, False, False], [False, False, False]]))


def test_random_subsets_per_item_reach_every_non_empty_subset_uniformly():
    available = random_available(15000, 4, "per_item", torch.Generator().manual_seed(0))
    assert available.any(dim=1).all()
    codes = (available.long() * (2 ** torch.arange(4))).sum(1)
    frequencies = torch.bincount(codes, minlength=16).float() / len(codes)
    assert frequencies[0] == 0
    assert torch.all((frequencies[1:] - 1 / 15).abs() < 0.01)
    assert len(all_subsets(4)) == 15 and all_subsets(2) == [(0,), (1,), (0, 1)]


def test_random_subsets_per_batch_draw_one_to_m_minus_one_modalities_for_the_whole_batch():
    """The authors' draw: a size uniform in 1..3 (of 4), then that many modalities uniformly; never all four."""
    generator = torch.Generator().manual_seed(0)
    draws = [random_available(2, 4, "per_batch", generator) for _ in range(6000)]
    assert all(torch.equal(d[0], d[1]) for d in draws)  # the same subset for every item
    sizes = torch.tensor([int(d[0].sum()) for d in draws])
    assert set(sizes.tolist()) == {1, 2, 3}
    assert torch.all((torch.bincount(sizes, minlength=4)[1:].float() / len(draws) - 1 / 3).abs() < 0.025)
    pairs = [tuple(d[0].nonzero().squeeze(1).tolist()) for d in draws if int(d[0].sum()) == 2]
    counts = np.array([pairs.count(pair) for pair in {p for p in pairs}]) / len(pairs)
    assert len(counts) == 6 and np.all(np.abs(counts - 1 / 6) < 0.03)
    with pytest.raises(ValueError, match="sampling must be"):
        random_available(2, 4, "uniform")


def reference_cross_modal_kd(bottlenecks, available, teachers, pair_reduction):
    """Written from the authors' DualNet.forward: for every teacher and every other available modality, the L1
    distance (mean over the elements of the items that have both), summed over pairs; or ("mean", plugin 0.1.0)
    every (item, pair) distance averaged."""
    b, available = bottlenecks.detach().double(), available.tolist()
    per_pair, per_item_pair = [], []
    for t in sorted(set(teachers)):
        for s in range(b.shape[1]):
            items = [n for n in range(b.shape[0]) if s != t and available[n][t] and available[n][s]]
            if items:
                per_pair.append(float(sum((b[n, t] - b[n, s]).abs().sum() for n in items))
                                / (len(items) * b[0, 0].numel()))
                per_item_pair += [float((b[n, t] - b[n, s]).abs().mean()) for n in items]
    if pair_reduction == "sum":
        return sum(per_pair)
    return float(np.mean(per_item_pair)) if per_item_pair else 0.0


@pytest.mark.parametrize("pair_reduction", ["sum", "mean"])
def test_cross_modal_kd_loss_matches_the_reference_and_teaches_students_only(pair_reduction):
    generator = torch.Generator().manual_seed(1)
    bottlenecks = torch.randn(3, 4, 5, 2, 2, 2, generator=generator, requires_grad=True)
    per_item = torch.tensor([[True, True, False, True], [False, True, True, False], [True, False, False, False]])
    per_batch = torch.tensor([[True, False, True, True]]).expand(3, 4)
    for available, teachers in ((per_item, [0, 2]), (per_batch, [0, 2, 2]), (per_batch, [3])):
        loss = cross_modal_kd_loss(bottlenecks, available, teachers, pair_reduction)
        assert loss.item() == pytest.approx(reference_cross_modal_kd(bottlenecks, available, teachers,
                                                                     pair_reduction), rel=1e-6)
    # with one subset for the batch, "sum" is the authors' sum over pairs of nn.L1Loss over the batch
    b = bottlenecks.detach()
    authors = sum(torch.nn.L1Loss()(b[:, s], b[:, t]) for t in (0, 2) for s in (0, 2, 3) if s != t)
    torch.testing.assert_close(cross_modal_kd_loss(b, per_batch, [0, 2], "sum"), authors)
    loss = cross_modal_kd_loss(bottlenecks, per_item, [0, 2], pair_reduction)
    loss.backward()
    assert bottlenecks.grad[0, 0].abs().sum() == 0 and bottlenecks.grad[1, 2].abs().sum() == 0  # teachers
    assert bottlenecks.grad[0, 1].abs().sum() > 0 and bottlenecks.grad[1, 1].abs().sum() > 0
    # absent entries may hold anything; no pair at all gives 0
    garbage = bottlenecks.detach().clone()
    garbage[1, 0] = float("nan")
    torch.testing.assert_close(cross_modal_kd_loss(garbage, per_item, [0, 2], pair_reduction), loss.detach())
    assert cross_modal_kd_loss(garbage[2:], per_item[2:], [1], pair_reduction) == 0  # the teacher is missing
    assert cross_modal_kd_loss(garbage[2:], per_item[2:], [0], pair_reduction) == 0  # the teacher is alone
    assert cross_modal_kd_loss(garbage, per_item, [], pair_reduction) == 0


def test_election_picks_the_modality_whose_image_shows_each_task():
    # a "network" that outputs the mean of the available channels as logits, and a batch in which modality 2
    # equals the region masks of task 0 and modality 1 those of task 1: they must be elected
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((2, 2, 4, 8, 8)) > 0.6)
    data = torch.from_numpy(rng.normal(size=(2, 3, 4, 8, 8))).float()
    noise = data.clone()
    data[:, 2] = target[:, 0].float() * 20 - 10
    data[:, 1] = target[:, 1].float() * 20 - 10

    def forward(batch, available):
        mask = available[:, :, None, None, None].float()
        fused = (batch * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return fused.expand(-1, 2, -1, -1, -1)

    dice = single_modality_dice(forward, [(data, target)], 3, None)
    assert dice.shape == (3, 2)
    assert dice[2, 0] == 1.0 and dice[1, 1] == 1.0
    assert elect_teachers(dice) == [2, 1]
    # label-based: tasks are label groups scored on the argmax
    labels = torch.zeros(1, 1, 4, 8, 8, dtype=torch.long)
    labels[..., :4] = 1

    def label_forward(batch, available):
        logits = torch.zeros(1, 2, 4, 8, 8)
        logits[:, 1] = batch[:, available[0]].mean(1)
        return logits
    images = torch.stack([labels[:, 0].float() * 2 - 1, -labels[:, 0].float()], 1)  # modality 0 sees it
    assert elect_teachers(single_modality_dice(label_forward, [(images, labels)], 2, [(1,)])) == [0]
    assert elect_teachers(np.array([[np.nan, 0.2], [np.nan, 0.5]])) == [None, 1]
    del noise


def test_election_cases_are_held_out_of_training_only():
    training = [f"case_{i:03d}" for i in range(20)]
    kept, held_out = split_election_cases(training, 0.1, 0)
    assert len(held_out) == 2 and not set(kept) & set(held_out) and sorted(kept + held_out) == training
    assert split_election_cases(list(reversed(training)), 0.1, 0) == (kept, held_out)
    assert split_election_cases(training, 0.1, 1)[1] != held_out
    with pytest.raises(ConfigurationError, match="at least 2 training cases"):
        split_election_cases(["only"], 0.1, 0)


def test_subset_network_names_the_files_it_needs():
    plans = ChannelSubset.of_names(DATASET_JSON, ["flair", "T1ce"]).plans(make_plans())
    network = with_input_channel_check(torch.nn.Conv3d(2, 1, 1), 2, plans)
    with pytest.raises(ValueError, match=r"takes 2 input channel\(s\) per case \(<case>_0000 = T1ce, "
                                         r"<case>_0001 = FLAIR\) but received 1"):
        network(torch.zeros(1, 1, 2, 2, 2))


def make_trained_folder(results, configuration="3d_fullres"):
    source = results / f"LCKDTrainer__nnUNetPlans__{configuration}"
    (source / "fold_0").mkdir(parents=True)
    (source / "plans.json").write_text(json.dumps(make_plans()))
    (source / "dataset.json").write_text(json.dumps(DATASET_JSON))
    (source / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    return source


def test_subset_model_folder_shares_the_weights_and_declares_only_its_channels(tmp_path):
    source = make_trained_folder(tmp_path)
    subset = ChannelSubset.of_names(DATASET_JSON, ["FLAIR", "t1ce"])
    folder = write_subset_model_folder(str(tmp_path), "LCKDTrainer", "nnUNetPlans", "3d_fullres", subset)
    assert os.path.basename(folder) == "LCKDTrainer__nnUNetPlans__3d_fullres_T1ce+FLAIR"
    checkpoint = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    assert os.path.islink(checkpoint) and open(checkpoint, "rb").read() == b"weights"
    assert os.path.realpath(checkpoint) == str((source / "fold_0" / "checkpoint_final.pth").resolve())
    dataset_json = json.load(open(os.path.join(folder, "dataset.json")))
    assert dataset_json["channel_names"] == {"0": "T1ce", "1": "FLAIR"}
    plans = json.load(open(os.path.join(folder, "plans.json")))
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"][:2] == ["ZScoreNormalization",
                                                                                  "CTNormalization"]
    assert plans["foreground_intensity_properties_per_channel"]["1"] == {"mean": 30.0, "std": 4.0}
    # again: nothing changes; a different folder under that name is refused unless asked
    assert write_subset_model_folder(str(tmp_path), "LCKDTrainer", "nnUNetPlans", "3d_fullres", subset) == folder
    (tmp_path / os.path.basename(folder) / "dataset.json").write_text("{}")
    with pytest.raises(ConfigurationError, match="exists with other contents; pass --overwrite"):
        write_subset_model_folder(str(tmp_path), "LCKDTrainer", "nnUNetPlans", "3d_fullres", subset)
    write_subset_model_folder(str(tmp_path), "LCKDTrainer", "nnUNetPlans", "3d_fullres", subset, overwrite=True)
    assert json.load(open(os.path.join(folder, "dataset.json"))) == dataset_json
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_subset_model_folder_needs_a_trained_model(tmp_path):
    subset = ChannelSubset.of_names(DATASET_JSON, ["T2"])
    with pytest.raises(ConfigurationError, match="train LCKDTrainer on 3d_fullres first"):
        write_subset_model_folder(str(tmp_path), "LCKDTrainer", "nnUNetPlans", "3d_fullres", subset)
    source = make_trained_folder(tmp_path)
    os.remove(source / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ConfigurationError, match="no fold with checkpoint_final.pth"):
        write_subset_model_folder(str(tmp_path), "LCKDTrainer", "nnUNetPlans", "3d_fullres", subset)
    assert sorted(os.listdir(tmp_path)) == [source.name]

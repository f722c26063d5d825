"""Modality dropout: the random channel subsets, and a model for fewer channels by slicing the first convolution
(equal to the full model fed zeros), written as a subset model folder that plain nnU-Net predicts."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_protokd.channels import ChannelSubset
from nnunet_protokd.errors import ConfigurationError
from nnunet_protokd.lckd.subsets import (
    SLICED_FROM_KEY,
    full_and_single_channel_subsets,
    sliced_checkpoint,
    write_subset_model_folder,
)
from nnunet_protokd.training.modality_dropout import (
    NotSliceableError,
    ZeroFilledNetwork,
    first_convolution,
    minimal_input_shape,
    random_kept_channels,
    sliced_state_dict,
    zero_missing_channels,
)
from tests.test_lckd import network_plans
from tests.test_student_settings import DATASET_JSON, tiny_architecture

TRAINER = "ModalityDropoutTrainer"


def residual_encoder_plans() -> dict:
    plans = network_plans()
    plans["configurations"]["3d_fullres"]["architecture"] = tiny_architecture("ResidualEncoderUNet")
    return plans


ARCHITECTURES = {"PlainConvUNet": network_plans, "ResidualEncoderUNet": residual_encoder_plans}


def plain_network(plans: dict, num_input_channels: int, seed: int = 0) -> torch.nn.Module:
    """What plain nnU-Net builds from `plans`, every parameter random (biases too, which nnU-Net starts at 0)."""
    manager = PlansManager(plans)
    network = nnUNetTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"),
                                                       num_input_channels, 3, False).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return network


def sliced_network(plans: dict, full: torch.nn.Module, channel_indices) -> torch.nn.Module:
    manager = PlansManager(plans)
    convolution = first_convolution(full, minimal_input_shape(4, manager.get_configuration("3d_fullres")))
    network = plain_network(plans, len(channel_indices), seed=1)
    network.load_state_dict(sliced_state_dict(full.state_dict(), convolution, channel_indices))
    return network


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_the_sliced_network_is_the_full_network_fed_zeros_for_the_missing_channels(architecture):
    plans = ARCHITECTURES[architecture]()
    full = plain_network(plans, 4)
    x = torch.randn(1, 4, 4, 8, 8)
    for channels in ((1,), (1, 3), (0, 1, 2, 3)):
        available = torch.zeros(4, dtype=torch.bool)
        available[list(channels)] = True
        with torch.no_grad():
            torch.testing.assert_close(sliced_network(plans, full, channels)(x[:, list(channels)]),
                                       ZeroFilledNetwork(full, available)(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_wrong_slice_is_not_the_full_network(architecture):
    plans = ARCHITECTURES[architecture]()
    full = plain_network(plans, 4)
    x = torch.randn(1, 4, 4, 8, 8)
    available = torch.tensor([False, True, False, True])
    with torch.no_grad():
        expected = ZeroFilledNetwork(full, available)(x)
        for wrong in ((3, 1), (1, 2), (0, 3)):  # channel order swapped, another channel
            assert not torch.allclose(sliced_network(plans, full, wrong)(x[:, [1, 3]]), expected, atol=1e-3)


class NormalisedInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.InstanceNorm3d(4, affine=True)
        self.conv = torch.nn.Conv3d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(self.norm(x))


class TwoBranches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 2, 3, padding=1)
        self.skip = torch.nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.conv(x) + self.skip(x)


class LinearFirst(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x)


class ScaledInput(NormalisedInput):
    def forward(self, x):
        return self.conv(2 * x)


@pytest.mark.parametrize("network, receives", [(NormalisedInput, r"norm \(InstanceNorm3d\)"),
                                               (TwoBranches, r"conv \(Conv3d\), skip \(Conv3d\)"),
                                               (LinearFirst, r"linear \(Linear\)"), (ScaledInput, "no module")])
def test_an_input_that_reaches_more_than_one_convolution_cannot_be_sliced(network, receives):
    with pytest.raises(NotSliceableError, match=f"its input goes to {receives}, not to one convolution"):
        first_convolution(network(), (1, 4, 4, 4, 4))
    assert issubclass(NotSliceableError, ConfigurationError)  # one `error:` line in commands


def test_kept_channels_per_size_draw_each_size_equally_then_a_uniform_subset():
    generator = torch.Generator().manual_seed(0)
    kept = random_kept_channels(40000, 4, "per_size", generator=generator)
    sizes = kept.sum(dim=1)
    assert sizes.min() == 1 and sizes.max() == 4
    for size in range(1, 5):
        assert abs(float((sizes == size).float().mean()) - 0.25) < 0.015
    singles = kept[sizes == 1].float().mean(dim=0)  # each channel alone equally often
    torch.testing.assert_close(singles, torch.full((4,), 0.25), atol=0.02, rtol=0)
    always = random_kept_channels(100, 4, "per_size", keep_all_probability=1.0, generator=generator)
    assert bool(always.all())
    codes = (random_kept_channels(30000, 4, "per_subset", generator=generator).long() * (2 ** torch.arange(4))).sum(1)
    counts = torch.bincount(codes, minlength=16).float() / len(codes)
    assert counts[0] == 0 and bool(((counts[1:] - 1 / 15).abs() < 0.01).all())
    with pytest.raises(ValueError, match="sampling must be one of"):
        random_kept_channels(2, 4, "per_batch")


def test_missing_channels_are_zero_whatever_they_held():
    data = torch.randn(2, 3, 4, 4)
    data[0, 1] = float("nan")
    kept = torch.tensor([[True, False, True], [False, False, True]])
    zeroed = zero_missing_channels(data, kept)
    assert bool(torch.isfinite(zeroed).all())
    assert bool((zeroed[0, 1] == 0).all()) and bool((zeroed[1, :2] == 0).all())
    torch.testing.assert_close(zeroed[0, [0, 2]], data[0, [0, 2]])


def test_validation_subsets_are_every_channel_then_each_alone():
    assert [s.label for s in full_and_single_channel_subsets(DATASET_JSON)] == ["T1+T1ce+T2+FLAIR", "T1", "T1ce",
                                                                                  "T2", "FLAIR"]


def make_trained_folder(results, plans: dict, full: torch.nn.Module):
    source = results / f"{TRAINER}__nnUNetPlans__3d_fullres"
    (source / "fold_0").mkdir(parents=True)
    (source / "plans.json").write_text(json.dumps(plans))
    (source / "dataset.json").write_text(json.dumps(DATASET_JSON))
    torch.save({"network_weights": full.state_dict(), "optimizer_state": {"state": {}}, "trainer_name": TRAINER,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": DATASET_JSON},
                "current_epoch": 3, "inference_allowed_mirroring_axes": (0, 1, 2)},
               source / "fold_0" / "checkpoint_final.pth")
    return source


def test_a_subset_folder_of_modality_dropout_is_plain_nnunet_with_the_first_convolution_sliced(tmp_path):
    plans = network_plans()
    full = plain_network(plans, 4)
    source = make_trained_folder(tmp_path, plans, full)
    subset = ChannelSubset.of_names(DATASET_JSON, ["FLAIR", "T1ce"])
    folder = write_subset_model_folder(str(tmp_path), TRAINER, "nnUNetPlans", "3d_fullres", subset)
    assert os.path.basename(folder) == f"{TRAINER}__nnUNetPlans__3d_fullres_T1ce+FLAIR"
    checkpoint_file = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    assert os.path.isfile(checkpoint_file) and not os.path.islink(checkpoint_file)
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["optimizer_state"] is None
    assert checkpoint[SLICED_FROM_KEY]["checkpoint"] == os.path.join("..", "..", source.name, "fold_0",
                                                                     "checkpoint_final.pth")
    assert json.load(open(os.path.join(folder, "dataset.json")))["channel_names"] == {"0": "T1ce", "1": "FLAIR"}
    # what plain nnUNetv2_predict builds from the folder, given the two files, is the full network fed zeros
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, (0,))
    x = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        predictor.network.eval()
        torch.testing.assert_close(predictor.network(x[:, [1, 3]]),
                                   ZeroFilledNetwork(full, torch.tensor([False, True, False, True]))(x),
                                   rtol=1e-4, atol=1e-4)
    # again: nothing changes; a retrained model replaces it only when asked
    mtime = os.path.getmtime(checkpoint_file)
    assert write_subset_model_folder(str(tmp_path), TRAINER, "nnUNetPlans", "3d_fullres", subset) == folder
    assert os.path.getmtime(checkpoint_file) == mtime
    make_trained_folder(tmp_path / "retrained", plans, plain_network(plans, 4, seed=5))
    os.replace(tmp_path / "retrained" / source.name / "fold_0" / "checkpoint_final.pth",
               source / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ConfigurationError, match="exists with other contents; pass --overwrite"):
        write_subset_model_folder(str(tmp_path), TRAINER, "nnUNetPlans", "3d_fullres", subset)
    write_subset_model_folder(str(tmp_path), TRAINER, "nnUNetPlans", "3d_fullres", subset, overwrite=True)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_a_model_that_cannot_be_sliced_leaves_no_folder(tmp_path):
    plans = network_plans()
    checkpoint = {"network_weights": NormalisedInput().state_dict(), "init_args": {"configuration": "3d_fullres"}}
    with pytest.raises(RuntimeError):  # not nnU-Net's network of these plans: its weights do not load
        sliced_checkpoint(checkpoint, plans, DATASET_JSON, "3d_fullres", ChannelSubset.of_names(DATASET_JSON, ["T1"]))


def test_the_trainer_zeroes_the_dropped_channels_of_each_item_and_keeps_the_others():
    from trainers.ModalityDropoutTrainer import ModalityDropoutTrainer
    seen = []
    stub = SimpleNamespace(settings={"subset_sampling": "per_size", "keep_all_probability": 0.0},
                           network=lambda x: seen.append(x) or x.sum(), loss=lambda output, target: output)
    data = torch.rand(64, 4, 2, 3, 3) + 1  # normalised data is never exactly 0 here
    torch.manual_seed(0)
    terms = ModalityDropoutTrainer.weighted_loss_terms(stub, data, None)
    assert set(terms) == {"seg_loss"} and terms["seg_loss"][0] == 1.0
    kept = seen[0].flatten(2).ne(0).all(dim=2)
    assert bool((seen[0].flatten(2).eq(0).all(dim=2) | kept).all())  # a channel is kept whole or zero whole
    assert bool(kept.any(dim=1).all()) and not bool(kept.all(dim=1).all())  # never none, not always all
    torch.testing.assert_close(seen[0], data * kept[:, :, None, None, None])
    stub.settings = {**stub.settings, "keep_all_probability": 1.0}
    ModalityDropoutTrainer.weighted_loss_terms(stub, data, None)
    torch.testing.assert_close(seen[1], data)


def test_a_subset_folder_of_modality_dropout_exports_for_nnunet_alone(tmp_path, monkeypatch):
    from nnunet_protokd.deploy.export import export_student
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    results = tmp_path / "nnUNet_results" / "Dataset501_BraTS2018"
    results.mkdir()
    plans = network_plans()
    plans["configurations"]["3d_fullres"].update(spacing=[1.0, 1.0, 1.0], patch_size=[4, 8, 8])
    source = make_trained_folder(results, plans, plain_network(plans, 4))
    summary = {"cases": ["a"], "subsets": {"T1ce": {"mean": {"(1, 2, 3)": 0.5}, "foreground_mean": 0.5}}}
    (source / "fold_0" / "validation_subsets").mkdir()
    (source / "fold_0" / "validation_subsets" / "summary.json").write_text(json.dumps(summary))
    write_subset_model_folder(str(results), TRAINER, "nnUNetPlans", "3d_fullres",
                              ChannelSubset.of_names(DATASET_JSON, ["T1ce"]))
    exported = export_student("501", "3d_fullres_T1ce", TRAINER, ["0"], str(tmp_path / "model.zip"))
    assert exported.model_folder == f"Dataset501_BraTS2018/{TRAINER}__nnUNetPlans__3d_fullres_T1ce"
    assert exported.card["model"]["needs_plugin"] is False
    assert not any("nnunet-protokd" in line for line in exported.card["usage"])
    assert exported.card["validation"]["0"]["dice"]["whole tumor"] == 0.5  # the trained model's T1ce row

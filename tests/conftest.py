import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts (nnUNetv2_*, nnunet-protokd)

# Each test process gets its share of the cores (under ./bootstrap.sh test, two pytest-xdist workers on 2 cores: one
# thread each), and so does every command it starts, which inherits this environment. nnU-Net's prediction (also
# that of its final validation) uses nnUNet_def_n_proc threads, and that many spawned processes each re-import
# nnU-Net (8-11 s of CPU) for its export and evaluation pools. OpenMP threads that wait sleep instead of spinning:
# nnUNetv2_train sets torch's thread count to the machine's cores whatever OMP_NUM_THREADS says, and with two
# processes per core busy-waiting threads burned up to four times the CPU of the work itself (measured: one
# forward pass of the phantoms' 3d_fullres network, 0.71 CPU-s with spinning threads, 0.18 s passive).
CORES_PER_TEST_PROCESS = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ.update(OMP_NUM_THREADS=CORES_PER_TEST_PROCESS, OMP_WAIT_POLICY="PASSIVE",
                  nnUNet_def_n_proc=CORES_PER_TEST_PROCESS, nnUNet_n_proc_DA="2")


def nnunet_environment(root: Path) -> dict:
    """Environment for nnU-Net commands on folders under `root` (threads and processes: as this process's)."""
    from nnunet_protokd.trainer_path import add_trainers_to_environment
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnUNet_results"), PYTHONWARNINGS="ignore")
    add_trainers_to_environment(env)
    return env


def run(command: list, env: dict = None, timeout: int = 1200, expect_success: bool = True, cwd=None):
    """Runs a command; on an unexpected exit status the assertion shows the end of its output."""
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=cwd)
    if expect_success and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}:\n"
                             f"{(result.stdout + result.stderr)[-4000:]}")
    return result


def main_in_process(arguments, environ: dict) -> int:
    """`nnunet-protokd ARGUMENTS` through the command's own `main` in this test process, with `environ` over
    os.environ while it runs (nnU-Net 2.8 reads its folder variables when used); returns its exit status."""
    from nnunet_protokd.cli import main  # not at the top: conftest sets the thread variables before torch loads
    with mock.patch.dict(os.environ, environ):
        return main([str(a) for a in arguments])


def protokd_in_process(root: Path, *arguments) -> str:
    """`nnunet-protokd ARGUMENTS` on `root`'s nnU-Net folders, run by this test process (the command's own `main`;
    nnU-Net 2.8 reads its folder variables when used): a set-up step without starting Python, PyTorch and nnU-Net
    again (8-11 s of CPU a command). Returns what it printed; a failure is the test's error, with its message. The
    commands whose output or exit status a test checks run as subprocesses (`run`), as a user runs them."""
    folders = {k: v for k, v in nnunet_environment(root).items() if k in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                           "nnUNet_results")}
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        status = main_in_process(arguments, folders)
    if status:
        raise AssertionError(f"nnunet-protokd {' '.join(map(str, arguments))} exited {status}:\n{errors.getvalue()}")
    return printed.getvalue()


def nnunet_train_in_process(arguments, environ: dict) -> int:
    """`nnUNetv2_train ARGUMENTS` through nnU-Net's own entry point (run_training_entry: the same argument parsing,
    trainer lookup through nnUNet_extTrainer, training and final validation) in this test process, with `environ`
    over os.environ while it runs; returns its exit status. The thread count it sets for -device cpu is restored."""
    import torch  # not at the top: conftest sets the thread variables before torch loads
    from nnunetv2.run.run_training import run_training_entry
    threads = torch.get_num_threads()
    try:
        with mock.patch.dict(os.environ, environ), \
                mock.patch.object(sys, "argv", ["nnUNetv2_train", *map(str, arguments)]):
            run_training_entry()
    except SystemExit as stopped:  # argparse's refusal
        return stopped.code if isinstance(stopped.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return 0


def train_in_process(root: Path, *arguments) -> None:
    """`nnUNetv2_train ARGUMENTS` on `root`'s nnU-Net folders in this test process: a fixture's training without
    starting Python, PyTorch and nnU-Net again (8-11 s of CPU a training). An error is the test's error. A training
    whose exit status or output a test checks runs as a subprocess (`run`), as a user runs it."""
    if nnunet_train_in_process(arguments, nnunet_environment(root)):
        raise AssertionError(f"nnUNetv2_train {' '.join(map(str, arguments))} refused its arguments")


# the plugin's set-up commands that an experiment runs as steps: a JSON edit or a sliced checkpoint, seconds of work
# after 8-11 s of starting Python, PyTorch and nnU-Net
SET_UP_COMMANDS = ("add-config", "lckd-subset")


def commands_in_process(run_command):
    """An experiment's command runner (Experiment.run_command) that runs `nnunet-protokd add-config/lckd-subset`
    through cli.main and `nnUNetv2_train` through nnU-Net's entry point in the test process (their exit status is
    the step's, as from the child), and every other command with `run_command`. The trainings are the commands a
    user's experiment runs, with the environment the experiment gives them."""
    def run(command, env=None):
        program = os.path.basename(str(command[0]))
        if program == "nnUNetv2_train":
            return subprocess.CompletedProcess(command, nnunet_train_in_process(command[1:], env or {}))
        if program != "nnunet-protokd" or command[1] not in SET_UP_COMMANDS:
            return run_command(command, env)
        return subprocess.CompletedProcess(command, main_in_process(command[1:], env or {}))
    return run


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory) -> Path:
    from nnunet_protokd.data.phantoms import generate_brats_phantoms
    folder = tmp_path_factory.mktemp("phantoms") / "MICCAI_BraTS_2018_Data_Training"
    generate_brats_phantoms(str(folder), num_hgg=3, num_lgg=2, seed=7, shape_zyx=(24, 32, 32))
    return folder


DATASET = "Dataset501_BraTS2018"


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills, built once per test session: under pytest-xdist the first worker that
    needs it builds it (under a file lock, in the session's shared temporary folder) and the others wait and read
    it; a build that failed is not reused. Users of the folder copy what they change."""
    from filelock import FileLock
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this run's, common to its workers
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def preprocessed_phantoms(tmp_path_factory, phantom_folder) -> Path:
    """`phantom_folder` converted as dataset 501 with a held-out set of three cases (imagesTs), then planned and
    preprocessed (3d_fullres) by nnU-Net, once per session: nnU-Net's fingerprint alone samples 10^8 foreground
    voxels per channel whatever the dataset's size (about 45 s here), so the tests copy this (`copy_phantoms`)
    instead of planning the same data again."""
    from nnunet_protokd.data.phantoms import generate_brats_phantoms

    def build(root: Path):
        env = nnunet_environment(root)
        generate_brats_phantoms(str(root / "test"), num_hgg=2, num_lgg=1, seed=2, shape_zyx=(24, 32, 32),
                                with_segmentation=False, first_case_index=100)
        run([BIN / "python", REPO / "dataset_conversion" / "convert_brats2018.py", phantom_folder, "501",
             "--test", root / "test"], env)
        run([BIN / "nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "2",
             "--verify_dataset_integrity"], env)
    return built_once(tmp_path_factory, "preprocessed_phantoms", build)


def copy_phantoms(preprocessed_phantoms: Path, root: Path, what: str = "preprocessed", dataset: str = DATASET):
    """Into `root`'s nnU-Net folders: "preprocessed" (the raw dataset and nnU-Net's plans and preprocessed data)
    or "fingerprint" (nnU-Net's dataset_fingerprint.json only, as that of `dataset`: nnUNetv2_plan_and_preprocess
    reuses an existing one, so a test that converts and plans phantom_folder's cases itself skips the 45 s
    sampling and nothing else)."""
    source = preprocessed_phantoms / "nnUNet_preprocessed" / DATASET
    if what == "preprocessed":
        shutil.copytree(preprocessed_phantoms / "nnUNet_raw", root / "nnUNet_raw")
        shutil.copytree(source, root / "nnUNet_preprocessed" / dataset)
    elif what == "fingerprint":
        (root / "nnUNet_preprocessed" / dataset).mkdir(parents=True)
        shutil.copy(source / "dataset_fingerprint.json", root / "nnUNet_preprocessed" / dataset)
    else:
        raise ValueError(what)


def assert_same_training_data(raw_dataset: Path, preprocessed_phantoms: Path) -> None:
    """A test that reused the session's fingerprint (copy_phantoms(..., "fingerprint")) converted the very data
    it was computed from: same training files, voxel for voxel, same geometry."""
    import numpy as np
    import SimpleITK as sitk
    source = preprocessed_phantoms / "nnUNet_raw" / DATASET
    names = sorted(p.relative_to(source).as_posix() for p in source.glob("[il]*Tr/*.nii.gz"))
    converted = sorted(p.relative_to(raw_dataset).as_posix() for p in raw_dataset.glob("[il]*Tr/*.nii.gz"))
    assert names and names == converted
    for name in names:
        ours, theirs = sitk.ReadImage(str(raw_dataset / name)), sitk.ReadImage(str(source / name))
        assert ours.GetSpacing() == theirs.GetSpacing() and ours.GetOrigin() == theirs.GetOrigin(), name
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs)), name


# the modules that train (minutes each) first, longest first: under pytest-xdist (./bootstrap.sh test runs two
# workers, a whole module each at a time, in this order) the short modules then fill the gaps at the end instead of
# a long one starting last and running alone
LONGEST_FIRST = ("test_integration.py", "test_deployment.py", "test_evidence.py", "test_benchmark.py",
                 "test_workflow.py", "test_resenc.py", "test_experiment.py", "test_teacher.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: other files keep their order

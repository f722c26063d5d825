import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's console scripts (nnUNetv2_*, nnunet-protokd)


def nnunet_environment(root: Path) -> dict:
    """Environment for nnU-Net commands on folders under `root`, sized for a 2-core CPU."""
    from nnunet_protokd.trainer_path import add_trainers_to_environment
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnUNet_results"), nnUNet_n_proc_DA="2", nnUNet_def_n_proc="2",
               OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    add_trainers_to_environment(env)
    return env


def run(command: list, env: dict = None, timeout: int = 600, expect_success: bool = True, cwd=None):
    """Runs a command; on an unexpected exit status the assertion shows the end of its output."""
    result = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=cwd)
    if expect_success and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {result.returncode}:\n"
                             f"{(result.stdout + result.stderr)[-4000:]}")
    return result


@pytest.fixture(scope="session")
def phantom_folder(tmp_path_factory) -> Path:
    from nnunet_protokd.data.phantoms import generate_brats_phantoms
    folder = tmp_path_factory.mktemp("phantoms") / "MICCAI_BraTS_2018_Data_Training"
    generate_brats_phantoms(str(folder), num_hgg=3, num_lgg=2, seed=7, shape_zyx=(24, 32, 32))
    return folder

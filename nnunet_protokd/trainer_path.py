"""Lets nnU-Net find the plugin's trainers without shell set-up.

nnU-Net looks up `-tr NAME` in its own package, then in the folders of the environment variable
`nnUNet_extTrainer`. `nnunet-protokd register-trainers` writes a one-line .pth file into the environment's
site-packages; Python runs it at start-up and it appends our trainers/ folder to that variable (keeping any
folders the user listed). Deleting the .pth file (or `register-trainers --remove`) undoes it.
"""
import os
import sysconfig

TRAINERS_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainers")
ENV_VARIABLE = "nnUNet_extTrainer"
PTH_FILE_NAME = "nnunet_protokd_trainers.pth"


def add_trainers_to_environment(environ=os.environ) -> None:
    folders = [f for f in environ.get(ENV_VARIABLE, "").split(os.pathsep) if f]
    if TRAINERS_FOLDER not in folders:
        environ[ENV_VARIABLE] = os.pathsep.join(folders + [TRAINERS_FOLDER])


def pth_file(site_packages: str = None) -> str:
    return os.path.join(site_packages or sysconfig.get_paths()["purelib"], PTH_FILE_NAME)


def register(site_packages: str = None) -> str:
    if not os.path.isdir(TRAINERS_FOLDER):
        raise FileNotFoundError(f"{TRAINERS_FOLDER} does not exist: the trainers folder is found next to the "
                                f"nnunet_protokd package, so install the project with `pip install -e .`")
    path = pth_file(site_packages)
    with open(path, "w") as f:
        f.write("import nnunet_protokd.trainer_path as p; p.add_trainers_to_environment()\n")
    return path


def unregister(site_packages: str = None) -> bool:
    path = pth_file(site_packages)
    if os.path.exists(path):
        os.remove(path)
        return True
    return False

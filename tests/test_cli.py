import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["train-drafter", "check", "bench", "export-onnx", "export-aoti", "export-trt",
                                     "draft-vocab"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "jetspec_compile.cli", command, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout and "--model" in out.stdout


def test_unknown_model_folder_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "jetspec_compile.cli", "check", "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no such folder" in out.stderr

import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", ["train-drafter", "check", "bench", "export-onnx", "export-aoti", "export-trt",
                                     "draft-vocab", "build-corpus", "export-vllm"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "jetspec_compile.cli", command, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout and "--model" in out.stdout


def test_unknown_model_folder_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "jetspec_compile.cli", "check", "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no such folder" in out.stderr


def test_sample_sets_outside_prompts_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jetspec_compile.cli", "train-drafter", "--out", str(tmp_path / "d"),
                          "--prompts", "gsm", "--samples", "2", "--sample-sets", "humaneval",
                          "--data", str(tmp_path / "data.jsonl")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "not among --prompts" in out.stderr
    assert not (tmp_path / "data.jsonl").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("option", [["--gamma", "0"], ["--reveal-prob", "1.5"]])
def test_bad_training_option_is_a_clear_error_before_anything_runs(tmp_path, option):
    out = subprocess.run([sys.executable, "-m", "jetspec_compile.cli", "train-drafter", "--out", str(tmp_path / "d"),
                          "--prompts", "gsm", "--data", str(tmp_path / "data.jsonl"), *option],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and option[0][2:].replace("-", "_") in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "data.jsonl").exists() and not (tmp_path / "d").exists()

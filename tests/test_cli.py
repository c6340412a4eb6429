"""The ``aelearn`` command as a user runs it: train and eval from the README, overrides, help, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aelearn.cli import main
from aelearn.metrics.report import PICTURES
from aelearn.models import MODELS
from aelearn.train import TrainConfig
from test_report import linked_pictures, png_size

# A few steps of the README's command, small enough for a test.
QUICK = ["--steps", "3", "--batch-size", "8", "checkpoint_every=2", "log_every=1", "image_every=0", "progress=false",
         "eval_examples=16", "model_options.latent_dim=4"]


# `aelearn eval` with small protocols (the published ones take minutes on a CPU).
SMALL_EVAL = ["--metrics", "mig,unsupervised", "--num-train", "100", "--aggregate-examples", "64", "--iwae-samples", "4",
              "--no-entropy"]


def aelearn(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The installed command, in a new process (as a user runs it)."""
    return subprocess.run([sys.executable, "-m", "aelearn", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_train_then_eval_from_the_readme(tmp_path):
    run = tmp_path / "runs" / "demo"
    completed = aelearn("train", "--model", "beta_vae", "--data", "dsprites", "--out", str(run), *QUICK)
    assert completed.returncode == 0, completed.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "beta_vae" and config["steps"] == 3 and config["model_options"] == {"latent_dim": 4}
    assert (run / "metrics.csv").is_file() and any((run / "checkpoints").iterdir())
    completed = aelearn("eval", str(run), *SMALL_EVAL)
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads((run / "eval.json").read_text())
    assert results["step"] == 3 and results["examples"] == 16 and {"loss", "reconstruction", "kl"} <= set(results)
    assert f"{results['loss']:.6g}" in completed.stdout
    assert f"{results['metrics']['mig']['mig']:.6g}" in completed.stdout and "written: " in completed.stdout
    # The report links its pictures, every one a valid PNG next to it.
    report = run / "report.md"
    assert {picture.name for picture in linked_pictures(report)} == set(PICTURES)
    for picture in linked_pictures(report):
        assert png_size(picture) > (10, 10)
    assert set(results["metrics"]) == {"mig", "unsupervised"} and results["elbo_decomposition"]["dataset_size"] == 64
    assert "--num-train 100" in report.read_text()


def test_eval_of_a_run_without_factors(tmp_path):
    run = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--model", "vae", "--out", str(run), *QUICK]) == 0
    completed = aelearn("eval", str(run), "--examples", "32", "--num-train", "100", "--iwae-samples", "2")
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads((run / "eval.json").read_text())
    # The whole dataset forms the aggregate posterior by default; the metrics are the unsupervised ones.
    assert results["elbo_decomposition"]["dataset_size"] == 1797 and results["elbo_decomposition"]["num_samples"] == 32
    assert list(results["metrics"]) == ["unsupervised"] and "data_entropy" not in results
    text = (run / "report.md").read_text()
    assert "unknown for data without a factor grid" in text
    for picture in linked_pictures(run / "report.md"):
        png_size(picture)


def test_resume_continues_a_run_and_a_finished_run_is_never_overwritten(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", "--data", "digits", "--model", "vae", "--out", run, *QUICK]) == 0
    before = (tmp_path / "run" / "metrics.csv").read_text()
    assert main(["train", "--data", "digits", "--model", "vae", "--out", run, *QUICK]) == 2
    assert (tmp_path / "run" / "metrics.csv").read_text() == before
    assert main(["train", "--data", "digits", "--model", "vae", "--out", run, "--resume", *QUICK[:-1], "--steps", "5",
                 "model_options.latent_dim=4"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 5


def test_config_file_with_command_line_overrides(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('model = "vae"\ndata = "digits"\nlr = 1e-3\n[model_options]\nlatent_dim = 6\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "lr=3e-4", "model_options.likelihood=gaussian",
                 "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lr"] == 3e-4 and printed["run_dir"] == str(tmp_path / "r")
    assert printed["model_options"] == {"latent_dim": 6, "likelihood": "gaussian"}
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "--model", "nope", "--steps", "1"], f"unknown model 'nope'; valid models: {', '.join(sorted(MODELS))}"),
        (["train", "--data", "nope", "--steps", "1"], "unknown dataset 'nope'"),
        (["train", "bogus=1"], "unknown configuration key 'bogus'"),
        (["train", "steps=many"], "steps"),
        (["train", "--config", "missing.toml"], "missing.toml"),
        (["eval", "no/such/run"], "no/such/run is not a directory"),
        (["eval", ".", "--metrics", "mig,nope"], "unknown metric 'nope'"),
        (["eval", ".", "--examples", "0"], "examples must be ≥ 1"),
    ],
)
def test_user_errors_give_one_line_and_a_non_zero_status(tmp_path, args, words):
    completed = aelearn(*args, cwd=tmp_path)
    assert completed.returncode == 2
    assert words in completed.stderr and "Traceback" not in completed.stderr, completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr


def test_a_corrupted_checkpoint_is_reported_not_raised(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--model", "vae", "--out", str(run), *QUICK]) == 0
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    completed = aelearn("eval", str(run))
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "checkpoint" in completed.stderr.lower(), completed.stderr


def test_help_explains_every_option_and_every_configuration_field():
    completed = aelearn("train", "--help")
    assert completed.returncode == 0
    for field in TrainConfig().to_dict():
        assert f"  {field} = " in completed.stdout, field
    for flag in ("--config", "--model", "--data", "--steps", "--out", "--resume", "KEY=VALUE"):
        assert flag in completed.stdout
    for command in ("train", "eval", "bench", "info"):
        assert command in aelearn("--help").stdout


def test_bench_times_the_available_backends(capsys):
    assert main(["bench", "--only", "mmd", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mmd n=2048" in printed and "reference" in printed and "× the reference" in printed
    assert main(["bench", "--only", "nothing"]) == 2

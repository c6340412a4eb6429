"""The trainer: configuration, checkpoints (atomic, weights-only, crash-safe), exact resumption,
the paths of every model family (several optimisers, scheduled loss weights, partly labelled
batches), mixed precision, images and logs, evaluation, and two replicas under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import train_distributed_worker as worker
from aelearn.models import BetaVAE, Model, split_batch
from aelearn.train import (
    CheckpointError,
    GlobalBatchSampler,
    PartiallyLabelled,
    TrainConfig,
    Trainer,
    apply_overrides,
    evaluate,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    read_metrics,
    save_checkpoint,
    train,
)
from aelearn.train.checkpoint import checkpoint_path, list_checkpoints
from aelearn.train.rng import capture_rng_state, restore_rng_state

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("steps_per_s", "time_s")


def blobs(n: int = 64, labels: int | None = None, seed: int = 0) -> TensorDataset:
    """Random binary 4×4 images (and labels in [0, labels))."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 4, 4, generator=g) > 0.5).float()
    if labels is None:
        return TensorDataset(images)
    return TensorDataset(images, torch.randint(labels, (n,), generator=g))


class ImagesOnly(Dataset):
    """Items that are bare image tensors."""

    def __init__(self, n: int = 32):
        self.images = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


class PickledObject:
    """What a weights-only load refuses: an arbitrary class."""


def tiny_vae(**options) -> BetaVAE:
    torch.manual_seed(0)
    return BetaVAE((1, 4, 4), 2, mlp_hidden=(8,), **options)


def config(tmp_path, name: str = "run", **fields) -> TrainConfig:
    defaults = dict(
        run_dir=str(tmp_path / name), steps=8, batch_size=8, lr=1e-2, log_every=2, checkpoint_every=4,
        image_every=0, progress=False, tensorboard="off",
    )
    return TrainConfig(**{**defaults, **fields})


def state_of(run_dir) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir))


def assert_states_equal(a: dict, b: dict, path: str = "") -> None:
    """Nested dicts / lists of tensors and primitives, tensors compared with torch.equal."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_states_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}/{index}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def metrics_without_timing(run_dir) -> dict:
    return {k: v for k, v in read_metrics(run_dir).items() if k not in TIMING}


# Configuration ---------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match=r"unknown configuration key 'learning_rate'; valid keys: model, model_options, .*lr"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    for values, message in [
        ({"steps": 2.5}, "'steps' must be an int ≥ 1"),
        ({"steps": True}, "'steps' must be an int"),
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"grad_clip": -1}, "'grad_clip' must be ≥ 0"),
        ({"optimizer": "lion"}, "'optimizer' must be one of adam, adamw, sgd, rmsprop"),
        ({"amp": True}, "'amp' must be one of auto, off, bfloat16, float16"),
        ({"model_options": [1]}, "'model_options' must be a table"),
        ({"lr_schedule": {"kind": "cosine", "start": 1, "end": 0, "warm": 3}}, "unknown parameter 'warm'"),
        ({"labelled_examples": -2}, "'labelled_examples' must be an int ≥ -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(values)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_overrides_parse_toml_values_and_reach_into_tables():
    base = TrainConfig(model_options={"latent_dim": 10})
    changed = apply_overrides(
        base, ["lr=3e-4", "steps = 20", "model=vae", "model_options.beta=8", "group_options.discriminator.lr=1e-5",
               'lr_schedule={kind="cosine", start=1.0, end=0.1}', "progress=false", 'amp="off"']
    )
    assert changed.lr == 3e-4 and changed.steps == 20 and changed.model == "vae" and changed.progress is False
    assert changed.model_options == {"latent_dim": 10, "beta": 8}
    assert changed.group_options == {"discriminator": {"lr": 1e-5}}
    assert changed.lr_schedule == {"kind": "cosine", "start": 1.0, "end": 0.1} and changed.amp == "off"
    assert base.model_options == {"latent_dim": 10}, "overrides must not change the config they start from"
    with pytest.raises(ValueError, match="unknown configuration key 'stepz'"):
        apply_overrides(base, ["stepz=3"])
    with pytest.raises(ValueError, match="'steps' must be an int"):
        apply_overrides(base, ["steps=many"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(base, ["steps"])
    with pytest.raises(ValueError, match="'lr' is not a table"):
        apply_overrides(base, ["lr.value=3"])


def test_config_files_toml_json_yaml(tmp_path, monkeypatch):
    (tmp_path / "run.toml").write_text('model = "vae"\nsteps = 30\n[model_options]\nlatent_dim = 4\n')
    config = load_config(tmp_path / "run.toml", ["model_options.latent_dim=6"])
    assert (config.model, config.steps, config.model_options) == ("vae", 30, {"latent_dim": 6})
    (tmp_path / "run.json").write_text(json.dumps({"steps": 5}))
    assert load_config(tmp_path / "run.json").steps == 5
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="unknown configuration key 'stepz'"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "run.yaml").write_text("steps: 7\nmodel_options:\n  beta: 2.0\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ImportError, match="pip install pyyaml"):
        load_config(tmp_path / "run.yaml")
    monkeypatch.delitem(sys.modules, "yaml")
    pytest.importorskip("yaml")
    assert load_config(tmp_path / "run.yaml").model_options == {"beta": 2.0}


# Checkpoints -----------------------------------------------------------------------------------


def test_checkpoints_hold_only_weights_only_loadable_values(tmp_path):
    path = save_checkpoint({"step": 3, "weights": {"w": torch.arange(4.0)}, "rng": [capture_rng_state()]}, tmp_path / "c.pt")
    torch.load(path, weights_only=True)
    state = load_checkpoint(path)
    assert state["step"] == 3 and torch.equal(state["weights"]["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["c.pt"], "the temporary file must be renamed, not left"


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    saved = save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    draws = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    restore_rng_state(load_checkpoint(saved)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1))
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2:] == again[2:]


def test_a_write_that_fails_half_way_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint({"step": 4, "value": torch.ones(3)}, checkpoint_path(run, 4))

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 half of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"step": 8, "value": torch.zeros(3)}, checkpoint_path(run, 8))
    monkeypatch.undo()
    assert [step for step, _ in list_checkpoints(run)] == [4]
    assert load_checkpoint(latest_checkpoint(run))["step"] == 4
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000004.pt"]


def test_corrupted_and_foreign_checkpoints_raise_clear_errors(tmp_path):
    path = save_checkpoint({"step": 1, "value": torch.randn(1000)}, tmp_path / "step-00000001.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step-00000001.pt cannot be read: it is truncated, corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an aelearn checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")

    torch.save({"format": "aelearn-checkpoint", "version": 1, "object": PickledObject()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


# Exact resumption ------------------------------------------------------------------------------


def resumable_config(tmp_path, name, **fields):
    # Checkpoints that fall between logs, a warm-up, a schedule, clipping and a scheduled β: every
    # piece of state a resumption must carry.
    return config(
        tmp_path, name, steps=12, log_every=4, checkpoint_every=3, grad_clip=0.5, warmup_steps=3,
        lr_schedule={"kind": "cosine", "start": 1.0, "end": 0.1}, **fields,
    )


def beta_schedule():
    return {"kind": "linear", "start": 0.0, "end": 2.0, "steps": 10}


def test_a_stopped_and_resumed_run_is_bit_for_bit_the_uninterrupted_one(tmp_path):
    data = blobs(40)
    train(resumable_config(tmp_path, "whole"), model=tiny_vae(beta=beta_schedule()), dataset=data)

    Trainer(resumable_config(tmp_path, "parts"), model=tiny_vae(beta=beta_schedule()), dataset=data).fit(until=7)
    assert [step for step, _ in list_checkpoints(tmp_path / "parts")] == [3, 6, 7]
    torch.manual_seed(12345)  # the resumed run must not depend on the state it is started in
    train(resumable_config(tmp_path, "parts", resume=True), model=tiny_vae(beta=beta_schedule()), dataset=data)

    whole, parts = state_of(tmp_path / "whole"), state_of(tmp_path / "parts")
    assert whole["step"] == parts["step"] == 12
    for key in ("model", "optimizers", "rng", "log"):
        assert_states_equal(whole[key], parts[key], key)
    assert metrics_without_timing(tmp_path / "whole") == metrics_without_timing(tmp_path / "parts")


def test_a_run_killed_while_writing_resumes_from_its_last_good_checkpoint(tmp_path, monkeypatch):
    data = blobs(40)
    train(config(tmp_path, "whole"), model=tiny_vae(), dataset=data)

    Trainer(config(tmp_path, "killed"), model=tiny_vae(), dataset=data).fit(until=4)
    resumed = Trainer(config(tmp_path, "killed", resume=True), model=tiny_vae(), dataset=data)

    def killed_mid_write(obj, file):
        file.write(b"PK\x03\x04 a third of a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        resumed.fit()  # dies writing the checkpoint of step 8
    monkeypatch.undo()
    assert [step for step, _ in list_checkpoints(tmp_path / "killed")] == [4]
    assert load_checkpoint(latest_checkpoint(tmp_path / "killed"))["step"] == 4
    # A kill -9 would have left its temporary file: the next resumption ignores and removes it.
    stale = tmp_path / "killed" / "checkpoints" / ".step-00000008.pt.999.tmp"
    stale.write_bytes(b"PK\x03\x04 truncated")
    train(config(tmp_path, "killed", resume=True), model=tiny_vae(), dataset=data)
    assert not stale.exists()
    assert_states_equal(state_of(tmp_path / "whole")["model"], state_of(tmp_path / "killed")["model"])
    assert metrics_without_timing(tmp_path / "whole") == metrics_without_timing(tmp_path / "killed")


def test_runs_are_never_overwritten_and_resume_only_what_they_were(tmp_path):
    data = blobs(16)
    train(config(tmp_path, steps=2), model=tiny_vae(), dataset=data)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config(tmp_path, steps=2), model=tiny_vae(), dataset=data)
    with pytest.raises(ValueError, match="cannot resume .* with a different lr"):
        train(config(tmp_path, steps=4, lr=0.5, resume=True), model=tiny_vae(), dataset=data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path, "empty", resume=True), model=tiny_vae(), dataset=data)
    train(config(tmp_path, steps=4, resume=True), model=tiny_vae(), dataset=data)
    assert state_of(tmp_path / "run")["step"] == 4


# Model families --------------------------------------------------------------------------------


class AdversarialAutoencoder(Model):
    """AAE-like: the codes are pushed towards prior samples through a discriminator, which is
    trained by its own optimiser on detached codes (also the shape of FactorVAE, WAE-GAN,
    FaderNetworks and PixelGAN-AE). Deterministic, so one step can be computed by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        self.decoder = nn.Sequential(nn.Linear(2, 16), nn.Unflatten(1, (1, 4, 4)))
        self.discriminator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        self.register_buffer("prior", torch.randn(8, 2))

    def optimizer_groups(self):
        return {"main": [*self.encoder.parameters(), *self.decoder.parameters()], "discriminator": list(self.discriminator.parameters())}

    def losses(self, x):
        z = self.encoder(x)
        reconstruction = (self.decoder(z) - x).square().flatten(1).sum(1).mean()
        fooled = F.binary_cross_entropy_with_logits(self.discriminator(z), torch.ones(len(z), 1))
        fake, real = self.discriminator(z.detach()), self.discriminator(self.prior)
        discriminator = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)) + F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        return reconstruction + 0.5 * fooled, discriminator, reconstruction

    def loss(self, batch, *, step):
        main, discriminator, reconstruction = self.losses(split_batch(batch)[0])
        return {"loss": main, "loss/discriminator": discriminator, "reconstruction": reconstruction}


def test_several_optimisers_each_minimise_their_own_loss(tmp_path):
    model = AdversarialAutoencoder()
    trainer = Trainer(
        config(tmp_path, optimizer="sgd", lr=0.1, group_options={"discriminator": {"lr": 0.03}}), model=model, dataset=blobs(16)
    )
    x = blobs(8, seed=4).tensors[0]
    main_loss, discriminator_loss, _ = model.losses(x)
    main_params, discriminator_params = model.optimizer_groups().values()
    want_main = [p - 0.1 * g for p, g in zip(main_params, torch.autograd.grad(main_loss, main_params, retain_graph=True))]
    want_disc = [p - 0.03 * g for p, g in zip(discriminator_params, torch.autograd.grad(discriminator_loss, discriminator_params))]
    logged = trainer.train_step((x,))
    assert set(logged) == {"loss", "loss/discriminator", "reconstruction"}
    for got, want in zip([*main_params, *discriminator_params], [*want_main, *want_disc]):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_adversarial_model_trains_checkpoints_and_resumes(tmp_path):
    data = blobs(32)
    cfg = dict(steps=6, checkpoint_every=3, grad_clip=1.0, group_options={"discriminator": {"lr": 1e-3, "betas": [0.5, 0.9]}})
    train(config(tmp_path, "whole", **cfg), model=AdversarialAutoencoder(), dataset=data)
    Trainer(config(tmp_path, "parts", **cfg), model=AdversarialAutoencoder(), dataset=data).fit(until=3)
    train(config(tmp_path, "parts", resume=True, **cfg), model=AdversarialAutoencoder(), dataset=data)
    whole, parts = state_of(tmp_path / "whole"), state_of(tmp_path / "parts")
    assert set(whole["optimizers"]) == {"main", "discriminator"}
    assert whole["optimizers"]["discriminator"]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert_states_equal(whole["model"], parts["model"])
    assert_states_equal(whole["optimizers"], parts["optimizers"])
    columns = read_metrics(tmp_path / "whole")
    assert {"loss/discriminator", "grad_norm", "grad_norm/discriminator"} <= set(columns)


def test_optimiser_groups_and_options_are_checked(tmp_path):
    class Overlapping(AdversarialAutoencoder):
        def optimizer_groups(self):
            return {"main": list(self.parameters()), "discriminator": list(self.discriminator.parameters())}

    class Forgetful(AdversarialAutoencoder):
        def optimizer_groups(self):
            return {"main": list(self.encoder.parameters())}

    with pytest.raises(ValueError, match="in optimiser groups 'main' and 'discriminator'"):
        Trainer(config(tmp_path, "a"), model=Overlapping(), dataset=blobs(16))
    with pytest.raises(ValueError, match="trainable parameters in no optimiser group: decoder"):
        Trainer(config(tmp_path, "b"), model=Forgetful(), dataset=blobs(16))
    with pytest.raises(ValueError, match="group_options names groups the model does not have: \\['critic'\\]"):
        Trainer(config(tmp_path, "c", group_options={"critic": {}}), model=AdversarialAutoencoder(), dataset=blobs(16))
    with pytest.raises(ValueError, match="unknown option 'bettas' of optimiser 'adam'.*valid options: betas"):
        Trainer(config(tmp_path, "d", optimizer_options={"bettas": [0.5, 0.9]}), model=tiny_vae(), dataset=blobs(16))
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(config(tmp_path, "e", batch_size=32), model=tiny_vae(), dataset=blobs(16)).fit()


def test_scheduled_loss_weights_and_learning_rate_are_applied_and_logged(tmp_path):
    steps = 6
    capacity = {"kind": "linear", "start": 0.0, "end": 5.0, "steps": 5}
    cfg = config(tmp_path, steps=steps, log_every=1, warmup_steps=2, lr_schedule={"kind": "piecewise", "values": [1.0, 0.5], "boundaries": [4]})
    train(cfg, model=tiny_vae(capacity=capacity, gamma=10.0), dataset=blobs(48))
    columns = read_metrics(tmp_path / "run")
    assert columns["step"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert columns["capacity"] == [min(s, 5) for s in range(steps)]
    assert columns["lr"] == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.005, 0.005])
    for loss, reconstruction, kl, c in zip(columns["loss"], columns["reconstruction"], columns["kl"], columns["capacity"]):
        assert loss == pytest.approx(reconstruction + 10.0 * abs(kl - c), rel=1e-5)


class SemiSupervised(Model):
    """M2-like: a classifier q(y | x) learned from the labelled part of each batch, the
    reconstruction from all of it through the class probabilities. Records the labels it saw."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        self.decoder = nn.Linear(2 + classes, 16)
        self.seen: list[torch.Tensor] = []

    def loss(self, batch, *, step):
        x, y = split_batch(batch)
        self.seen.append(y.clone())
        labelled = y >= 0
        logits = self.classifier(x)
        codes = torch.cat([self.encoder(x), logits.softmax(1)], 1)
        reconstruction = (self.decoder(codes) - x.flatten(1)).square().sum(1).mean()
        classification = F.cross_entropy(logits[labelled], y[labelled]) if labelled.any() else logits.sum() * 0
        return {"loss": reconstruction + classification, "classification": classification, "labelled": labelled.float().mean()}


def test_semi_supervised_batches_mix_labelled_and_unlabelled_examples(tmp_path):
    data = blobs(48, labels=3)
    model = SemiSupervised()
    train(config(tmp_path, steps=6, labelled_examples=12), model=model, dataset=data)  # one epoch
    seen = torch.cat(model.seen)
    assert int((seen >= 0).sum()) == 12 and int((seen == -1).sum()) == 36
    assert any(0 < int((y >= 0).sum()) < len(y) for y in model.seen), "no batch mixed both kinds"
    assert "labelled" in read_metrics(tmp_path / "run")


def test_partially_labelled_masks_factor_vectors():
    factors = torch.arange(20).reshape(10, 2)
    data = PartiallyLabelled(TensorDataset(torch.rand(10, 1, 2, 2), factors), 4, seed=0)
    labels = torch.stack([data[i][1] for i in range(10)])
    kept = (labels >= 0).all(1)
    assert int(kept.sum()) == 4 and (labels[~kept] == -1).all() and torch.equal(labels[kept], factors[kept])
    batch = data.__getitems__([0, 1, 2])
    assert all(torch.equal(item[1], data[i][1]) for i, item in enumerate(batch))
    with pytest.raises(ValueError, match="between 0 and"):
        PartiallyLabelled(TensorDataset(torch.rand(10, 1, 2, 2), factors), 11, seed=0)


# Data order ------------------------------------------------------------------------------------


def test_replicas_share_out_exactly_the_global_batches_of_one_process():
    def batches(sampler, count):
        iterator = iter(sampler)
        return [next(iterator) for _ in range(count)]

    single = batches(GlobalBatchSampler(30, 8, seed=5), 8)  # 3 batches per epoch: crosses two epochs
    halves = [batches(GlobalBatchSampler(30, 8, seed=5, rank=r, world_size=2), 8) for r in range(2)]
    for whole, first, second in zip(single, *halves):
        assert len(first) == len(second) == 4 and sorted(first + second) == sorted(whole)
    assert batches(GlobalBatchSampler(30, 8, seed=5, start=5), 3) == single[5:8]
    assert sorted(sum(single[:3], [])) != sorted(sum(single[3:6], [])) or single[:3] != single[3:6]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        GlobalBatchSampler(30, 9, seed=0, world_size=2)


# Precision, images, logs, evaluation -----------------------------------------------------------


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_mixed_precision_path(tmp_path, amp):
    # On a GPU amp="auto" picks one of these; here autocast runs on the CPU, float16 with a loss scaler.
    trainer = Trainer(config(tmp_path, steps=4, amp=amp), model=tiny_vae(), dataset=blobs(32))
    assert (trainer.scaler is not None) == (amp == "float16")
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)).all() for v in read_metrics(tmp_path / "run")["loss"])
    if amp == "float16":
        assert state_of(tmp_path / "run")["scaler"]["scale"] > 0


def read_png(path) -> tuple[int, int, int]:
    """(width, height, colour type) of a PNG, checking every chunk's CRC and the image data's size."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        assert int.from_bytes(data[position + 8 + length : position + 12 + length], "big") == zlib.crc32(kind + body)
        chunks[kind] = body
        position += 12 + length
    width, height = int.from_bytes(chunks[b"IHDR"][:4], "big"), int.from_bytes(chunks[b"IHDR"][4:8], "big")
    colour = chunks[b"IHDR"][9]
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + width * (1 if colour == 0 else 3))
    return width, height, colour


def test_images_progress_bar_logs_and_evaluation(tmp_path, capsys):
    data = ImagesOnly(32)
    run_dir = train(config(tmp_path, steps=4, image_every=2, image_count=10, progress=True), model=tiny_vae(), dataset=data)
    assert "4/4" in capsys.readouterr().err
    images = sorted(os.listdir(run_dir / "images"))
    assert images == [f"step-0000000{s}-{kind}.png" for s in (2, 4) for kind in ("reconstructions", "samples")]
    # 10 examples, 8 per row: rows of examples, their reconstructions, the remaining 2 and theirs.
    assert read_png(run_dir / "images" / "step-00000004-reconstructions.png") == (2 + 8 * 6, 2 + 4 * 6, 0)
    assert read_png(run_dir / "images" / "step-00000004-samples.png") == (2 + 8 * 6, 2 + 2 * 6, 0)
    columns = read_metrics(run_dir)
    assert {"step", "epoch", "lr", "loss", "reconstruction", "kl", "beta", "steps_per_s", "time_s"} <= set(columns)
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 4

    first = evaluate(run_dir, model=tiny_vae(), dataset=data, examples=20, batch_size=8)
    assert first == evaluate(run_dir, model=tiny_vae(), dataset=data, examples=20, batch_size=8)
    assert first["step"] == 4 and first["examples"] == 20
    assert first["loss"] == pytest.approx(first["reconstruction"] + 4.0 * first["kl"], rel=1e-5)


def test_optional_tensorboard_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(config(tmp_path, "on", steps=2, tensorboard="on"), model=tiny_vae(), dataset=blobs(16))
    train(config(tmp_path, "auto", steps=2, tensorboard="auto"), model=tiny_vae(), dataset=blobs(16))


def test_a_diverging_run_stops_with_a_clear_error(tmp_path):
    class Diverging(Model):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def loss(self, batch, *, step):
            return {"loss": self.weight * (float("inf") if step >= 2 else 1.0)}

    with pytest.raises(FloatingPointError, match="step 4: non-finite loss; the last checkpoint is .*step-00000002.pt"):
        train(config(tmp_path, checkpoint_every=2), model=Diverging(), dataset=blobs(16))


def test_trainer_builds_models_from_the_registry(tmp_path):
    cfg = config(tmp_path, steps=2, model="beta_vae", model_options={"latent_dim": 3, "architecture": "mlp", "mlp_hidden": [8]})
    trainer = Trainer(cfg, dataset=ImagesOnly(16))
    assert isinstance(trainer.model, BetaVAE) and trainer.model.latent_dim == 3
    trainer.fit()
    assert evaluate(tmp_path / "run", dataset=ImagesOnly(16), examples=8)["step"] == 2


# Two replicas ----------------------------------------------------------------------------------


def test_two_replicas_stay_in_sync_and_match_one_process_on_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker.__file__, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for run in ("match", "vae"):
        replicas = [torch.load(tmp_path / f"{run}-rank{r}.pt", weights_only=True) for r in range(2)]
        assert_states_equal(replicas[0], replicas[1], run)
        assert_states_equal(replicas[0], state_of(tmp_path / run)["model"], run)
    single = worker.make_model("match")
    train(worker.make_config(tmp_path / "single", "match"), model=single, dataset=worker.make_dataset())
    replica = torch.load(tmp_path / "match-rank0.pt", weights_only=True)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(replica[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert read_metrics(tmp_path / "match")["loss"] == pytest.approx(read_metrics(tmp_path / "single")["loss"], rel=1e-5)


def test_a_run_from_names_alone_trains_and_evaluates(tmp_path):
    # What `aelearn train` and `aelearn eval` do: the model and the data come from their registries.
    cfg = config(tmp_path, steps=2, batch_size=4, model="beta_vae", data="dsprites", model_options={"latent_dim": 3}, eval_examples=8)
    run_dir = train(cfg)
    assert state_of(run_dir)["model"]["encoder.net.0.weight"].shape == (32, 1, 4, 4)
    results = evaluate(run_dir)
    assert results["step"] == 2 and results["examples"] == 8 and results["loss"] > 0

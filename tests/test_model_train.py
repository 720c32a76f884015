"""Training end to end on tiny simulated data: the held-out loss and defocus error fall, checkpoints resume, and the
split keeps validation specimens out of training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST_SIMULATOR

from acquire_refocus.cli import main
from acquire_refocus.config import parse_config
from acquire_refocus.errors import ConfigError
from acquire_refocus.model.checkpoint import load_weights
from acquire_refocus.model.data import TRAIN_SEED_BASE, VALIDATION_SEED_BASE, simulated_fields, split_field_names
from acquire_refocus.model.train import train


def _config(**training: object) -> object:
    return parse_config({
        "simulator": FAST_SIMULATOR,
        "model": {"architecture": "unet", "base_channels": 4, "depth": 3},
        "loss": {"defocus_weight": 0.2},
        "training": {"patch_size_px": 64, "batch_size": 8, "learning_rate": 3e-3, "validation_every": 1000,
                     "train_fields": 4, "validation_fields": 2, "defocus_range_um": [0.0, 20.0],
                     "num_threads": 1, "seed": 3, **training},
    })


def test_short_training_lowers_loss_and_defocus_error_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run = tmp_path / "run"
    first = train(_config(), out_dir=run, steps=1, progress=False)
    before = first.history[-1]
    resumed = train(_config(), out_dir=run, steps=150, resume=first.checkpoint_path, progress=False)
    after = resumed.history[-1]
    # the same fixed validation batch (held-out specimens) before and after
    assert resumed.history[0] == before and after.step == 150
    assert after.loss < 0.8 * before.loss
    assert after.defocus_mae_um < 0.8 * before.defocus_mae_um
    loaded = load_weights(resumed.weights_path)
    assert loaded.metadata["training"]["steps"] == 150
    assert (run / "history.csv").read_text().count("\n") == 3  # header + two validations
    assert (run / "config.yaml").is_file()


def test_resume_refuses_other_model_settings(tmp_path: Path) -> None:
    first = train(_config(), out_dir=tmp_path / "a", steps=1, progress=False)
    other = parse_config({**_config().model_dump(mode="json"), "model": {"base_channels": 8, "depth": 3}})
    with pytest.raises(ConfigError, match="trained with model settings"):
        train(other, out_dir=tmp_path / "b", steps=2, resume=first.checkpoint_path, progress=False)


def test_focus_head_alone_trains_from_initial_weights_and_leaves_the_refocusing_network_as_it_was(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    start = train(_config(), out_dir=tmp_path / "stage1", steps=1, progress=False)
    head = train(_config(initial_weights=str(start.weights_path), train_only="focus_head"),
                 out_dir=tmp_path / "head", steps=60, progress=False)
    before, after = load_weights(start.weights_path).network.state_dict(), load_weights(head.weights_path).network
    changed = {name for name, value in after.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith("focus_head.") for name in changed), sorted(changed)
    assert head.history[-1].psnr_output_db == pytest.approx(head.history[0].psnr_output_db)
    assert head.history[-1].defocus_mae_um < start.history[-1].defocus_mae_um
    recorded = load_weights(head.weights_path).metadata["training"]
    assert recorded["train_only"] == "focus_head"
    assert recorded["initial_weights"]["training"]["steps"] == 1
    assert recorded["initial_weights"]["fresh_parameters"] == []


@pytest.mark.parametrize("model", [{"architecture": "unet", "base_channels": 4, "depth": 3},
                                   {"architecture": "multiscale", "base_channels": 4, "depth": 2, "scales": 2}])
def test_decoder_alone_trains_and_leaves_the_encoder_and_the_focus_estimate_as_they_were(
    tmp_path: Path, model: dict[str, object],
) -> None:
    torch.set_num_threads(1)
    base = _config().model_dump(mode="json")
    stage1 = parse_config({**base, "model": model})
    start = train(stage1, out_dir=tmp_path / "stage1", steps=1, progress=False)
    tuning = parse_config({**base, "model": model, "loss": {"l1_weight": 0.5, "l2_weight": 20.0},
                            "training": {**base["training"], "initial_weights": str(start.weights_path),
                                         "train_only": "decoder"}})
    tuned = train(tuning, out_dir=tmp_path / "decoder", steps=40, progress=False)
    before = load_weights(start.weights_path).network
    after = load_weights(tuned.weights_path).network
    changed = {name for name, value in after.state_dict().items() if not torch.equal(value, before.state_dict()[name])}
    decoder = after.image_decoder()
    decoder_ids = {id(t) for t in [*decoder.parameters(), *decoder.buffers()]}
    decoder_names = {name for name, t in [*after.named_parameters(), *after.named_buffers()] if id(t) in decoder_ids}
    assert changed and changed <= decoder_names, sorted(changed - decoder_names)
    frame = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(before.eval()(frame)[1], after.eval()(frame)[1])  # the focus estimate is untouched
        assert not torch.equal(before(frame)[0], after(frame)[0])
    assert tuned.history[-1].psnr_output_db > start.history[-1].psnr_output_db + 3.0  # same held-out batch (+8.7 / +9.5 dB)
    assert load_weights(tuned.weights_path).metadata["training"]["train_only"] == "decoder"


def test_initial_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    start = train(_config(), out_dir=tmp_path / "a", steps=1, progress=False)
    other = parse_config({**_config().model_dump(mode="json"), "model": {"base_channels": 8, "depth": 3},
                          "training": {**_config().training.model_dump(mode="json"),
                                       "initial_weights": str(start.weights_path)}})
    with pytest.raises(ConfigError, match="trained with model settings"):
        train(other, out_dir=tmp_path / "b", steps=2, progress=False)


def test_time_limit_stops_training_and_still_writes_weights(tmp_path: Path) -> None:
    result = train(_config(max_wall_time_min=0.001), out_dir=tmp_path / "t", steps=10_000, progress=False)
    assert result.steps < 10_000
    assert load_weights(result.weights_path).metadata["training"]["steps"] == result.steps


def test_splits_are_by_field_of_view() -> None:
    train_seeds = {f.seed for f in simulated_fields(64, TRAIN_SEED_BASE, (600.0, 600.0))}
    validation_seeds = {f.seed for f in simulated_fields(16, VALIDATION_SEED_BASE, (600.0, 600.0))}
    assert not train_seeds & validation_seeds
    names = [f"well{i}_site{j}" for i in range(10) for j in range(3)]
    train_names, validation_names = split_field_names(names, 0.2, seed=0)
    assert set(train_names).isdisjoint(validation_names) and len(validation_names) == 6
    assert sorted(train_names + validation_names) == sorted(names)


def test_train_command_rejects_a_bad_step_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_a_defocus_range_beyond_the_psf_bank_is_a_clear_error_before_training(tmp_path: Path) -> None:
    from acquire_refocus.errors import ConfigError

    with pytest.raises(ConfigError, match=r"reaches beyond the simulator's PSF bank \(simulator.max_defocus_um: 40\)"):
        train(_config(defocus_range_um=[-100.0, 100.0]), out_dir=tmp_path / "run", steps=1, progress=False)

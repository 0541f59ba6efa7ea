import io
import math

import pytest
import torch
from torch import nn

from herbarium.optim import (
    DEFAULT_LRS,
    OPTIMIZERS,
    SCHEDULES,
    Phase,
    PhasedOptimizer,
    Schedule,
    constant,
    cosine_restarts,
    cycle_index,
    parse_phases,
    parse_schedule,
    step_decay,
    warmup_cosine,
)


def cosine_formula(progress: float, min_factor: float) -> float:
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- pure schedules --------------------------------------------------------------------------


def test_constant_and_step_decay():
    assert [constant(step) for step in (0, 7, 10_000)] == [1.0, 1.0, 1.0]
    assert [step_decay(step, 10) for step in (0, 9, 10, 19, 20, 35)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    assert step_decay(25, 10, gamma=0.1) == pytest.approx(0.01)


def test_warmup_cosine_formula():
    total, warmup, min_factor = 110, 10, 0.05
    for step in range(warmup):
        assert warmup_cosine(step, total, warmup, min_factor) == (step + 1) / warmup
    for step in (10, 35, 60, 109):
        expected = cosine_formula((step - warmup) / (total - warmup), min_factor)
        assert warmup_cosine(step, total, warmup, min_factor) == pytest.approx(expected, abs=1e-12)
    assert warmup_cosine(10, total, warmup, min_factor) == 1.0
    assert warmup_cosine(60, total, warmup, min_factor) == pytest.approx((1 + min_factor) / 2)
    assert warmup_cosine(110, total, warmup, min_factor) == min_factor
    assert warmup_cosine(500, total, warmup, min_factor) == min_factor
    with pytest.raises(ValueError):
        warmup_cosine(0, total_steps=5, warmup_steps=6)


def test_cycle_index_with_growing_cycles():
    # cycle_steps 4, mult 2: cycles [0, 4), [4, 12), [12, 28)
    assert cycle_index(0, 4, 2.0) == (0, 0, 4, False)
    assert cycle_index(3, 4, 2.0) == (0, 0, 4, True)
    assert cycle_index(4, 4, 2.0) == (1, 4, 8, False)
    assert cycle_index(11, 4, 2.0) == (1, 4, 8, True)
    assert cycle_index(12, 4, 2.0) == (2, 12, 16, False)
    assert cycle_index(27, 4, 2.0).is_last
    last_steps = [step for step in range(30) if cycle_index(step, 5).is_last]
    assert last_steps == [4, 9, 14, 19, 24, 29]


def test_cosine_restarts_formula():
    min_factor = 0.1
    for step, (start, length) in {0: (0, 4), 2: (0, 4), 3: (0, 4), 4: (4, 8), 9: (4, 8), 12: (12, 16)}.items():
        expected = cosine_formula((step - start) / length, min_factor)
        assert cosine_restarts(step, 4, 2.0, min_factor) == pytest.approx(expected, abs=1e-12)
    assert cosine_restarts(4, 4, 2.0) == 1.0  # restart
    # The warmup ramp multiplies the first cycle without moving the cycle boundaries.
    assert cosine_restarts(1, 4, 1.0, warmup_steps=3) == pytest.approx(2 / 3 * cosine_formula(1 / 4, 0.0))
    assert cosine_restarts(4, 4, 1.0, warmup_steps=3) == 1.0


# --- CLI specs -------------------------------------------------------------------------------


def test_parse_schedule_forms_convert_epochs_to_steps():
    steps_per_epoch, total_epochs = 5, 30
    step = parse_schedule("step:10")
    assert step == Schedule("step", period=10, gamma=0.5)
    assert step.factor(49, steps_per_epoch, total_epochs) == 1.0
    assert step.factor(50, steps_per_epoch, total_epochs) == 0.5
    assert parse_schedule("step:10:0.1") == Schedule("step", period=10, gamma=0.1)
    cosine = parse_schedule("cosine:warmup=1:min=0.01")
    assert cosine.factor(2, steps_per_epoch, total_epochs) == warmup_cosine(2, 150, 5, 0.01)
    assert cosine.factor(77, steps_per_epoch, total_epochs) == warmup_cosine(77, 150, 5, 0.01)
    sgdr = parse_schedule("sgdr:5:mult=2")
    assert sgdr.factor(33, steps_per_epoch, total_epochs) == cosine_restarts(33, 25, 2.0)
    assert sgdr.cycle(74, steps_per_epoch).is_last  # cycles of 5 and 10 epochs: the second ends at epoch 15
    assert parse_schedule("constant").factor(123, steps_per_epoch, total_epochs) == 1.0


@pytest.mark.parametrize("spec", ["constant", "step:10", "step:3:0.1", "cosine:warmup=1", "sgdr:5:mult=2:min=0.01"])
def test_schedule_spec_round_trip(spec):
    schedule = parse_schedule(spec)
    assert parse_schedule(schedule.to_spec()) == schedule
    assert parse_schedule(str(schedule)) == schedule


@pytest.mark.parametrize("spec", ["linear", "step", "step:x", "cosine:5", "sgdr:5:gamma=2", "step:1:0.5:9", "sgdr:0"])
def test_parse_schedule_errors_name_valid_forms(spec):
    with pytest.raises(ValueError) as error:
        parse_schedule(spec)
    for kind in SCHEDULES:
        assert kind in str(error.value)
    assert "step:EPOCHS" in str(error.value)


def test_parse_phases():
    phases = parse_phases("adam:0,sgd:10,adam:20", lrs={"sgd": 0.1})
    assert [(phase.name, phase.start_epoch, phase.lr) for phase in phases] == [
        ("adam", 0, DEFAULT_LRS["adam"]),
        ("sgd", 10, 0.1),
        ("adam", 20, DEFAULT_LRS["adam"]),
    ]
    explicit = parse_phases("adam@1e-3:0, sgd@0.02:5", lrs={"adam": 5.0})
    assert [(phase.lr, phase.start_epoch) for phase in explicit] == [(1e-3, 0), (0.02, 5)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sgd:1,adam:4", "epoch 0"),
        ("adam:0,sgd:5,adam:5", "strictly increase"),
        ("adam:0,lion:3", "adam, adamw, sgd, rmsprop"),
        ("adam:0,sgd", "NAME:START_EPOCH"),
        ("adam@fast:0", "NAME:START_EPOCH"),
    ],
)
def test_parse_phases_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_phases(spec)


# --- phased optimizer ------------------------------------------------------------------------

STEPS_PER_EPOCH = 3
TOTAL_EPOCHS = 6


def make_model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def batch(epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * epoch + index)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 2, generator=generator)


def train_step(model: nn.Module, optimizer: PhasedOptimizer, epoch: int, index: int) -> None:
    inputs, targets = batch(epoch, index)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def make_optimizer(model: nn.Module, spec: str = "adam:0,sgd:2,adam:4", **kwargs) -> PhasedOptimizer:
    return PhasedOptimizer(
        model.parameters(), parse_phases(spec), parse_schedule("cosine:warmup=1"), STEPS_PER_EPOCH, TOTAL_EPOCHS,
        **kwargs,
    )


def test_switch_at_epoch_uses_phase_lr_times_global_schedule():
    model = make_model()
    optimizer = make_optimizer(model)
    for epoch in range(2):
        assert not optimizer.start_epoch(epoch)  # still the first phase
        for index in range(STEPS_PER_EPOCH):
            train_step(model, optimizer, epoch, index)
    assert optimizer.active_phase.name == "adam"
    assert optimizer.start_epoch(2)
    assert optimizer.active is optimizer.optimizers["sgd"]
    assert optimizer.history == [{"epoch": 2, "step": 6, "from": "adam", "to": "sgd", "reason": "schedule"}]

    # The first SGD step: LR = 0.05 * cosine factor at global step 6 (not restarted), Nesterov momentum 0.9
    # on a fresh buffer moves by lr * (1 + 0.9) * (grad + weight_decay * param).
    expected_lr = DEFAULT_LRS["sgd"] * warmup_cosine(6, STEPS_PER_EPOCH * TOTAL_EPOCHS, STEPS_PER_EPOCH)
    assert optimizer.current_lr() == pytest.approx(expected_lr)
    before = model.weight.detach().clone()
    inputs, targets = batch(2, 0)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    grad = model.weight.grad.clone()
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)
    expected = before - expected_lr * 1.9 * (grad + 1e-4 * before)
    torch.testing.assert_close(model.weight.detach(), expected)
    assert optimizer.global_step == 7


def test_adam_moments_resume_after_sgd_phase():
    model = make_model()
    optimizer = make_optimizer(model)
    for epoch in range(5):
        optimizer.start_epoch(epoch)
        for index in range(STEPS_PER_EPOCH):
            train_step(model, optimizer, epoch, index)
    adam_state = optimizer.optimizers["adam"].state[model.weight]
    # Adam ran epochs 0-1 and 4: its step count continues through the SGD phase instead of restarting.
    assert adam_state["step"].item() == 3 * STEPS_PER_EPOCH
    assert optimizer.optimizers["sgd"].state[model.weight]["momentum_buffer"] is not None


def run(model: nn.Module, optimizer: PhasedOptimizer, epochs: range) -> None:
    for epoch in epochs:
        optimizer.start_epoch(epoch)
        for index in range(STEPS_PER_EPOCH):
            train_step(model, optimizer, epoch, index)


def save_and_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trip_across_switch_reproduces_trajectory():
    reference_model = make_model()
    reference = make_optimizer(reference_model)
    run(reference_model, reference, range(TOTAL_EPOCHS))

    # Interrupt in the SGD phase, with Adam's state idle, and resume from a weights_only load.
    model = make_model()
    optimizer = make_optimizer(model)
    run(model, optimizer, range(3))
    checkpoint = save_and_load({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    resumed_model = make_model()
    with torch.no_grad():
        resumed_model.weight.zero_()  # prove the weights come from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make_optimizer(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert (resumed.global_step, resumed.active_phase.name) == (3 * STEPS_PER_EPOCH, "sgd")
    run(resumed_model, resumed, range(3, TOTAL_EPOCHS))

    assert torch.equal(resumed_model.weight, reference_model.weight)
    assert torch.equal(resumed_model.bias, reference_model.bias)
    assert resumed.history == reference.history
    assert resumed.state_dict()["global_step"] == reference.state_dict()["global_step"]


def test_load_rejects_different_phases():
    model = make_model()
    state = make_optimizer(model).state_dict()
    with pytest.raises(ValueError, match="phases"):
        make_optimizer(model, "adam:0,sgd:3").load_state_dict(state)


def test_plateau_brings_next_phase_forward_without_shifting_later_ones():
    model = make_model()
    optimizer = make_optimizer(model, "adam:0,sgd:10,adamw:20", plateau_patience=2)
    optimizer.start_epoch(0)
    assert [optimizer.report_metric(value) for value in (0.5, 0.6, 0.6)] == [False, False, False]
    optimizer.start_epoch(1)
    assert optimizer.report_metric(0.55) is True  # second epoch without beating 0.6
    assert optimizer.active_phase.name == "adam"  # takes effect at the next epoch
    assert optimizer.start_epoch(2)
    assert optimizer.active_phase.name == "sgd"
    assert optimizer.history[-1] == {"epoch": 2, "step": 0, "from": "adam", "to": "sgd", "reason": "plateau"}
    assert not optimizer.start_epoch(10)  # sgd already active at its scheduled start
    assert optimizer.start_epoch(20) and optimizer.active_phase.name == "adamw"


def test_plateau_counter_resets_on_improvement_and_round_trips():
    model = make_model()
    optimizer = make_optimizer(model, "adam:0,sgd:10", plateau_patience=2)
    assert [optimizer.report_metric(value) for value in (0.5, 0.4, 0.7, 0.6)] == [False] * 4
    resumed = make_optimizer(make_model(), "adam:0,sgd:10", plateau_patience=2)
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    assert resumed.report_metric(0.65) is True  # one bad epoch before saving, one after
    no_plateau = make_optimizer(make_model(), "adam:0,sgd:10")
    assert not any(no_plateau.report_metric(0.1) for _ in range(5))


def test_plateau_tracking_restarts_with_each_phase():
    model = make_model()
    optimizer = make_optimizer(model, "adam:0,sgd:2,adamw:10", plateau_patience=2)
    assert [optimizer.report_metric(value) for value in (0.9, 0.5)] == [False, False]
    optimizer.start_epoch(2)  # scheduled switch: SGD is not compared with Adam's best of 0.9
    assert [optimizer.report_metric(value) for value in (0.3, 0.2, 0.2)] == [False, False, True]


def test_step_with_grad_scaler_matches_unscaled_step():
    plain_model, scaled_model = make_model(), make_model()
    plain, scaled = make_optimizer(plain_model), make_optimizer(scaled_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for index in range(4):
        inputs, targets = batch(0, index)
        plain.zero_grad()
        nn.functional.mse_loss(plain_model(inputs), targets).backward()
        plain.step()
        scaled.zero_grad()
        scaler.scale(nn.functional.mse_loss(scaled_model(inputs), targets)).backward()
        scaled.step(scaler)
        scaler.update()
    assert scaled.global_step == 4
    torch.testing.assert_close(scaled_model.weight, plain_model.weight)


def test_param_groups_keep_own_weight_decay_and_lr_scale():
    model = make_model()
    groups = [{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0.0, "lr_scale": 0.1}]
    optimizer = PhasedOptimizer(groups, parse_phases("sgd:0,adamw:1"), Schedule(), 1, 2)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-4, 0.0]
    optimizer.start_epoch(1)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0]
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-3, 1e-4])


def test_phase_validation():
    assert Phase("sgd", 3).lr == DEFAULT_LRS["sgd"]
    with pytest.raises(ValueError, match=", ".join(OPTIMIZERS)):
        Phase("lamb", 0)

import math

import pytest
import torch
import torch.nn.functional as F

from herbarium.losses import (
    CLASS_WEIGHTS,
    LOSS_SETTINGS,
    LOSSES,
    BalancedSoftmaxLoss,
    FocalLoss,
    LabelSmoothingCrossEntropy,
    LogitAdjustedLoss,
    MultiRankLoss,
    SymmetricCrossEntropy,
    build_loss,
    build_multi_rank_loss,
    class_weights,
    unread_loss_settings,
)

NUM_CLASSES = 7
COUNTS = [50, 20, 9, 4, 1, 0, 30]  # long-tailed, with an unseen class


def make_batch(batch_size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, NUM_CLASSES, generator=generator) * 2.0  # [B, C]
    target = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)  # [B]
    return logits, target


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-6, atol=1e-6)


# --- class weights -------------------------------------------------------------------------


def test_class_weight_formulas_and_mean_one():
    counts = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1)  # count 0 weighs as count 1
    beta = 0.99
    expected = {
        "none": torch.ones(NUM_CLASSES, dtype=torch.float64),
        "inverse": 1.0 / counts,
        "sqrt_inverse": 1.0 / counts.sqrt(),
        "effective": (1 - beta) / (1 - beta**counts),
    }
    for mode, raw in expected.items():
        weights = class_weights(COUNTS, mode, beta=beta)
        assert weights.dtype == torch.float32 and weights.shape == (NUM_CLASSES,)
        close(weights, raw / raw.mean())
        assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    # The unseen class (count 0) and the singleton (count 1) get the same weight.
    assert class_weights(COUNTS, "inverse")[5] == class_weights(COUNTS, "inverse")[4]


def test_effective_weights_saturate_between_uniform_and_inverse():
    counts = [1, 10, 100, 10_000]
    effective = class_weights(counts, "effective", beta=0.999)
    inverse = class_weights(counts, "inverse")
    # Ratio head/tail: inverse gives 1/10000, effective (1 - 0.999) / (1 - 0.999 ** 10000) ~ 1e-3.
    assert effective[3] / effective[0] == pytest.approx((1 - 0.999) / (1 - 0.999**10_000), rel=1e-5)
    assert effective[3] / effective[0] > inverse[3] / inverse[0]


def test_class_weights_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError) as error:
        class_weights(COUNTS, "balanced")
    for mode in CLASS_WEIGHTS:
        assert mode in str(error.value)


# --- focal / cross-entropy -----------------------------------------------------------------


def test_focal_gamma_zero_is_cross_entropy():
    logits, target = make_batch()
    logits.requires_grad_(True)
    focal = FocalLoss(gamma=0.0)(logits, target)
    (focal_grad,) = torch.autograd.grad(focal, logits)
    reference = F.cross_entropy(logits, target)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    close(focal, reference)
    close(focal_grad, reference_grad)


def test_focal_gamma_zero_with_class_weights_is_weighted_cross_entropy():
    logits, target = make_batch()
    weight = class_weights(COUNTS, "inverse")
    close(FocalLoss(gamma=0.0, weight=weight)(logits, target), F.cross_entropy(logits, target, weight=weight))


def test_focal_gamma_two_matches_reference():
    logits, target = make_batch()
    weight = class_weights(COUNTS, "sqrt_inverse")
    probs = logits.double().softmax(dim=1)  # [B, C]
    target_prob = probs[torch.arange(len(target)), target]  # [B]
    per_sample = -((1 - target_prob) ** 2) * target_prob.log()  # [B]
    close(FocalLoss(gamma=2.0)(logits, target), per_sample.mean())
    sample_class_weight = weight.double()[target]  # [B]
    expected = (sample_class_weight * per_sample).sum() / sample_class_weight.sum()
    close(FocalLoss(gamma=2.0, weight=weight)(logits, target), expected)


# --- label smoothing, logit adjustment, symmetric CE ---------------------------------------


def test_label_smoothing_matches_torch():
    logits, target = make_batch()
    weight = class_weights(COUNTS, "inverse")
    close(LabelSmoothingCrossEntropy(0.1)(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    close(
        LabelSmoothingCrossEntropy(0.2, weight=weight)(logits, target),
        F.cross_entropy(logits, target, weight=weight, label_smoothing=0.2),
    )


def test_logit_adjustment_only_in_train_mode():
    logits, target = make_batch()
    tau = 0.7
    counts = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1)
    log_prior = (counts / counts.sum()).log()  # [C]
    loss = LogitAdjustedLoss(COUNTS, tau=tau)
    assert loss.training
    close(loss(logits, target), F.cross_entropy(logits.double() + tau * log_prior, target))
    loss.eval()
    close(loss(logits, target), F.cross_entropy(logits, target))
    balanced = BalancedSoftmaxLoss(COUNTS)
    close(balanced(logits, target), F.cross_entropy(logits.double() + log_prior, target))


def test_focal_logit_adjusted_is_focal_loss_on_the_adjusted_logits_in_training():
    logits, target = make_batch()
    counts = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1)
    adjusted = logits.double() + 0.5 * (counts / counts.sum()).log()
    loss = build_loss("focal_logit_adjusted", COUNTS, gamma=2.0, tau=0.5)
    nll = F.cross_entropy(adjusted, target, reduction="none")
    close(loss(logits, target), ((1 - torch.exp(-nll)) ** 2 * nll).mean())
    loss.eval()  # raw logits at evaluation, as for plain logit adjustment
    nll = F.cross_entropy(logits.double(), target, reduction="none")
    close(loss(logits, target), ((1 - torch.exp(-nll)) ** 2 * nll).mean())
    close(build_loss("focal_logit_adjusted", COUNTS, gamma=0.0)(logits, target), build_loss("logit_adjusted", COUNTS)(logits, target))


def test_logit_adjusted_prior_is_a_buffer_that_round_trips():
    logits, target = make_batch()
    source = LogitAdjustedLoss(COUNTS)
    assert "log_prior" in dict(source.named_buffers())
    restored = LogitAdjustedLoss([1] * NUM_CLASSES)  # a different prior until the state is loaded
    restored.load_state_dict(source.state_dict())
    close(restored(logits, target), source(logits, target))


def test_symmetric_cross_entropy_matches_formula():
    logits, target = make_batch()
    alpha, beta = 0.3, 1.5
    probs = logits.double().softmax(dim=1)  # [B, C]
    one_hot = F.one_hot(target, NUM_CLASSES).double()  # [B, C]
    cross_entropy = -(one_hot * probs.log()).sum(dim=1)  # [B]
    reverse = -(probs * one_hot.clamp(1e-4, 1.0).log()).sum(dim=1)  # [B]
    expected = (alpha * cross_entropy + beta * reverse).mean()
    close(SymmetricCrossEntropy(alpha=alpha, beta=beta)(logits, target), expected)


# --- behaviour shared by every loss ---------------------------------------------------------


def build_every_loss() -> dict[str, torch.nn.Module]:
    losses = {name: build_loss(name, COUNTS, "effective", gamma=1.5) for name in LOSSES}
    losses["focal_unweighted"] = build_loss("focal", COUNTS)
    return losses


@pytest.mark.parametrize("name", list(build_every_loss()))
def test_ignored_targets_contribute_nothing(name):
    loss_fn = build_every_loss()[name]
    logits, target = make_batch()
    ignored = torch.tensor([1, 4, 5])
    target = target.clone()
    target[ignored] = -1
    kept = torch.ones(len(target), dtype=torch.bool)
    kept[ignored] = False
    logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    close(loss, loss_fn(logits[kept].detach(), target[kept]))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(grad[kept].abs().sum(dim=1) > 0)


@pytest.mark.parametrize("name", list(build_every_loss()))
def test_all_ignored_gives_differentiable_zero(name):
    loss_fn = build_every_loss()[name]
    logits, _ = make_batch()
    logits.requires_grad_(True)
    loss = loss_fn(logits, torch.full((len(logits),), -1))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(logits.grad == 0)


@pytest.mark.parametrize("name", list(build_every_loss()))
def test_integer_sample_weights_equal_repeating_samples(name):
    # The weighted mean is sum(w_i * loss_i) / sum(w_i): weight 2 counts a sample twice, weight 0 drops it.
    loss_fn = build_every_loss()[name]
    logits, target = make_batch()
    sample_weight = torch.tensor([2.0, 0.0, 1.0, 3.0, 1.0, 1.0, 0.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    repeats = sample_weight.long()
    repeated_logits = logits.repeat_interleave(repeats, dim=0)
    repeated_target = target.repeat_interleave(repeats)
    close(loss_fn(logits, target, sample_weight=sample_weight), loss_fn(repeated_logits, repeated_target))


def test_unknown_loss_names_valid_keys():
    with pytest.raises(ValueError) as error:
        build_loss("hinge", COUNTS)
    for name in LOSSES:
        assert name in str(error.value)


def test_build_loss_applies_settings_and_class_weights():
    weight = class_weights(COUNTS, "inverse")
    focal = build_loss("focal", COUNTS, "inverse", gamma=3.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 3.0
    close(focal.weight, weight)
    assert build_loss("ce", COUNTS).gamma == 0.0 and build_loss("ce", COUNTS).weight is None
    assert build_loss("label_smoothing", COUNTS, smoothing=0.3).smoothing == 0.3
    assert build_loss("logit_adjusted", COUNTS, tau=0.5).tau == 0.5
    sce = build_loss("sce", COUNTS, "sqrt_inverse", sce_alpha=0.2, sce_beta=0.5)
    assert (sce.alpha, sce.beta) == (0.2, 0.5)
    close(sce.weight, class_weights(COUNTS, "sqrt_inverse"))
    effective = build_loss("balanced_softmax", COUNTS, "effective", beta=0.9)
    close(effective.weight, class_weights(COUNTS, "effective", beta=0.9))


CHANGED_SETTING = {"gamma": 3.0, "smoothing": 0.3, "tau": 0.5, "beta": 0.9, "sce_alpha": 0.4, "sce_beta": 0.5}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_setting_is_unread_exactly_when_changing_it_leaves_the_loss_unchanged(name):
    """unread_loss_settings warns about a setting iff changing it leaves the loss's value as it was."""
    logits, target = make_batch(seed=2)
    base = build_loss(name, COUNTS, "effective").train()(logits, target)
    for setting in LOSS_SETTINGS:
        changed = build_loss(name, COUNTS, "effective", **{setting: CHANGED_SETTING[setting]}).train()(logits, target)
        unread = unread_loss_settings([setting], [name], "effective") == [setting]
        assert unread == torch.equal(changed, base), (name, setting)


def test_beta_is_read_only_with_effective_class_weights():
    assert unread_loss_settings(["beta", "tau"], ["logit_adjusted"], "inverse") == ["beta"]
    assert unread_loss_settings(["beta", "tau"], ["logit_adjusted", "ce"], "effective") == []


# --- multi-rank ------------------------------------------------------------------------------


def test_multi_rank_loss_sums_weighted_terms():
    species_logits, species_target = make_batch(seed=1)
    genus_logits, genus_target = make_batch(seed=2)
    genus_target[:4] = -1  # unlabelled at genus
    losses = {"species": FocalLoss(gamma=2.0), "genus": LabelSmoothingCrossEntropy(0.1)}
    multi = MultiRankLoss(losses, {"species": 1.5, "genus": 1.0})
    sample_weight = torch.linspace(0.1, 1.0, len(species_target))
    species_logits.requires_grad_(True)
    logits = {"species": species_logits, "genus": genus_logits}
    targets = {"species": species_target, "genus": genus_target}
    total, terms = multi(logits, targets, sample_weight=sample_weight)
    species = losses["species"](species_logits, species_target, sample_weight=sample_weight)
    genus = losses["genus"](genus_logits, genus_target, sample_weight=sample_weight)
    close(total, 1.5 * species + genus)
    close(terms["species"], species)
    close(terms["genus"], genus)
    assert all(not term.requires_grad for term in terms.values())
    total.backward()
    assert species_logits.grad.abs().sum() > 0


def test_multi_rank_loss_checks_ranks():
    with pytest.raises(ValueError, match="rank_weights"):
        MultiRankLoss({"species": FocalLoss()}, {"genus": 1.0})
    multi = MultiRankLoss({"species": FocalLoss(), "genus": FocalLoss()}, None)
    logits, target = make_batch()
    with pytest.raises(KeyError, match="genus"):
        multi({"species": logits}, {"species": target})


def test_build_multi_rank_loss_and_eval_mode_propagates():
    counts_by_rank = {"species": COUNTS, "genus": [10, 40, 1]}
    multi = build_multi_rank_loss(
        {"species": "logit_adjusted", "genus": "focal"},
        counts_by_rank,
        {"species": 1.5, "genus": 1.0},
        "inverse",
        tau=2.0,
        gamma=1.0,
    )
    assert multi.losses["species"].tau == 2.0 and multi.losses["genus"].gamma == 1.0
    close(multi.losses["genus"].weight, class_weights([10, 40, 1], "inverse"))
    species_logits, species_target = make_batch()
    genus_logits = torch.randn(len(species_target), 3)
    genus_target = torch.randint(0, 3, (len(species_target),))
    logits = {"species": species_logits, "genus": genus_logits}
    targets = {"species": species_target, "genus": genus_target}
    multi.eval()
    _, terms = multi(logits, targets)
    species_weight = class_weights(COUNTS, "inverse")
    close(terms["species"], F.cross_entropy(species_logits, species_target, weight=species_weight))
    with pytest.raises(ValueError, match="counts_by_rank"):
        build_multi_rank_loss({"species": "ce"}, {"genus": [1]}, {"species": 1.0})


def test_reverse_term_is_bounded():
    # The property that makes SCE robust to label noise: RCE <= -log(1e-4) however wrong the model is.
    logits = torch.tensor([[50.0, -50.0, 0.0]])
    target = torch.tensor([1])
    reverse_only = SymmetricCrossEntropy(alpha=0.0, beta=1.0)
    assert reverse_only(logits, target).item() == pytest.approx(-math.log(1e-4), rel=1e-6)

"""Sampling defaults measured at the end of training (maskgit.tune): the distance, the pick, the whole search.

The intra-class Frechet distance (mean over classes of the FD between the samples asked for class c and the
held-out images of class c; Miyato & Koyama 2018) is what makes guidance measurable: samples that miss their
class can have exactly the right pooled distribution (so the plain FD cannot see it) while every per-class
distance grows.

In the tuner's small pixel space, though, that distance is dominated by colour and position, and on the built-in
shapes and the digits it rose with every step of guidance while a CNN judge's class accuracy rose too. So a
conditional run first keeps the settings whose class fidelity (the share of samples a small classifier of code
grids, trained on the run's training grids, assigns to the class asked for) is within two binomial standard
errors of the best, and only then goes by the distance.
"""

import dataclasses

import numpy as np
import pytest
import torch

from core.stats import frechet_distance
from maskgit.config import MaskGITConfig, MaskGITTrainConfig
from maskgit.model import build_maskgit
from maskgit.sampler import SamplerConfig
from maskgit.tune import (CLASSIFIER_EPOCHS, MIN_PER_CLASS, Projection, describe, distance, features, pick,
                          train_code_classifier, tune_sampling)
from vqvae.config import VQ_PRESETS
from vqvae.model import VQVAE
from vqvae.tokenizer import OwnTokenizer


def class_features(rng, per_class: int, classes: int = 3, dims: int = 6):
    means = 4.0 * np.eye(classes, dims)
    feats = np.concatenate([means[c] + rng.normal(size=(per_class, dims)) for c in range(classes)])
    return feats, np.repeat(np.arange(classes), per_class)


def test_intra_class_fd_sees_samples_that_miss_their_class():
    rng = np.random.default_rng(0)
    ref, ref_labels = class_features(rng, 200)
    good, labels = class_features(rng, 200)
    shuffled = rng.permutation(len(labels))  # the same images, asked for the wrong classes
    right, name = distance(good, labels, ref, ref_labels)
    wrong, _ = distance(good, labels[shuffled], ref, ref_labels)
    assert name == "intra-class FD"
    # the pooled FD is blind to the labels: identical for both
    assert frechet_distance(good, ref) == pytest.approx(frechet_distance(good[shuffled], ref))
    assert wrong > 5 * right
    # and it is the mean of the per-class distances
    per_class = [frechet_distance(good[labels == c], ref[ref_labels == c]) for c in range(3)]
    assert right == pytest.approx(np.mean(per_class))


def test_too_few_held_out_images_per_class_fall_back_to_the_pooled_fd():
    rng = np.random.default_rng(1)
    ref, ref_labels = class_features(rng, MIN_PER_CLASS - 1)
    samples, labels = class_features(rng, 50)
    value, name = distance(samples, labels, ref, ref_labels)
    assert name == "FD" and value == pytest.approx(frechet_distance(samples, ref))
    assert distance(samples, None, ref, None) == (pytest.approx(frechet_distance(samples, ref)), "FD")


def test_pick_prefers_weaker_guidance_and_temperature_near_one_within_one_percent():
    scores = [dict(cfg=0.0, temperature=1.0, distance=10.0), dict(cfg=2.0, temperature=1.0, distance=5.0),
              dict(cfg=3.0, temperature=0.8, distance=4.96), dict(cfg=3.0, temperature=1.0, distance=4.97)]
    assert pick(scores) == scores[1]  # 5.0 is within 1% of 4.96 and has the weakest guidance
    scores[1]["distance"] = 5.1
    assert pick(scores) == scores[3]  # among 4.96 / 4.97 (same cfg): the temperature nearer 1
    scores[3]["distance"] = 6.0
    assert pick(scores) == scores[2]
    # the same cfg and temperature within 1%: the choice temperature listed first (grid order)
    scores = [dict(cfg=0.0, temperature=1.0, choice_temperature=4.5, distance=10.05),
              dict(cfg=0.0, temperature=1.0, choice_temperature=2.0, distance=10.0)]
    assert pick(scores) == scores[0]
    scores[0]["distance"] = 10.2
    assert pick(scores) == scores[1]
    # ... and re-masking off before on, as the grid lists them
    scores = [dict(cfg=1.0, temperature=1.0, remask=False, distance=10.05),
              dict(cfg=1.0, temperature=1.0, remask=True, distance=10.0)]
    assert pick(scores) == scores[0]


def test_the_code_classifier_learns_which_codes_mark_a_class_and_leaves_the_global_rng_alone():
    # class c: code c at a random half of the 16 positions, uniform noise elsewhere; a linear-in-counts task
    g = torch.Generator().manual_seed(0)

    def grids(n):
        labels = torch.randint(0, 3, (n,), generator=g)
        codes = torch.randint(3, 20, (n, 16), generator=g)
        marked = torch.rand(n, 16, generator=g) < 0.5
        return torch.where(marked, labels[:, None], codes), labels

    train, train_labels = grids(600)
    test, test_labels = grids(200)
    state = torch.random.get_rng_state()
    net = train_code_classifier(train, train_labels, 20, (4, 4), 3, steps=150, batch_size=64, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not net.training and net.accuracy(test, test_labels) > 0.95
    # its accuracy is the share of argmax hits, computed in one go here
    with torch.no_grad():
        expected = (net(test).argmax(1) == test_labels).float().mean().item()
    assert net.accuracy(test, test_labels, batch_size=7) == pytest.approx(expected)
    # seeded: the same weights again
    again = train_code_classifier(train, train_labels, 20, (4, 4), 3, steps=150, batch_size=64, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(net.state_dict().values(), again.state_dict().values()))
    # labels that carry no information: chance
    shuffled = train_code_classifier(train, train_labels[torch.randperm(600, generator=g)], 20, (4, 4), 3,
                                     steps=150, batch_size=64, seed=1)
    assert shuffled.accuracy(test, test_labels) < 0.6


def test_the_code_classifier_trains_at_most_its_epoch_cap_over_a_small_set():
    """CLASSIFIER_EPOCHS passes over the grids at most: on 20 grids (one batch each step) 600 steps asked for are the
    same training as CLASSIFIER_EPOCHS steps, so the weights come out identical; one step fewer differs."""
    g = torch.Generator().manual_seed(0)
    codes, labels = torch.randint(0, 20, (20, 16), generator=g), torch.randint(0, 3, (20,), generator=g)
    asked = train_code_classifier(codes, labels, 20, (4, 4), 3, steps=600, batch_size=64, seed=1)
    capped = train_code_classifier(codes, labels, 20, (4, 4), 3, steps=CLASSIFIER_EPOCHS, batch_size=64, seed=1)
    fewer = train_code_classifier(codes, labels, 20, (4, 4), 3, steps=CLASSIFIER_EPOCHS - 1, batch_size=64, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(asked.state_dict().values(), capped.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(asked.state_dict().values(), fewer.state_dict().values()))


def test_the_code_classifier_refuses_no_grids_or_mismatched_labels():
    """No grids (or labels of another length) is a clear error, not a division by zero or a sampling error."""
    codes, labels = torch.zeros(0, 16, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="0 grids and 0 labels"):
        train_code_classifier(codes, labels, 20, (4, 4), 3)
    with pytest.raises(ValueError, match="5 grids and 4 labels"):
        train_code_classifier(torch.zeros(5, 16, dtype=torch.long), torch.zeros(4, dtype=torch.long), 20, (4, 4), 3)


def test_pick_keeps_the_settings_within_two_standard_errors_of_the_best_fidelity_then_the_lowest_distance():
    scores = [dict(cfg=0.0, temperature=1.0, fidelity=0.80, distance=5.0),
              dict(cfg=1.0, temperature=1.0, fidelity=0.85, distance=6.0),
              dict(cfg=2.0, temperature=1.0, fidelity=0.90, distance=7.0)]
    # 98 samples: p = (88.2 + 1) / 100 = 0.892, a standard error of 0.0314, so the band reaches down to 0.837:
    # cfg 1 stays in and has the lower distance; cfg 0 is out
    assert pick(scores, 98) == scores[1]
    # 10,000 samples: a band of 0.006, so only cfg 2 is left
    assert pick(scores, 10_000) == scores[2]
    # 25 samples: a band of 0.12, everything stays
    assert pick(scores, 25) == scores[0]
    # without a sample count (or without fidelities) it is the distance alone
    assert pick(scores) == scores[0]
    assert pick([{k: v for k, v in s.items() if k != "fidelity"} for s in scores], 98)["cfg"] == 0.0
    # a perfect best still has an error: 250 of 250 gives p = 251 / 252 and a band of 0.008, so one miss in 250
    # (99.6%) is as good, and two (99.2%) are not
    scores = [dict(cfg=0.0, temperature=1.0, fidelity=0.992, distance=5.0),
              dict(cfg=1.0, temperature=1.0, fidelity=0.996, distance=6.0),
              dict(cfg=2.0, temperature=1.0, fidelity=1.0, distance=7.0)]
    assert pick(scores, 250) == scores[1]


def test_the_default_grid_tries_the_samplers_own_choice_temperature():
    """maskgit/config.py cannot import the sampler (the sampler imports the model, which imports the config), so
    the grid's default repeats SamplerConfig's choice temperature as a literal: they must not drift apart."""
    assert MaskGITTrainConfig().tune_choice_temperatures == (SamplerConfig().choice_temperature,)


def test_the_grid_must_have_every_axis_in_range():
    MaskGITTrainConfig(tune_choice_temperatures=(4.5, 0.0)).validate()  # 0: no noise, the plain confidence order
    for bad in ((), (-1.0,)):
        with pytest.raises(ValueError, match="tune_choice_temperatures"):
            MaskGITTrainConfig(tune_choice_temperatures=bad).validate()
    with pytest.raises(ValueError, match="tune_temperatures"):
        MaskGITTrainConfig(tune_temperatures=(0.0,)).validate()
    MaskGITTrainConfig(tune_remask=(True,)).validate()
    for bad in ((), (False, False)):
        with pytest.raises(ValueError, match="tune_remask"):
            MaskGITTrainConfig(tune_remask=bad).validate()


def test_features_and_projection():
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    feats = features(images)
    assert feats.shape == (5, 3 * 8 * 8) and feats.dtype == np.float64
    # area averaging: each feature is the mean of a 4x4 block
    assert feats[0, 0] == pytest.approx(images[0, 0, :4, :4].mean().item(), abs=1e-6)
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 192))
    project = Projection(ref)
    assert project(ref).shape == (100, 32)
    np.testing.assert_allclose(project.basis.T @ project.basis, np.eye(32), atol=1e-10)
    np.testing.assert_allclose(project(ref).mean(0), 0, atol=1e-10)
    assert Projection(ref[:10])(ref).shape == (100, 10)  # never more directions than images


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    vq_cfg = dataclasses.replace(VQ_PRESETS["tiny"][0], image_size=16)
    tokenizer = OwnTokenizer(VQVAE(vq_cfg, sync_codebook=False))
    grid = (16 // tokenizer.downsample,) * 2
    model = build_maskgit(MaskGITConfig(dim=32, depth=1, heads=2), codebook_size=tokenizer.codebook_size,
                          grid=grid, num_classes=4).eval()
    codes = torch.randint(0, tokenizer.codebook_size, (48, grid[0] * grid[1]))
    labels = torch.arange(48) % 4
    return model, tokenizer, codes, labels


def test_tune_sampling_scores_every_setting_and_records_the_pick(tiny_pair):
    model, tokenizer, codes, labels = tiny_pair
    train = dict(train_codes=codes, train_labels=labels)
    kwargs = dict(cfgs=(0.0, 2.0), temperatures=(1.0, 0.5), num_samples=32, steps=2, **train)
    result = tune_sampling(model, tokenizer, codes, labels, **kwargs)
    assert [(s["cfg"], s["temperature"]) for s in result["scores"]] == [(0.0, 1.0), (0.0, 0.5), (2.0, 1.0),
                                                                         (2.0, 0.5)]
    assert result["metric"] == "class fidelity (code classifier), then intra-class FD" and result["held_out"] == 48
    assert 0 <= result["classifier_held_out_accuracy"] <= 1
    assert result["samples_per_setting"] == 4 * max(MIN_PER_CLASS, 32 // 4)
    assert all(np.isfinite(s["distance"]) and s["distance"] >= 0 for s in result["scores"])
    assert all(0 <= s["fidelity"] <= 1 for s in result["scores"])
    chosen = pick(result["scores"], result["samples_per_setting"])
    assert {k: result[k] for k in ("cfg", "temperature")} == {k: chosen[k] for k in ("cfg", "temperature")}
    assert {s["choice_temperature"] for s in result["scores"]} == {4.5}  # MaskGIT's value when none is given
    # a fixed seed: the search repeats exactly
    assert tune_sampling(model, tokenizer, codes, labels, **kwargs)["scores"] == result["scores"]
    # the choice temperature is a third axis, recorded with the pick
    crossed = tune_sampling(model, tokenizer, codes, labels, cfgs=(0.0,), temperatures=(1.0,),
                            choice_temperatures=(4.5, 0.0), num_samples=32, steps=2, **train)
    assert [s["choice_temperature"] for s in crossed["scores"]] == [4.5, 0.0]
    assert crossed["choice_temperature"] == pick(crossed["scores"], crossed["samples_per_setting"])[
        "choice_temperature"]
    assert crossed["scores"][0]["distance"] == result["scores"][0]["distance"]  # same seed, same setting
    assert crossed["scores"][1]["distance"] != crossed["scores"][0]["distance"]  # the noise changes the samples
    assert {s["remask"] for s in result["scores"] + crossed["scores"]} == {False}  # the sampler's default
    # re-masking is a fourth axis, recorded with the pick; it changes the samples
    remasked = tune_sampling(model, tokenizer, codes, labels, cfgs=(0.0,), temperatures=(1.0,),
                             remasks=(False, True), num_samples=32, steps=4, **train)
    assert [s["remask"] for s in remasked["scores"]] == [False, True]
    assert remasked["remask"] == pick(remasked["scores"], remasked["samples_per_setting"])["remask"]
    assert remasked["scores"][0]["distance"] != remasked["scores"][1]["distance"]
    assert "choice temperature 4.5, remask: " in describe(remasked)
    # an unconditional model: guidance is not searched
    uncond = build_maskgit(MaskGITConfig(dim=32, depth=1, heads=2, class_cond=False),
                           codebook_size=tokenizer.codebook_size, grid=model.grid, num_classes=0).eval()
    result = tune_sampling(uncond, tokenizer, codes, labels, **kwargs)
    assert [s["cfg"] for s in result["scores"]] == [0.0, 0.0] and result["metric"] == "FD"
    assert not any("fidelity" in s for s in result["scores"]) and "classifier_held_out_accuracy" not in result
    # without training grids the distance alone decides
    alone = tune_sampling(model, tokenizer, codes, labels, cfgs=(0.0, 2.0), temperatures=(1.0,), num_samples=32,
                          steps=2)
    assert alone["metric"] == "intra-class FD" and not any("fidelity" in s for s in alone["scores"])


def test_tune_sampling_keeps_at_most_max_classes(tiny_pair):
    model, tokenizer, codes, labels = tiny_pair
    result = tune_sampling(model, tokenizer, codes, labels, cfgs=(0.0,), temperatures=(1.0,), num_samples=8,
                           steps=1, max_classes=2)
    assert result["held_out"] == 24 and result["samples_per_setting"] == 2 * MIN_PER_CLASS

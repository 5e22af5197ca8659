"""The shipped MNIST classifier and tokenizers meet their targets, and the recipe reproduces them.

Targets: the classifier recognises ≥ 99% of the test digits; for each tokenizer it recognises ≥ 98%
of the reconstructions of all 10,000 test digits, and ≥ 80% of the codebook is used on them.
"""

import json

import pytest
import torch

from npp.classifier import (EMBEDDED_CLASSIFIER, ClassifierConfig, ClassifierTrainConfig, MnistClassifier,
                            accuracy, load_mnist_classifier, train_classifier)
from npp.cli import main
from npp.data import mnist_images, to_unit_range
from npp.files import ASSETS
from npp.tokenizer import EMBEDDED_TOKENIZERS, load_embedded_tokenizer
from npp.tokenizer_train import TokenizerTrainConfig, evaluate_tokenizer, train_tokenizer

CLASSIFIER_ACCURACY, RECON_ACCURACY, CODEBOOK_USAGE = 0.99, 0.98, 0.80


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    return mnist_images("test")


@pytest.fixture(scope="module")
def classifier() -> MnistClassifier:
    return load_mnist_classifier()


def test_shipped_classifier_accuracy(classifier, test_split):
    images, labels = test_split
    measured = accuracy(classifier, images, labels)
    assert measured >= CLASSIFIER_ACCURACY
    recorded = json.loads((EMBEDDED_CLASSIFIER / "metrics.json").read_text())
    assert recorded["test_accuracy"] == pytest.approx(measured, abs=1e-3)      # the file tells the truth


# All 10,000 digits take ~30 s through mnist-8x8 and ~45 s through mnist-16x16 on 2 idle cores (minutes
# on a loaded one): the default suite checks the first 1,000 of each, `make test-heavy` all of them
# against the numbers the files record.
@pytest.mark.parametrize("name, digits", [
    ("mnist-8x8", 1_000),
    ("mnist-16x16", 1_000),
    pytest.param("mnist-8x8", 10_000, marks=pytest.mark.heavy),
    pytest.param("mnist-16x16", 10_000, marks=pytest.mark.heavy),
])
def test_shipped_tokenizer_reconstructions_are_recognised(name, digits, classifier, test_split):
    images, labels = (t[:digits] for t in test_split)
    vq = load_embedded_tokenizer(name)
    measured = evaluate_tokenizer(vq, images, labels, classifier)
    assert measured["images"] == digits
    assert measured["recon_classifier_accuracy"] >= RECON_ACCURACY
    assert measured["codebook_usage"] >= CODEBOOK_USAGE
    recorded = json.loads((ASSETS / name / "metrics.json").read_text())
    assert recorded["fingerprint"] == vq.fingerprint()                          # metrics belong to these weights
    if digits == recorded["test"]["images"]:                                    # the file tells the truth
        assert recorded["test"]["recon_classifier_accuracy"] == pytest.approx(
            measured["recon_classifier_accuracy"], abs=1e-3)
        assert recorded["test"]["codebook_usage"] == pytest.approx(measured["codebook_usage"], abs=1e-2)


def test_shipped_assets_record_how_they_were_made():
    for folder in ("mnist-classifier", *EMBEDDED_TOKENIZERS):
        metrics = json.loads((ASSETS / folder / "metrics.json").read_text())
        assert metrics["command"].startswith("npp ") and metrics["wall_time_s"] > 0
        assert {"date", "machine", "torch", "config"} <= metrics.keys()
        assert sum(f.stat().st_size for f in (ASSETS / folder).iterdir()) < 5_000_000


def test_load_embedded_tokenizer_names_the_choices():
    with pytest.raises(ValueError, match="mnist-8x8, mnist-16x16"):
        load_embedded_tokenizer("mnist-4x4")


def test_classifier_features_are_the_penultimate_layer_and_deterministic(classifier, test_split):
    images_B3HW = to_unit_range(test_split[0][:8])
    features_BF = classifier.features(images_B3HW)
    assert features_BF.shape == (8, classifier.config.feature_dim)
    assert torch.equal(classifier.features(images_B3HW), features_BF)         # eval mode: no dropout noise
    assert torch.allclose(classifier.head[1](features_BF), classifier(images_B3HW))
    with pytest.raises(ValueError, match="to_unit_range"):
        classifier.features(test_split[0][:2])                                   # uint8 pixels are refused


def test_classifier_round_trips_through_safetensors(tmp_path):
    model = MnistClassifier(ClassifierConfig(widths=(32,), feature_dim=16)).eval()
    model.save_pretrained(tmp_path)
    loaded = MnistClassifier.from_pretrained(tmp_path)
    images_B3HW = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded.config == model.config and torch.equal(loaded(images_B3HW), model(images_B3HW))


def test_classifier_cli_trains_and_records(tmp_path, capsys):
    out = tmp_path / "clf"
    assert main(["classifier", "train", "--out", str(out), "--epochs", "2", "--train-images", "2048",
                 "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 2048 and metrics["test_images"] == 10_000
    assert metrics["test_accuracy"] > 0.5                                      # learns from 2,048 digits in two passes
    assert MnistClassifier.from_pretrained(out).num_params() == metrics["parameters"]


@pytest.mark.heavy
@pytest.mark.timeout(3600)
def test_shipped_recipe_reproduces_the_targets(tmp_path):
    """Retrain the classifier and the mnist-8x8 tokenizer from scratch with the defaults.

    About 12 minutes on 2 idle CPU cores, up to half an hour on busy ones.
    """
    _, classifier_metrics = train_classifier(ClassifierTrainConfig(progress=False), tmp_path / "classifier")
    assert classifier_metrics["test_accuracy"] >= CLASSIFIER_ACCURACY
    config = TokenizerTrainConfig(preset="mnist-8x8", classifier=str(tmp_path / "classifier"), progress=False)
    _, metrics = train_tokenizer(config, tmp_path / "mnist-8x8")
    assert metrics["test"]["images"] == 10_000
    assert metrics["test"]["recon_classifier_accuracy"] >= RECON_ACCURACY
    assert metrics["test"]["codebook_usage"] >= CODEBOOK_USAGE

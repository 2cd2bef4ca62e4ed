"""Input-feature descriptions: layer-0 top tokens and positions; Neuronpedia ids above."""
import torch

from attnrules.rules.descriptions import describe_input_features
from attnrules.sources import InputSAE
from attnrules.toy import VOCAB, build_toy


def test_layer0_features_are_named_by_their_top_token_or_position():
    toy = build_toy()
    d = describe_input_features(toy.model, toy.input_sae, backend="torch")
    assert d.labels[: len(VOCAB)] == VOCAB
    assert d.labels[len(VOCAB) + 3] == "pos3"
    assert d.details[VOCAB.index("If")].startswith("If (1)")


def test_above_layer0_features_are_neuronpedia_ids():
    sae = InputSAE.from_tensors(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4), layer=3,
                                neuronpedia_id="gpt2-small/3-res-jb")
    d = describe_input_features(None, sae)
    assert d(2) == "3-res-jb/2" and d.details[2] == "https://neuronpedia.org/gpt2-small/3-res-jb/2"
    anonymous = InputSAE.from_tensors(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4), layer=3)
    assert describe_input_features(None, anonymous)(1) == "L3.in1"

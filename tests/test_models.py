"""Shape, contract and configuration tests of the pure-PyTorch networks (tiny inputs, CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from facestream.models import (
    DeepLabV3Plus,
    DVSNetConfig,
    DVSNetHead,
    FlowConfig,
    FlowNet2S,
    KeyPolicy,
    PolicyConfig,
    SegmentationConfig,
    config_from_dict,
    config_to_dict,
)

BATCH = 2  # > 1: the ASPP pooling branch has BatchNorm on a 1x1 map


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "xception65"}, r"backbone must be one of .*, got 'xception65'"),
        ({"split": "logits"}, r"split must be one of .*, got 'logits'"),
        ({"num_classes": 1}, "num_classes must be >= 2, got 1"),
        ({"input_size": 100}, "input_size must be a positive multiple of 16, got 100"),
        ({"input_size": 0}, "input_size must be a positive multiple of 16, got 0"),
        ({"output_stride": 32}, "output_stride must be 8 or 16, got 32"),
    ],
)
def test_segmentation_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 96}, "input_size must be a positive multiple of 64, got 96"),
        ({"input_size": 0}, "input_size must be a positive multiple of 64, got 0"),
        ({"warp_size": 0}, "warp_size must be positive, got 0"),
        ({"scale_channels": 0}, "scale_channels must be positive, got 0"),
        ({"width": 0.0}, r"width must be in \(0, 1\], got 0.0"),
        ({"width": 1.5}, r"width must be in \(0, 1\], got 1.5"),
    ],
)
def test_flow_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlowConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fc_sizes": (1024, 128)}, r"fc_sizes needs 3 sizes, got \(1024, 128\)"),
        ({"window": 0}, "window must be positive, got 0"),
    ],
)
def test_policy_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (DVSNetConfig, {"fc_sizes": (1024,)}, "fc_sizes"),
        (DVSNetConfig, {"in_channels": 0}, "in_channels"),
        (DVSNetConfig, {"conv6_size": 0}, "conv6_size"),
        (PolicyConfig, {"conv6_size": 0}, "conv6_size"),
        (PolicyConfig, {"fc_sizes": (1024, 0, 128)}, "fc_sizes"),
    ],
    ids=[
        "dvsnet-fc_sizes",
        "dvsnet-in_channels",
        "dvsnet-conv6_size",
        "policy-conv6_size",
        "policy-fc_sizes-zero",
    ],
)
def test_size_fields_are_validated(cls, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_segmentation_config_derived_sizes() -> None:
    scores = SegmentationConfig(input_size=64, split="scores", num_classes=5)
    decoder = SegmentationConfig(input_size=64, split="decoder", decoder_channels=256)
    assert scores.feature_size == 16 and decoder.feature_size == 16
    assert scores.feature_channels == 5
    assert decoder.feature_channels == 256


def test_flow_config_derived_sizes() -> None:
    config = FlowConfig(input_size=128)
    assert config.conv6_channels == 384  # 1024 * 3/8
    assert config.conv6_size == 2
    assert config.channels(64) == 24


ALL_CONFIGS = [
    SegmentationConfig(backbone="resnet50", num_classes=3, input_size=64, split="decoder"),
    FlowConfig(input_size=64, warp_size=32, scale_channels=256, width=0.5, div_flow=10.0),
    PolicyConfig(in_channels=192, conv6_size=1, conv0_channels=48, fc_sizes=(64, 32, 16), window=30),
    DVSNetConfig(in_channels=192, conv6_size=1, conv_channels=48, fc_sizes=(64, 8)),
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: type(c).__name__)
def test_config_dict_round_trip(config) -> None:
    data = config_to_dict(config)
    assert data["kind"] in ("segmentation", "flow", "policy", "dvsnet")
    assert config_from_dict(data) == config
    # Through JSON tuples become lists; they must come back as tuples (frozen, hashable).
    restored = config_from_dict(json.loads(json.dumps(data)))
    assert restored == config
    for field in dataclasses.fields(restored):
        assert type(getattr(restored, field.name)) is type(getattr(config, field.name)), field.name
    hash(restored)


def test_config_to_dict_rejects_non_config() -> None:
    with pytest.raises(TypeError, match="not a model config: dict"):
        config_to_dict({"kind": "flow"})


@pytest.mark.parametrize("data", [{"kind": "optical"}, {"input_size": 64}])
def test_config_from_dict_unknown_kind(data: dict) -> None:
    with pytest.raises(ValueError, match="unknown model config kind"):
        config_from_dict(data)


def test_config_from_dict_unknown_field() -> None:
    data = {**config_to_dict(FlowConfig()), "stride": 4, "levels": 5}
    with pytest.raises(ValueError, match=r"unknown fields for flow config: \['levels', 'stride'\]"):
        config_from_dict(data)


def test_config_from_dict_validates_values() -> None:
    with pytest.raises(ValueError, match="backbone must be one of"):
        config_from_dict({"kind": "segmentation", "backbone": "vgg16"})


def test_config_from_dict_does_not_mutate_input() -> None:
    data = json.loads(json.dumps(config_to_dict(PolicyConfig())))
    snapshot = json.dumps(data, sort_keys=True)
    config_from_dict(data)
    assert json.dumps(data, sort_keys=True) == snapshot


# --------------------------------------------------------------------------- DeepLab-V3+


@pytest.fixture(scope="module")
def deeplab_models() -> dict[tuple[str, str, int], DeepLabV3Plus]:
    """One network per (backbone, split, input size); built once, in eval mode."""
    torch.manual_seed(0)
    cases = [("mobilenet_v2", 64), ("mobilenet_v2", 128), ("resnet50", 64)]
    return {
        (backbone, split, size): DeepLabV3Plus(
            SegmentationConfig(backbone=backbone, split=split, input_size=size)
        ).eval()
        for backbone, size in cases
        for split in ("scores", "decoder")
    }


DEEPLAB_CASES = [
    (backbone, split, size)
    for backbone, size in [("mobilenet_v2", 64), ("mobilenet_v2", 128), ("resnet50", 64)]
    for split in ("scores", "decoder")
]


@pytest.mark.parametrize(("backbone", "split", "size"), DEEPLAB_CASES)
def test_deeplab_shapes_and_split(deeplab_models, backbone: str, split: str, size: int) -> None:
    model = deeplab_models[(backbone, split, size)]
    config = model.config
    image = torch.rand(BATCH, 3, size, size)
    with torch.no_grad():
        features = model.features(image)
        task = model.task(features)
        scores = model(image)
    quarter = size // 4
    assert features.shape == (BATCH, config.feature_channels, quarter, quarter)
    assert config.feature_channels == (5 if split == "scores" else 256)
    assert task.shape == (BATCH, config.num_classes, quarter, quarter)
    assert scores.shape == (BATCH, config.num_classes, size, size)
    expected = F.interpolate(task, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_deeplab_scores_split_task_is_identity(deeplab_models) -> None:
    model = deeplab_models[("mobilenet_v2", "scores", 64)]
    features = torch.randn(BATCH, 5, 16, 16)
    assert torch.equal(model.task(features), features)


def test_deeplab_decoder_split_task_is_classifier(deeplab_models) -> None:
    model = deeplab_models[("mobilenet_v2", "decoder", 64)]
    features = torch.randn(BATCH, 256, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.task(features), model.classifier(features))


@pytest.mark.parametrize(
    "shape",
    [(BATCH, 3, 128, 128), (BATCH, 3, 64, 48), (BATCH, 1, 64, 64), (3, 64, 64)],
    ids=["other-size", "not-square", "one-channel", "no-batch"],
)
def test_deeplab_rejects_wrong_image(deeplab_models, shape: tuple[int, ...]) -> None:
    model = deeplab_models[("mobilenet_v2", "scores", 64)]
    with pytest.raises(ValueError, match="DeepLabV3Plus"):
        model.features(torch.rand(*shape))
    with pytest.raises(ValueError, match="DeepLabV3Plus"):
        model(torch.rand(*shape))


# --------------------------------------------------------------------------- FlowNet2-s


@pytest.fixture(scope="module")
def flownets() -> dict[int, FlowNet2S]:
    torch.manual_seed(0)
    return {size: FlowNet2S(FlowConfig(input_size=size, warp_size=64)).eval() for size in (64, 128)}


@pytest.mark.parametrize("size", [64, 128])
def test_flownet_output_shapes(flownets, size: int) -> None:
    model = flownets[size]
    config = model.config
    pair = torch.rand(BATCH, 6, size, size)
    with torch.no_grad():
        out = model(pair)
        alone = model.conv6_features(pair)  # the encoder without the flow decoder
    torch.testing.assert_close(alone, out.conv6, rtol=0, atol=0)
    assert out.flow.shape == (BATCH, 2, 64, 64)
    assert out.scale.shape == (BATCH, config.scale_channels, 64, 64)
    assert out.conv6.shape == (BATCH, config.conv6_channels, size // 64, size // 64)
    assert config.conv6_channels == 384
    for name, tensor in out._asdict().items():
        assert torch.isfinite(tensor).all(), name


def test_flownet_channels_are_three_eighths_of_flownets(flownets) -> None:
    model = flownets[64]
    full = {"conv1": 64, "conv2": 128, "conv3": 256, "conv4": 512, "conv5": 512, "conv6": 1024}
    for name, channels in full.items():
        conv = getattr(model, name)[0]
        assert conv.out_channels == channels * 3 // 8, name
    assert model.conv1[0].in_channels == 6
    assert model.conv1[0].out_channels == 24
    assert model.conv6[0].out_channels == 384


def test_flownet_scale_is_one_at_init(flownets) -> None:
    with torch.no_grad():
        out = flownets[128](torch.rand(BATCH, 6, 128, 128))
    assert torch.equal(out.scale, torch.ones_like(out.scale))


@pytest.mark.parametrize(
    "shape",
    [(BATCH, 6, 128, 128), (BATCH, 3, 64, 64), (BATCH, 6, 64, 128), (6, 64, 64)],
    ids=["other-size", "one-frame", "not-square", "no-batch"],
)
def test_flownet_rejects_wrong_input(flownets, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="FlowNet2S"):
        flownets[64](torch.rand(*shape))


# --------------------------------------------------------------------------- key policy


@pytest.fixture(scope="module")
def policy() -> KeyPolicy:
    torch.manual_seed(0)
    return KeyPolicy(PolicyConfig()).eval()


def _policy_inputs(batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 384, 2, 2), torch.rand(batch, 2)


def test_policy_layer_sizes(policy: KeyPolicy) -> None:
    assert (policy.conv0.in_channels, policy.conv0.out_channels) == (384, 96)
    assert policy.fc0.in_features == 96 * 2 * 2
    assert policy.fc0.out_features == 1024
    assert (policy.fc1.in_features, policy.fc1.out_features) == (1024, 1024)
    assert (policy.fc2.in_features, policy.fc2.out_features) == (1024, 128)
    assert (policy.fc3.in_features, policy.fc3.out_features) == (130, 2)


def test_policy_key_probability_is_softmax_of_key_logit(policy: KeyPolicy) -> None:
    conv6, expert = _policy_inputs(4)
    with torch.no_grad():
        logits = policy(conv6, expert)
        prob = policy.key_probability(conv6, expert)
    assert logits.shape == (4, 2)
    assert prob.shape == (4,)
    assert ((prob > 0) & (prob < 1)).all()
    torch.testing.assert_close(prob, torch.softmax(logits, dim=1)[:, 1])


@pytest.mark.parametrize("index", [0, 1], ids=["KAR", "LKD"])
def test_policy_expert_inputs_change_logits(policy: KeyPolicy, index: int) -> None:
    conv6, expert = _policy_inputs()
    changed = expert.clone()
    changed[:, index] += 0.5
    with torch.no_grad():
        before, after = policy(conv6, expert), policy(conv6, changed)
    assert not torch.allclose(before, after)
    # FC3 is linear in the expert inputs: the logit change is exactly 0.5 * its weight column.
    expected = 0.5 * policy.fc3.weight[:, 128 + index].detach()
    torch.testing.assert_close(after - before, expected.expand_as(before), rtol=1e-4, atol=1e-5)


def test_policy_expert_weights(policy: KeyPolicy) -> None:
    weights = policy.expert_weights()
    w = policy.fc3.weight.detach()
    assert weights.shape == (2,)
    torch.testing.assert_close(weights, torch.stack((w[1, 128] - w[0, 128], w[1, 129] - w[0, 129])))
    weights.add_(1.0)  # a copy: editing it must not touch the network
    torch.testing.assert_close(policy.expert_weights(), weights - 1.0)


@pytest.mark.parametrize(
    ("conv6_shape", "expert_shape"),
    [
        ((BATCH, 384, 1, 1), (BATCH, 2)),
        ((BATCH, 256, 2, 2), (BATCH, 2)),
        ((BATCH, 384, 2, 2), (BATCH, 3)),
    ],
    ids=["conv6-size", "conv6-channels", "expert"],
)
def test_policy_rejects_wrong_shapes(policy: KeyPolicy, conv6_shape, expert_shape) -> None:
    with pytest.raises(ValueError, match="KeyPolicy expects"):
        policy(torch.randn(*conv6_shape), torch.rand(*expert_shape))


def test_policy_accepts_flownet_conv6(flownets) -> None:
    """The policy's default config reads FlowNet2-s Conv6 at the default 128 input."""
    flow_config = flownets[128].config
    config = PolicyConfig()
    assert config.in_channels == flow_config.conv6_channels
    assert config.conv6_size == flow_config.conv6_size


# --------------------------------------------------------------------------- DVSNet head


def test_dvsnet_head_output_in_unit_interval() -> None:
    head = DVSNetHead(DVSNetConfig()).eval()
    with torch.no_grad():
        score = head(torch.randn(3, 384, 2, 2) * 10)
    assert score.shape == (3,)
    assert ((score >= 0) & (score <= 1)).all()


def test_dvsnet_head_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="DVSNetHead expects"):
        DVSNetHead(DVSNetConfig())(torch.randn(BATCH, 384, 1, 1))

"""k-diffusion JSON config loading against K.config.load_config's outputs (kdiff_configs.json)."""

import json

import pytest

from edm_jax.nets.kdiff_config import load_config, round_to_power_of_two

SHIPPED = [
    "config_32x32_small.json",
    "config_32x32_small_butterflies.json",
    "config_cifar10.json",
    "config_cifar10_transformer.json",
    "config_mnist.json",
    "config_mnist_transformer.json",
    "config_oxford_flowers.json",
    "config_oxford_flowers_shifted_window.json",
]


@pytest.fixture(scope="module")
def kdiff_configs(fixtures_dir):
    return json.loads((fixtures_dir / "kdiff_configs.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_with_k_diffusion_defaults(kdiff_configs, tmp_path, name):
    entry = kdiff_configs["configs"][name]
    path = tmp_path / name
    path.write_text(entry["text"])
    assert load_config(path) == entry["loaded"]


@pytest.mark.parametrize(
    "name", ["v2_minimal", "v2_float_dropout", "v1_transformer_minimal", "image_v1_minimal"]
)
def test_load_config_edge_cases(kdiff_configs, name):
    case = kdiff_configs["load_config_edge_cases"][name]
    assert load_config(case["input"]) == case["loaded"]


def test_v1_d_ff_default(kdiff_configs):
    for width, d_ff in kdiff_configs["v1_d_ff_default"]["values"].items():
        assert round_to_power_of_two(int(width) * 8 / 3, tol=0.05) == d_ff


def test_load_config_does_not_modify_its_input(kdiff_configs):
    case = kdiff_configs["load_config_edge_cases"]["v2_minimal"]["input"]
    before = json.dumps(case, sort_keys=True)
    load_config(case)
    assert json.dumps(case, sort_keys=True) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["model"].update(type="image_v2"),
            r"unknown k-diffusion model type 'image_v2'.*valid",
        ),
        (
            lambda c: c["model"].update(widht=3),
            r"unknown key 'widht' in k-diffusion config section 'model' \(did you mean 'width'\?\)",
        ),
        (
            lambda c: c["optimizer"].update(weight_decy=0.1),
            r"unknown key 'weight_decy'.*'optimizer' \(did you mean 'weight_decay'\?\)",
        ),
        (
            lambda c: c.update(lr_schedule={}),
            r"unknown key 'lr_schedule' in k-diffusion config \(top level\) \(did you mean 'lr_sched'\?\)",
        ),
    ],
)
def test_unknown_keys_are_one_clear_error(edit, message):
    config = {
        "model": {
            "type": "image_transformer_v1",
            "input_channels": 3,
            "input_size": [32, 32],
            "patch_size": [2, 2],
            "depth": 2,
            "width": 128,
        },
        "dataset": {"type": "imagefolder", "location": "x"},
        "optimizer": {"lr": 1e-4},
    }
    edit(config)
    with pytest.raises(ValueError, match=message):
        load_config(config)

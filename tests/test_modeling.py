"""Model construction from `config.model` (`vljax/modeling.py`): the image tower's weights from a
torchvision ResNet state dict named in the config, I3D-inflated, against the inflation itself."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from configs import merlin
from vljax import modeling
from vljax.models import two_tower
from vljax.models.resnet3d import inflate_kernel
from tests.models.test_resnet3d import numpy_state_dict, random_torch_resnet


def _tiny_model_config(image_init: str):
    c = merlin.get_config("tiny")
    c.model.image.update(init=image_init, depth=18)  # torchvision has ResNet-18, not tiny's ResNet-10
    c.model.phenotype_weight = 0.0
    return c


def test_image_init_torchvision_inflates_the_named_state_dict(tmp_path):
    sd = {k: v for k, v in numpy_state_dict(random_torch_resnet(18, 4, seed=3)).items()
          if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18_w4.safetensors"
    save_file(sd, str(path))
    config = _tiny_model_config(f"torchvision:{path}")
    mesh = modeling.make_mesh()
    model = modeling.abstract_model(modeling.model_spec(config, None), config.seed)
    params, rest = modeling.init_model(model, config.seed, NamedSharding(mesh, P()))
    image = params["image_tower"]
    kernel = np.asarray(image["layer1"][0]["conv1"]["kernel"][...])
    np.testing.assert_array_equal(kernel, inflate_kernel(sd["layer1.0.conv1.weight"], kernel.shape[0]))
    stem = np.asarray(image["conv1"]["kernel"][...])
    np.testing.assert_array_equal(stem, inflate_kernel(sd["conv1.weight"], stem.shape[0]))
    np.testing.assert_array_equal(np.asarray(rest["image_tower"]["layer2"][0]["downsample"]["norm"]["var"][...]),
                                  sd["layer2.0.downsample.1.running_var"])
    jax.tree.map(lambda x: x.block_until_ready(), params)


def test_image_init_is_checked(tmp_path):
    with pytest.raises(ValueError, match="config.model.image.init='imagenet'"):
        modeling.model_spec(_tiny_model_config("imagenet"), None)
    spec = modeling.model_spec(_tiny_model_config(f"torchvision:{tmp_path / 'absent.safetensors'}"), None)
    with pytest.raises(FileNotFoundError, match="absent.safetensors does not exist"):
        two_tower.load_pretrained(None, spec)  # refused before any weight is touched

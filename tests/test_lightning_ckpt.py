"""PyTorch Lightning 1.x checkpoints (``last.ckpt``) read without pytorch_lightning and without
executing anything the file names."""

import os
import sys
import types

import flax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dimo_jax.converters import taming, torch_files  # noqa: E402
from dimo_jax.networks import vqgan  # noqa: E402

_FAKE_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
                 "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")


def _save_with_fake_lightning(obj_fn, path):
  """torch.save of ``obj_fn(ModelCheckpoint, AttributeDict)`` with the two Lightning classes defined
  in fake modules that exist in sys.modules only while saving."""
  assert not any(name in sys.modules for name in _FAKE_MODULES), "pytorch_lightning must not be loaded"
  modules = {name: types.ModuleType(name) for name in _FAKE_MODULES}

  class ModelCheckpoint:
    def __init__(self, monitor):
      self.monitor = monitor

  class AttributeDict(dict):
    pass

  for cls, module in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                      (AttributeDict, "pytorch_lightning.utilities.parsing")):
    cls.__module__, cls.__qualname__ = module, cls.__name__
    setattr(modules[module], cls.__name__, cls)
  sys.modules.update(modules)
  try:
    torch.save(obj_fn(ModelCheckpoint, AttributeDict), str(path))
  finally:
    for name in _FAKE_MODULES:
      sys.modules.pop(name, None)


def _small_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  small = vqgan.TamingConfig.small()
  sd = {k: torch.from_numpy(rng.normal(0, 0.1, s).astype(np.float32))
        for k, (_, s) in taming.taming_param_layout(small).items()}
  return small, sd


def _lightning_checkpoint(state_dict):
  def build(ModelCheckpoint, AttributeDict):  # noqa: N803
    first = next(iter(state_dict.values()))
    return {
        "epoch": 11,
        "global_step": 12000,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": dict(state_dict, **{"loss.logvar": torch.zeros(())}),
        "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.25),
                                        "best_model_path": "logs/checkpoints/last.ckpt",
                                        "current_score": torch.tensor(0.3), "dirpath": "logs/checkpoints"}},
        "optimizer_states": [{"state": {0: {"step": 3, "exp_avg": torch.zeros_like(first),
                                            "exp_avg_sq": torch.ones_like(first)}},
                              "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "eps": 1e-8,
                                                "weight_decay": 0, "amsgrad": False, "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(embed_dim=256, n_embed=1024, monitor=ModelCheckpoint("val")),
    }
  return build


def test_lightning_checkpoint_loads_with_placeholders(tmp_path):
  small, sd = _small_state_dict()
  path = tmp_path / "last.ckpt"
  _save_with_fake_lightning(_lightning_checkpoint(sd), path)
  with pytest.raises(ValueError, match="weights_only=True"):  # what torch.load alone makes of it
    torch_files.load_torch_file(str(path))

  obj = torch_files.load_torch_file(str(path), placeholders=True)
  assert "pytorch_lightning" not in sys.modules
  assert obj["epoch"] == 11 and obj["pytorch-lightning_version"] == "1.0.8"
  for k, v in sd.items():
    assert isinstance(obj["state_dict"][k], torch.Tensor)
    np.testing.assert_array_equal(obj["state_dict"][k].numpy(), v.numpy())
  (key, value), = obj["callbacks"].items()
  assert torch_files.is_placeholder(key) and isinstance(key, type)
  assert (key.placeholder_module, key.placeholder_name) == ("pytorch_lightning.callbacks.model_checkpoint",
                                                            "ModelCheckpoint")
  assert value["monitor"] == "val/rec_loss" and float(value["best_model_score"]) == 0.25
  opt = obj["optimizer_states"][0]
  assert opt["param_groups"][0]["betas"] == (0.5, 0.9)
  np.testing.assert_array_equal(opt["state"][0]["exp_avg_sq"].numpy(), np.ones(tuple(opt["state"][0]["exp_avg"].shape)))
  hp = obj["hyper_parameters"]
  assert isinstance(hp, torch_files.Placeholder) and hp.placeholder_name == "AttributeDict"
  assert hp.items["embed_dim"] == 256 and hp.items["monitor"].state == {"monitor": "val"}
  labels = [label for _, label in torch_files.find_placeholders(obj)]
  assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in labels

  # The converter takes the file as shipped; the result equals the plain state dict's conversion.
  got = taming.load_taming_checkpoint(str(path), small)
  want = taming.convert_taming_state_dict(sd, small)
  flat_got = flax.traverse_util.flatten_dict(got["params"])
  flat_want = flax.traverse_util.flatten_dict(want)
  assert flat_got.keys() == flat_want.keys()
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]))


class _WritesAFile:
  """A payload: unpickling it runs ``exec`` (writes ``target``)."""

  def __init__(self, target):
    self.target = str(target)

  def __reduce__(self):
    return (exec, (f"open({self.target!r}, 'w').write('ran')",))


class _RunsACommand:
  def __init__(self, target):
    self.target = str(target)

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def test_nothing_in_the_file_executes(tmp_path):
  target, target2 = tmp_path / "written_by_exec", tmp_path / "written_by_system"
  path = tmp_path / "evil.ckpt"
  small, sd = _small_state_dict(1)
  torch.save({"state_dict": sd, "payload": _WritesAFile(target), "other": [_RunsACommand(target2)]}, str(path))

  with pytest.raises(ValueError, match="weights_only=True"):
    torch_files.load_torch_file(str(path))
  obj = torch_files.load_torch_file(str(path), placeholders=True)
  payload = obj["payload"]
  assert isinstance(payload, torch_files.Placeholder)
  assert (payload.placeholder_module, payload.placeholder_name) == ("builtins", "exec")
  assert obj["other"][0].placeholder_name == "system"
  taming.load_taming_checkpoint(str(path), small)
  assert not target.exists() and not target2.exists()

  # A placeholder among the weights is refused with its key and class.
  torch.save({"state_dict": dict(sd, **{"encoder.conv_in.weight": _WritesAFile(target)})}, str(path))
  with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight.*builtins\.exec"):
    taming.load_taming_checkpoint(str(path), small)
  assert not target.exists()

  # The payload is live: an unrestricted load runs it.
  torch.save({"payload": _WritesAFile(target)}, str(path))
  torch.load(str(path), weights_only=False)
  assert target.read_text() == "ran"

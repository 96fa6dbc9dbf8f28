"""The Di[M]O authors' PyTorch step next to dimo_jax's, in one run, at the same size and settings.

  # a reduced size on any machine (float32 both; the CPU when there is no GPU)
  python experiments/compare_authors.py --authors_repo=/path/to/DiMO --size=reduced --out=/tmp/cmp
  # the paper's size on a GPU (24 x 768, 256 + 1 tokens, codebook 1024, batch 64, bf16)
  python experiments/compare_authors.py --authors_repo=/path/to/DiMO --size=full --out=$OUT/cmp

``--authors_repo`` is a checkout of the authors' public repository (github.com/yuanzhi-zhu/DiMO),
made by the user outside this repository (``git clone https://github.com/yuanzhi-zhu/DiMO``).
Their MaskGIT transformer class (``MaskGit_src/Network/transformer.py``, ``MaskTransformer``) is
imported from that checkout at run time; nothing of theirs is copied here. Their training script
(``train_DIMO_MaskGit.py``) needs ``diffusers``, ``accelerate`` and more at import time, so the
plumbing of their step around their model is written here from the algorithm as the reference
notes describe it (``shared/reference/dimo_reference.md``, section 1):

- generator update: labels uniform over the classes; x_init = uniform random codes with exactly
  round(L r_init) positions set to the mask id (a per-sample random permutation); the generator's
  logits at x_init with embedding noise sigma (their ``noise_emb_perturb``), in training mode
  (dropout on), with autograd; x_theta drawn from them; an arccos forward mask with exactly
  max(1, round(L r)) masks; the teacher (training mode: dropout on, no gradients) on both guidance
  branches in one batch of 2B (their null class) and the auxiliary on x_t, without gradients;
  g = q - p (forward KL) at the masked positions, NaNs to 0; the surrogate
  0.5 * sum((z - stopgrad(z - g))^2) / B; backward; global-norm clipping at 1; NaN/inf in the
  gradients replaced; Adam (no weight decay) with a linear warm-up;
- one auxiliary update: a fresh batch from the generator (no gradients), a fresh arccos mask,
  cross-entropy with label smoothing 0.1 at the masked positions, Adam;
- the EMA of the generator with rate min(decay, (1 + t) / (10 + t));
- frozen in generator and auxiliary: the token embedding (hence the tied head), the position
  embedding and the output bias (their ``fix_emb_layer``); dropout in all three networks;
- dtype policy: ``float32``, or ``bfloat16`` as their ``mixed_precision: bf16`` (autocast over
  float32 master weights; TF32 off as in their script).

dimo_jax's step is ``Distiller.step`` (the same algorithm, ``configs/maskgit.py``'s settings with the
size overridden), built and compiled the way ``experiments/benchmark.py`` does it; its sampling
times come from ``benchmark.bench_sampling`` (transformer only, no VQGAN). The authors' side samples
with their model under ``torch.no_grad`` in eval mode: one step (x_init, one forward with embedding
noise, one draw), and MaskGIT's confidence sampler (arccos schedule, guidance ramped linearly
w (t + 1) / T as dimo_jax's ``linear``, both branches in one batch, Gumbel confidence noise).

Each side runs in its own process (``--inprocess`` runs both in this one), so that each one's
peak memory is its own: on a GPU ``torch.cuda.max_memory_allocated`` and JAX's
``memory_stats()['peak_bytes_in_use']``; on the CPU the peak resident set size during the timed
steps (Linux ``VmHWM``, reset after the warm-up) of each process, and for JAX also XLA's estimate
of the compiled step (arguments + outputs - aliased + temporaries). ``--rounds`` alternates the two
sides that many times; the table gives the median over rounds of each side's median step.

Writes ``<out>/compare_authors.json`` and ``<out>/compare_authors.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)

AUTHORS_URL = "https://github.com/yuanzhi-zhu/DiMO"
AUTHORS_MODEL_FILE = os.path.join("MaskGit_src", "Network", "transformer.py")
AUTHORS_MODEL_MODULE = "MaskGit_src.Network.transformer"
AUTHORS_MODEL_CLASS = "MaskTransformer"
DTYPES = ("float32", "bfloat16")
SIDES = ("authors", "jax")


class AuthorsRepoError(ValueError):
  """``--authors_repo`` is missing or is not a usable checkout of the authors' repository."""


# ---------------------------------------------------------------------------- what is compared


@dataclasses.dataclass
class Spec:
  """The model size and the Di[M]O settings both sides run with (the authors' defaults)."""
  depth: int = 4
  width: int = 256
  heads: int = 8
  mlp_dim: int = 1024
  side: int = 16  # tokens per image side: side * side visual tokens, plus the class token
  codebook: int = 1024
  classes: int = 1000
  batch: int = 8
  sample_batch: int = 8
  dtype: str = "float32"  # float32 | bfloat16 (compute; parameters stay float32)
  remat: str = "none"  # dimo_jax only (the authors' run does not checkpoint): none | full | dots | ...
  attention: str = ""  # dimo_jax only: model.attention_impl ('' = XLA with the fused backward; xla_saved; cudnn)
  guidance: float = 2.0  # teacher guidance in the step (their true_cfg)
  dropout: float = 0.1
  r_init: float = 0.6
  sigma: float = 0.1
  lr: float = 1e-5
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  grad_clip: float = 1.0
  label_smoothing: float = 0.1
  ema_decay: float = 0.9999
  sample_steps: int = 16
  sample_guidance: float = 2.5
  sample_temperature: float = 1.3
  r_temp: float = 4.5

  @property
  def seq_len(self) -> int:
    return self.side * self.side

  def validate(self):
    for name in ("depth", "width", "heads", "mlp_dim", "side", "codebook", "batch", "sample_batch",
                 "sample_steps"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    if self.classes < 1:
      raise ValueError(f"--classes={self.classes} must be >= 1 (the step draws labels and uses the null class)")
    if self.width % self.heads:
      raise ValueError(f"--width={self.width} is not divisible by --heads={self.heads}")
    if self.dtype not in DTYPES:
      raise ValueError(f"--dtype={self.dtype!r} is not valid; choose one of {list(DTYPES)}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"--dropout={self.dropout} must be in [0, 1)")
    if not 0.0 < self.r_init < 1.0:
      raise ValueError(f"--r_init={self.r_init} must be in (0, 1)")
    if self.sample_steps > self.seq_len:
      raise ValueError(f"--sample_steps={self.sample_steps} exceeds the {self.seq_len} tokens")


SIZES = {
    # the paper's teacher: valeoai MaskGIT 24 x 768, 16 heads, 16 x 16 tokens, bf16, batch 64
    "full": dict(depth=24, width=768, heads=16, mlp_dim=3072, side=16, codebook=1024, classes=1000,
                 batch=64, sample_batch=64, dtype="bfloat16", remat="full"),
    # what a 2-core CPU runs in minutes
    "reduced": dict(depth=4, width=256, heads=8, mlp_dim=1024, side=16, codebook=1024, classes=1000,
                    batch=8, sample_batch=8, dtype="float32", remat="none"),
    # tests
    "tiny": dict(depth=1, width=32, heads=2, mlp_dim=64, side=4, codebook=16, classes=10, batch=2,
                 sample_batch=2, dtype="float32", remat="none", sample_steps=4),
}


@dataclasses.dataclass
class RunOptions:
  authors_repo: str = ""
  steps: int = 5
  warmup: int = 2
  sample_reps: int = 3
  rounds: int = 1
  torch_threads: int = 0  # 0: os.cpu_count()
  torch_device: str = "auto"  # auto (cuda when available) | cpu | cuda
  seed: int = 0
  sides: str = "authors,jax"
  inprocess: bool = False
  fast_compile: bool = False  # smoke runs: XLA backend optimisation level 0 (timings not representative)
  max_load: float = 0.0  # > 0: before each side, wait until the 1-minute load average is below it
  max_wait_s: float = 900.0  # ... for at most this long (then run anyway, and say so)
  out: str = ""
  command: str = ""

  def validate(self):
    for name in ("steps", "sample_reps", "rounds"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    for name in ("warmup", "torch_threads", "seed"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
    if self.torch_device not in ("auto", "cpu", "cuda"):
      raise ValueError(f"--torch_device={self.torch_device!r}: choose auto, cpu or cuda")
    for side in self.side_list():
      if side not in SIDES:
        raise ValueError(f"--sides: {side!r} is not one of {list(SIDES)}")

  def side_list(self) -> List[str]:
    return [s.strip() for s in self.sides.split(",") if s.strip()]


# ---------------------------------------------------------------------------- the authors' checkout


def check_authors_repo(path: str) -> str:
  """The absolute path of a checkout holding the authors' model file; a clear error otherwise."""
  how = (f"pass --authors_repo=<a checkout of {AUTHORS_URL}>, made outside this repository, e.g. "
         f"`git clone {AUTHORS_URL} ~/DiMO` then --authors_repo=~/DiMO")
  if not path:
    raise AuthorsRepoError(f"no --authors_repo given: {how}")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(full):
    raise AuthorsRepoError(f"--authors_repo={path!r}: no such directory ({full}); {how}")
  model_file = os.path.join(full, AUTHORS_MODEL_FILE)
  if not os.path.isfile(model_file):
    raise AuthorsRepoError(
        f"--authors_repo={path!r} is not a checkout of the Di[M]O authors' repository: "
        f"{AUTHORS_MODEL_FILE} is missing there; {how}")
  return full


def load_authors_model_class(path: str):
  """Imports ``MaskTransformer`` from the user's checkout (the checkout goes on ``sys.path``)."""
  repo = check_authors_repo(path)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise AuthorsRepoError("the authors' side needs PyTorch: pip install torch") from e
  loaded = sys.modules.get(AUTHORS_MODEL_MODULE)
  if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "")).startswith(repo + os.sep):
    raise AuthorsRepoError(f"{AUTHORS_MODEL_MODULE} is already imported from {loaded.__file__}, "
                           f"not from --authors_repo={path!r}")
  if repo not in sys.path:
    sys.path.insert(0, repo)
  try:
    module = importlib.import_module(AUTHORS_MODEL_MODULE)
  except Exception as e:  # pylint: disable=broad-except
    raise AuthorsRepoError(f"importing {AUTHORS_MODEL_MODULE} from --authors_repo={path!r} failed: "
                           f"{type(e).__name__}: {e}") from e
  cls = getattr(module, AUTHORS_MODEL_CLASS, None)
  if cls is None:
    raise AuthorsRepoError(f"{os.path.join(repo, AUTHORS_MODEL_FILE)} defines no {AUTHORS_MODEL_CLASS}; "
                           f"is --authors_repo={path!r} a checkout of {AUTHORS_URL}?")
  return cls


def authors_commit(path: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=10, check=False)
  except Exception:  # pylint: disable=broad-except
    return None
  return out.stdout.strip() or None


# ---------------------------------------------------------------------------- host facts


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def reset_peak_rss() -> bool:
  """Resets this process's peak resident set size (Linux ``VmHWM``); False where unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def rss_bytes(field: str = "VmHWM") -> Optional[int]:
  """``VmHWM`` (peak since the last reset) or ``VmRSS`` of this process, from /proc/self/status;
  falls back to ``getrusage`` (the lifetime peak) elsewhere."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def wait_for_load(max_load: float, max_wait_s: float, poll_s: float = 5.0) -> Dict[str, Any]:
  """Waits until the host's 1-minute load average is below ``max_load`` (a shared host), at most
  ``max_wait_s``; returns the wait and the load it ended at."""
  t0 = time.perf_counter()
  load = load_average()
  while max_load > 0 and load and load[0] >= max_load and time.perf_counter() - t0 < max_wait_s:
    time.sleep(poll_s)
    load = load_average()
  return {"waited_s": round(time.perf_counter() - t0, 1), "load": load,
          "below_max": bool(not max_load or not load or load[0] < max_load)}


def _stats(times: List[float]) -> Dict[str, Any]:
  return {"median_s": statistics.median(times), "min_s": min(times), "times_s": list(times)}


# ---------------------------------------------------------------------------- the authors' side


class AuthorsStep:
  """The authors' MaskGIT model inside the Di[M]O step's plumbing (module docstring)."""

  def __init__(self, model_cls, spec: Spec, device: str, seed: int):
    import copy  # pylint: disable=import-outside-toplevel

    import torch  # pylint: disable=import-outside-toplevel
    self.torch, self.spec, self.device = torch, spec, torch.device(device)
    torch.manual_seed(seed)
    make = lambda: model_cls(img_size=16 * spec.side, hidden_dim=spec.width, codebook_size=spec.codebook,
                             depth=spec.depth, heads=spec.heads, mlp_dim=spec.mlp_dim, dropout=spec.dropout,
                             nclass=spec.classes)
    self.teacher = make().to(self.device)
    if self.teacher.num_visual_tokens != spec.seq_len:
      raise ValueError(f"the authors' model has {self.teacher.num_visual_tokens} visual tokens, expected "
                       f"{spec.seq_len}")
    self.teacher.train().requires_grad_(False)  # dropout on: never put in eval mode in their run
    self.gen = copy.deepcopy(self.teacher).train().requires_grad_(True)
    self.aux = copy.deepcopy(self.teacher).train().requires_grad_(True)
    for net in (self.gen, self.aux):  # their fix_emb_layer
      net.tok_emb.weight.requires_grad_(False)
      net.pos_emb.requires_grad_(False)
      net.bias.requires_grad_(False)
    self.ema = copy.deepcopy(self.gen).eval().requires_grad_(False)
    self.gen_params = [p for p in self.gen.parameters() if p.requires_grad]
    self.aux_params = [p for p in self.aux.parameters() if p.requires_grad]
    warm = lambda t: min(1.0, (t + 1) / spec.warmup_steps) if spec.warmup_steps > 0 else 1.0
    self.opt_g = torch.optim.Adam(self.gen_params, lr=spec.lr, betas=(spec.b1, spec.b2), eps=spec.eps,
                                  weight_decay=0.0)
    self.opt_a = torch.optim.Adam(self.aux_params, lr=spec.lr, betas=(spec.b1, spec.b2), eps=spec.eps,
                                  weight_decay=0.0)
    self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, warm)
    self.sched_a = torch.optim.lr_scheduler.LambdaLR(self.opt_a, warm)
    self.t = 0

  # -- pieces
  def autocast(self):
    return self.torch.autocast(device_type=self.device.type, dtype=self.torch.bfloat16,
                               enabled=self.spec.dtype == "bfloat16")

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def n_params(self) -> Dict[str, int]:
    return {"total": sum(p.numel() for p in self.teacher.parameters()),
            "trainable": sum(p.numel() for p in self.gen_params)}

  def labels(self, batch):
    return self.torch.randint(0, self.spec.classes, (batch,), device=self.device)

  def exact_mask(self, counts, batch):
    """[B, L] bool with exactly ``counts[b]`` True per row at random positions."""
    ranks = self.torch.rand(batch, self.spec.seq_len, device=self.device).argsort(-1)
    return ranks < counts.view(-1, 1)

  def x_init(self, batch):
    s, torch = self.spec, self.torch
    codes = torch.randint(0, s.codebook, (batch, s.seq_len), device=self.device)
    n = torch.full((batch,), max(1, round(s.seq_len * s.r_init)), device=self.device)
    return torch.where(self.exact_mask(n, batch), s.codebook, codes)

  def forward_mask(self, x):
    torch, s = self.torch, self.spec
    b = x.shape[0]
    ratio = torch.arccos(torch.rand(b, device=self.device)) / (math.pi / 2)
    n = (s.seq_len * ratio).round().clamp(min=1).long()
    mask = self.exact_mask(n, b)
    return torch.where(mask, s.codebook, x), mask

  def draw(self, logits, temperature=1.0):
    torch, k = self.torch, self.spec.codebook
    probs = torch.softmax(logits[..., :k].float() / temperature, -1)
    return torch.multinomial(probs.reshape(-1, k), 1).view(probs.shape[:-1])

  def call(self, net, x, y, drop=None, sigma=0.0):
    side = self.spec.side
    return net(x.view(-1, side, side), y, drop_label=drop, noise_emb_perturb=sigma)

  def guided(self, net, x, y, w):
    """Both guidance branches in one batch of 2B (their ``cfg_pred_model``)."""
    torch = self.torch
    b = x.shape[0]
    drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=self.device),
                      torch.ones(b, dtype=torch.bool, device=self.device)])
    both = self.call(net, torch.cat([x, x]), torch.cat([y, y]), drop).float()
    cond, uncond = both[:b], both[b:]
    return uncond + w * (cond - uncond)

  # -- the step
  def generator_update(self):
    torch, s = self.torch, self.spec
    b = s.batch
    y, x0 = self.labels(b), self.x_init(b)
    with self.autocast():
      z = self.call(self.gen, x0, y, sigma=s.sigma)
    with torch.no_grad():
      x_theta = self.draw(z)
      x_t, mask = self.forward_mask(x_theta)
      with self.autocast():
        t_logits = self.guided(self.teacher, x_t, y, s.guidance)
        a_logits = self.call(self.aux, x_t, y).float()
      p, q = torch.softmax(t_logits, -1), torch.softmax(a_logits, -1)
      g = torch.nan_to_num(torch.where(mask.unsqueeze(-1), q - p, 0.0))
    zf = z.float()
    loss = 0.5 * torch.nn.functional.mse_loss(zf, (zf - g).detach(), reduction="sum") / b
    loss.backward()
    if s.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.gen_params, s.grad_clip)
    for p_ in self.gen_params:
      if p_.grad is not None:
        torch.nan_to_num(p_.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p_.grad)
    self.opt_g.step()
    self.opt_g.zero_grad(set_to_none=True)
    self.sched_g.step()
    return loss.detach()

  def auxiliary_update(self):
    torch, s = self.torch, self.spec
    b = s.batch
    with torch.no_grad():
      y, x0 = self.labels(b), self.x_init(b)
      with self.autocast():
        z = self.call(self.gen, x0, y, sigma=s.sigma)
      x_theta = self.draw(z)
      x_t, mask = self.forward_mask(x_theta)
    with self.autocast():
      logits = self.call(self.aux, x_t, y)
    target = torch.where(mask, x_theta, -1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, s.codebook + 1).float(), target.view(-1),
                                             ignore_index=-1, label_smoothing=s.label_smoothing)
    loss.backward()
    for p_ in self.aux_params:
      if p_.grad is not None:
        torch.nan_to_num(p_.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p_.grad)
    self.opt_a.step()
    self.opt_a.zero_grad(set_to_none=True)
    self.sched_a.step()
    return loss.detach()

  def ema_update(self):
    rate = min(self.spec.ema_decay, (1 + self.t) / (10 + self.t))
    with self.torch.no_grad():
      self.torch._foreach_lerp_(list(self.ema.parameters()), list(self.gen.parameters()), 1.0 - rate)  # pylint: disable=protected-access

  def step(self) -> Dict[str, float]:
    gen_loss = self.generator_update()
    aux_loss = self.auxiliary_update()
    self.ema_update()
    self.t += 1
    out = {"gen_loss": float(gen_loss.item()), "aux_loss": float(aux_loss.item())}  # synchronises
    self.sync()
    return out

  # -- sampling (eval mode, no gradients)
  def one_step(self, y):
    s = self.spec
    with self.torch.no_grad(), self.autocast():
      z = self.call(self.gen, self.x_init(y.shape[0]), y, sigma=s.sigma)
    return self.draw(z, s.sample_temperature)

  def step_counts(self, steps):
    """Tokens revealed per step, arccos schedule, at least one per step (MaskGIT's)."""
    ls = [1.0 - i / (steps - 1) if steps > 1 else 0.0 for i in range(steps)]
    val = [math.acos(r) / (math.pi / 2) for r in ls]
    total = sum(val) or 1.0
    counts = [max(1, int(round(v / total * self.spec.seq_len))) for v in val]
    counts[-1] += self.spec.seq_len - sum(counts)
    if counts[-1] < 1:  # too many steps for the tokens: take the excess off the earlier steps
      counts = [1] * steps
      counts[-1] += self.spec.seq_len - steps
    return counts

  def confidence_sampler(self, net, y, steps):
    torch, s = self.torch, self.spec
    b = y.shape[0]
    code = torch.full((b, s.seq_len), s.codebook, dtype=torch.long, device=self.device)
    masked = torch.ones(b, s.seq_len, dtype=torch.bool, device=self.device)
    with torch.no_grad():
      for t, k in enumerate(self.step_counts(steps)):
        with self.autocast():
          logits = self.guided(net, code, y, s.sample_guidance * (t + 1) / steps)
        probs = torch.softmax(logits[..., :s.codebook] / s.sample_temperature, -1)
        pred = torch.multinomial(probs.reshape(-1, s.codebook), 1).view(b, s.seq_len)
        conf = torch.log(torch.gather(probs, -1, pred.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30))
        gumbel = -torch.log(-torch.log(torch.rand_like(conf).clamp(1e-20, 1.0 - 1e-7)))
        conf = conf + s.r_temp * (1.0 - (t + 1) / steps) * gumbel
        conf = torch.where(masked, conf, -math.inf)
        chosen = torch.zeros_like(masked).scatter_(1, conf.topk(k, dim=-1).indices, True) & masked
        code = torch.where(chosen, pred, code)
        masked = masked & ~chosen
    return code


def _torch_device(opts: RunOptions) -> str:
  import torch  # pylint: disable=import-outside-toplevel
  if opts.torch_device == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  if opts.torch_device == "cuda" and not torch.cuda.is_available():
    raise ValueError("--torch_device=cuda but PyTorch sees no CUDA device")
  return opts.torch_device


def run_authors_side(spec: Spec, opts: RunOptions) -> Dict[str, Any]:
  """Times the authors' model in the Di[M]O step and in both samplers; a dict of plain values."""
  model_cls = load_authors_model_class(opts.authors_repo)
  import torch  # pylint: disable=import-outside-toplevel
  threads = opts.torch_threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  device = _torch_device(opts)
  if device == "cuda":  # as their script
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
  load_start = load_average()
  rss_base = rss_bytes("VmRSS")
  t0 = time.perf_counter()
  run = AuthorsStep(model_cls, spec, device, opts.seed)
  build_s = time.perf_counter() - t0
  metrics = None
  for _ in range(opts.warmup):
    metrics = run.step()
  hwm_reset = reset_peak_rss()
  rss_start = rss_bytes("VmRSS")
  times = []
  cpu0 = time.process_time()
  for _ in range(opts.steps):
    t0 = time.perf_counter()
    metrics = run.step()
    times.append(time.perf_counter() - t0)
  cpu_per_step = (time.process_time() - cpu0) / opts.steps
  memory = {"rss_before_models_bytes": rss_base, "rss_at_timed_steps_start_bytes": rss_start,
            "peak_rss_timed_steps_bytes": rss_bytes("VmHWM") if hwm_reset else None,
            "peak_rss_process_bytes": rss_bytes("VmHWM") if not hwm_reset else None}
  if device == "cuda":
    memory["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    memory["cuda_max_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
  finite = all(math.isfinite(v) for v in (metrics or {}).values())

  y = torch.arange(spec.sample_batch, device=device) % spec.classes
  sampling = {}
  run.gen.eval()
  run.teacher.eval()
  for name, fn in (("generator_1_step", lambda: run.one_step(y)),
                   (f"teacher_{spec.sample_steps}_steps",
                    lambda: run.confidence_sampler(run.teacher, y, spec.sample_steps))):
    t0 = time.perf_counter()
    fn()
    run.sync()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(opts.sample_reps):
      t0 = time.perf_counter()
      out = fn()
      run.sync()
      ts.append(time.perf_counter() - t0)
    assert tuple(out.shape) == (spec.sample_batch, spec.seq_len)
    sampling[name] = {**_stats(ts), "first_call_s": first}
  return {
      "side": "authors", "framework": f"torch {torch.__version__}", "device": device,
      "device_name": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu: {cpu_model()}",
      "torch_threads": threads, "authors_repo": os.path.abspath(opts.authors_repo),
      "authors_commit": authors_commit(opts.authors_repo), "params": run.n_params(),
      "build_s": build_s, "step": {**_stats(times), "warmup": opts.warmup, "steps": opts.steps,
                                   "cpu_s_per_step": cpu_per_step,
                                   "metrics_finite": finite, "last_metrics": metrics},
      "memory": memory, "sampling": sampling,
      "host_load_average": {"start": load_start, "end": load_average()},
  }


# ---------------------------------------------------------------------------- dimo_jax's side


def load_benchmark():
  """``experiments/benchmark.py`` as a module (the project's pieces are reached through it)."""
  name = "dimo_benchmark_script"
  if name not in sys.modules:
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return sys.modules[name]


# Where the project's functions live (old and new layouts of the package); ``project_api`` first
# looks at the modules ``benchmark.py`` imports, then at these.
_PROJECT_MODULES = ("dimo_jax.method.dimo", "dimo_jax.networks.maskgit", "dimo_jax.core.memory",
                    "dimo_jax.core.samplers", "dimo_jax.networks.vqgan", "dimo_jax.distill",
                    "dimo_jax.models", "dimo_jax.samplers", "dimo_jax.vqgan")


def project_api(bm):
  """The few project functions this script and ``throughput.py`` use, found by name among the
  ``dimo_jax`` modules that ``benchmark.py`` imports (so a move of a module inside the package needs
  no change here as long as ``benchmark.py`` follows it)."""
  import types  # pylint: disable=import-outside-toplevel
  modules = [m for m in vars(bm).values()
             if isinstance(m, types.ModuleType) and m.__name__.startswith("dimo_jax")]

  def find(attr):
    for m in modules:
      if hasattr(m, attr):
        return getattr(m, attr)
    for name in _PROJECT_MODULES:
      try:
        m = importlib.import_module(name)
      except ImportError:
        continue
      if hasattr(m, attr):
        return getattr(m, attr)
    raise ImportError(f"no dimo_jax module imported by experiments/benchmark.py defines {attr!r}; "
                      "update compare_authors.project_api")

  module_of = lambda attr: importlib.import_module(find(attr).__module__)
  network = module_of("build_model")  # the transformer families: build_model, init_params, count_params
  memory = module_of("check_fits")  # check_fits, device_bytes_limit, estimated_bytes
  return types.SimpleNamespace(
      build_distiller=find("build_distiller"), build_model=network.build_model,
      init_params=network.init_params, count_params=network.count_params,
      check_fits=memory.check_fits, device_bytes_limit=memory.device_bytes_limit,
      estimated_bytes=memory.estimated_bytes, confidence_sampler=find("confidence_sampler"),
      one_step_generate=find("one_step_generate"), vqgan=module_of("TamingVQGAN"))


def project_config(spec: Spec):
  """``configs/maskgit.py`` (the authors' settings) with the size and settings of ``spec``."""
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  maskgit = importlib.import_module("configs.maskgit")
  c = maskgit.get_config("1")
  c.model.depth, c.model.width, c.model.heads, c.model.mlp_dim = spec.depth, spec.width, spec.heads, spec.mlp_dim
  c.model.dropout = spec.dropout
  c.model.dtype = spec.dtype
  c.model.param_dtype = "float32"
  c.model.remat = spec.remat
  c.model.attention_impl = spec.attention
  c.data.seq_len = spec.seq_len
  c.data.image_shape = (spec.side, spec.side)
  c.data.vocab_size = spec.codebook
  c.data.num_classes = spec.classes
  d = c.distill
  d.batch_size = spec.batch
  d.r_init = f"fix_{spec.r_init}"
  d.sigma = spec.sigma
  d.divergence, d.beta = "fkl", 0.0
  d.gen_lr = d.aux_lr = spec.lr
  d.warmup_steps = spec.warmup_steps
  d.b1, d.b2, d.eps = spec.b1, spec.b2, spec.eps
  d.gen_grad_clip, d.aux_grad_clip = spec.grad_clip, 0.0
  d.aux_updates = 1
  d.aux_label_smoothing = spec.label_smoothing
  d.ema_decay = spec.ema_decay
  d.freeze = ("tok_emb", "pos_emb", "out_bias")
  d.teacher_dropout = d.gen_dropout = d.aux_dropout = spec.dropout > 0
  c.teacher.guidance = spec.guidance
  c.teacher.guidance_schedule = "constant"
  c.sample.steps = spec.sample_steps
  c.sample.guidance = spec.sample_guidance
  c.sample.guidance_schedule = "linear"
  c.sample.temperature = spec.sample_temperature
  c.sample.r_temp = spec.r_temp
  c.sample.r_init = spec.r_init
  c.sample.sigma = spec.sigma
  return c


def run_jax_side(spec: Spec, opts: RunOptions) -> Dict[str, Any]:
  """Times dimo_jax's ``Distiller.step`` and both samplers at ``spec``; a dict of plain values."""
  bm = load_benchmark()
  jax, api = bm.jax, project_api(bm)
  load_start = load_average()
  bopts = bm.BenchmarkOptions(steps=opts.steps, warmup=opts.warmup, batch=spec.batch,
                              sample_batch=spec.sample_batch, sample_steps=spec.sample_steps,
                              sample_reps=opts.sample_reps, skip_vqgan=True, seed=opts.seed,
                              fast_compile=opts.fast_compile)
  cfg = bm.prepare_config(project_config(spec), bopts)
  model = api.build_model(cfg.model, **bm.data_sizes(cfg))
  rss_base = rss_bytes("VmRSS")
  t0 = time.perf_counter()
  params = jax.block_until_ready(jax.jit(lambda k: api.init_params(model, k))(jax.random.key(opts.seed)))
  dist = api.build_distiller(cfg, model)
  state = dist.init_state(params, seed=opts.seed)
  fn, state = dist.jit_step(state)  # one device, the state donated
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = fn.lower(state)
  compiled = (lowered.compile(compiler_options=bm.FAST_COMPILE_OPTIONS) if opts.fast_compile
              else lowered.compile())
  compile_s = time.perf_counter() - t0
  xla = bm.compiled_memory(compiled)
  api.check_fits(compiled, api.device_bytes_limit())
  metrics = None
  for _ in range(opts.warmup):
    state, metrics = jax.block_until_ready(compiled(state))
  hwm_reset = reset_peak_rss()
  rss_start = rss_bytes("VmRSS")
  times = []
  cpu0 = time.process_time()
  for _ in range(opts.steps):
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state))
    times.append(time.perf_counter() - t0)
  cpu_per_step = (time.process_time() - cpu0) / opts.steps
  memory = {"rss_before_models_bytes": rss_base, "rss_at_timed_steps_start_bytes": rss_start,
            "peak_rss_timed_steps_bytes": rss_bytes("VmHWM") if hwm_reset else None,
            "peak_rss_process_bytes": rss_bytes("VmHWM") if not hwm_reset else None,
            "device_peak_bytes_in_use": bm.device_peak_bytes(), "xla_compiled_step": xla}
  last = {k: float(v) for k, v in metrics.items()}
  finite = all(math.isfinite(v) for k, v in last.items() if not k.endswith("nan_count"))
  del state, metrics, compiled, fn
  sampling_raw = bm.bench_sampling(cfg, model, params, bopts)
  sampling = {}
  for name, raw in (("generator_1_step", sampling_raw["generator"]),
                    (f"teacher_{spec.sample_steps}_steps", sampling_raw["teacher"])):
    sampling[name] = {"median_s": raw["median_s"], "min_s": raw["min_s"], "times_s": raw["times_s"],
                      "first_call_s": raw["first_call_s"], "compile_s": raw["lower_s"] + raw["compile_s"]}
  info = bm.device_info()
  return {
      "side": "jax", "framework": f"jax {jax.__version__}", "device": info["platform"],
      "device_name": (f"cpu: {cpu_model()}" if info["platform"] == "cpu" else info["device_kind"]),
      "params": {"total": api.count_params(params)}, "build_s": build_s,
      "step": {**_stats(times), "warmup": opts.warmup, "steps": opts.steps, "compile_s": compile_s,
               "cpu_s_per_step": cpu_per_step,
               "metrics_finite": finite, "last_metrics": last,
               "remat": cfg.model.remat, "donate": True},
      "memory": memory, "sampling": sampling,
      "host_load_average": {"start": load_start, "end": load_average()},
  }


# ---------------------------------------------------------------------------- orchestration


def _run_side_subprocess(side: str, spec: Spec, opts: RunOptions) -> Dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "side.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--_child=" + side,
           "--_spec=" + json.dumps(dataclasses.asdict(spec)),
           "--_opts=" + json.dumps(dataclasses.asdict(opts)), "--_json=" + out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      raise RuntimeError(f"the {side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out) as f:
      return json.load(f)


def run_side(side: str, spec: Spec, opts: RunOptions) -> Dict[str, Any]:
  if side == "authors":
    return run_authors_side(spec, opts)
  return run_jax_side(spec, opts)


def _median_over_rounds(rounds: List[Dict[str, Any]], *path) -> Optional[float]:
  values = []
  for r in rounds:
    v = r
    for p in path:
      v = v.get(p) if isinstance(v, dict) else None
    if v is not None:
      values.append(v)
  return statistics.median(values) if values else None


def summarise(side_rounds: Dict[str, List[Dict[str, Any]]], spec: Spec) -> Dict[str, Any]:
  """Medians over rounds of each side's numbers, and the ratios authors / dimo_jax."""
  teacher = f"teacher_{spec.sample_steps}_steps"
  out = {}
  for side, rounds in side_rounds.items():
    if not rounds:
      continue
    mem = rounds[0]["memory"]
    on_gpu = rounds[0]["device"] in ("cuda", "gpu")
    if on_gpu:
      key = "cuda_max_memory_allocated_bytes" if side == "authors" else "device_peak_bytes_in_use"
      peak, source = _median_over_rounds(rounds, "memory", key), (
          "torch.cuda.max_memory_allocated()" if side == "authors"
          else "device.memory_stats()['peak_bytes_in_use']")
    else:
      peak = _median_over_rounds(rounds, "memory", "peak_rss_timed_steps_bytes")
      source = "peak RSS of its process during the timed steps (VmHWM reset after warm-up)"
      if peak is None:
        peak = _median_over_rounds(rounds, "memory", "peak_rss_process_bytes")
        source = "peak RSS of its process (lifetime)"
    out[side] = {
        "step_median_s": _median_over_rounds(rounds, "step", "median_s"),
        "step_medians_per_round_s": [r["step"]["median_s"] for r in rounds],
        "step_min_s": min(r["step"]["min_s"] for r in rounds),
        "cpu_s_per_step": _median_over_rounds(rounds, "step", "cpu_s_per_step"),
        "compile_s": _median_over_rounds(rounds, "step", "compile_s"),
        "peak_bytes": peak, "peak_source": source,
        "rss_before_models_bytes": mem.get("rss_before_models_bytes"),
        "rss_at_timed_steps_start_bytes": _median_over_rounds(rounds, "memory", "rss_at_timed_steps_start_bytes"),
        "xla_estimate_bytes": (mem.get("xla_compiled_step") or {}).get("estimated_bytes"),
        "one_step_s": _median_over_rounds(rounds, "sampling", "generator_1_step", "median_s"),
        "teacher_steps_s": _median_over_rounds(rounds, "sampling", teacher, "median_s"),
        "params": rounds[0]["params"], "device_name": rounds[0]["device_name"],
        "framework": rounds[0]["framework"], "metrics_finite": all(r["step"]["metrics_finite"] for r in rounds),
        "load_average": [r["host_load_average"] for r in rounds],
        "load_waits": [r["load_wait"] for r in rounds if r.get("load_wait")],
    }
  ratios = {}
  if "authors" in out and "jax" in out:
    a, j = out["authors"], out["jax"]
    for key in ("step_median_s", "step_min_s", "cpu_s_per_step", "peak_bytes", "one_step_s", "teacher_steps_s"):
      if a.get(key) and j.get(key):
        ratios[key] = a[key] / j[key]
  out["ratios_authors_over_jax"] = ratios
  return out


def markdown(record: Dict[str, Any]) -> str:
  s, spec = record["summary"], Spec(**record["spec"])
  a, j, ratio = s.get("authors", {}), s.get("jax", {}), s["ratios_authors_over_jax"]

  def num(v, scale=1.0, digits=4):
    return "n/a" if v is None else f"{v * scale:.{digits}g}"

  def rat(key):
    return f"{ratio[key]:.2f}x" if key in ratio else ""

  nb = spec.sample_batch
  rows = [
      (f"Di[M]O step, batch {spec.batch}, median (s)", num(a.get("step_median_s")),
       num(j.get("step_median_s")), rat("step_median_s")),
      ("step, fastest of all rounds (s)", num(a.get("step_min_s")), num(j.get("step_min_s")), rat("step_min_s")),
      ("CPU time per step, all threads (s)", num(a.get("cpu_s_per_step")), num(j.get("cpu_s_per_step")),
       rat("cpu_s_per_step")),
      ("compile of the step (s)", "-", num(j.get("compile_s"), digits=3), ""),
      ("peak memory (GB)", num(a.get("peak_bytes"), 1e-9), num(j.get("peak_bytes"), 1e-9), rat("peak_bytes")),
      ("RSS before building the models (GB)", num(a.get("rss_before_models_bytes"), 1e-9),
       num(j.get("rss_before_models_bytes"), 1e-9), ""),
      ("RSS at the start of the timed steps (GB)", num(a.get("rss_at_timed_steps_start_bytes"), 1e-9),
       num(j.get("rss_at_timed_steps_start_bytes"), 1e-9), ""),
      ("XLA estimate of the step: arguments + outputs - aliased + temporaries (GB)", "-",
       num(j.get("xla_estimate_bytes"), 1e-9), ""),
      (f"one-step generator, {nb} images, transformer only (ms)", num(a.get("one_step_s"), 1e3),
       num(j.get("one_step_s"), 1e3), rat("one_step_s")),
      (f"teacher {spec.sample_steps} steps, guidance {spec.sample_guidance:g} linear, {nb} images (s)",
       num(a.get("teacher_steps_s")), num(j.get("teacher_steps_s")), rat("teacher_steps_s")),
      ("parameters per network", f"{a['params']['total']:,}" if a else "n/a",
       f"{j['params']['total']:,}" if j else "n/a", ""),
  ]
  peak_note = "; ".join(f"{name}: {side['peak_source']}" for name, side in (("authors", a), ("dimo_jax", j)) if side)
  loads = "; ".join(f"{name}: " + ", ".join(f"{x['start']} -> {x['end']}" for x in side["load_average"])
                    for name, side in (("authors", a), ("dimo_jax", j)) if side)
  devices = sorted({side["device_name"] for side in (a, j) if side})
  head = [
      "# The authors' Di[M]O step next to dimo_jax's", "",
      f"- command: `{record['command']}`",
      f"- device: {', '.join(devices)} ({record['cpu_count']} CPU cores visible); date {record['date']}; "
      + ", ".join(side["framework"] + (f" with {record['options']['torch_threads'] or record['cpu_count']} threads"
                                       if side is a else "") for side in (a, j) if side),
      f"- authors' code: {record.get('authors_repo')} at {record.get('authors_commit')} (their "
      f"{AUTHORS_MODEL_CLASS}; the step's plumbing written from the reference notes)",
      f"- size: {spec.depth} x {spec.width}, {spec.heads} heads, MLP {spec.mlp_dim}, {spec.seq_len} + 1 tokens, "
      f"codebook {spec.codebook}, {spec.classes} classes; compute {spec.dtype} (parameters float32); "
      f"dimo_jax remat {spec.remat}, attention {spec.attention or 'xla (fused backward)'}",
      f"- step: one generator update with teacher guidance {spec.guidance:g} and one auxiliary update, EMA; "
      f"dropout {spec.dropout:g} in all three networks; frozen token embedding, positions, output bias; "
      f"{record['options']['warmup']} warm-up + {record['options']['steps']} timed steps per round, "
      f"{record['options']['rounds']} round(s), each side in "
      + ("this process" if record["options"]["inprocess"] else "its own process")
      + "; medians over rounds",
      f"- peak memory: {peak_note}",
      f"- host load average (1, 5, 15 min) at the start -> end of each side, per round: {loads}",
  ] + ([f"- each side started once the 1-minute load average was below {record['options']['max_load']:g} "
        f"(waiting at most {record['options']['max_wait_s']:g} s; "
        + ", ".join(f"{name} waited " + "/".join(f"{w['waited_s']:g}" for w in side.get("load_waits", []))
                    + " s" for name, side in (("authors", a), ("dimo_jax", j)) if side) + ")"]
       if record["options"].get("max_load") else []) + [
      "", "| quantity | authors (PyTorch) | dimo_jax (JAX) | authors / dimo_jax |", "|---|---|---|---|",
  ]
  body = [f"| {q} | {x} | {y} | {r} |" for q, x, y, r in rows]
  per_round = [f"- step medians per round (s): authors {a.get('step_medians_per_round_s')}, "
               f"dimo_jax {j.get('step_medians_per_round_s')}"] if a and j else []
  return "\n".join(head + body + [""] + per_round) + "\n"


def run(spec: Spec, opts: RunOptions) -> Dict[str, Any]:
  """Both sides (``opts.sides``), ``opts.rounds`` times alternately; the record (plain values)."""
  spec.validate()
  opts.validate()
  sides = opts.side_list()
  if "authors" in sides:
    check_authors_repo(opts.authors_repo)  # fail before anything long runs
  side_rounds: Dict[str, List[Dict[str, Any]]] = {s: [] for s in sides}
  for _ in range(opts.rounds):
    for side in sides:
      waited = wait_for_load(opts.max_load, opts.max_wait_s)
      result = run_side(side, spec, opts) if opts.inprocess else _run_side_subprocess(side, spec, opts)
      result["load_wait"] = waited
      side_rounds[side].append(result)
  record = {
      "command": opts.command or "compare_authors.run(spec, opts)",
      "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
      "python_version": platform.python_version(),
      "authors_repo": os.path.abspath(opts.authors_repo) if "authors" in sides else None,
      "authors_commit": authors_commit(opts.authors_repo) if "authors" in sides else None,
      "spec": dataclasses.asdict(spec), "options": dataclasses.asdict(opts),
      "rounds": side_rounds, "summary": summarise(side_rounds, spec),
  }
  if opts.out:
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "compare_authors.json"), "w") as f:
      json.dump(record, f, indent=2)
    with open(os.path.join(opts.out, "compare_authors.md"), "w") as f:
      f.write(markdown(record))
  return record


# ---------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--authors_repo", default="", help=f"a checkout of {AUTHORS_URL} (outside this repository)")
  p.add_argument("--size", default="reduced", choices=sorted(SIZES),
                 help="full: the paper's (for a GPU); reduced: 4 x 256 float32 (a CPU); tiny: tests")
  for field in dataclasses.fields(Spec):
    p.add_argument("--" + field.name, type=type(field.default) if field.default is not None else str,
                   default=None, help=f"override the size's {field.name}")
  d = RunOptions()
  p.add_argument("--steps", type=int, default=d.steps, help="timed steps per round")
  p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before them")
  p.add_argument("--sample_reps", type=int, default=d.sample_reps, help="timed calls per sampler")
  p.add_argument("--rounds", type=int, default=d.rounds, help="alternations of the two sides")
  p.add_argument("--torch_threads", type=int, default=d.torch_threads, help="0: all cores")
  p.add_argument("--torch_device", default=d.torch_device, choices=["auto", "cpu", "cuda"])
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--sides", default=d.sides, help="authors,jax (default), or one of them")
  p.add_argument("--inprocess", action="store_true", help="run both sides in this process")
  p.add_argument("--fast_compile", action="store_true",
                 help="smoke runs: compile dimo_jax's programs at XLA optimisation level 0 (slower code)")
  p.add_argument("--max_load", type=float, default=d.max_load,
                 help="a shared host: before each side wait until the 1-minute load average is below this")
  p.add_argument("--max_wait_s", type=float, default=d.max_wait_s, help="longest wait for --max_load")
  p.add_argument("--out", default="", help="directory for compare_authors.json / .md")
  p.add_argument("--_child", default="", help=argparse.SUPPRESS)
  p.add_argument("--_spec", default="", help=argparse.SUPPRESS)
  p.add_argument("--_opts", default="", help=argparse.SUPPRESS)
  p.add_argument("--_json", default="", help=argparse.SUPPRESS)
  return p


def spec_from_args(args) -> Spec:
  values = dict(SIZES[args.size])
  for field in dataclasses.fields(Spec):
    v = getattr(args, field.name)
    if v is not None:
      values[field.name] = v
  return Spec(**values)


def main(argv=None) -> Optional[Dict[str, Any]]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser().parse_args(argv)
  if args._child:  # pylint: disable=protected-access
    spec, opts = Spec(**json.loads(args._spec)), RunOptions(**json.loads(args._opts))  # pylint: disable=protected-access
    result = run_side(args._child, spec, opts)  # pylint: disable=protected-access
    with open(args._json, "w") as f:  # pylint: disable=protected-access
      json.dump(result, f)
    return None
  spec = spec_from_args(args)
  opts = RunOptions(authors_repo=args.authors_repo, steps=args.steps, warmup=args.warmup,
                    sample_reps=args.sample_reps, rounds=args.rounds, torch_threads=args.torch_threads,
                    torch_device=args.torch_device, seed=args.seed, sides=args.sides,
                    inprocess=args.inprocess, fast_compile=args.fast_compile, max_load=args.max_load, max_wait_s=args.max_wait_s, out=args.out,
                    command=" ".join(shlex.quote(a) for a in ["python", "experiments/compare_authors.py", *argv]))
  record = run(spec, opts)
  print(markdown(record))
  return record


if __name__ == "__main__":
  try:
    main()
  except AuthorsRepoError as err:
    print(f"compare_authors.py: {err}", file=sys.stderr)
    sys.exit(2)

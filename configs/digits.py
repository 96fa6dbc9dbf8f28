"""The embedded default: 8x8 handwritten digits (scikit-learn, no download) as 64 tokens.

Teacher:  python -m dimo_jax.main --config=configs/digits.py --workdir=/tmp/digits_teacher --config.mode=teacher
Distill:  python -m dimo_jax.main --config=configs/digits.py --workdir=/tmp/digits_dimo
"""
import ml_collections

from configs import base


def get_config():
  c = base.get_config("classes", "distill", seed=3407)

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | npy | tfds
  c.data.path = ""  # npy: tokens [N, L]
  c.data.labels = ""  # npy: labels [N] (optional)
  c.data.vocab_size = 0  # 0: infer (digits: levels)
  c.data.num_classes = -1  # -1: infer from labels (0 = unconditional)
  c.data.levels = 17  # grey levels for digits / tfds
  c.data.val_fraction = 0.1
  c.data.seed = 0
  c.data.tfds_name = "mnist"
  c.data.tfds_data_dir = ""
  c.data.image_shape = (8, 8)  # (H, W) when tokens are a grey image raster, else None
  c.data.max_examples = 0

  # ---------------------------------------------------------------- model (teacher, generator and
  # auxiliary share the architecture: both students start from the teacher's weights)
  c.model = ml_collections.ConfigDict()
  c.model.arch = "preln"  # preln (valeoai MaskGIT) | bert (Google MaskGIT)
  c.model.width = 64
  c.model.depth = 3
  c.model.heads = 4
  c.model.mlp_dim = 256
  c.model.dropout = 0.1
  c.model.class_token = "last"
  c.model.gelu_approximate = False
  c.model.ln_eps = 1e-5
  c.model.ln_eps_io = 1e-12
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"
  c.model.logits_dtype = "float32"
  c.model.scan = True
  c.model.remat = "none"  # none | full | dots | dots_no_batch
  c.model.attention_impl = ""  # '' (XLA) | cudnn

  # ---------------------------------------------------------------- teacher training (mode=teacher)
  c.train.steps = 3000
  c.train.batch_size = 64  # global
  c.train.lr = 1e-3
  c.train.warmup_steps = 200
  c.train.lr_schedule = "cosine"  # constant | cosine
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.99
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.999
  c.train.label_dropout = 0.1  # replace labels by the null class for guidance
  c.train.mask_schedule = "arccos"
  c.train.exact_mask = False  # True: exact-count masking; False: Bernoulli
  c.train.loss_on = "all"  # masked | all (the MaskGIT teacher copies visible tokens)
  c.train.label_smoothing = 0.0  # 0.1 spreads ~6% of every token's mass over all 17 levels: noisy samples
  c.train.log_every = 100
  c.train.eval_every = 500
  c.train.checkpoint_every = 1000
  c.train.sample_every = 2000
  c.train.keep_checkpoints = 2
  c.train.budget = ""  # sizes model / steps left at 0 ("5min" or FLOPs "2e13"); "": every size given
  c.train.plateau_window = 0  # early stop on the validation loss's noise (0: off; configs/tokens.py sets it)
  c.train.plateau_k = 2.0

  # ---------------------------------------------------------------- teacher used by distill / sample
  c.teacher = ml_collections.ConfigDict()
  c.teacher.checkpoint = "pretrained/digits_teacher"  # a teacher workdir or converted checkpoint
  c.teacher.use_ema = True
  c.teacher.guidance = 1.0  # classifier-free guidance weight w (1 = conditional, no guidance)
  c.teacher.guidance_schedule = "constant"  # constant | linear (adaptive: ramps 0 -> w over ratio)

  # ---------------------------------------------------------------- Di[M]O distillation (mode=distill)
  c.distill.steps = 400  # plateaus by ~200 steps on digits (docs/proofs.md, section 7)
  c.distill.batch_size = 64  # global
  c.distill.r_init = "fix_0.6"  # 'fix_R' | 'random_LO_HI' | a number
  # k-step generator (core/generator_steps.py): 1 is Di[M]O's one-step generator. On the digits a 2-step
  # generator scored FD-pixel 172.1 at 2 steps and 149.2 at 1 step against the one-step generator's 143.3
  # (teacher's best 143.2); on the copy / permutation joints 2 steps lowered the sample's TV by 9-13% but
  # made its one-step samples worse and stayed 3x off the teacher, on the Markov joints 2 steps were worse
  # than the one-step generator (docs/proofs.md, section 10).
  c.distill.generator_steps = 1
  c.distill.generator_schedule = "linear"  # re-masking levels of steps 2..k: a masking schedule or k-1 ratios
  c.distill.sigma = 0.1  # embedding noise on the generator's visual tokens
  c.distill.sigma_warmup_steps = 0  # >0: ramp sigma linearly from 0
  c.distill.gen_temp = 1.0
  c.distill.top_k = 0
  c.distill.top_p = 1.0
  c.distill.mask_schedule = "arccos"
  c.distill.divergence = "fkl"  # fkl | rkl | jeffreys | tv | js | hellinger (f-divergences by autodiff)
  c.distill.beta = 0.0  # generalised Jeffreys weight: (1-beta) FKL + beta RKL
  c.distill.normalization = "batch"  # batch (code: sum / B) | masked (paper: mean over masked tokens)
  c.distill.dmd_weight = False  # paper's DMD-style per-sample weight
  c.distill.grad_input = "init"  # init (x_init) | sample (x_theta with x_init's mask)
  c.distill.gen_lr = 1e-3
  c.distill.gen_lr_schedule = "constant"  # constant (authors) | cosine (to 0 at distill.steps)
  c.distill.aux_lr = 3e-3  # the auxiliary must track the generator (docs/proofs.md)
  c.distill.warmup_steps = 100
  c.distill.b1 = 0.9
  c.distill.b2 = 0.999
  c.distill.eps = 1e-8
  c.distill.gen_grad_clip = 1.0
  c.distill.aux_grad_clip = 0.0  # 0: none
  # Nothing frozen: on digits and on known joints freezing the token / position embeddings and the
  # output bias (the authors' MaskGIT setting, configs/maskgit.py) slowed distillation a lot
  # (docs/proofs.md, section 7).
  c.distill.freeze = ()
  c.distill.aux_updates = 4
  c.distill.aux_label_smoothing = 0.0  # smoothing biases the generator to modes (docs/proofs.md)
  c.distill.aux_soft_target = False
  c.distill.smooth_teacher = False  # smooth the teacher like the auxiliary's targets (unbiased fixed point)
  c.distill.teacher_dropout = False
  c.distill.gen_dropout = False
  c.distill.aux_dropout = False
  c.distill.ema_decay = 0.999
  c.distill.log_every = 100
  c.distill.checkpoint_every = 500
  c.distill.sample_every = 1000
  c.distill.keep_checkpoints = 2
  c.distill.evaluate_at_end = True  # run mode=evaluate on the finished generator and print the table

  # ---------------------------------------------------------------- sampling (mode=sample)
  c.sample = ml_collections.ConfigDict()
  c.sample.checkpoint = ""  # workdir to sample from ('' = --workdir)
  c.sample.model = "teacher"  # teacher | generator
  c.sample.sampler = "confidence"  # confidence | ancestral
  c.sample.num = 100
  c.sample.batch_size = 100
  c.sample.steps = 16
  c.sample.schedule = "arccos"
  c.sample.temperature = 1.0
  c.sample.r_temp = 4.5  # Gumbel noise scale on the confidence, annealed to 0
  c.sample.guidance = 1.0
  c.sample.guidance_schedule = "constant"  # constant | linear
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.labels = ""  # '' = balanced over classes, or '3,3,7'
  c.sample.r_init = 0.6  # generator inputs
  c.sample.sigma = 0.1
  c.sample.generator_steps = 0  # generator steps in mode=sample / evaluate: 0 = what it was trained for
  c.sample.output = ""  # '' = <workdir>/samples.npy
  c.sample.seed = 0

  # ---------------------------------------------------------------- evaluation (mode=evaluate)
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.teacher_checkpoint = ""  # '' = config.teacher.checkpoint
  c.evaluate.generator = ""  # '' = the workdir (its generator/ folder)
  c.evaluate.teacher_steps = (1, 2, 4, 8, 16)
  # Teacher rows for each sampler ('' or (): config.sample.sampler only); the table's note gives
  # Di[M]O's distance over the teacher's best row.
  c.evaluate.teacher_samplers = ("confidence", "ancestral")
  c.evaluate.generator_temperatures = (1.0,)
  c.evaluate.r_init = 0.6
  c.evaluate.sigma = 0.1
  c.evaluate.per_class = 100
  c.evaluate.num_samples = 0  # 0 = per_class x classes
  c.evaluate.batch_size = 250
  c.evaluate.seed = 0
  c.evaluate.use_ema = True
  c.evaluate.reference_split = "val"  # val | train | all
  c.evaluate.real_rows = True
  c.evaluate.inception_path = ""  # FID Inception weights (pt_inception-2015-12-05-6726825d.pth)
  c.evaluate.reference_stats = ""  # .npz with mu / sigma
  c.evaluate.fid_protocol = "project"  # "paper": 8-bit images, clean-fid legacy-TF preprocessing (docs/fid_protocol.md)
  c.evaluate.reference_images = ""
  c.evaluate.reference_image_size = 256
  c.evaluate.classifier_dir = ""  # '' = <workdir>/eval/classifier
  c.evaluate.classifier = ml_collections.ConfigDict()
  c.evaluate.prdc_k = 3
  c.evaluate.is_splits = 10
  c.evaluate.entropy_samples = 256
  c.evaluate.entropy_threshold = 1e-3  # the paper's
  c.evaluate.timing_repeats = 3
  c.evaluate.grid_steps = (1, 4, 16)
  c.evaluate.grid_columns = 10
  c.evaluate.output_dir = ""  # '' = <workdir>/eval

  return c

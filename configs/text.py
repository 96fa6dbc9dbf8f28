"""Text masked diffusion on the embedded corpus (the Python language reference, bytes), CPU-sized.

The teacher is an MD4 / MDLM-style bidirectional transformer (dimo_jax/networks/text_mdm.py),
trained with the masked-diffusion objective of method/mdm.py; Di[M]O distils it into a one-step
generator; a causal reference LM trained on the training split judges the samples
(generative perplexity, unigram entropy, distinct n-grams: dimo_jax/evaluation/text_metrics.py).

The whole path through the command line (teacher in <workdir>/teacher, Di[M]O, then the table of
mode=evaluate in <workdir>/eval):
  python -m dimo_jax.main --config=configs/text.py --workdir=/tmp/dimo_text
The same components as one script, with the teacher and reference LM cached for sweeps:
  python experiments/text_pipeline.py --workdir=/tmp/text_pipeline
Your own text: --config.data.name=text --config.data.path=<file.txt or folder>[,...]
  (--config.data.split_blank_lines=True: documents separated by blank lines);
BPE instead of bytes: --config.data.tokenizer=bpe --config.data.vocab_size=1024
  (or --config.data.tokenizer_path=<tokenizer.json> with a '<|sep|>' special token).

Measured on 2026-12-06 on a 2-core CPU shared with other jobs (1-minute load average 16 to 36):
teacher (0.27M parameters, 1,000 steps) 12.3 min, Di[M]O (200 steps) 14 to 20 min, reference LM
(800 steps) 10 min, the table 5 to 13 min. Settings from seed 0, reported on seed 1
(experiments/text_pipeline.py --seed=1): real held-out text gen. PPL 4.12 at entropy 2.78; teacher
one step 235.2; teacher best 25.1 (confidence, 32 steps, entropy 2.26), ancestral best 77.7 (32 steps,
entropy 2.79); Di[M]O one step 149.5 at entropy 2.73 (-2.0%): 5.95x the teacher's best, 1.92x its
ancestral best. The goal (1.5x the teacher's best, entropy within 2%) is not met at this size.
The command line above, once at full size (2026-12-06, same CPU, load 2 to 16): 24.4 min wall, 449 s
CPU (about 3.7 min on an idle 2-core CPU); Di[M]O one step 172.5 against the teacher's best 23.4 (7.38x)
at entropy +0.2% (README, 'Text (language) Di[M]O').
"""
import importlib.util
import os

import ml_collections


def _digits():
  try:
    from configs import digits  # pylint: disable=import-outside-toplevel
    return digits
  except ImportError:  # loaded by path from outside the repository root
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py")
    spec = importlib.util.spec_from_file_location("dimo_configs_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
  c = _digits().get_config()
  c.family = "text"
  c.mode = "distill"  # trains <workdir>/teacher first when it is not finished
  c.seed = 3407

  # ---------------------------------------------------------------- data (data/text_corpus.py)
  c.data = ml_collections.ConfigDict()
  c.data.name = "embedded"  # embedded | text | npy | tfds
  c.data.path = ""  # text: .txt files / folders (comma-separated); npy: token ids
  c.data.split_blank_lines = False
  c.data.tokenizer = "bytes"  # bytes | bpe
  c.data.tokenizer_path = ""  # bpe: a tokenizer.json ('' = train one on the training documents)
  c.data.vocab_size = 0  # bpe: the trained vocabulary; npy: 0 = max id + 1
  c.data.sep_id = -1  # npy: the document separator's id (-1: none)
  c.data.seq_len = 64
  c.data.val_fraction = 0.1
  c.data.seed = 0  # the held-out split
  c.data.max_examples = 0
  c.data.tfds_name = "lm1b"
  c.data.tfds_data_dir = ""
  c.data.image_shape = None
  c.data.num_classes = 0  # unconditional: every network gets the label 0

  # ---------------------------------------------------------------- the teacher (networks/text_mdm.py)
  c.model = ml_collections.ConfigDict()
  c.model.arch = "text_mdm"
  c.model.width = 96
  c.model.depth = 2
  c.model.heads = 4
  c.model.mlp_dim = 384
  c.model.dropout = 0.0
  c.model.ln_eps = 1e-5
  c.model.gelu_approximate = True
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"
  c.model.logits_dtype = "float32"
  c.model.scan = True
  c.model.remat = "none"  # none | full | dots | dots_no_batch
  c.model.attention_impl = ""

  # ---------------------------------------------------------------- teacher training (method/mdm.py)
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.lr = 2e-3
  c.train.warmup_steps = 100
  c.train.lr_schedule = "cosine"
  c.train.weight_decay = 0.01
  c.train.b2 = 0.99
  c.train.ema_decay = 0.995
  c.train.label_dropout = 0.0
  c.train.mask_schedule = "linear"  # MD4 / MDLM: the masked fraction uniform in (0, 1)
  c.train.exact_mask = False
  c.train.loss_on = "masked"
  c.train.label_smoothing = 0.0

  # ---------------------------------------------------------------- Di[M]O (method/dimo.py)
  c.teacher.checkpoint = ""
  c.teacher.guidance = 1.0  # unconditional: no guidance
  c.distill.steps = 200
  c.distill.batch_size = 32
  c.distill.r_init = "fix_0.6"
  c.distill.sigma = 0.1
  c.distill.mask_schedule = "linear"
  c.distill.divergence = "fkl"
  c.distill.beta = 0.0
  c.distill.gen_lr = 1e-3
  c.distill.gen_lr_schedule = "cosine"
  c.distill.aux_lr = 3e-3
  c.distill.aux_updates = 2
  c.distill.warmup_steps = 20
  c.distill.freeze = ()
  c.distill.aux_label_smoothing = 0.0
  c.distill.ema_decay = 0.99
  c.distill.sample_every = 0
  # One generator step: generators trained for 2 and 4 steps on this corpus were worse at their own
  # step count (gen. PPL 183.7 and 190.1) than the one-step generator (172.5; the teacher's best 23.4);
  # sampled at one step they were lower (136.5, 91.1) with entropy 3.0% and 6.6% under the real
  # text's, outside the 2% the goal allows (docs/proofs.md, section 10, "Text").
  c.distill.generator_steps = 1

  # ---------------------------------------------------------------- evaluation (evaluation/text_metrics.py)
  c.evaluate.num_samples = 128
  c.evaluate.batch_size = 128
  c.evaluate.teacher_steps = (1, 2, 4, 8, 16, 32, 64)  # and the sequence length
  c.evaluate.teacher_samplers = ("ancestral", "confidence")
  c.evaluate.sampler_schedule = "cosine"
  c.evaluate.r_temp = 4.5
  c.evaluate.categorical = "gumbel_max"  # gumbel_max | inverse_cdf (float64) | float32_gumbel
  c.evaluate.r_init = 0.6
  c.evaluate.sigma = 0.1
  c.evaluate.seed = 0
  c.evaluate.reference_lm = ml_collections.ConfigDict()
  c.evaluate.reference_lm.width = 96
  c.evaluate.reference_lm.depth = 2
  c.evaluate.reference_lm.heads = 4
  c.evaluate.reference_lm.mlp_dim = 384
  c.evaluate.reference_lm.steps = 800
  c.evaluate.reference_lm.batch_size = 32
  c.evaluate.reference_lm.lr = 2e-3
  c.evaluate.reference_lm.seed = 1
  c.sample.num = 16
  c.sample.steps = 64
  return c

"""Text masked diffusion at the field's scale: OpenWebText-size corpora on GPUs / TPUs.

Bring the corpus tokenised (GPT-2 BPE, 50,257 ids, the document separator '<|endoftext|>' =
50256) as one 1-D integer .npy (uint16 suffices), read memory-mapped; sequences of 1,024 tokens;
a teacher of 162M parameters (width 768, 12 layers, 12 heads: MDLM's 169M DiT without its time conditioning), bfloat16
compute with float32 parameters, rematerialised layers, fsdp over the mesh.

  python experiments/text_pipeline.py --config=configs/text_owt.py --workdir=gs://.../owt \
    --config.data.path=/data/owt_gpt2.npy --config.mesh.fsdp=8
"""
import importlib.util
import os


def _text():
  try:
    from configs import text  # pylint: disable=import-outside-toplevel
    return text
  except ImportError:  # loaded by path from outside the repository root
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text.py")
    spec = importlib.util.spec_from_file_location("dimo_configs_text", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config():
  c = _text().get_config()
  c.data.name = "npy"
  c.data.path = ""  # required: the tokenised corpus
  c.data.vocab_size = 50257
  c.data.sep_id = 50256
  c.data.seq_len = 1024
  c.data.val_fraction = 0.0005  # about 4.5M held-out tokens of OpenWebText's 9B

  c.model.width = 768
  c.model.depth = 12
  c.model.heads = 12
  c.model.mlp_dim = 3072
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots_no_batch"
  c.model.attention_impl = ""  # 'cudnn' on NVIDIA GPUs

  c.train.steps = 1_000_000
  c.train.batch_size = 512
  c.train.lr = 3e-4
  c.train.warmup_steps = 2500
  c.train.ema_decay = 0.9999
  c.train.log_every = 1000
  c.train.eval_every = 10000
  c.train.checkpoint_every = 10000

  c.distill.steps = 20000
  # XLA's memory analysis of the Di[M]O step on fsdp 8 (docs/performance.md, 'Text Di[M]O at OpenWebText
  # scale'): 12.9 GB of temporaries per example on a device (the vocabulary-wide float32 tensors). Global
  # batch 64 needs 103.9 GB a device, 40 (5 a device) 65.3 GB: under 80 GB with 15 GB to spare; 48 would
  # leave about 2. logits_dtype=bfloat16 saves nothing (the step's softmaxes are float32), remat=full 3.6 GB.
  # On more devices keep 5 examples a device (80 on 16).
  c.distill.batch_size = 40
  c.distill.gen_lr = 1e-5
  c.distill.aux_lr = 3e-5
  c.distill.aux_updates = 1
  c.distill.warmup_steps = 500
  c.distill.ema_decay = 0.999
  c.distill.generator_steps = 1  # as configs/text.py: k > 1 was worse on the embedded corpus; not measured at this scale
  c.distill.log_every = 100
  c.distill.checkpoint_every = 1000

  c.evaluate.num_samples = 1024
  c.evaluate.batch_size = 32
  c.evaluate.teacher_steps = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
  c.evaluate.teacher_samplers = ("ancestral",)
  # The judge: a GPT-2-small-size causal LM trained on the training split (GPT-2 Large where you have it).
  c.evaluate.reference_lm.width = 768
  c.evaluate.reference_lm.depth = 12
  c.evaluate.reference_lm.heads = 12
  c.evaluate.reference_lm.mlp_dim = 3072
  c.evaluate.reference_lm.dtype = "bfloat16"
  c.evaluate.reference_lm.remat = "dots_no_batch"
  c.evaluate.reference_lm.steps = 100_000
  c.evaluate.reference_lm.batch_size = 256
  c.evaluate.reference_lm.lr = 6e-4

  c.mesh.data = -1
  c.mesh.fsdp = 8
  return c

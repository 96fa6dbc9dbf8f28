"""The training objectives: the masked-diffusion teacher's step (``mdm``) and Di[M]O's (``dimo``)."""

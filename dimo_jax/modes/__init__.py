"""One module per ``config.mode`` (``teacher``, ``distill``, ``sample``, ``evaluate``), each with
``run(config, workdir)``, and the loop plumbing they share (``loop``).
"""

"""WorldStereo networks: ``config`` (checkpoint config, no torch model code), ``transformer`` (backbone + branches),
``branches`` (camera and memory branches), ``loading`` (official checkpoint packages over their base model),
``weightfiles`` (weight files read by their headers, where the base model lives), ``inventory`` (what a checkpoint
holds and needs: ``python -m engine inspect``), ``components`` (text / image encoders, VAE), ``tiny`` (random tiny
packages), ``parallel`` (sequence parallelism).

Nothing is imported here: reading a checkpoint's config (``engine.models.config``) must not pull in diffusers.
"""

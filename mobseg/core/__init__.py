"""mobseg.core: the torch-only core of mobseg (SPEC sections 3-5).

Modules (imported explicitly; this package imports nothing so that the CLI
can read :mod:`mobseg.core.config` without loading torch):

* :mod:`mobseg.core.config` -- HeadConfig / LossConfig, method names, run tags.
* :mod:`mobseg.core.partitions` -- P x P (x P) blocks of a patch, block ops.
* :mod:`mobseg.core.distributions` -- the five reparameterised logit distributions.
* :mod:`mobseg.core.heads` -- decoder features -> distribution parameters.
* :mod:`mobseg.core.losses` -- CE + Dice over k samples, KL, orthogonality, entropy.
* :mod:`mobseg.core.inference` -- per-voxel distribution parameters and the maps from them.
* :mod:`mobseg.core.quadrature` -- exact two-class moments by quadrature.
* :mod:`mobseg.core.registry` -- METHODS: name -> (distribution, head); build_head.

See docs/methods.md.
"""

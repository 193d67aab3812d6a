"""The ``sd15`` backend's options, declared once: their defaults, help, flags and checks.

``config.PriorConfig`` is built on this class, so `apa align --prompt ...` sets a field declared
here and a stored session keeps it in its flat ``prior`` section; the backend
(``priors/stable_diffusion.py``) reads the same object, built from the prior options by
:meth:`SD15Options.from_dict`. No torch here: the configuration imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from apa.knobs import choice, finite, knob, require, whole

DEFAULT_PROMPT = "a photo of fruit"  # suits the default CLIP users (apple, grape, banana)
INIT_MODES = ("noise", "prompt")
DTYPES = ("fp16", "bf16", "fp32")
DTYPE_SPELLINGS = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}  # torch's names


@dataclass(frozen=True)
class SD15Options:
    """Options of the ``sd15`` prior; the defaults are the seed's unless marked."""

    model: str | None = knob(None, "a local diffusers folder of SD 1.5 (none: the Hugging Face cache)", group="sd15")
    prompt: str = knob(DEFAULT_PROMPT, "the text the model is conditioned on", group="sd15")
    negative_prompt: str = knob("", "the text classifier-free guidance steers away from", group="sd15")
    guidance_scale: float = knob(7.5, "classifier-free guidance scale w in ε_u + w·(ε_c − ε_u); 1: the prompt "
                                 "branch alone, one UNet pass", group="sd15")
    height: int | None = knob(None, "image height in pixels, a multiple of 8 (none: the model's own, 512 for "
                              "SD 1.5)", group="sd15")
    width: int | None = knob(None, "image width in pixels, a multiple of 8 (none: the model's own)", group="sd15")
    init: str = knob("noise", "where sampling starts: pure noise, the marginal the start weights assume (not the "
                     "seed's), or the seed's prompt start (plain samples noised back)", choices=INIT_MODES,
                     group="sd15")
    init_steps: int = knob(10, "ancestral steps that make the prompt start's latents", group="sd15")
    dtype: str | None = knob(None, "network precision (none: fp16 on CUDA, fp32 on the CPU)", choices=DTYPES,
                             group="sd15")
    batch_size: int | None = knob(None, "particles per UNet / VAE call (none: 8 on the CPU, all on a GPU, where "
                                  "each particle's guidance pair shares one call)", flag="sd_batch_size",
                                  group="sd15")
    attention_slicing: bool | None = knob(None, "slice the UNet's attention (none: on the CPU only; on CUDA the "
                                          "fused attention is faster and, under the exact Jacobian's backward "
                                          "pass, far lighter)", group="sd15")
    vae_slicing: bool | None = knob(None, "decode one image at a time (none: on the CPU only)", group="sd15")
    vae_tiling: bool = knob(True, "decode large images in tiles", group="sd15")
    channels_last: bool = knob(False, "UNet and VAE in channels-last memory format", group="sd15")
    compile: bool = knob(False, "torch.compile the UNet (the first round pays the compile time)", group="sd15")
    cuda_graphs: bool = knob(False, "with --compile: CUDA graphs replayed for each static batch shape",
                             group="sd15")

    def __post_init__(self) -> None:
        finite("--guidance-scale", self.guidance_scale)
        for flag, v in (("--height", self.height), ("--width", self.width)):
            require(v is None or (whole(v) and v >= 8 and v % 8 == 0),
                    f"{flag} must be a positive multiple of 8 (pixels), got {v!r}")
        choice("--init", self.init, INIT_MODES)
        require(whole(self.init_steps) and self.init_steps >= 1,
                f"--init-steps must be a whole number of at least 1, got {self.init_steps!r}")
        require(self.dtype is None or self.dtype in DTYPES,
                f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        require(self.batch_size is None or (whole(self.batch_size) and self.batch_size >= 1),
                f"--sd-batch-size must be a whole number of at least 1, got {self.batch_size!r}")
        require(not self.cuda_graphs or self.compile, "--cuda-graphs captures the compiled UNet: add --compile true")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "SD15Options":
        """The options among the prior options (``config.PriorConfig`` as a dict; other priors' keys
        such as ``name`` are ignored; None means the default). torch's dtype names are accepted."""
        valid = {f.name for f in dataclasses.fields(SD15Options)}
        given = {k: v for k, v in (options or {}).items() if v is not None and k in valid}
        if "dtype" in given:
            given["dtype"] = DTYPE_SPELLINGS.get(given["dtype"], given["dtype"])
        return SD15Options(**given)

"""Safety checker of `text_to_image.py --check_safety` (MindONE's flags), framework-neutral.

After decoding (and after the watermark), images a checker flags as NSFW are replaced by black
images and NSFW_MESSAGE is logged, as MindONE does. The CLIP image embedding comes from the chosen
backend's evaluation encoder (`common.evaluation.scores.load_clip_encoder`); the safety heads below are
numpy. Weights are read from local files only: nothing is ever downloaded.

`--safety_version 1`: the diffusers/CompVis Stable Diffusion safety checker
(`StableDiffusionSafetyChecker`, what `safety_checker/` of an SD 1.x diffusers folder holds).
`--clip_ckpt_path` is that checker: a folder with config.json and model.safetensors or
pytorch_model.bin, or one weight file (a config.json beside it is used; without one the
architecture is read from the tensor shapes, assuming OpenAI CLIP's 64-wide heads and QuickGELU).
Tensors: `vision_model.vision_model.*` (a transformers CLIPVisionModel; `vision_model.*` as
transformers 5 saves it), `visual_projection.weight`,
`concept_embeds` [C, D], `concept_embeds_weights` [C], `special_care_embeds` [S, D],
`special_care_embeds_weights` [S] (C = 17, S = 3 in the released checker). With
cos = cosine(image embedding, embeds), an image is flagged when, for some concept c,
round(cos_c - concept_embeds_weights[c] + adjustment, 3) > 0, where adjustment is 0.01 if some
special-care concept s has round(cos_s - special_care_embeds_weights[s], 3) > 0 and 0 otherwise
(diffusers' loop raises the adjustment at the first special-care hit, which can only add later
hits, so the final adjustment depends on "any hit" alone). Cosines are float64 here, float32 in
diffusers: scores within float32 rounding of a 3-decimal boundary can differ.

`--safety_version 2` (MindONE's default): LAION's CLIP-based NSFW detector. `--clip_ckpt_path` is a
CLIP ViT-L/14 in any form the evaluation loader reads (MindONE's clip_vit_l_14.ckpt, an OpenAI or
open_clip file, a transformers CLIP folder; the architecture defaults to OpenAI's ViT-L/14).
`--nsfw_ckpt_path` is the head (default models/l14_nsfw.safetensors, else models/l14_nsfw*.ckpt
such as MindONE's l14_nsfw-c7c99ae7.ckpt, else models/l14_nsfw*.pth). Its tensors, named as in
LAION's PyTorch conversion of the Keras model and MindONE's MindSpore NSFWModel (an optional
`module.` / `model.` prefix is ignored, and so is a Keras `norm.count`):

    norm.mean [768], norm.variance [768]           x = (e - mean) / sqrt(variance)
    linear_1.weight [64, 768],  linear_1.bias [64]  x = relu(x @ W.T + b)
    linear_2.weight [512, 64],  linear_2.bias [512] x = relu(...)
    linear_3.weight [256, 512], linear_3.bias [256] x = relu(...)
    linear_4.weight [1, 256],   linear_4.bias [1]   score = sigmoid(x @ W.T + b)

where e is the L2-normalised CLIP image embedding (weights [out, in], as torch.nn.Linear and
mindspore.nn.Dense store them; any number of layers and widths is accepted if they chain). An
image is flagged when score > 0.2.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from common.formats.checkpoint_io import load_state_dict
from common.errors import UserError
from common.evaluation.models import (HF_WEIGHT_FILES, ClipArch, ClipSource, read_config_file, canonical_clip_weights,
                                      clip_arch_from_dict, clip_parameter_shapes, load_clip_source)
from common.evaluation.scores import image_pixels, l2_normalize, load_clip_encoder

logger = logging.getLogger(__name__)

NSFW_MESSAGE = ("Potential NSFW content was detected in one or more images. A black image will be returned "
                "instead. Try again with a different prompt and/or seed.")
NSFW_THRESHOLD = 0.2             # version 2: flagged when the head's score exceeds it
SPECIAL_CARE_ADJUSTMENT = 0.01   # version 1: added to every concept score once a special-care concept hits
VERSIONS = (1, 2)

# Where the checkers are looked for without --clip_ckpt_path / --nsfw_ckpt_path (never downloaded).
DEFAULT_CHECKER_V1 = os.path.join("models", "safety_checker")
DEFAULT_CLIP_V2 = os.path.join("models", "clip_vit_l_14.ckpt")        # MindONE's default file name
DEFAULT_CLIP_V2_NAME = "clip_vit_l_14"                                 # OpenAI ViT-L/14 (QuickGELU)
DEFAULT_NSFW = os.path.join("models", "l14_nsfw.safetensors")
NSFW_PATTERNS = (os.path.join("models", "l14_nsfw*.ckpt"), os.path.join("models", "l14_nsfw*.pth"))

V1_WHAT = ("the diffusers/CompVis StableDiffusionSafetyChecker: a folder with config.json and "
           "model.safetensors or pytorch_model.bin, or its weight file")
V2_CLIP_WHAT = ("a CLIP ViT-L/14: MindONE's clip_vit_l_14.ckpt, an OpenAI/open_clip weight file or a "
                "transformers CLIP folder")
NSFW_WHAT = ("LAION's CLIP ViT-L/14 NSFW head (norm.mean, norm.variance, linear_1..4.weight/bias), e.g. "
             "MindONE's l14_nsfw-c7c99ae7.ckpt")
_NOTHING_DOWNLOADED = "nothing is downloaded"


# --------------------------------------------------------------------------- heads (numpy)

@dataclass(frozen=True)
class ConceptHead:
    """Version 1: concept and special-care embeddings with their cosine thresholds."""
    concept_embeds: np.ndarray            # [C, D]
    concept_thresholds: np.ndarray        # [C]
    special_embeds: np.ndarray            # [S, D]
    special_thresholds: np.ndarray        # [S]

    @property
    def dim(self) -> int:
        return int(self.concept_embeds.shape[1])


@dataclass(frozen=True)
class NsfwHead:
    """Version 2: normalisation, then Dense layers (ReLU between, sigmoid after the last)."""
    mean: np.ndarray
    variance: np.ndarray
    layers: Tuple[Tuple[np.ndarray, np.ndarray], ...]     # ([out, in] weight, [out] bias) per layer

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return l2_normalize(a) @ l2_normalize(b).T


def concept_scores(embeds: np.ndarray, head: ConceptHead) -> Tuple[np.ndarray, np.ndarray]:
    """(special-care scores [N, S], concept scores [N, C]), rounded to 3 decimals like diffusers;
    the concept scores include the special-care adjustment."""
    special = np.round(_cosine(embeds, head.special_embeds) - head.special_thresholds, 3)
    adjustment = np.where((special > 0).any(axis=1), SPECIAL_CARE_ADJUSTMENT, 0.0)[:, None]
    concept = np.round(_cosine(embeds, head.concept_embeds) - head.concept_thresholds + adjustment, 3)
    return special, concept


def concept_flags(embeds: np.ndarray, head: ConceptHead) -> np.ndarray:
    """Version 1 verdict per image (bool [N]): some concept score above 0."""
    return (concept_scores(embeds, head)[1] > 0).any(axis=1)


def nsfw_scores(embeds: np.ndarray, head: NsfwHead) -> np.ndarray:
    """Version 2 NSFW probability per image ([N], float64) from raw CLIP image embeddings."""
    x = (l2_normalize(embeds) - head.mean) / np.sqrt(head.variance)
    for i, (weight, bias) in enumerate(head.layers):
        x = x @ weight.T + bias
        if i < len(head.layers) - 1:
            x = np.maximum(x, 0.0)
    return 1.0 / (1.0 + np.exp(-x[:, 0]))


def nsfw_flags(embeds: np.ndarray, head: NsfwHead) -> np.ndarray:
    return nsfw_scores(embeds, head) > NSFW_THRESHOLD


# --------------------------------------------------------------------------- loading

def _strip_wrappers(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def find_nsfw_ckpt(path: Optional[str] = None) -> str:
    """`--nsfw_ckpt_path`, or the first of DEFAULT_NSFW and NSFW_PATTERNS that exists."""
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise UserError(f"NSFW head not found: {path} (--nsfw_ckpt_path must be {NSFW_WHAT}; "
                            f"{_NOTHING_DOWNLOADED})")
        return path
    if os.path.isfile(DEFAULT_NSFW):
        return DEFAULT_NSFW
    for pattern in NSFW_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise UserError(f"NSFW head not found: {DEFAULT_NSFW} (nor {' or '.join(NSFW_PATTERNS)}): put {NSFW_WHAT} "
                    f"there or pass --nsfw_ckpt_path ({_NOTHING_DOWNLOADED})")


def load_nsfw_head(path: str) -> NsfwHead:
    """The version 2 head from a .safetensors / torch / MindSpore file (names in the module docstring)."""
    sd = _strip_wrappers(load_state_dict(path))
    missing = [k for k in ("norm.mean", "norm.variance", "linear_1.weight", "linear_1.bias") if k not in sd]
    if missing:
        raise UserError(f"{path}: not {NSFW_WHAT}: missing {', '.join(missing)}")
    mean, variance = _f64(sd["norm.mean"]).reshape(-1), _f64(sd["norm.variance"]).reshape(-1)
    if mean.shape != variance.shape or (variance <= 0).any():
        raise UserError(f"{path}: norm.mean and norm.variance must have one shape and a positive variance")
    layers: List[Tuple[np.ndarray, np.ndarray]] = []
    width = mean.shape[0]
    while f"linear_{len(layers) + 1}.weight" in sd:
        name = f"linear_{len(layers) + 1}"
        weight, bias = _f64(sd[f"{name}.weight"]), _f64(sd.get(f"{name}.bias", np.zeros(0)))
        if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
            raise UserError(f"{path}: {name}.weight {weight.shape} / {name}.bias {bias.shape} do not take "
                            f"{width} inputs")
        layers.append((weight, bias))
        width = weight.shape[0]
    if width != 1:
        raise UserError(f"{path}: the last layer linear_{len(layers)} has {width} outputs; the NSFW head ends in one")
    unused = sorted(k for k in sd if not re.fullmatch(r"norm\.(mean|variance|count)|linear_\d+\.(weight|bias)", k))
    if unused:
        logger.warning("%s: ignoring %d tensor(s) the NSFW head does not use, e.g. %s", path, len(unused),
                       ", ".join(unused[:3]))
    return NsfwHead(mean, variance, tuple(layers))


_V1_HEAD = ("concept_embeds", "concept_embeds_weights", "special_care_embeds", "special_care_embeds_weights")
_HF_VISION = "vision_model.vision_model."       # CLIPVisionModel inside the checker


def _infer_vision_config(sd: Dict[str, np.ndarray], source: str) -> dict:
    """A transformers vision_config from the checker's tensor shapes (OpenAI CLIP: 64-wide heads)."""
    try:
        width = int(sd["vision_model.embeddings.class_embedding"].shape[0])
        patch = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1])
        positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
        mlp = int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"{source}: not {V1_WHAT}: no {e.args[0]} (nor {_HF_VISION}{e.args[0][13:]})") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1 or width % 64:
        raise UserError(f"{source}: cannot read the architecture from the tensor shapes; put the checker's "
                        f"config.json beside the weight file")
    logger.info("%s: no config.json; assuming a CLIP ViT with 64-wide heads and QuickGELU", source)
    return {"hidden_size": width, "patch_size": patch, "image_size": grid * patch, "intermediate_size": mlp,
            "num_hidden_layers": layers, "num_attention_heads": width // 64, "hidden_act": "quick_gelu"}


def _vision_only_arch(vision_config: dict, projection_dim: int, name: str, source: str) -> ClipArch:
    """A ClipArch whose image tower is `vision_config`; its text tower is a 1-layer stub (the
    encoders build both towers, only the image side is used)."""
    v = dict(vision_config)
    stub = {"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "max_position_embeddings": 2, "vocab_size": 2, "hidden_act": v.get("hidden_act", "quick_gelu"),
            "layer_norm_eps": v.get("layer_norm_eps", 1e-5)}
    return clip_arch_from_dict({"projection_dim": projection_dim, "vision_config": v, "text_config": stub},
                               name, source)


def load_concept_checker(path: Optional[str]) -> Tuple[ClipSource, ConceptHead]:
    """Version 1: (the CLIP image tower as a ClipSource, the concept head) of a diffusers/CompVis
    safety checker folder or weight file."""
    path = os.path.expanduser(path or DEFAULT_CHECKER_V1)
    if not os.path.exists(path):
        raise UserError(f"safety checker not found: {path} (--clip_ckpt_path with --safety_version 1 must be "
                        f"{V1_WHAT}; {_NOTHING_DOWNLOADED})")
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if not files:
            raise UserError(f"{path}: no {' or '.join(HF_WEIGHT_FILES)} (--clip_ckpt_path with --safety_version 1 "
                            f"must be {V1_WHAT})")
        weight_file, config_file = files[0], os.path.join(path, "config.json")
    else:
        weight_file, config_file = path, os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    sd = _strip_wrappers(load_state_dict(weight_file))
    missing = [k for k in _V1_HEAD + ("visual_projection.weight",) if k not in sd]
    if missing:
        raise UserError(f"{weight_file}: not {V1_WHAT}: missing {', '.join(missing)}")
    head = ConceptHead(_f64(sd["concept_embeds"]), _f64(sd["concept_embeds_weights"]).reshape(-1),
                       _f64(sd["special_care_embeds"]), _f64(sd["special_care_embeds_weights"]).reshape(-1))
    if (head.concept_embeds.ndim != 2 or head.special_embeds.shape[1:] != head.concept_embeds.shape[1:]
            or head.concept_thresholds.shape[0] != head.concept_embeds.shape[0]
            or head.special_thresholds.shape[0] != head.special_embeds.shape[0]):
        raise UserError(f"{weight_file}: concept/special-care embeddings and weights do not fit together")
    # The checker holds a CLIPVisionModel: `vision_model.vision_model.*` in the released files and
    # transformers 4, `vision_model.*` as transformers 5 saves it. Either way the names become
    # CLIPModel's, which the eval loader maps; visual_projection.weight already is one.
    vision = {(k[len("vision_model."):] if k.startswith(_HF_VISION) else k): v
              for k, v in sd.items() if k.startswith("vision_model.")}
    vision["visual_projection.weight"] = sd["visual_projection.weight"]
    projection_dim = int(np.shape(sd["visual_projection.weight"])[0])
    if os.path.isfile(config_file):
        cfg = read_config_file(config_file)
        vision_config = dict(cfg.get("vision_config") or {})
        projection_dim = int(cfg.get("projection_dim", projection_dim))
        source = config_file
    else:
        vision_config, source = _infer_vision_config(vision, weight_file), weight_file
    arch = _vision_only_arch(vision_config, projection_dim, "safety_checker", source)
    stub = {k: np.zeros(shape, np.float32) for k, shape in clip_parameter_shapes(arch).items()
            if not k.startswith("visual.")}
    weights = canonical_clip_weights({**vision, **stub}, arch, weight_file)
    if head.dim != arch.embed_dim:
        raise UserError(f"{weight_file}: concept embeddings have {head.dim} dimensions, the projection {arch.embed_dim}")
    return ClipSource(arch, weight_file, "safety_checker", weights), head


def load_nsfw_clip(path: Optional[str], model_name: Optional[str] = None, config: Optional[str] = None) -> ClipSource:
    """Version 2: the CLIP ViT-L/14 (or what `model_name` / `config` say) of `--clip_ckpt_path`."""
    path = os.path.expanduser(path or DEFAULT_CLIP_V2)
    if not os.path.exists(path):
        raise UserError(f"CLIP for the safety checker not found: {path} (--clip_ckpt_path with --safety_version 2 "
                        f"must be {V2_CLIP_WHAT}; {_NOTHING_DOWNLOADED})")
    return load_clip_source(path, model_name or (None if config else DEFAULT_CLIP_V2_NAME), config)


# --------------------------------------------------------------------------- the checker

def clip_pixels(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """float32 [N, 3, size, size] CLIP input of uint8 HWC RGB images: shorter side to `size`
    (bicubic), centre crop, CLIP mean/std (what CLIPImageProcessor does for the diffusers checker)."""
    return np.stack([image_pixels(Image.fromarray(np.asarray(image, np.uint8)), size) for image in images])


class SafetyChecker:
    """`checker(images) -> (images, flags)` for one backend and version; files are read and checked
    before the backend's framework is loaded."""

    def __init__(self, backend: str, version: int = 2, clip_ckpt_path: Optional[str] = None,
                 nsfw_ckpt_path: Optional[str] = None, clip_model_name: Optional[str] = None,
                 clip_config: Optional[str] = None, batch_size: int = 8):
        try:
            self.version = int(version)
        except (TypeError, ValueError):
            self.version = None
        if self.version not in VERSIONS:
            raise UserError(f"--safety_version must be 1 or 2, got {version!r}")
        self.batch_size = max(1, int(batch_size))
        if self.version == 1:
            source, self.head = load_concept_checker(clip_ckpt_path)
        else:
            self.head = load_nsfw_head(find_nsfw_ckpt(nsfw_ckpt_path))
            source = load_nsfw_clip(clip_ckpt_path, clip_model_name, clip_config)
        if self.head.dim != source.arch.embed_dim:
            raise UserError(f"{source.path}: CLIP embeddings have {source.arch.embed_dim} dimensions but the safety "
                            f"head takes {self.head.dim} (the checker needs CLIP ViT-L/14)")
        self.source = source
        self.encoder = load_clip_encoder(backend, source)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """[N, D] float32 CLIP image embeddings (projected, not normalised)."""
        size = self.source.arch.image_size
        return np.concatenate([np.asarray(self.encoder.encode_images(clip_pixels(images[i:i + self.batch_size], size)),
                                          np.float32) for i in range(0, len(images), self.batch_size)])

    def flags(self, embeds: np.ndarray) -> np.ndarray:
        return concept_flags(embeds, self.head) if self.version == 1 else nsfw_flags(embeds, self.head)

    def __call__(self, images):
        """uint8 HWC images (an [N, H, W, 3] array or a list) -> (the same kind of container with the
        flagged images black, bool [N] flags). The input is not modified."""
        if len(images) == 0:
            return images, np.zeros(0, bool)
        flags = self.flags(self.embed(images))
        if not flags.any():
            return images, flags
        logger.warning(NSFW_MESSAGE)
        if isinstance(images, np.ndarray):
            out = images.copy()
            out[flags] = 0
            return out, flags
        return [np.zeros_like(im) if f else im for im, f in zip(images, flags)], flags


_CACHE: Dict[tuple, SafetyChecker] = {}


def load_safety_checker(backend_name: str, clip_ckpt_path: Optional[str], version: int,
                        nsfw_ckpt_path: Optional[str] = None, **kwargs) -> SafetyChecker:
    """The SafetyChecker for these arguments, built once per process (the CLIP is large)."""
    key = (str(backend_name).lower(), clip_ckpt_path, str(version), nsfw_ckpt_path, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE.clear()            # one checker at a time: a ViT-L/14 is 1.2 GB of float32
        _CACHE[key] = SafetyChecker(backend_name, version, clip_ckpt_path, nsfw_ckpt_path, **kwargs)
    return _CACHE[key]


def check_safety(images, backend_name: str, clip_ckpt_path: Optional[str], version: int,
                 nsfw_ckpt_path: Optional[str] = None, **kwargs):
    """(images with NSFW-flagged ones black, bool flags) for uint8 HWC images, on `backend_name`'s
    CLIP (see the module docstring for the versions and files). `kwargs` (clip_model_name,
    clip_config, batch_size) go to SafetyChecker."""
    return load_safety_checker(backend_name, clip_ckpt_path, version, nsfw_ckpt_path, **kwargs)(images)

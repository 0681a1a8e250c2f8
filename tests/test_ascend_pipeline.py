"""text_to_image on the MindSpore backend gives the PyTorch backend's images: same weights, same
seed, every sampler, with and without LoRA, and from a checkpoint converted to MindONE's layout."""
import os

import numpy as np
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("torch")

from conftest import TINY  # noqa: E402
from helpers.scripts import run_script  # noqa: E402
from common.formats import lora as lora_fmt  # noqa: E402
from common.arch import load_arch  # noqa: E402
from common.formats.checkpoint_io import load_state_dict  # noqa: E402
from common.diffusion.generate import SampleSettings, sample_latents  # noqa: E402
from common.images import to_uint8  # noqa: E402
from common.diffusion.samplers import SAMPLERS  # noqa: E402
from common.tokenizer import tokenizer_for  # noqa: E402

SIZE = 32  # 16x16 latents keep MindSpore's CPU convolutions quick


@pytest.fixture(scope="module")
def pipes(tiny_models):
    import backends.ascend as ascend
    import backends.cuda as cuda
    out = {}
    for version in ("v1", "v2"):
        arch = load_arch(TINY[version])
        weights = load_state_dict(tiny_models[version])
        out[version] = (arch, cuda.Pipeline(arch, weights), ascend.Pipeline(arch, weights))
    return out


def images(pipe, arch, sampler, seed=0, steps=4):
    tok = tokenizer_for(arch.text)
    settings = SampleSettings(sampler=sampler, steps=steps, scale=7.5, height=SIZE, width=SIZE, seed=seed,
                              progress=False)
    latents = sample_latents(pipe, arch, tok(["a photo of sks robot"] * 2), tok(["blurry"] * 2), settings, (0, 0))
    return latents, pipe.decode(latents)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_image_on_both_backends(pipes, version, sampler):
    arch, pt, ms = pipes[version]
    lat_pt, img_pt = images(pt, arch, sampler)
    lat_ms, img_ms = images(ms, arch, sampler)
    assert np.abs(lat_pt - lat_ms).max() < 1e-3 * max(1.0, np.abs(lat_pt).max())
    pixels = np.abs(to_uint8(img_pt).astype(np.float32) - to_uint8(img_ms).astype(np.float32)) / 255.0
    assert pixels.mean() <= 1 / 255, pixels.mean()
    assert np.abs(img_pt).mean() > 1e-3   # not trivially zero


def test_stacked_community_files_give_the_same_image(tiny_models):
    """A LoCon on every layer plus LoHa, LoKr and full-diff layers, stacked with a scale each:
    merged once in common, the same image on both backends."""
    import backends.ascend as ascend
    import backends.cuda as cuda
    from test_lora_files import community_lora, lycoris_files
    arch = load_arch(TINY["v1"])
    weights = load_state_dict(tiny_models["v1"])
    loha, lokr, full = lycoris_files(arch)
    merged = lora_fmt.merge_loras(weights, arch, [(community_lora(arch, "all"), 0.3), (loha, 0.5), (lokr, 0.5),
                                                  (full, 0.2)])
    _, a = images(cuda.Pipeline(arch, merged), arch, "ddim")
    _, b = images(ascend.Pipeline(arch, merged), arch, "ddim")
    _, c = images(cuda.Pipeline(arch, weights), arch, "ddim")
    assert np.abs(a - b).mean() < 1e-4
    assert np.abs(a - c).mean() > 1e-3   # the adapters changed the image


def test_class_images_through_the_mindspore_pipeline(tmp_path, tiny_models):
    import backends.ascend as ascend
    from common.training.class_images import ensure_class_images
    from common.training.train_args import parse_train_args
    arch = load_arch(TINY["v2"])
    args = parse_train_args(["--instance_data_dir", "x", "--instance_prompt", "x", "--class_data_dir",
                             str(tmp_path / "cls"), "--class_prompt", "a robot", "--num_class_images", "3",
                             "--sample_batch_size", "2", "--sampling_steps", "2", "--image_size", str(SIZE),
                             "--mode", "1"])        # PYNATIVE_MODE: two batch shapes, no graph compiled for each
    group = ascend.process_group(args)
    assert ensure_class_images(ascend, group, arch, load_state_dict(tiny_models["v2"]), tokenizer_for(arch.text), args) == 3
    assert sorted(os.listdir(tmp_path / "cls")) == ["00000.png", "00001.png", "00002.png"]
    assert ensure_class_images(ascend, group, arch, load_state_dict(tiny_models["v2"]), tokenizer_for(arch.text), args) == 0


def test_cli_on_a_converted_mindone_checkpoint(tmp_path, tiny_models):
    """convert_weights.py -> MindONE .ckpt -> text_to_image --backend ascend == --backend cuda on the original."""
    ckpt = tmp_path / "tiny-v2-ms.ckpt"
    run_script("tools/model_conversion/convert_weights.py", "--source", tiny_models["v2"], "--target", ckpt,
               "--model", "sdv2", "--source_version", "pt", "--config", TINY["v2"])
    common = ["--config", TINY["v2"], "--prompt", "a photo of sks robot", "--n_samples", "1", "--n_iter", "1",
              "--sampling_steps", "3", "--H", str(SIZE), "--W", str(SIZE), "--seed", "9"]
    for backend, source in (("ascend", str(ckpt)), ("cuda", tiny_models["v2"])):
        run_script("text_to_image.py", "--backend", backend, "--ckpt_path", source,
                   "--output_path", tmp_path / backend, *common)
    from PIL import Image
    a = np.asarray(Image.open(tmp_path / "ascend" / "samples" / "00000.png"), np.float32)
    b = np.asarray(Image.open(tmp_path / "cuda" / "samples" / "00000.png"), np.float32)
    assert np.abs(a - b).mean() / 255 <= 1 / 255

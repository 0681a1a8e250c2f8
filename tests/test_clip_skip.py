"""--clip_skip N: the text encoder's N-th layer from the end, then the final layer norm, on both
backends, checked against transformers' CLIPTextModel hidden states and diffusers' encode_prompt;
training with it saves the skipped layers unchanged."""
import dataclasses
import types

import numpy as np
import pytest
import yaml

from conftest import SUBJECT, TINY
from common.arch import load_arch
from common.errors import UserError
from common.formats import keymap
from common.formats.checkpoint_io import load_state_dict, save_state_dict
from common.formats.init_weights import random_weights
from common.tokenizer import default_vocab_path, tokenizer_for

PROMPTS = ["a photo of sks robot", ""]
TEXT_PARITY = 1e-4                 # tests/test_ascend_models.py: text encoder, MindSpore vs PyTorch


def weights_of(arch, seed=0):
    """random_weights with norm scales and biases perturbed, so that skipping the final layer
    norm, or taking the wrong block, cannot go unnoticed."""
    sd = random_weights(arch, seed)
    rng = np.random.default_rng(seed + 100)
    return {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 1 else v
            for k, v in sd.items()}


def full_clip_text_model(arch, weights):
    """transformers' CLIPTextModel with every block the checkpoint stores (SD2's last one too)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backends.cuda.models import load_weights
    full = dataclasses.replace(arch, text=dataclasses.replace(arch.text, used_layers=arch.text.layers))
    model = CLIPTextModel(CLIPTextConfig(**keymap.clip_text_config(full)))
    load_weights(model, keymap.ldm_to_diffusers(weights, full, ("text_encoder",))["text_encoder"], "text encoder")
    return model.eval()


def final_layer_norm(model):
    """transformers >= 5.6 has CLIPTextModel.final_layer_norm; before, text_model.final_layer_norm."""
    return getattr(model, "text_model", model).final_layer_norm


def ours(backend, arch, weights, ids):
    if backend == "cuda":
        from backends.cuda import Pipeline
        return Pipeline(arch, weights).encode_text(ids).float().numpy()
    pytest.importorskip("mindspore")
    from backends.ascend import Pipeline
    return Pipeline(arch, weights).encode_text(ids).asnumpy()


def test_with_clip_skip_reduces_the_used_layers():
    v1, v2 = load_arch(TINY["v1"]), load_arch(TINY["v2"])
    assert v1.with_clip_skip(None) is v1 and v1.with_clip_skip(1) is v1
    assert (v1.text.layers, v1.with_clip_skip(2).text.used_layers, v1.with_clip_skip(3).text.used_layers) == (3, 2, 1)
    assert v2.with_clip_skip(2).text.used_layers == 1          # SD2 counts from its penultimate layer
    assert v1.with_clip_skip(2).text.layers == 3                # checkpoints keep every block
    for n in (0, 4, -1, 2.0, True):
        with pytest.raises(UserError, match=r"--clip_skip .*1 .* to 3 .*tiny-v1-inference.yaml") as e:
            v1.with_clip_skip(n)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="ss_clip_skip 3"):
        v2.with_clip_skip(3, source="ss_clip_skip")


@pytest.mark.parametrize("backend", ["cuda", "ascend"])
@pytest.mark.parametrize("version,n,hidden", [("v1", 2, -2), ("v1", 3, -3), ("v2", 2, -3)])
def test_clip_skip_is_that_hidden_state_through_the_final_layer_norm(backend, version, n, hidden):
    """SD1 with N=2 conditions on hidden_states[-2]; SD2 (already on hidden_states[-2]) with N=2
    on hidden_states[-3]; both after the final layer norm."""
    import torch
    arch = load_arch(TINY[version])
    weights = weights_of(arch)
    ids = tokenizer_for(arch.text)(PROMPTS)
    model = full_clip_text_model(arch, weights)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        want = final_layer_norm(model)(out.hidden_states[hidden]).numpy()
    got = ours(backend, arch.with_clip_skip(n), weights, ids)
    assert np.abs(got - want).max() <= TEXT_PARITY
    default = ours(backend, arch, weights, ids)
    assert np.abs(default - want).max() > 1e-2          # the skip really changed the conditioning


def test_diffusers_encode_prompt_clip_skip_1_is_our_2(tmp_path):
    """diffusers counts skipped layers (clip_skip=1); A1111/kohya count the layer used (N=2)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from backends.cuda import Pipeline
    from backends.cuda.models import load_models
    from helpers.hf_clip import hf_clip_tokenizer
    vocab = default_vocab_path()
    if vocab is None:
        pytest.skip("open_clip's CLIP vocabulary is not installed")
    arch = load_arch(TINY["v1"])
    weights = weights_of(arch)
    unet, vae, text, _ = load_models(arch, weights)
    if not hasattr(text, "text_model"):
        # diffusers 0.42 reads text_encoder.text_model.final_layer_norm, which transformers >= 5.6
        # no longer has: give it the path (a plain attribute, not a registered submodule)
        object.__setattr__(text, "text_model", types.SimpleNamespace(final_layer_norm=text.final_layer_norm))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=hf_clip_tokenizer(vocab, tmp_path),
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        theirs = pipe.encode_prompt(PROMPTS[0], "cpu", 1, False, clip_skip=1)[0].numpy()
    mine = Pipeline(arch.with_clip_skip(2), weights).encode_text(tokenizer_for(arch.text)(PROMPTS[:1]))
    assert np.abs(mine.numpy() - theirs).max() <= 1e-5


@pytest.mark.parametrize("backend", ["cuda", "ascend"])
def test_full_fine_tune_with_clip_skip_saves_the_skipped_layers_unchanged(tmp_path, backend):
    """The text encoder trains only the blocks it runs; the checkpoint still holds every block
    (the skipped one exactly as it came), and train_config.yaml records --clip_skip. (One step in
    PYNATIVE_MODE on ascend: which parameters change does not depend on the mode.)"""
    if backend == "ascend":
        pytest.importorskip("mindspore")
    from backends import load_backend
    from common.training.train_args import parse_train_args
    from common.training.train_loop import run_training
    arch = load_arch(TINY["v1"])
    base = weights_of(arch)
    model = str(tmp_path / "base.safetensors")
    save_state_dict(model, base)
    out = tmp_path / "run"
    args = parse_train_args(["--model_config", TINY["v1"], "--pretrained_model_path", model, "--backend", backend,
                             "--instance_data_dir", SUBJECT, "--instance_prompt", "a photo of sks robot",
                             "--with_prior_preservation", "False", "--train_text_encoder", "True",
                             "--clip_skip", "2", "--image_size", "32", "--mode", "1", "--train_batch_size", "1",
                             "--train_data_repeats", "1", "--max_train_steps", "1", "--start_learning_rate", "1e-3",
                             "--output_path", str(out)])
    result = run_training(args, load_backend(backend))
    saved = load_state_dict(result["checkpoint"])
    assert set(saved) == set(base)
    layer = keymap.CLIP_PREFIX + "encoder.layers.{}."
    skipped = [k for k in base if k.startswith(layer.format(2))]
    trained = [k for k in base if k.startswith(layer.format(0))]
    assert skipped and all(np.array_equal(saved[k], base[k]) for k in skipped)
    assert any(not np.allclose(saved[k], base[k]) for k in trained)
    assert yaml.safe_load((out / "train_config.yaml").read_text())["clip_skip"] == 2

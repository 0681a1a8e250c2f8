"""tools/model_conversion/convert_weights.py: MindONE's interface on tiny SD1 / SD2 models, both
directions, diffusers folders, LoRA formats, and the safety rules (safe pickles, clear one-line
errors with exit code 2, no overwriting without --overwrite)."""
import importlib.util
import os
import pickle

import numpy as np
import pytest

from common.formats import checkpoint_io as cio
from common.formats import conversion, keymap
from common.formats import mindspore_layout as ml
from common.arch import load_arch
from common.errors import UserError
from common.formats.init_weights import random_weights
from common.formats.lora import LoraPair, from_state_dict, lora_targets, to_diffusers, to_kohya
from helpers.scripts import run_script

try:
    import torch
except ImportError:
    torch = None
try:
    import mindspore
except ImportError:
    mindspore = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch")
needs_ms = pytest.mark.skipif(mindspore is None, reason="needs MindSpore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "model_conversion", "convert_weights.py")
TINY = {"v1": "configs/tiny-v1-inference.yaml", "v2": "configs/tiny-v2-inference.yaml"}

_spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)


def cli(*args, cwd=None):
    """Run the script as users do; returns (exit code, stdout, stderr)."""
    r = run_script(SCRIPT, *args, cwd=cwd or ROOT, check=False)
    return r.returncode, r.stdout, r.stderr


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:6]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].dtype, b[k].dtype)
        assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), k


def one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny original-layout files: SD1 in fp16, SD2 in fp32 (with the optional OpenCLIP tensors)."""
    folder = tmp_path_factory.mktemp("cw")
    out = {}
    for version, dtype in (("v1", "fp16"), ("v2", "fp32")):
        arch = load_arch(TINY[version])
        sd = {k: cio.cast_array(v, dtype) for k, v in random_weights(arch, seed=1).items()}
        path = str(folder / f"tiny-{version}.safetensors")
        cio.save_state_dict(path, sd)
        out[version] = (path, arch, sd)
    return out


# ------------------------------------------------------------------ both directions (subprocess)

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cli_pt_to_ms_and_back_is_bit_exact(models, version, tmp_path):
    path, arch, sd = models[version]
    ms_file, back = tmp_path / "model.ckpt", tmp_path / "back.safetensors"
    model = "sdv1" if version == "v1" else "sdv2"
    code, out, err = cli("--source", path, "--target", ms_file, "--model", model,
                         "--source_version", "pt", "--config", TINY[version])
    assert code == 0, err
    assert "converted" in out and "unet/vae/text_encoder" in out
    assert cio.checkpoint_format(str(ms_file)) == "mindspore"
    written = cio.load_state_dict(str(ms_file))
    assert set(written) == set(ml.mindspore_shapes(load_arch(TINY[version])))
    code, out, err = cli("-s", ms_file, "-t", back, "-m", model, "-sv", "ms", "--config", TINY[version])
    assert code == 0, err
    assert_same(cio.load_state_dict(str(back)), sd)
    if mindspore is not None:                       # the file is what MindSpore itself reads
        loaded = mindspore.load_checkpoint(str(ms_file))
        assert sorted(loaded) == sorted(written)
        some = ml.MS_TEXT_PREFIX + "transformer_layer.resblocks.0.attn.attn.in_proj.weight"
        assert loaded[some].asnumpy().tobytes() == written[some].tobytes()


# ------------------------------------------------------------------ diffusers folders

@needs_torch
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_diffusers_folder_round_trip_and_live_models(models, version, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path, arch, sd = models[version]
    folder, back = tmp_path / "folder", tmp_path / "back.ckpt"
    assert cw.main(["-s", path, "-t", str(folder), "--to", "diffusers", "--config", TINY[version]]) == 0
    expected = keymap.ldm_to_diffusers(sd, arch)
    got = cio.load_diffusers_folder(str(folder))
    for comp in ("unet", "vae", "text_encoder"):
        assert_same(got[comp], expected[comp])
    assert ("extras" in got) == (version == "v2")       # SD2's unused block etc. kept beside
    # the folder loads with diffusers / transformers from its config.json files, nothing missing
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        model, info = cls.from_pretrained(str(folder / sub), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
    # and back to a single file (a torch pickle this time): bit-exact
    assert cw.main(["-s", str(folder), "-t", str(back), "--to", "pt", "--config", TINY[version]]) == 0
    assert_same(cio.load_state_dict(str(back)), sd)


def test_ms_to_diffusers_like_mindone_diffusersv2(models, tmp_path):
    path, arch, sd = models["v2"]
    ms_file, folder = tmp_path / "m.ckpt", tmp_path / "out"
    assert cw.main(["-s", path, "-t", str(ms_file), "--config", TINY["v2"]]) == 0
    assert cw.main(["-s", str(ms_file), "-t", str(folder), "-m", "diffusersv2", "-sv", "ms",
                    "--config", TINY["v2"]]) == 0
    got = cio.load_diffusers_folder(str(folder))
    expected = keymap.ldm_to_diffusers(sd, arch)
    for comp in expected:
        assert_same(got[comp], expected[comp])
    # a diffusers folder whose scheduler says v_prediction is recognised
    import json
    cfg = folder / "scheduler" / "scheduler_config.json"
    assert json.loads(cfg.read_text())["prediction_type"] == "epsilon"
    assert cio.folder_prediction_type(str(folder)) == "epsilon"


# ------------------------------------------------------------------ quirks: dtype, EMA, VAE, pickles

@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_cast(models, dtype, tmp_path):
    path, arch, sd = models["v2"]
    target = tmp_path / "cast.ckpt"
    assert cw.main(["-s", path, "-t", str(target), "--dtype", dtype, "--config", TINY["v2"]]) == 0
    got = ml.mindspore_to_ldm(cio.load_mindspore_ckpt(str(target)), arch)
    for k, x in sd.items():
        assert got[k].tobytes() == cio.cast_array(x, dtype).tobytes(), k
    if dtype == "bf16" and torch is not None:      # rounding as torch does it
        k = keymap.UNET_PREFIX + "out.2.weight"
        ref = torch.from_numpy(sd[k]).to(torch.bfloat16).view(torch.int16).numpy()
        assert got[k].view("<u2").tobytes() == ref.tobytes()
    if mindspore is not None:
        w = mindspore.load_checkpoint(str(target))[keymap.UNET_PREFIX + "out.2.conv.weight"]
        assert w.dtype == (mindspore.bfloat16 if dtype == "bf16" else mindspore.float16)


@needs_torch
def test_torch_pickle_with_ema_buffers_and_separate_vae(models, tmp_path):
    path, arch, sd = models["v1"]
    t = lambda x: torch.from_numpy(np.array(x))
    ckpt = {k.replace("transformer.text_model.", "transformer."): t(v) for k, v in sd.items()}
    ckpt.update({keymap.ema_name(k): t(v + 1) for k, v in sd.items() if k.startswith(keymap.UNET_PREFIX)})
    ckpt["betas"] = torch.zeros(1000)
    ckpt["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    src = tmp_path / "civitai.ckpt"
    torch.save({"state_dict": ckpt, "global_step": 5}, src)
    # a standalone VAE file: original names without the prefix, plus loss weights
    vae = {k[len(keymap.VAE_PREFIX):]: t(v * 2) for k, v in sd.items() if k.startswith(keymap.VAE_PREFIX)}
    vae["loss.logvar"] = torch.zeros(())
    vae_file = tmp_path / "vae.pt"
    torch.save({"state_dict": vae}, vae_file)
    out = tmp_path / "out.safetensors"
    assert cw.main(["-s", str(src), "-t", str(out), "--to", "pt", "--ema", "--vae", str(vae_file),
                    "--config", TINY["v1"]]) == 0
    got = cio.load_state_dict(str(out))
    assert set(got) == set(sd)
    for k, v in sd.items():     # UNet from EMA (+1), VAE from the separate file (x2), text as is
        expected = v + 1 if k.startswith(keymap.UNET_PREFIX) else v * 2 if k.startswith(keymap.VAE_PREFIX) else v
        assert got[k].tobytes() == expected.tobytes(), k


@needs_torch
def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, (f"echo pwned > {tmp_path / 'pwned'}",)
    src = tmp_path / "evil.ckpt"
    with open(src, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    code, out, err = cli("-s", src, "-t", tmp_path / "out.ckpt", "--model", "sdv1")
    one_line_error(code, err, "refused", str(src))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.ckpt").exists()


def test_truncated_sources_give_one_line_errors(models, tmp_path):
    path, arch, sd = models["v1"]
    ms_file = tmp_path / "good.ckpt"
    assert cw.main(["-s", path, "-t", str(ms_file), "--config", TINY["v1"]]) == 0
    for good, name in ((path, "cut.safetensors"), (str(ms_file), "cut.ckpt")):
        data = open(good, "rb").read()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        code, out, err = cli("-s", tmp_path / name, "-t", tmp_path / f"out-{name}", "--config", TINY["v1"])
        one_line_error(code, err, name)
        assert not (tmp_path / f"out-{name}").exists()
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    code, _, err = cli("-s", tmp_path / "junk.ckpt", "-t", tmp_path / "o.ckpt", "-m", "sdv1")
    one_line_error(code, err, "junk.ckpt")


def test_existing_target_survives_without_overwrite(models, tmp_path):
    path, arch, sd = models["v1"]
    target = tmp_path / "exists.ckpt"
    target.write_bytes(b"precious")
    code, out, err = cli("-s", path, "-t", target, "--config", TINY["v1"])
    one_line_error(code, err, "already exists", "--overwrite")
    assert target.read_bytes() == b"precious"
    code, out, err = cli("-s", path, "-t", target, "--config", TINY["v1"], "--overwrite")
    assert code == 0, err
    assert cio.checkpoint_format(str(target)) == "mindspore"
    assert sorted(os.listdir(tmp_path)) == ["exists.ckpt"]          # no temporary files left


def test_wrong_source_version_config_and_flags(models, tmp_path):
    path, arch, sd = models["v1"]
    with pytest.raises(UserError, match="--source_version ms was given"):
        cw.main(["-s", path, "-t", str(tmp_path / "x.ckpt"), "-sv", "ms", "--config", TINY["v1"]])
    with pytest.raises(UserError, match="does not define|wrong shape"):
        cw.main(["-s", path, "-t", str(tmp_path / "x.ckpt"), "--config", TINY["v2"]])
    with pytest.raises(UserError, match="cannot tell SD1 from SD2"):
        cw.main(["-s", path, "-t", str(tmp_path / "x.ckpt")])
    with pytest.raises(UserError, match="not a LoRA"):
        cw.main(["-s", path, "-t", str(tmp_path / "x.ckpt"), "--lora", "--config", TINY["v1"]])
    with pytest.raises(UserError, match="--dtype"):
        cw.main(["-s", path, "-t", str(tmp_path / "x.ckpt"), "--dtype", "fp8"])
    assert os.listdir(tmp_path) == []


def test_model_recognised_from_full_size_shapes():
    args = cw.build_parser().parse_args(["-s", "x", "-t", "y"])
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert conversion.choose_config(args, {to_k: np.zeros((320, 768), np.float16)}) == "configs/v1-inference.yaml"
    assert conversion.choose_config(args, {to_k: np.zeros((320, 1024), np.float16)}) == "configs/v2-inference.yaml"
    emb = "cond_stage_model.transformer.embedding_table"
    assert conversion.choose_config(args, {emb: np.zeros((4, 1024))}, "v_prediction") == "configs/v2-vpred-inference.yaml"
    kohya_up = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"
    kohya_down = kohya_up.replace("lora_up", "lora_down")
    assert conversion.choose_config(args, {kohya_up: np.zeros((320, 4)), kohya_down: np.zeros((4, 768))}) \
        == "configs/v1-inference.yaml"


def test_help_explains_every_flag():
    parser = cw.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        assert action.help and len(action.help) > 15, action.option_strings
        for opt in action.option_strings:
            assert opt in text
    for flag in ("--source", "-s", "--target", "-t", "--model", "-m", "--source_version", "-sv",
                 "--config", "--dtype", "--ema", "--vae", "--overwrite", "--to", "--lora"):
        assert flag in text


# ------------------------------------------------------------------ LoRA

def make_lora(arch, rank=4, seed=0):
    rng = np.random.default_rng(seed)
    return {t: LoraPair(down=rng.standard_normal((rank, layer.fan_in)).astype(np.float32),
                        up=rng.standard_normal((layer.fan_out, rank)).astype(np.float32), alpha=float(rank))
            for t, layer in lora_targets(arch, True, True).items()}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_lora_kohya_ms_diffusers_round_trips(version, tmp_path):
    arch = load_arch(TINY[version])
    kohya = to_kohya(make_lora(arch))
    src = tmp_path / "kohya.safetensors"
    cio.save_state_dict(str(src), kohya)
    c = ["--config", TINY[version]]
    # kohya -> MindSpore LoRA -> kohya
    assert cw.main(["-s", str(src), "-t", str(tmp_path / "lora.ckpt"), *c]) == 0
    ms = cio.load_mindspore_ckpt(str(tmp_path / "lora.ckpt"))
    assert ml.is_mindspore_lora(ms) and int(ms["lora_rank"]) == 12
    assert cw.main(["-s", str(tmp_path / "lora.ckpt"), "-t", str(tmp_path / "back.safetensors"), *c]) == 0
    assert_same(cio.load_state_dict(str(tmp_path / "back.safetensors")), kohya)
    # kohya -> diffusers -> kohya
    assert cw.main(["-s", str(src), "-t", str(tmp_path / "d.safetensors"), "--to", "diffusers", *c]) == 0
    diff = cio.load_state_dict(str(tmp_path / "d.safetensors"))
    assert_same(diff, to_diffusers(from_state_dict(kohya, arch)))
    assert cw.main(["-s", str(tmp_path / "d.safetensors"), "-t", str(tmp_path / "k2.safetensors"),
                    "--to", "kohya", "--lora", *c]) == 0
    assert_same(cio.load_state_dict(str(tmp_path / "k2.safetensors")), kohya)
    # MindSpore LoRA -> diffusers: same tensors as kohya -> diffusers
    assert cw.main(["-s", str(tmp_path / "lora.ckpt"), "-t", str(tmp_path / "d2.safetensors"),
                    "--to", "diffusers", *c]) == 0
    assert_same(cio.load_state_dict(str(tmp_path / "d2.safetensors")), diff)


def test_mindone_lora_cli_round_trip_subprocess(tmp_path):
    """A MindONE-style LoRA (shared down per fused in_proj, fp16) -> kohya -> MindSpore: same file."""
    arch = load_arch(TINY["v1"])
    rng = np.random.default_rng(3)
    ms = {}
    for module, targets in ml.lora_modules(arch).items():
        layer = lora_targets(arch, True, True)[targets[0]]
        i, o = layer.fan_in, layer.fan_out
        ms[module + ".lora_down.weight"] = rng.standard_normal((4, i)).astype(np.float16)
        ms[module + ".lora_up.weight"] = rng.standard_normal((o * len(targets), 4)).astype(np.float16)
    ms["lora_rank"] = np.asarray(4, np.int64)
    src = tmp_path / "mindone_lora.ckpt"
    cio.save_mindspore_ckpt(str(src), ms)
    code, out, err = cli("-s", src, "-t", tmp_path / "k.safetensors", "-sv", "ms", "--config", TINY["v1"])
    assert code == 0 and "kohya" in out, err
    code, out, err = cli("-s", tmp_path / "k.safetensors", "-t", tmp_path / "again.ckpt", "-sv", "pt",
                         "--config", TINY["v1"])
    assert code == 0 and "lora_rank 4" in out, err
    assert_same(cio.load_state_dict(str(tmp_path / "again.ckpt")), ms)

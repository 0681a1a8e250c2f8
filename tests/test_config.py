"""Train-config loading: MindONE keys, CLI precedence, type conversion and errors."""
import pytest

from common.arch import load_arch, parse_arch
from common.errors import UserError
from common.training.train_args import parse_train_args

BASE = ["--instance_data_dir", "data", "--instance_prompt", "a photo of sks dog"]


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_mindone_configs_load_with_their_values():
    a = parse_train_args(["--train_config", "configs/train/train_config_dreambooth_lora_v2.yaml"] + BASE)
    assert a.start_learning_rate == pytest.approx(5e-5) and isinstance(a.start_learning_rate, float)
    assert a.weight_decay == pytest.approx(1e-4)
    assert a.use_lora is True and a.lora_rank == 64 and a.lora_ft_text_encoder is True
    assert a.betas == [0.9, 0.98]
    assert a.with_prior_preservation is True and a.num_class_images == 200
    assert a.lora_alpha == 64.0
    v = parse_train_args(["--train_config", "configs/train/train_config_dreambooth_vanilla_v2.yaml"] + BASE)
    assert v.with_prior_preservation is False and v.prior_loss_weight == 0.0
    assert v.start_learning_rate == pytest.approx(2e-6)


def test_every_shipped_train_config_parses():
    import glob
    for path in glob.glob("configs/train/*.yaml"):
        args = parse_train_args(["--train_config", path] + BASE)
        load_arch(args.model_config)


def test_cli_wins_over_yaml(tmp_path):
    cfg = write(tmp_path, "start_learning_rate: 2e-6\ntrain_batch_size: 3\nuse_ema: True\nwith_prior_preservation: False\n")
    a = parse_train_args(["--train_config", cfg, "--start_learning_rate", "1e-4", "--use_ema", "False"] + BASE)
    assert a.start_learning_rate == pytest.approx(1e-4)
    assert a.train_batch_size == 3
    assert a.use_ema is False


def test_booleans_accept_mindone_and_diffusers_spellings():
    a = parse_train_args(BASE + ["--with_prior_preservation", "False", "--train_text_encoder", "false",
                                 "--gradient_checkpointing"])
    assert a.with_prior_preservation is False and a.train_text_encoder is False
    assert a.gradient_checkpointing is True


def test_unknown_key_is_named(tmp_path):
    cfg = write(tmp_path, "start_learning_rate: 1e-5\nlearning_rat: 3\n")
    with pytest.raises(UserError, match="learning_rat"):
        parse_train_args(["--train_config", cfg] + BASE)


@pytest.mark.parametrize("line,key", [("train_batch_size: two", "train_batch_size"),
                                      ("use_lora: maybe", "use_lora"),
                                      ("betas: 0.9", "betas"),
                                      ("start_learning_rate: [1, 2]", "start_learning_rate")])
def test_wrong_type_is_named(tmp_path, line, key):
    with pytest.raises(UserError, match=key):
        parse_train_args(["--train_config", write(tmp_path, line + "\n")] + BASE)


def test_missing_config_and_bad_combinations(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_train_args(["--train_config", str(tmp_path / "nope.yaml")] + BASE)
    with pytest.raises(UserError, match="instance_data_dir"):
        parse_train_args(["--instance_prompt", "x"])
    with pytest.raises(UserError, match="class_data_dir"):
        parse_train_args(BASE + ["--with_prior_preservation", "True"])
    with pytest.raises(UserError, match="train_text_encoder"):
        parse_train_args(BASE + ["--with_prior_preservation", "False", "--use_lora", "True",
                                 "--lora_ft_text_encoder", "True", "--train_text_encoder", "False"])
    with pytest.raises(UserError, match="end_learning_rate"):
        parse_train_args(BASE + ["--with_prior_preservation", "False", "--end_learning_rate", "1"])


def test_diffusers_aliases():
    a = parse_train_args(BASE + ["--with_prior_preservation", "False", "--output_dir", "o", "--resolution", "64",
                                 "--learning_rate", "1e-4", "--checkpointing_steps", "5", "--center_crop"])
    assert a.output_path == "o" and a.image_size == 64 and a.ckpt_save_steps == 5
    assert a.start_learning_rate == pytest.approx(1e-4) and a.random_crop is False


def test_architecture_configs():
    v1 = load_arch("configs/v1-inference.yaml")
    v2 = load_arch("configs/v2-inference.yaml")
    vp = load_arch("configs/v2-vpred-inference.yaml")
    assert (v1.version, v1.text.kind, v1.text.used_layers, v1.text.hidden_act) == ("sd1", "clip", 12, "quick_gelu")
    assert (v2.version, v2.text.layers, v2.text.used_layers, v2.text.hidden_act) == ("sd2", 24, 23, "gelu")
    assert [v2.unet.heads(level) for level in range(4)] == [5, 10, 20, 20]
    assert vp.schedule.parameterization == "v" and vp.image_size == 768
    assert v1.image_size == 512 and v1.text.pad_token == 49407 and v2.text.pad_token == 0
    for t in ("tiny-v1", "tiny-v2"):
        assert load_arch(f"configs/{t}-inference.yaml").image_size == 64


def test_mindone_style_text_encoder_config():
    """MindONE writes the 23 blocks it builds for SD2 and `use_quick_gelu` for SD1."""
    cfg = {"model": {"params": {
        "parameterization": "eps", "image_size": 64,
        "unet_config": {"params": {"in_channels": 4, "out_channels": 4, "model_channels": 320,
                                   "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                                   "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "context_dim": 1024,
                                   "use_linear_in_transformer": True}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {
            "use_fp16": True, "tokenizer": "BpeTokenizer", "context_length": 77, "vocab_size": 49408,
            "output_dim": 1024, "width": 1024, "layers": 23, "heads": 16, "epsilon": 1e-5, "use_quick_gelu": False}}}}}
    arch = parse_arch(cfg)
    assert arch.version == "sd2" and arch.text.layers == 24 and arch.text.used_layers == 23


def test_bad_architecture_config(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_arch(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {params: {}}\n")
    with pytest.raises(UserError, match="not an LDM model config"):
        load_arch(str(bad))

"""Weight files and layouts (may import the common.* base only).

- atomic writes live in common.atomic; checkpoint_io: .safetensors / torch pickle (torch_pickle:
  read without torch, no code run) / MindSpore .ckpt / diffusers folders, sniffed from content
- keymap: the original single-file layout <-> diffusers names, generated from the architecture
- mindspore_layout: the original layout <-> MindONE's MindSpore names (models and LoRA)
- lora: LoraSet and the diffusers / PEFT / kohya LoRA file formats
- init_weights: seeded random weights for any architecture (tiny test models)
- loading: any source a user names -> original-layout weights or a LoraSet
- conversion: what tools/model_conversion/convert_weights.py does
"""

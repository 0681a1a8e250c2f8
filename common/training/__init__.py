"""Training shared by both backends (may import every lower layer; nothing imports it but the
entry points and backends' trainers).

- train_args: train_dreambooth.py's flags (MindONE's names, diffusers' aliases), validated
- data: instance / class image folders, crops, flips, the DreamBooth batches
- class_images: class-image generation for prior preservation
- train_loop: the run folder, randomness per step, learning rate, checkpoints, resume, validation
"""

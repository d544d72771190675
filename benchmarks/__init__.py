"""Benchmarks and the papers' experiments, one file per experiment, each writing its own section of BENCHMARKS.md:

- sweep: seconds per iteration and peak memory of DRTune against T and K, next to full backprop (--full_size on a GPU)
- checkpointing: memory per trained step and time of each gradient checkpointing granularity
- fig7: Fig. 7, the LoRA gradient norm against K, with and without stop-gradient
- table1: a miniature Table 1, every method's main() for the same CPU budget
- drtune_ablation: Fig. 8 and 9, DRTune's reward gain against K and against m, on the tiny world
- preference: the training step of dpo.py (--dpo) and spo.py (--spo) against the batch size
- step_preference: whether a step-level win (SPO's comparison) carries to the final image, per step and CFG
- world_preference: offline DPO, online DPO (frozen and moving reference) and SPO on the world, same reward and CPU
  budget: reward gain per CPU second, prompts still drawn
- gallery: every --preset demo on the tiny world, one before/after row per method (docs/gallery.png)
- peers: alignprop.py and dpo.py next to TRL's AlignPropTrainer and diffusers' train_diffusion_dpo.py

Run one as `python -m benchmarks.<name>` from the repo root (or `python benchmarks/<name>.py`); --help lists its
flags. common.py holds what they share; full_size.py the random-weight published architectures.
"""

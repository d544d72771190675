"""Train the tiny world's models from the world alone, on CPU: an SD1.5-format pipeline and its reward models.

Phases (each resumable: a finished phase is skipped, the UNet phase restarts from its last checkpoint):

    data       training scenes (seeds 0..N-1, the held-out color-shape pairs excluded), rendered once
    vae        AutoencoderKL, 4x down-sampling (32 px -> 8x8x4 latents); L1 + MSE + small KL;
               scaling_factor = 1 / std of the latents, as SD's 0.18215 was chosen
    clip       a tiny CLIP (transformers CLIPModel, the real CLIP tokenizer) trained contrastively on the
               scenes and their captions; the reward models of the world
    unet       UNet2DConditionModel + CLIPTextModel (initialized from the tiny CLIP's text tower) trained jointly
               on epsilon with the SD1.5 noise schedule, min-SNR-5 weighting, a small noise offset (the high-noise
               steps of tiny latents keep the image's mean; DDIM samples from pure noise), 10% empty captions, EMA
    aesthetic  the LAION aesthetic-head layout on the tiny CLIP's image embeddings, regressed on a quality
               score the world defines (one large, centered, high-contrast shape without texture scores 10)
    export     tiny_models/world-sd15 (save_pretrained), tiny_models/world-clip (transformers CLIPModel folder
               + the same weights in open_clip's layout), tiny_models/world-aesthetic.safetensors, world.json
    sd3        an SD3-format world on the exported world-sd15's VAE and text encoder: SD3Transformer2DModel +
               CLIPTextModelWithProjection (the SD1.5 world's text tower, both CLIP slots, no T5) trained jointly
               with the flow-matching loss (logit-normal sigma, velocity target noise - x_0), 10% empty captions, EMA
    export-sd3 tiny_models/world-sd3 (StableDiffusion3Pipeline.save_pretrained, text_encoder_3 and tokenizer_3 null)

Run it with one torch thread per process (faster than two on these 2-core machines), in the background:

    OMP_NUM_THREADS=1 nice python tiny_models/build_world.py                 # the shipped models (~3.5 CPU hours)
    OMP_NUM_THREADS=1 nice python tiny_models/build_world.py --phases data,sd3,export-sd3   # the SD3 world alone
    OMP_NUM_THREADS=1 python tiny_models/build_world.py --smoke --work /tmp/w --out /tmp/w/out   # seconds
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import world  # noqa: E402

FULL = dict(num_scenes=100_000, vae_steps=3000, vae_batch=32, clip_steps=800, clip_batch=256,
            unet_steps=5500, unet_batch=64, unet_checkpoint_every=500, aesthetic_steps=1500, sd3_steps=4500)
SMOKE = dict(num_scenes=256, vae_steps=3, vae_batch=8, clip_steps=3, clip_batch=16, unet_steps=4, unet_batch=8,
             unet_checkpoint_every=2, aesthetic_steps=3, sd3_steps=4)
# The real SD1.5 scheduler settings; the scripts and the pipelines build DDPM / DDIM / DPM++ from them.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
                      clip_sample=False, timestep_spacing="leading", prediction_type="epsilon")
# The world-sd15 folder ships them as a DDIMScheduler, the scheduler it draws well with when loaded plainly
# (StableDiffusionPipeline.from_pretrained) and called at the pipeline's defaults, 50 steps and CFG 7.5: SD1.5's own
# PNDM drew the prompted background there about 20-40% of the time, DDIM 100% (README: The tiny world).
WORLD_SCHEDULER = "DDIMScheduler"
NOISE_OFFSET, MIN_SNR_GAMMA, EMPTY_CAPTION_PROB, EMA_DECAY = 0.1, 5.0, 0.1, 0.999
# The SD3 world's scheduler: SD3's FlowMatchEulerDiscreteScheduler file with shift 1 (8x8 latents need no shift
# toward noise; SD3's 3.0 is for 128x128 latents). Training draws sigma from a logit-normal(0, 1), as diffusers'
# SD3 examples do through a scheduler of this shift.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)
# A small SD3Transformer2DModel (joint attention, 2.4 M parameters): the prototype of TINY-WORLD.md.
SD3_TRANSFORMER = dict(sample_size=world.RESOLUTION // 4, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                       attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128,
                       caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=16)


def log(*parts):
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def done(work, phase):
    return os.path.exists(os.path.join(work, f"{phase}.done"))


def mark_done(work, phase, **info):
    write_json(os.path.join(work, f"{phase}.done"), info)


def atomic_save(save, path):
    """save(tmp_path), then rename: a killed build never leaves a torn file."""
    tmp = path + ".tmp"
    save(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def to_tensor(images):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------


def phase_data(work, cfg):
    images, captions, scenes = world.dataset(range(cfg["num_scenes"]))
    np.save(os.path.join(work, "images.npy"), images)
    with open(os.path.join(work, "scenes.json"), "w") as f:
        json.dump(dict(captions=captions, scenes=scenes), f)


def load_data(work):
    images = np.load(os.path.join(work, "images.npy"))
    with open(os.path.join(work, "scenes.json")) as f:
        meta = json.load(f)
    return images, meta["captions"], meta["scenes"]


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=world.RESOLUTION)


def phase_vae(work, cfg, seed):
    torch.manual_seed(seed)
    images, _, _ = load_data(work)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(cfg["vae_steps"]):
        set_lr(optimizer, lr_at(step, cfg["vae_steps"], 1e-3, 100))
        x = to_tensor(images[torch.randint(len(images), (cfg["vae_batch"],), generator=generator).numpy()])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == cfg["vae_steps"] - 1:
            log(f"vae step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    vae.eval()
    with torch.no_grad():  # scaling factor: unit std of the latents, as for SD (0.18215)
        sample = to_tensor(images[: min(2048, len(images))])
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(256)])
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        held_out, _, _ = world.dataset(range(10**7, 10**7 + 256), held_out="any")
        x = to_tensor(held_out)
        error = (vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean().item() * 127.5
    vae.save_pretrained(os.path.join(work, "vae"))
    return dict(seconds=time.time() - start, scaling_factor=vae.config.scaling_factor, heldout_mae_255=error)


def world_tokenizer():
    """A CLIP byte-level BPE tokenizer whose merges make every word of the world one token (~560 ids instead of
    CLIP's 49,408: small embeddings, faster text learning). Special tokens last, so EOS is the largest id (CLIP
    pools its text at argmax(input_ids)). Any text still tokenizes, byte by byte."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]  # GPT-2 byte alphabet
    words = ["a", "on", "the", "and", "background", *world.COLORS, *world.SHAPES, *world.POSITIONS]
    merges = []

    def pieces(word):
        parts, ranks = [*word[:-1], word[-1] + "</w>"], {m: i for i, m in enumerate(merges)}
        while len(parts) > 1:
            pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    while any(len(pieces(w)) > 1 for w in words):
        for w in words:
            while len(parts := pieces(w)) > 1:
                merges.append((parts[0], parts[1]))
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)
    for w in words:
        assert len(tokenizer(w).input_ids) == 3, w  # BOS, the word, EOS
    return tokenizer


CLIP_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="gelu")  # + the tokenizer's vocabulary and special ids
CLIP_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   image_size=world.RESOLUTION, patch_size=4, hidden_act="gelu")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # OpenAI CLIP's


def clip_pixels(images):
    """(N, H, W, 3) uint8 -> CLIP input with OpenAI CLIP's mean/std (the world is already at the input size)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def phase_clip(work, cfg, seed):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    images, captions, _ = load_data(work)
    tokenizer = world_tokenizer()
    text_config = dict(CLIP_TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=CLIP_VISION, projection_dim=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(cfg["clip_steps"]):
        set_lr(optimizer, lr_at(step, cfg["clip_steps"], 1e-3, 100))
        idx = torch.randint(len(images), (cfg["clip_batch"],), generator=generator).numpy()
        texts = [captions[i] for i in idx]
        # captions are short: 32 tokens hold every caption of the grammar, and with the causal mask the pooled
        # (EOS) state is the same as at 77
        tokens = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        image_embeds = F.normalize(model.get_image_features(pixel_values=clip_pixels(images[idx])).pooler_output, dim=-1)
        text_embeds = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
        logits = model.logit_scale.exp() * image_embeds @ text_embeds.T
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)  # duplicates are positives
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 200 == 0 or step == cfg["clip_steps"] - 1:
            log(f"clip step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.save_pretrained(os.path.join(work, "clip"))
    tokenizer.save_pretrained(os.path.join(work, "clip"))
    return dict(seconds=time.time() - start, final_loss=loss.item())


def make_unet(cross_attention_dim):
    from diffusers import UNet2DConditionModel

    latent = world.RESOLUTION // 4
    return UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(48, 96), norm_num_groups=16,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def save_training_state(ckpt_dir, params, ema, optimizer, step):
    """A model phase's parameters, EMA and optimizer, each file written aside and renamed; state.json last."""
    from safetensors.torch import save_file
    os.makedirs(ckpt_dir, exist_ok=True)
    for name, tensors in (("params", params), ("ema", ema)):  # keys p0, p1, ...: the flat parameter list
        atomic_save(lambda p: save_file({f"p{i}": t.detach().contiguous() for i, t in enumerate(tensors)}, p),
                    os.path.join(ckpt_dir, f"{name}.safetensors"))
    atomic_save(lambda p: torch.save(optimizer.state_dict(), p), os.path.join(ckpt_dir, "optimizer.pt"))
    atomic_save(lambda p: write_json(p, dict(step=step)), os.path.join(ckpt_dir, "state.json"))


def load_training_state(ckpt_dir, params, ema, optimizer):
    """What save_training_state wrote, into params, ema and optimizer; returns the step."""
    from safetensors.torch import load_file
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        step = json.load(f)["step"]
    for name, tensors in (("params", params), ("ema", ema)):
        loaded = load_file(os.path.join(ckpt_dir, f"{name}.safetensors"))
        with torch.no_grad():
            for i, t in enumerate(tensors):
                t.copy_(loaded[f"p{i}"])
    optimizer.load_state_dict(torch.load(os.path.join(ckpt_dir, "optimizer.pt"), weights_only=True))
    return step


@contextlib.contextmanager
def ema_weights(params, ema):
    """Inside, params hold the EMA weights; their training values come back after."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


def save_pipeline_atomically(pipe, path):
    """pipe.save_pretrained into path.tmp, then renamed into place (a killed build never leaves a torn folder)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def encode_latents(vae, images):
    """Posterior mean and std of every training image, scaled (sampled afresh at each step)."""
    means, stds = [], []
    with torch.no_grad():
        for chunk in np.array_split(images, max(1, len(images) // 512)):
            dist = vae.encode(to_tensor(chunk)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means) * vae.config.scaling_factor, torch.cat(stds) * vae.config.scaling_factor


def phase_unet(work, cfg, seed):
    from diffusers import AutoencoderKL, DDPMScheduler
    from safetensors.torch import load_file, save_file
    from transformers import CLIPModel, CLIPTextModel

    images, captions, _ = load_data(work)
    tokenizer = world_tokenizer()
    vae = AutoencoderKL.from_pretrained(os.path.join(work, "vae")).eval()
    latents_path = os.path.join(work, "latents.safetensors")
    if not os.path.exists(latents_path):
        mean, std = encode_latents(vae, images)
        atomic_save(lambda p: save_file(dict(mean=mean.contiguous(), std=std.contiguous()), p), latents_path)
    stored = load_file(latents_path)
    latent_mean, latent_std = stored["mean"], stored["std"]
    tokens = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    empty = tokens[-1]
    tokens = tokens[:-1]

    torch.manual_seed(seed)
    clip = CLIPModel.from_pretrained(os.path.join(work, "clip"))
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = make_unet(text_encoder.config.hidden_size)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    noise_scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    abar = noise_scheduler.alphas_cumprod
    snr = abar / (1 - abar)
    loss_weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # min-SNR-gamma for epsilon prediction

    ckpt_dir, step = os.path.join(work, "unet-ckpt"), 0
    if os.path.exists(os.path.join(ckpt_dir, "state.json")):
        step = load_training_state(ckpt_dir, params, ema, optimizer)
        log(f"unet: resumed at step {step}")

    start, losses = time.time(), []
    total = cfg["unet_steps"]
    while step < total:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the same batches after a resume
        set_lr(optimizer, lr_at(step, total, 1e-3, 200))
        idx = torch.randint(len(images), (cfg["unet_batch"],), generator=generator)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        ids = tokens[idx].clone()
        ids[torch.rand(len(idx), generator=generator) < EMPTY_CAPTION_PROB] = empty
        noise = torch.randn(x0.shape, generator=generator)
        noise = noise + NOISE_OFFSET * torch.randn((len(idx), x0.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, 1000, (len(idx),), generator=generator)
        xt = noise_scheduler.add_noise(x0, noise, t)
        states = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=states).sample
        loss = ((pred - noise) ** 2).mean((1, 2, 3)) @ loss_weight[t] / len(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"unet step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - start:.0f} s)")
        if step % cfg["unet_checkpoint_every"] == 0 or step == total:
            save_training_state(ckpt_dir, params, ema, optimizer, step)
            save_world_pipeline(work, unet, text_encoder, ema, params, os.path.join(work, "pipeline-ema"))
    return dict(seconds=time.time() - start, steps=step, final_loss=float(np.mean(losses[-100:])) if losses else None)


def world_scheduler():
    """The scheduler world-sd15 ships (WORLD_SCHEDULER with SD1.5's settings, every key written out)."""
    import diffusers
    return getattr(diffusers, WORLD_SCHEDULER).from_config(SD15_SCHEDULER)


def write_world_scheduler(path):
    """Put the world's scheduler into the pipeline folder `path`: scheduler/scheduler_config.json and its entry in
    model_index.json (so that an export of a work folder saved with another scheduler ships this one)."""
    world_scheduler().save_pretrained(os.path.join(path, "scheduler"))
    index_path = os.path.join(path, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", WORLD_SCHEDULER]
    with open(index_path, "w") as f:  # as diffusers writes it
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_world_pipeline(work, unet, text_encoder, ema, params, path):
    """The EMA weights as an SD1.5-format pipeline folder (written aside, then renamed into place)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(os.path.join(work, "vae")),
                                   text_encoder=text_encoder, tokenizer=world_tokenizer(), unet=unet,
                                   scheduler=world_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with ema_weights(params, ema):
        save_pipeline_atomically(pipe, path)


def sd3_text_encoder(out):
    """CLIPTextModelWithProjection from the exported SD1.5 world's text encoder (transformers 5: its state dict has
    no text_model. prefix, this one's has) and the world CLIP's text projection."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(os.path.join(out, "world-sd15", "text_encoder"))
    config.projection_dim = config.hidden_size
    encoder = CLIPTextModelWithProjection(config)
    base = load_file(os.path.join(out, "world-sd15", "text_encoder", "model.safetensors"))
    clip = load_file(os.path.join(out, "world-clip", "model.safetensors"))
    state = {f"text_model.{k.removeprefix('text_model.')}": v for k, v in base.items()}
    state["text_projection.weight"] = clip["text_projection.weight"]
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return encoder


def sd3_conditioning(text_encoder, ids):
    """What StableDiffusion3Pipeline.encode_prompt builds with one CLIP tower in both CLIP slots, no T5 and
    max_sequence_length=77: the penultimate states side by side (B, 77, 128), then 77 zero tokens for the empty T5
    slot (B, 154, 128); pooled = both projections side by side (B, 128). The pipeline's default of 256 zero tokens
    would cost 2.5x per training step here, so the world is sampled with max_sequence_length=77 (the demo presets'
    --max_sequence_length; pass it to the pipeline too)."""
    out = text_encoder(ids, output_hidden_states=True)
    states = torch.cat([out.hidden_states[-2]] * 2, dim=-1)
    return torch.cat([states, torch.zeros_like(states)], dim=1), torch.cat([out.text_embeds] * 2, dim=-1)


def phase_sd3(work, out, cfg, seed):
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from safetensors.torch import load_file, save_file

    images, captions, _ = load_data(work)
    tokenizer = world_tokenizer()
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "world-sd15", "vae")).eval()
    latents_path = os.path.join(work, "sd3-latents.safetensors")
    if not os.path.exists(latents_path):
        mean, std = encode_latents(vae, images)
        atomic_save(lambda p: save_file(dict(mean=mean.contiguous(), std=std.contiguous()), p), latents_path)
    stored = load_file(latents_path)
    latent_mean, latent_std = stored["mean"], stored["std"]
    tokens = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt").input_ids
    empty, tokens = tokens[-1], tokens[:-1]

    torch.manual_seed(seed)
    text_encoder = sd3_text_encoder(out)
    transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    ckpt_dir, step = os.path.join(work, "sd3-ckpt"), 0
    if os.path.exists(os.path.join(ckpt_dir, "state.json")):
        step = load_training_state(ckpt_dir, params, ema, optimizer)
        log(f"sd3: resumed at step {step}")

    start, losses, total = time.time(), [], cfg["sd3_steps"]
    while step < total:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)  # the same batches after a resume
        set_lr(optimizer, lr_at(step, total, 1e-3, 200))
        idx = torch.randint(len(images), (cfg["unet_batch"],), generator=generator)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=generator)
        ids = tokens[idx].clone()
        ids[torch.rand(len(idx), generator=generator) < EMPTY_CAPTION_PROB] = empty
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=generator)).view(-1, 1, 1, 1)  # logit-normal(0, 1)
        xt = (1 - sigma) * x0 + sigma * noise
        states, pooled = sd3_conditioning(text_encoder, ids)
        pred = transformer(xt, encoder_hidden_states=states, pooled_projections=pooled,
                           timestep=sigma.flatten() * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"sd3 step {step} loss {np.mean(losses[-100:]):.4f} ({time.time() - start:.0f} s)")
        if step % cfg["unet_checkpoint_every"] == 0 or step == total:
            save_training_state(ckpt_dir, params, ema, optimizer, step)
            save_sd3_pipeline(out, transformer, text_encoder, ema, params, os.path.join(work, "sd3-pipeline-ema"))
    return dict(seconds=time.time() - start, steps=step, final_loss=float(np.mean(losses[-100:])) if losses else None)


def save_sd3_pipeline(out, transformer, text_encoder, ema, params, path):
    """The EMA weights as a StableDiffusion3Pipeline folder: the one text encoder in both CLIP slots, no T5 (load it
    with text_encoder_3=None, tokenizer_3=None; the scripts here read the components themselves). The VAE gets
    shift_factor 0 (the SD3 pipelines decode latents / scaling_factor + shift_factor)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vae = AutoencoderKL.from_pretrained(os.path.join(out, "world-sd15", "vae"))
    vae.register_to_config(shift_factor=0.0)
    tokenizer = world_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder, tokenizer_2=tokenizer, text_encoder_3=None,
                                    tokenizer_3=None)
    with ema_weights(params, ema):
        save_pipeline_atomically(pipe, path)


def quality(scene):
    """The world's 'aesthetic' score in [1, 10]: one clean shape, large, centered, high contrast, no texture."""
    shapes = scene["shapes"]
    bg = np.array(world.COLORS[scene["background"]], dtype=np.float32)
    size = np.mean([np.clip((s["size"] - 0.28) / (0.55 - 0.28), 0, 1) for s in shapes])
    centered = np.mean([1 - min(1.0, math.hypot(s["x"] - 0.5, s["y"] - 0.5) / 0.4) for s in shapes])
    contrast = np.mean([np.linalg.norm(np.array(world.COLORS[s["color"]]) - bg) / 441.7 for s in shapes])
    score = 0.3 * (len(shapes) == 1) + 0.25 * size + 0.2 * centered + 0.15 * contrast + 0.1 * (scene["texture"] is None)
    return 1 + 9 * float(score)


def phase_aesthetic(work, cfg, seed):
    from transformers import CLIPModel

    sys.path.insert(0, os.path.dirname(HERE))
    import rewards

    torch.manual_seed(seed)
    images, _, scenes = load_data(work)
    clip = CLIPModel.from_pretrained(os.path.join(work, "clip")).eval()
    n = min(len(images), 20_000)
    with torch.no_grad():
        embeds = torch.cat([F.normalize(clip.get_image_features(pixel_values=clip_pixels(chunk)).pooler_output, dim=-1)
                            for chunk in np.array_split(images[:n], max(1, n // 1024))])
    target = torch.tensor([quality(s) for s in scenes[:n]])
    head = rewards._AestheticMLP(clip.config.projection_dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    split = int(0.9 * n)
    head.train()
    for step in range(cfg["aesthetic_steps"]):
        set_lr(optimizer, lr_at(step, cfg["aesthetic_steps"], 1e-3, 50))
        idx = torch.randint(split, (256,), generator=generator)
        loss = F.mse_loss(head(embeds[idx]), target[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        pred = head(embeds[split:])
        corr = float(np.corrcoef(pred.numpy(), target[split:].numpy())[0, 1]) if n - split > 1 else float("nan")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, os.path.join(work, "aesthetic.safetensors"))
    log(f"aesthetic: held-out correlation {corr:.3f}")
    return dict(heldout_correlation=corr)


def open_clip_config(config):
    """open_clip model config equivalent to the transformers CLIP config (GELU, not QuickGELU)."""
    t, v = config.text_config, config.vision_config
    return dict(embed_dim=config.projection_dim,
                vision_cfg=dict(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                                layers=v.num_hidden_layers, head_width=v.hidden_size // v.num_attention_heads,
                                mlp_ratio=v.intermediate_size / v.hidden_size),
                text_cfg=dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                              heads=t.num_attention_heads, layers=t.num_hidden_layers,
                              mlp_ratio=t.intermediate_size / t.hidden_size,
                              hf_tokenizer_name="."))  # the world tokenizer, in the config's own folder


def to_open_clip_state_dict(model):
    """transformers CLIPModel weights in open_clip's key layout (fused in_proj, projections transposed)."""
    sd = model.state_dict()
    out = {}

    def blocks(prefix_in, prefix_out, layers):
        for i in range(layers):
            a, b = f"{prefix_in}.encoder.layers.{i}", f"{prefix_out}.resblocks.{i}"
            out[f"{b}.ln_1.weight"], out[f"{b}.ln_1.bias"] = sd[f"{a}.layer_norm1.weight"], sd[f"{a}.layer_norm1.bias"]
            out[f"{b}.ln_2.weight"], out[f"{b}.ln_2.bias"] = sd[f"{a}.layer_norm2.weight"], sd[f"{a}.layer_norm2.bias"]
            for kind in ("weight", "bias"):
                out[f"{b}.attn.in_proj_{kind}"] = torch.cat([sd[f"{a}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{b}.attn.out_proj.{kind}"] = sd[f"{a}.self_attn.out_proj.{kind}"]
                out[f"{b}.mlp.c_fc.{kind}"] = sd[f"{a}.mlp.fc1.{kind}"]
                out[f"{b}.mlp.c_proj.{kind}"] = sd[f"{a}.mlp.fc2.{kind}"]

    v, t = "vision_model", "text_model"
    out["visual.class_embedding"] = sd[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[f"{v}.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = sd[f"{v}.pre_layrnorm.weight"], sd[f"{v}.pre_layrnorm.bias"]
    blocks(v, "visual.transformer", model.config.vision_config.num_hidden_layers)
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = sd[f"{v}.post_layernorm.weight"], sd[f"{v}.post_layernorm.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = sd[f"{t}.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[f"{t}.embeddings.position_embedding.weight"]
    blocks(t, "transformer", model.config.text_config.num_hidden_layers)
    out["ln_final.weight"], out["ln_final.bias"] = sd[f"{t}.final_layer_norm.weight"], sd[f"{t}.final_layer_norm.bias"]
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out


def phase_export(work, out):
    from transformers import CLIPImageProcessor, CLIPModel

    os.makedirs(out, exist_ok=True)
    world.write_json(os.path.join(out, "world.json"))
    for name, source in (("world-sd15", "pipeline-ema"),):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        shutil.copytree(os.path.join(work, source), os.path.join(out, name))
        write_world_scheduler(os.path.join(out, name))
    clip_dir = os.path.join(out, "world-clip")
    shutil.rmtree(clip_dir, ignore_errors=True)
    clip = CLIPModel.from_pretrained(os.path.join(work, "clip"))
    clip.save_pretrained(clip_dir)
    world_tokenizer().save_pretrained(clip_dir)
    size = world.RESOLUTION
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(clip_dir)
    with open(os.path.join(clip_dir, "open_clip_config.json"), "w") as f:
        json.dump(open_clip_config(clip.config), f, indent=2)
    torch.save({"state_dict": to_open_clip_state_dict(clip)}, os.path.join(clip_dir, "open_clip_model.pt"))
    shutil.copy(os.path.join(work, "aesthetic.safetensors"), os.path.join(out, "world-aesthetic.safetensors"))


def phase_export_sd3(work, out):
    shutil.rmtree(os.path.join(out, "world-sd3"), ignore_errors=True)
    shutil.copytree(os.path.join(work, "sd3-pipeline-ema"), os.path.join(out, "world-sd3"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=os.path.join(HERE, ".world-build"), help="phase outputs (resumable)")
    parser.add_argument("--out", default=HERE, help="where the shipped folders go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of each phase on a small subset")
    parser.add_argument("--unet_steps", type=int, default=None, help="override the UNet phase's length")
    parser.add_argument("--sd3_steps", type=int, default=None, help="override the SD3 phase's length")
    parser.add_argument("--phases", default="data,vae,clip,unet,aesthetic,export,sd3,export-sd3")
    args = parser.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.unet_steps is not None:
        cfg["unet_steps"] = args.unet_steps
    if args.sd3_steps is not None:
        cfg["sd3_steps"] = args.sd3_steps
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.work, exist_ok=True)
    phases = dict(data=lambda: phase_data(args.work, cfg), vae=lambda: phase_vae(args.work, cfg, args.seed),
                  clip=lambda: phase_clip(args.work, cfg, args.seed), unet=lambda: phase_unet(args.work, cfg, args.seed),
                  aesthetic=lambda: phase_aesthetic(args.work, cfg, args.seed),
                  export=lambda: phase_export(args.work, args.out),
                  sd3=lambda: phase_sd3(args.work, args.out, cfg, args.seed),
                  **{"export-sd3": lambda: phase_export_sd3(args.work, args.out)})
    for name in args.phases.split(","):
        if not name.startswith("export") and done(args.work, name):
            log(f"{name}: done already")
            continue
        log(f"{name}: start")
        start = time.process_time()
        info = phases[name]() or {}
        mark_done(args.work, name, cpu_seconds=time.process_time() - start, **info)
        log(f"{name}: done {info}")


if __name__ == "__main__":
    main()

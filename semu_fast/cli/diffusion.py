"""`semu-fast unlearn-ddpm` and `semu-fast unlearn-sd`: SEMU on diffusion models (diffusers).

    semu-fast unlearn-ddpm --forget-class 3 --out ddpm_out
    semu-fast unlearn-sd --model ./sd-folder --forget-prompt "a photo of a cat" --anchor-prompt "a photo" --out sd_out
    semu-fast unlearn-sd --preset official --model ./sd-folder --images cats/ --forget-prompt "an image of a cat" \
        --anchor-prompt "an image of a dog" --retain-prompt "an image of a dog" --retain-images dogs/ --out sd_out

unlearn-ddpm: the embedded digits DDPM (a tiny class-conditional UNet2DModel trained on scikit-learn's 8x8 digits,
cached) forgets --forget-class; a digits classifier labels samples of every class before and after; writes
out/metrics.json and out/adapters (sf.load_adapters). unlearn-sd: concept removal on a local Stable-Diffusion-style
folder (unet/, text_encoder/, tokenizer/; scheduler/ and vae/ optional); writes out/metrics.json, out/adapters,
report.md with sample grids of every prompt before and after and, with --save-unet, the merged UNet in out/unet
(--lora: a diffusers LoRA in out/lora). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

from .._utils import default_cache
from ._common import (add_device_flag, add_preset_flag, add_run_flags, add_training_flags, finish_run, gamma,
                      library_error, named_paths, non_negative, non_negative_int, positive, preset_options,
                      require, settings, silence)


def register(subparsers) -> None:
    """Add the `unlearn-ddpm` and `unlearn-sd` subcommands to an argparse subparsers object."""
    _register_ddpm(subparsers)
    _register_sd(subparsers)


def _register_ddpm(subparsers) -> None:
    from ..workflows.diffusion import DIGITS_TRAIN_STEPS

    ddpm = subparsers.add_parser("unlearn-ddpm", help="forget a class of the embedded digits DDPM with SEMU",
                                 description="The embedded digits DDPM forgets --forget-class with SEMU; a digits "
                                 "classifier labels generated samples before and after.")
    g = ddpm.add_argument_group("model")
    g.add_argument("--forget-class", type=int, default=0, help="digit to forget (default 0)")
    g.add_argument("--cache-dir", type=Path, default=None, help="where the trained DDPM and classifier are cached "
                   "(default $SEMU_FAST_CACHE or ~/.cache/semu_fast)")
    g.add_argument("--train-steps", type=positive(int), default=DIGITS_TRAIN_STEPS,
                   help=f"training steps of the digits DDPM when it is not cached (default {DIGITS_TRAIN_STEPS})")
    g.add_argument("--classifier", type=Path, default=None, metavar="FILE",
                   help="state dict of semu_fast.workflows.digits.digits_cnn to label samples (default: the cached "
                   "one, trained here the first time)")
    add_device_flag(g)
    g = ddpm.add_argument_group("SEMU")
    add_preset_flag(g, "sf.preset('official-ddpm'): its projection and rank rule without a floor, guided and "
                    "clipped gradient pass, target class c + 1, class dropout, 1000 steps, no remain loss "
                    "(--alpha 1e-3: its retain variant)")
    add_training_flags(g, gamma_default=0.95, lr=1e-3, what=", Adam")
    g.add_argument("--attention-gamma", type=gamma, default=1.0, help="gamma of the attention projections "
                   "(default 1.0, as the official DDPM code)")
    g.add_argument("--attention-layout", choices=("per_column", "matrix"), default="per_column",
                   help="per_column (default): one rank-1 adapter per input column of each attention projection, "
                   "as the official DDPM's 1x1-conv attention (about C trainable entries); matrix: one adapter "
                   "per projection (up to C^2)")
    g.add_argument("--alpha", type=non_negative, default=1.0,
                   help="weight of the remain loss (standard loss on the other classes); 0: forget loss only")
    g.add_argument("--steps", type=positive(int), default=600,
                   help="optimizer steps, cycling over the forget class (default 600, measured on the digits "
                   "DDPM; official and unlearn_ddpm's default: 1000)")
    g.add_argument("--batch-size", type=positive(int), default=64)
    g = ddpm.add_argument_group("evaluation")
    g.add_argument("--samples-per-class", type=positive(int), default=50)
    g.add_argument("--inference-steps", type=positive(int), default=50, help="DDIM steps per sample")
    g.add_argument("--grid-samples", type=non_negative_int, default=4, metavar="N",
                   help="N samples per class, from the same seeds before and after, drawn as samples_before.png / "
                   "samples_after.png next to report.md (0: none)")
    g.add_argument("--guidance-scale", type=non_negative, default=1.0,
                   help="classifier-free guidance of the samples (default 1: none)")
    add_run_flags(ddpm.add_argument_group("run"), "semu_fast_ddpm_out",
                  "metrics.json, adapters/, report.md and the sample grids")
    ddpm.set_defaults(func=run_ddpm, parser=ddpm)


def _register_sd(subparsers) -> None:
    from ..workflows.stable_diffusion import SD_PRESETS

    sd = subparsers.add_parser("unlearn-sd", help="remove a concept from a local Stable Diffusion UNet with SEMU",
                               description="Concept removal: the noise prediction under the forget prompt is "
                               "pulled towards the prediction under the anchor prompt; only the chosen layers "
                               "change.")
    g = sd.add_argument_group("model, prompts and data")
    g.add_argument("--model", type=Path, required=True, help="local folder with unet/, text_encoder/ and "
                   "tokenizer/ subfolders (scheduler/ and vae/ optional), as a diffusers pipeline saves them")
    g.add_argument("--forget-prompt", action="append", required=True, metavar="TEXT",
                   help="prompt of the concept to remove; repeat for several")
    g.add_argument("--anchor-prompt", action="append", default=None, metavar="TEXT",
                   help="prompt to steer to (paired with the forget prompts when as many, else one or random); "
                   "default: the empty prompt")
    g.add_argument("--retain-prompt", action="append", default=None, metavar="TEXT",
                   help="prompt of data to keep: each step adds --retain-weight x the plain denoising loss on "
                   "its latents (--retain-images, else sampled); repeat for several")
    g.add_argument("--retain-weight", type=non_negative, default=None, metavar="W",
                   help="weight of the retain loss (default 0.1, the official --retrain alpha, with "
                   "--retain-prompt; else 0)")
    g.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="PNG/JPG images of the concept, encoded by the folder's vae/ (resized to the UNet's "
                   "sample size x the VAE's scale); image i shows forget prompt i mod the number of prompts. "
                   "Default: latents sampled from the frozen UNet")
    g.add_argument("--retain-images", type=Path, default=None, metavar="DIR",
                   help="images to keep, likewise, for --retain-prompt")
    add_device_flag(g)
    g = sd.add_argument_group("SEMU")
    add_preset_flag(g, "sf.preset('official-sd'): every Linear and Conv2d, its projection and rank rule without a "
                    "floor, exact SVD, guidance 7.5, Adam 1e-5, batch 8, 5 epochs, latents in order",
                    moved=dict.fromkeys(SD_PRESETS, "--layers"))
    g.add_argument("--layers", choices=tuple(SD_PRESETS), default="xattn",
                   help="layers to change: xattn (every attn2 projection, default), xattn-kv (attn2.to_k/to_v), "
                   "all (the official preset's)")
    add_training_flags(g, gamma_default=0.95, lr=1e-5, epochs=5, what=", Adam, as the official SD run")
    g.add_argument("--attention-gamma", type=gamma, default=None,
                   help="gamma of the attention projections (default: same as --gamma)")
    g.add_argument("--num-latents", type=positive(int), default=16,
                   help="latents of the concept (and of the retain prompts), sampled from the frozen UNet when "
                   "no images are given")
    g.add_argument("--sample-steps", type=positive(int), default=20,
                   help="DDIM steps to sample them and the report's grids")
    g.add_argument("--guidance", type=non_negative, default=7.5,
                   help="guidance scale for sampling and in the gradient pass (official 7.5)")
    g.add_argument("--batch-size", type=positive(int), default=8)
    g = sd.add_argument_group("output")
    add_run_flags(g, "semu_fast_sd_out", "metrics.json, adapters/, report.md and the sample grids (and unet/, lora/)")
    g.add_argument("--grid-samples", type=non_negative_int, default=2, metavar="N",
                   help="N samples per forget, anchor and retain prompt, from the same seeds before and after, drawn "
                   "as samples_before.png / samples_after.png next to report.md (decoded by vae/ when the model "
                   "folder has one, else the latents' first 3 channels); 0: none")
    g.add_argument("--save-unet", action="store_true", help="also save the UNet with R merged in, out/unet")
    g.add_argument("--lora", action="store_true", help="also export the adapters as a diffusers LoRA folder out/lora "
                   "(conv adapters, which have no LoRA form, are skipped)")
    sd.set_defaults(func=run_sd, parser=sd)


def run_ddpm(args, parser) -> int:
    import torch

    from ..workflows import diffusion as D, results
    from ..workflows.classification import pretrained_digits_cnn
    from ..workflows.digits import DIGITS_NUM_CLASSES, digits_cnn
    from ..workflows.models import load_checkpoint

    require(parser, "diffusers")
    if args.quiet:
        silence("diffusers")
    if not 0 <= args.forget_class < DIGITS_NUM_CLASSES:
        parser.error(f"argument --forget-class: must be in [0, {DIGITS_NUM_CLASSES}), got {args.forget_class}")
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache()
    device = args.device
    if args.classifier is not None:
        try:
            classifier = load_checkpoint(digits_cnn(), args.classifier)
        except (OSError, ValueError) as err:
            parser.error(f"argument --classifier: cannot load a digits_cnn state dict: {err}")
        classifier.to(device)
    else:
        classifier = pretrained_digits_cnn(cache_dir, args.seed, progress=not args.quiet, device=device)
    classifier.eval()
    torch.manual_seed(args.seed)
    unet, scheduler = D.pretrained_digits_ddpm(cache_dir, args.seed, args.train_steps, progress=not args.quiet,
                                               device=device)
    evaluate = dict(samples_per_class=args.samples_per_class, num_inference_steps=args.inference_steps,
                    guidance_scale=args.guidance_scale, seed=args.seed)
    before = D.classifier_metrics(unet, scheduler, classifier, args.forget_class, **evaluate)
    grid_labels = torch.arange(DIGITS_NUM_CLASSES).repeat_interleave(args.grid_samples)

    def grid(model):  # the same seed before and after: each cell starts from the same noise
        return D.to_unit_range(D.sample(model, scheduler, grid_labels, args.inference_steps,
                                        torch.Generator().manual_seed(args.seed),
                                        guidance_scale=args.guidance_scale))

    grid_before = grid(unet) if args.grid_samples else None
    forget, remain = D.digits_loaders(args.seed, args.forget_class, args.batch_size)
    flags = {"alpha": args.alpha, "gamma": args.gamma, "attention_gamma": args.attention_gamma,
             "attention_layout": args.attention_layout, "lr": args.lr, "steps": args.steps}
    if args.preset == "official":
        options = preset_options("official-ddpm", args, flags, seed=args.seed)
    else:
        options = {**flags, "seed": args.seed}
    semu_model, report, trained = D.unlearn_ddpm(unet, scheduler, forget, args.forget_class,
                                                 remain if options["alpha"] > 0 else None,
                                                 num_classes=DIGITS_NUM_CLASSES, progress=not args.quiet, **options)
    after = D.classifier_metrics(semu_model, scheduler, classifier, args.forget_class, **evaluate)
    metrics = {"forget_class_rate_before": before["forget_class_rate"],
               "forget_class_rate_after": after["forget_class_rate"],
               "other_accuracy_before": before["other_accuracy"], "other_accuracy_after": after["other_accuracy"],
               "other_accuracy_drop": before["other_accuracy"] - after["other_accuracy"],
               "per_class_accuracy_before": before["per_class_accuracy"],
               "per_class_accuracy_after": after["per_class_accuracy"],
               **trained, "total_params": report.total_params, "semu_settings": options}
    files = results.write_run(args.out, semu_model, report, metrics, settings(args, options, flags), "unlearn-ddpm")
    if args.grid_samples:
        results.write_samples(args.out, grid_before, grid(semu_model), [f"class {c}" for c in
                                                                        range(DIGITS_NUM_CLASSES)])
        files.append(results.SAMPLES)
    files += results.render(args.out, samples=bool(args.grid_samples))
    results.record_run(args.out, files, [*named_paths(args), cache_dir])
    return finish_run(args.out, files, [
        f"{'samples labelled as their class (%)':36s} {'before':>8s} {'after':>8s}",
        f"{'forgotten class ' + str(args.forget_class):36s} {before['forget_class_rate']:8.1f} "
        f"{after['forget_class_rate']:8.1f}",
        f"{'other classes':36s} {before['other_accuracy']:8.1f} {after['other_accuracy']:8.1f}",
        f"trainable: {report.trainable_params} of {report.total_params} parameters in {len(report.layers)} layers",
        "trainable share (%): " + ", ".join(f"{part} {value['trainable_share']:.4f}"
                                            for part, value in trained["trainable_split"].items())])


def _encode_folder(parser, flag: str, folder, vae, unet):
    """Latents of the images in `folder` through the VAE, sized for the UNet; parser errors name `flag`."""
    from ..workflows import sd_images
    from ..workflows.diffusion import sample_size

    if vae is None:
        parser.error(f"argument {flag}: the model folder has no vae/ to encode images with")
    size = sample_size(unet)[0] * sd_images.vae_scale_factor(vae)
    try:
        return sd_images.encode_images(vae, sd_images.load_images(folder, size))
    except (OSError, ValueError) as err:
        parser.error(f"argument {flag}: {err}")


def run_sd(args, parser) -> int:
    from ..workflows import results, sd_images, stable_diffusion as SD

    require(parser, "diffusers", "transformers")
    if args.quiet:
        silence("diffusers", "transformers")
    if args.save_unet and args.out.resolve() == args.model.resolve():
        parser.error(f"argument --out: {args.out} is the --model folder; --save-unet would replace its unet/ with the "
                     f"merged one (give another --out)")
    retain_prompts = args.retain_prompt or []
    if args.retain_images is not None and not retain_prompts:
        parser.error("argument --retain-images: needs --retain-prompt (the prompt of those images)")
    retain_weight = args.retain_weight if args.retain_weight is not None else (0.1 if retain_prompts else 0.0)
    if retain_weight > 0 and not retain_prompts:
        parser.error("argument --retain-weight: needs --retain-prompt (the prompts of the data to keep)")
    if retain_prompts and retain_weight == 0:
        parser.error("argument --retain-weight: 0 would ignore --retain-prompt; give a weight > 0 (the official "
                     "--retrain uses 0.1)")
    try:
        unet, text_encoder, tokenizer, scheduler, vae = SD.load_sd(args.model, args.device, with_vae=True)
    except (OSError, ValueError) as err:
        parser.error(f"argument --model: {err}")
    anchors = args.anchor_prompt if args.anchor_prompt is not None else [""]
    latents = _encode_folder(parser, "--images", args.images, vae, unet) if args.images is not None else None
    retain_latents = (_encode_folder(parser, "--retain-images", args.retain_images, vae, unet)
                      if args.retain_images is not None else None)
    flags = {"preset": args.layers, "gamma": args.gamma, "attention_gamma": args.attention_gamma, "lr": args.lr,
             "epochs": args.epochs, "batch_size": args.batch_size, "gradient_guidance": args.guidance,
             "sample_guidance": args.guidance, "num_latents": args.num_latents, "sample_steps": args.sample_steps}
    dests = {"preset": "layers", "gradient_guidance": "guidance", "sample_guidance": "guidance"}
    if args.preset == "official":
        options = preset_options("official-sd", args, flags, dests, seed=args.seed)
    else:
        options = {**flags, "seed": args.seed}
    grid_prompts = list(dict.fromkeys([*args.forget_prompt, *anchors, *retain_prompts]))

    def grid(model):  # the same seed before and after: each cell starts from the same noise
        return SD.sample_prompts(model, scheduler, text_encoder, tokenizer, grid_prompts, args.grid_samples,
                                 args.sample_steps, args.guidance, args.seed)

    grid_before = grid(unet) if args.grid_samples else None
    try:
        semu_model, report, metrics = SD.unlearn_sd(
            unet, scheduler, text_encoder, tokenizer, args.forget_prompt, anchors, latents=latents,
            retain_prompts=retain_prompts, retain_latents=retain_latents, retain_weight=retain_weight,
            progress=not args.quiet, **options)
    except ValueError as err:
        library_error(parser, err)
    metrics["semu_settings"] = {**options, "retain_weight": retain_weight}
    files = results.write_run(args.out, semu_model, report, metrics,
                              {**settings(args, options, flags, dests), "anchor_prompt": anchors,
                               "retain_weight": retain_weight}, "unlearn-sd")
    if args.grid_samples:
        grid_after = grid(semu_model)
        results.write_samples(args.out, sd_images.latents_to_images(grid_before, vae, grid_before),
                              sd_images.latents_to_images(grid_after, vae, grid_before), grid_prompts)
        files.append(results.SAMPLES)
    files += results.render(args.out, samples=bool(args.grid_samples))
    if args.lora:
        from ..lora import export_diffusers_lora

        export_diffusers_lora(semu_model, args.out / "lora", prefix="unet", skip_conv=True)
        files.append("lora/")
    if args.save_unet:
        semu_model.merge_and_unload().save_pretrained(args.out / "unet")
        files.append("unet/")
    results.record_run(args.out, files, [*named_paths(args), *(args.model / name for name in SD.SD_SUBFOLDERS)])
    return finish_run(args.out, files, [
        f"forget-vs-anchor prediction gap (MSE): {metrics['forget_anchor_gap_before']:.4g} -> "
        f"{metrics['forget_anchor_gap_after']:.4g}; anchor drift {metrics['anchor_drift']:.4g}",
        f"trainable: {report.trainable_params} parameters in {len(metrics['adapted_layers'])} layers "
        f"(layers {options['preset']}, preset {args.preset})"])

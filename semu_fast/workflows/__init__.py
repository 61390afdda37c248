"""SEMU workflows: one entry point per task, each returning (SEMUModel, SEMUReport, metrics dict).

classification.run (SalUn's classification setting, with baselines), diffusion.unlearn_ddpm (DDPM class
forgetting), stable_diffusion.unlearn_sd (concept removal; sd_images turns image folders into latents and back
through the VAE), llm.unlearn_llm (causal LMs; llm_data, llm_losses, llm_eval and llm_trainer hold its data,
objectives, metrics and transformers.Trainer integration). digits holds the embedded toy data and models; models
the classification architectures and checkpoints; results and plots what a run writes to its folder."""

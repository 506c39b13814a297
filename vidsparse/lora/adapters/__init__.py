"""LoRA training adapters, one module per model family (text-to-video; image-to-video beside it).

Wan (``wan``: Wan 2.1 and Wan 2.2 A14B's two experts, SkyReels-V2; ``wan_i2v``: their
image-to-video pipelines), CogVideoX (``cogvideox``: v-prediction on its scheduler's alphas, T2V
and I2V, see that module) and the flow-matching table below (``hunyuan`` with HunyuanVideo I2V,
``ltx`` with LTX-Video I2V and ``LTXConditionPipeline``, ``mochi``), HunyuanVideo 1.5 T2V / I2V,
Kandinsky 5 T2V / I2V and Wan VACE without control (``hunyuan15``, ``kandinsky5``, ``wan_vace``:
every input from their pipelines' own methods), Cosmos-Predict2 video2world and Cosmos-Predict2.5
(``cosmos``: flow velocity at their own time scale, conditioning frames from ``prepare_latents``); the interface is ``base`` (with
``ClipConditionMixin`` for the per-clip image conditions). docs/lora.md, "Image-to-video", lists
each first-frame condition.

Each follows its diffusers 0.42 pipeline exactly, so a LoRA trained here is trained on what the
pipeline will feed the transformer at inference:

============ ============================ ============================== =============================
family       latents (VAE mode z)         text conditioning              transformer time / output
============ ============================ ============================== =============================
HunyuanVideo ``z * scaling_factor``       Llama embeds [256] + mask,     ``t = 1000 s``, velocity;
                                          CLIP pooled; guidance 1000 g   guidance-distilled: ``g = 1``
LTX-Video    ``(z - mean) * sf / std``,   T5 embeds [128] + mask         ``t = 1000 s``, velocity;
             packed to tokens [B, S, C]                                  RoPE scale (8/25, 32, 32)
Mochi        ``(z - mean) * sf / std``    T5 embeds [256] + mask         ``t = 1000 (1 - s)``,
                                                                         output ``x0 - noise``
============ ============================ ============================== =============================

(``s`` is the noise level: ``x_s = (1 - s) x0 + s noise``.) Mochi's pipeline runs a
``FlowMatchEulerDiscreteScheduler(invert_sigmas=True)``: its sigmas are ``1 - s``, the
transformer gets ``1000 (1 - s)`` and ``step`` adds ``(sigma_next - sigma) * output`` with
``sigma_next - sigma = s - s_next > 0``; an Euler step towards the data therefore needs
``output = -(noise - x0)``. ``MochiModel.predict`` converts both, so the training loop's loss
(velocity ``noise - x0`` at timestep ``1000 s``) is the same for every family.

HunyuanVideo T2V is guidance-distilled: its transformer takes the guidance scale as an input
(``guidance = 1000 g``; the pipeline's default ``g = 6`` at inference). Training on data uses
``g = 1`` (``HunyuanVideoModel.guidance_scale``): at ``g = 1`` classifier-free guidance is the
plain conditional velocity, which is exactly the flow-matching target of a (video, caption)
pair. The same choice is the default of the public HunyuanVideo LoRA trainers.

Default LoRA targets are the video self-attention q/k/v/o only: Wan-style ``attn1`` for LTX and
Mochi (their joint-attention text projections ``add_*_proj`` / ``to_add_out`` and LTX's
cross-attention ``attn2`` are left alone); for HunyuanVideo ``attn.to_q/k/v/to_out.0`` of the
double-stream blocks and ``attn.to_q/k/v`` of the single-stream blocks (which have no attention
output projection: their ``proj_out`` also carries the MLP), listed per layer because the text
token refiner's self-attention has the same module names.

A pipeline without text encoders (``text_encoder=None``, as the tiny test pipelines) gets the
deterministic hashed embeddings of ``vidsparse.models.tiny.encode_prompt_tiny`` instead, with a
padding mask of one token per word (+1), so offline runs and tests exercise the masks.
"""

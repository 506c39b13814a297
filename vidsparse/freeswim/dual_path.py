"""FreeSwim's dual path on a diffusers Wan transformer: window branch, full branch, override.

What the reference (``WillWu111/FreeSwim``) does, per transformer forward at the target size:

- **window branch** (batch rows ``[:B]``): self-attention restricted to ``vidsparse.FreeSwim``
  (the inward window of the base grid over all frames); its prediction is the one returned;
- **full branch** (rows ``[B:]``, the same latents, text and timestep): full self-attention;
  its prediction is discarded;
- in every block the full branch's text cross-attention output (before ``to_out``) replaces
  the window branch's (the "cross-attention override"); self-attention, FFN, the image part
  of Wan I2V cross-attention and everything else stay per row.

Both branches start every step from the window branch's latents, so here the pipeline never
sees the second row: the hook doubles the batch going in and returns rows ``[:B]`` of the
output. A forward runs in one of three modes:

- ``dual``: both branches in lockstep (batch 2B), override in every block; on a cache
  refresh the full branch's per-block outputs are also stored;
- ``reuse``: window branch only (batch B); each block's cross-attention output is read from
  the cache (no cross-attention computed), as the reference does between refreshes;
- ``window``: window branch only with its own cross-attention (the reference's
  unconditional pass in the cache variant).

Which pass is conditional: diffusers' ``cache_context("cond" | "uncond")`` when the pipeline
sets one (``WanPipeline``); otherwise (``WanVideoToVideoPipeline`` sets none) the first call at
a timestep is the conditional pass and the next one the unconditional, which is the order of
every diffusers Wan pipeline. Steps are counted per timestep change; the pipelines reset the
hook after each call (``maybe_free_model_hooks``), ``reset_dual_path`` does it by hand.

``remove_dual_path`` puts the original processor objects back and unregisters the hook, so
the model computes what it computed before, bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn

from vidsparse.attention import attention as sparse_attention
from vidsparse.attention import backend_for
from vidsparse.families import family_of
from vidsparse.families.processor import WrappedProcessor
from vidsparse.families.wan import wan_qkv, wan_rope
from vidsparse.freeswim.cache import CacheReport, CrossAttentionCache, cache_bytes
from vidsparse.freeswim.config import DualPathConfig
from vidsparse.layout import VideoLayout, auto_block_size
from vidsparse.patterns.freeswim import FreeSwim
from vidsparse.pipelines.hooks import empty_state_manager

HOOK_NAME = "vidsparse-freeswim"
_TRANSFORMER_ATTRS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class DualCall:
    """What the processors need to know about the current forward."""

    mode: str  # "dual" | "reuse" | "window"
    rows: int  # B: window-branch rows (the caller's batch)
    layout: VideoLayout
    step: int
    branch: str  # "cond" | "uncond"
    store: bool  # dual + cache refresh: store the full branch's outputs


def window_kernel(config: DualPathConfig, layout: VideoLayout, q: torch.Tensor) -> tuple[str, int]:
    """(backend name, kernel block) the window branch runs on ``layout`` for inputs like ``q``: the
    block is ``config.block_size``, else the rule of every other vidsparse path (``auto_block_size``:
    a smaller block on grids of < 128 tokens a frame), else the backend's default."""
    chosen = backend_for(config.backend, q)
    return chosen.name, config.block_size or auto_block_size(layout) or chosen.default_block


@dataclass(frozen=True)
class DualPathReport:
    """Per mode, the (step, branch) of every forward that ran in it, plus the cache."""

    dual: tuple[tuple[int, str], ...]
    reuse: tuple[tuple[int, str], ...]
    window: tuple[tuple[int, str], ...]
    refreshes: tuple[int, ...]  # conditional steps whose full-branch outputs were stored
    cache: CacheReport
    # The kernel the window branch really ran (last forward): backend name and block size; None before any.
    window_backend: str | None = None
    window_block: int | None = None

    def full_branch_steps(self, branch: str = "cond") -> list[int]:
        return [s for s, b in self.dual if b == branch]

    def describe(self) -> str:
        return (
            f"dual path: full branch in {len(self.dual)} forwards, cached override in {len(self.reuse)}, "
            f"window only in {len(self.window)}; {self.cache.describe()}"
        )


@dataclass
class DualPathState:
    """Everything the dual path keeps for one patched transformer."""

    config: DualPathConfig
    pattern: FreeSwim
    num_layers: int
    inner_dim: int
    cache: CrossAttentionCache
    current: DualCall | None = None
    original_processors: dict[str, Any] = field(default_factory=dict)
    log: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: {"dual": [], "reuse": [], "window": []})
    refreshes: list[int] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)  # per-processor call counts, for tests
    window_kernel: tuple[str, int] | None = None  # (backend, block size) of the last window-branch call
    _last_t: float | None = None
    _calls_at_t: int = 0
    _step: int = -1

    def reset(self) -> None:
        """A new generation: step 0 next, the cache emptied, the log kept until ``clear_log``."""
        self.current = None
        self._last_t, self._calls_at_t, self._step = None, 0, -1
        self.cache.reset()

    def clear_log(self) -> None:
        for v in self.log.values():
            v.clear()
        self.refreshes.clear()
        self.calls.clear()
        self.window_kernel = None

    def report(self) -> DualPathReport:
        return DualPathReport(
            dual=tuple(self.log["dual"]),
            reuse=tuple(self.log["reuse"]),
            window=tuple(self.log["window"]),
            refreshes=tuple(self.refreshes),
            cache=self.cache.report(),
            window_backend=None if self.window_kernel is None else self.window_kernel[0],
            window_block=None if self.window_kernel is None else self.window_kernel[1],
        )

    # -- per forward ---------------------------------------------------------------------
    def _branch_and_step(self, context: Any, timestep: Any) -> tuple[str, int]:
        name = getattr(context, "name", None)
        ctx_step = getattr(context, "step_index", None)
        t = float(timestep.detach().max()) if isinstance(timestep, torch.Tensor) else float(timestep or 0.0)
        if t != self._last_t:
            self._last_t, self._calls_at_t = t, 0
            self._step += 1
        else:
            self._calls_at_t += 1
        step = int(ctx_step) if ctx_step is not None else self._step
        if name in ("cond", "uncond"):
            return name, step
        return ("cond" if self._calls_at_t == 0 else "uncond"), step

    def begin(self, layout: VideoLayout, batch: int, context: Any, timestep: Any, device, dtype) -> DualCall:
        cfg = self.config
        branch, step = self._branch_and_step(context, timestep)
        store = False
        if branch == "uncond":
            mode = "dual" if cfg.uncond_override else "window"
        elif cfg.cache_interval == 1 or self.cache.recompute:
            mode = "dual"
        else:
            key = (layout, batch, str(device))
            if step % cfg.cache_interval == 0 or not self.cache.valid_for(key):
                itemsize = torch.empty((), dtype=cfg.cache_dtype or dtype).element_size()
                needed = cache_bytes(layout.video_len, self.inner_dim, self.num_layers, batch, itemsize)
                store = self.cache.begin_refresh(key, needed, torch.device(device))
                mode = "dual"
                if store:
                    self.refreshes.append(step)
            else:
                mode = "reuse"
        self.log[mode].append((step, branch))
        self.current = DualCall(mode, batch, layout, step, branch, store)
        return self.current


# -- processors -----------------------------------------------------------------------------
class _DualProcessor(WrappedProcessor):
    state: DualPathState


class DualSelfAttnProcessor(_DualProcessor):
    """``attn1``: window attention on the window rows, full attention on the full rows."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        call = self.state.current
        if call is None or encoder_hidden_states is not None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        cfg = self.state.config
        query, key, value = wan_qkv(attn, hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = wan_rope(query, *rotary_emb)
            key = wan_rope(key, *rotary_emb)
        scale = cfg.softmax_scale(query.shape[-1])
        b = call.rows
        call.layout.check_seq_len(query.shape[1])
        self.state.calls["window"] += 1
        self.state.window_kernel = window_kernel(cfg, call.layout, query)
        block = self.state.window_kernel[1]
        out = sparse_attention(
            query[:b], key[:b], value[:b], call.layout, self.state.pattern,
            backend=cfg.backend, layer=self.layer, scale=scale, block_size=block,
        )  # fmt: skip
        if call.mode == "dual":
            self.state.calls["full"] += 1
            full = dispatch_attention_fn(
                query[b:], key[b:], value[b:], attn_mask=None, dropout_p=0.0, is_causal=False, scale=scale,
                backend=self._attention_backend, parallel_config=None,
            )  # fmt: skip
            out = torch.cat([out.to(full.dtype), full], dim=0)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class DualCrossAttnProcessor(_DualProcessor):
    """``attn2``: the full rows' text cross-attention output replaces the window rows'."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        call = self.state.current
        if call is None or call.mode == "window" or encoder_hidden_states is None or attention_mask is not None:
            self.state.calls["cross-own"] += 1
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        image_context = None
        if attn.add_k_proj is not None:  # Wan I2V: image tokens first, 512 text tokens (as diffusers)
            n_img = encoder_hidden_states.shape[1] - 512
            image_context = encoder_hidden_states[:, :n_img]
            encoder_hidden_states = encoder_hidden_states[:, n_img:]
        b = call.rows
        need_query = call.mode == "dual" or image_context is not None
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)) if need_query else None
        if call.mode == "dual":
            ctx = encoder_hidden_states[b:]
            if getattr(attn, "fused_projections", False):
                key, value = attn.to_kv(ctx).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(ctx), attn.to_v(ctx)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))
            self.state.calls["cross-full"] += 1
            text = dispatch_attention_fn(
                query[b:], key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=None,
            )  # fmt: skip
            if call.store:
                self.state.cache.put(self.layer, text)
            text = torch.cat([text, text], dim=0)
        else:  # reuse
            self.state.calls["cross-cached"] += 1
            dtype = query.dtype if query is not None else hidden_states.dtype
            text = self.state.cache.get(self.layer, hidden_states.device, dtype)
        out = text.flatten(2, 3).type_as(hidden_states if query is None else query)
        if image_context is not None:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
            else:
                key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            img = dispatch_attention_fn(
                query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=None,
            )  # fmt: skip
            out = out + img.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# -- hook -----------------------------------------------------------------------------------
_BATCHED_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


class DualPathHook(ModelHook):
    """Doubles the batch for ``dual`` forwards and returns the window branch's rows."""

    _is_stateful = True

    def __init__(self, state: DualPathState) -> None:
        super().__init__()
        self.state = state
        self.context_manager = empty_state_manager()
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(module).forward)  # the class's: other hooks wrap .forward
        return module

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        bound = dict(self._signature.bind(module, *args, **kwargs).arguments)
        bound.pop(next(iter(self._signature.parameters)))  # self
        hs = bound["hidden_states"]
        p_t, p_h, p_w = module.config.patch_size
        _, _, f, h, w = hs.shape
        layout = VideoLayout(f // p_t, h // p_h, w // p_w)
        call = self.state.begin(
            layout, int(hs.shape[0]), self.context_manager._context, bound.get("timestep"), hs.device, hs.dtype
        )
        if call.mode == "dual":
            for name in _BATCHED_INPUTS:
                value = bound.get(name)
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == call.rows:
                    bound[name] = torch.cat([value, value], dim=0)
        return (), bound

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        call = self.state.current
        if call is None or call.mode != "dual":
            return output
        b = call.rows
        if isinstance(output, tuple):
            return (output[0][:b], *output[1:])
        if hasattr(output, "sample"):
            output.sample = output.sample[:b]
            return output
        return output[:b]

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


# -- apply / remove -------------------------------------------------------------------------
def _transformers(target: Any) -> list[torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return [getattr(target, "_orig_mod", target)]
    if hasattr(target, "components"):
        found = [getattr(target, a) for a in _TRANSFORMER_ATTRS if getattr(target, a, None) is not None]
        if found:
            return [getattr(t, "_orig_mod", t) for t in found]
        raise ValueError(f"{type(target).__name__} holds no transformer (pipe.transformer is None).")
    raise TypeError(f"Expected a diffusers Wan pipeline or a WanTransformer3DModel, got {type(target).__name__}.")


def check_wan_transformer(transformer: Any) -> None:
    """ValueError unless ``transformer`` is a diffusers Wan transformer with cross-attention."""
    import diffusers

    name = type(transformer).__name__
    if not isinstance(transformer, diffusers.WanTransformer3DModel):
        why = "it is not a Wan transformer"
        with contextlib.suppress(ValueError):  # a transformer of no family: the generic reason
            family = family_of(transformer)
            if family.text_position != "none":  # joint attention: no cross-attention
                why = f"the {family.name} family attends text jointly inside self-attention"
        raise ValueError(
            f"FreeSwim's dual path replaces cross-attention outputs and is built for the Wan family "
            f"(WanTransformer3DModel); got a {name} ({why}). Use a Wan 2.1/2.2 pipeline, or a plain vidsparse "
            "pattern (e.g. vidsparse.apply(pipe, vs.FreeSwim(base_grid=...))) for window attention alone."
        )
    for i, block in enumerate(transformer.blocks):
        for sub in ("attn1", "attn2"):
            proc = getattr(getattr(block, sub), "processor", None)
            if type(proc).__name__ != "WanAttnProcessor":
                raise ValueError(
                    f"blocks.{i}.{sub} uses the processor {type(proc).__name__}, but the dual path mirrors diffusers' "
                    "WanAttnProcessor. Remove the other patch first (vidsparse.remove(pipe), "
                    "transformer.set_default_attn_processor() or the other plugin's remove)."
                )


def get_dual_state(transformer: torch.nn.Module) -> DualPathState | None:
    transformer = getattr(transformer, "_orig_mod", transformer)
    registry = getattr(transformer, "_diffusers_hook", None)
    if not isinstance(registry, HookRegistry):
        return None
    hook = registry.get_hook(HOOK_NAME)
    return hook.state if isinstance(hook, DualPathHook) else None


def apply_dual_path(target: Any, config: DualPathConfig) -> list[DualPathState]:
    """Patch every Wan transformer of ``target`` (pipeline or transformer); one state each.

    All checks run before anything is patched. Applying again replaces the configuration.
    """
    if not isinstance(config, DualPathConfig):
        raise TypeError(f"config must be a vidsparse.freeswim.DualPathConfig, got {type(config).__name__}.")
    transformers = _transformers(target)
    for t in transformers:
        remove_from(t)
        check_wan_transformer(t)
    states = []
    for t in transformers:
        inner = t.blocks[0].attn2.inner_dim
        state = DualPathState(
            config=config,
            pattern=FreeSwim(base_grid=config.base_grid),
            num_layers=len(t.blocks),
            inner_dim=int(inner),
            cache=CrossAttentionCache(config.cache_budget_bytes, config.cache_overflow, config.cache_dtype),
        )
        registry = HookRegistry.check_if_exists_or_initialize(t)
        registry.register_hook(DualPathHook(state), HOOK_NAME)
        for i, block in enumerate(t.blocks):
            for sub, cls in (("attn1", DualSelfAttnProcessor), ("attn2", DualCrossAttnProcessor)):
                module = getattr(block, sub)
                state.original_processors[f"blocks.{i}.{sub}"] = module.processor
                module.set_processor(cls(module.processor, i, state))
        states.append(state)
    return states


def remove_from(transformer: torch.nn.Module) -> bool:
    state = get_dual_state(transformer)
    if state is None:
        return False
    transformer = getattr(transformer, "_orig_mod", transformer)
    modules = dict(transformer.named_modules())
    for path, original in state.original_processors.items():
        modules[path].set_processor(original)
    state.cache.reset()
    transformer._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    return True


def remove_dual_path(target: Any) -> Any:
    """Give every transformer of ``target`` its original processors and forward back."""
    for t in _transformers(target):
        remove_from(t)
    return target


def reset_dual_path(target: Any) -> None:
    """Forget steps and the cache (a new generation starts); pipelines do it after each call."""
    for t in _transformers(target):
        state = get_dual_state(t)
        if state is not None:
            state.reset()

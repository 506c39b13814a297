"""Compile the Triton kernels for sm_90 (H100/H200) offline and report what the machine code says.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the
whole pipeline down to a cubin with the ptxas shipped in the triton wheel, and the wheel's
cuobjdump/nvdisasm disassemble it. For every kernel variant (forward, dK/dV, dQ; caller-order
gather vs contiguous kernel order; run-time key validity; per-query selection) and every
shipped autotune config at head dim 128, bf16, plan block 128, and for the key-block-major
kernels (``kb-*``, VMoBA's default path) at the launch shape they ship, it records:

- registers per thread, spill stores/loads and stack frame (ptxas -v, same flags as triton),
- shared memory (triton's metadata),
- whether wgmma (``HGMMA``) and TMA (``UTMALDG``) appear in the SASS,
- the SASS instructions of each inner loop that issues wgmma, and per key tile (the loop's
  wgmma count divided by the wgmma a tile needs), plus the loop's global loads and
  exp2 (``MUFU.EX2``) and FP32 multiply counts.

The same figures for a fused-attention baseline compiled the same way: our own transcription of
the inner loop of Triton's ``06-fused-attention`` tutorial forward kernel (tensor descriptors
for Q/K/V/O, scale folded into exp2, no masking), labelled as such in the output; the
tutorial itself is not shipped in the triton wheel.

    python benchmarks/offline_compile.py                        # writes benchmarks/results/offline_sm90.{json,md}
    python benchmarks/offline_compile.py --out /tmp/o.json --quick   # default configs only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, even when the caller interprets
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vidsparse.kernels import triton_kernels as tk  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HEAD_DIM = 128
BLOCK = 128


# -- the baseline: the tutorial's forward inner loop, written out ---------------------------


@triton.jit
def tutorial_fwd_baseline(
    Q, K, V, Out, sm_scale, Z, H, N_CTX,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Transcription of 06-fused-attention's non-causal forward (``_attn_fwd`` + ``_attn_fwd_inner``,
    STAGE 1 path): tensor descriptors on [Z*H*N_CTX, HEAD_DIM], scale folded into exp2."""
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    y_dim = Z * H * N_CTX
    desc_q = tl.make_tensor_descriptor(
        Q, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM]
    )
    desc_k = tl.make_tensor_descriptor(
        K, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )
    desc_v = tl.make_tensor_descriptor(
        V, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_N, HEAD_DIM]
    )
    desc_o = tl.make_tensor_descriptor(
        Out, shape=[y_dim, HEAD_DIM], strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM]
    )
    offset_y = off_z * (N_CTX * H) + off_h * N_CTX
    qo_offset_y = offset_y + start_m * BLOCK_M
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504
    q = desc_q.load([qo_offset_y, 0])
    offsetk_y = offset_y
    for _start_n in tl.range(0, N_CTX, BLOCK_N):
        k = desc_k.load([offsetk_y, 0]).T
        qk = tl.dot(q, k)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([offsetk_y, 0])
        p = p.to(v.dtype)
        acc = tl.dot(p, v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
        offsetk_y += BLOCK_N
    acc = acc / l_i[:, None]
    desc_o.store([qo_offset_y, 0], acc.to(Out.dtype.element_ty))


# -- compiling ----------------------------------------------------------------------------


def _signature(fn, pointers: dict[str, str], floats: tuple[str, ...], consts: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


# What a real launch tells the compiler: Triton's launcher marks every pointer that is 16-byte
# aligned and every int argument divisible by 16 with ``tt.divisibility=16`` (``"D"`` in its
# specialisation key) and compiles that variant. Hinted here: every pointer (fresh or contiguous
# tensors), the [B, S, H, D] strides at head dim 128, S_PAD / N_CTX (multiples of the block) and
# the group-major selection's strides (multiples of S_PAD). Not hinted: the head count (12 at
# Wan2.1-1.3B), the mask count and the list strides (multiples of the block count only).
DIVISIBLE_INTS = frozenset(
    {f"s_{t}{d}" for t in "qkvodg" for d in "bsh"} | {"S_PAD", "N_CTX", "s_kvb", "s_sb", "s_sh", "s_sg"}
)
LAUNCH_HINTS = True  # --no-launch-hints: compile without them (the figures before 2026-12-02)


def _hints(fn, signature: dict[str, str]) -> dict:
    if not LAUNCH_HINTS:
        return {}
    return {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or (kind == "i32" and name in DIVISIBLE_INTS)
    }


def compile_kernel(fn, pointers, floats, consts, num_warps: int, num_stages: int):
    sig = _signature(fn, pointers, floats, consts)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=_hints(fn, sig))
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def _ptxas() -> str:
    """The ptxas triton itself uses for sm_90 (the wheel ships two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def ptxas_report(ptx: str) -> dict[str, int]:
    """Registers, spill bytes and stack frame from ptxas -v (the flags triton uses)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src), "-o",
               str(Path(d) / "k.o")]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed: {res.stderr.strip()[:400]}")
        log = res.stdout + res.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": grab(r"(\d+) bytes stack frame"),
    }


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def sass_listing(cubin: bytes) -> list[tuple[str | None, str]]:
    """[(label or None, instruction text)] in program order (labels attach to the next instruction)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    out: list[tuple[str | None, str]] = []
    pending = None
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending = m.group(1)
            continue
        m = _INSN.search(line)
        if m:
            out.append((pending, m.group(2).strip()))
            pending = None
    return out


def _opcode(insn: str) -> str:
    parts = insn.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def inner_loops(listing, hgmma_per_tile: int) -> list[dict]:
    """Loops (backward branches) that issue wgmma and contain no other such loop, in program order."""
    where = {lab: i for i, (lab, _) in enumerate(listing) if lab}
    loops = []
    for i, (_, insn) in enumerate(listing):
        op = _opcode(insn)
        if not op.startswith("BRA"):
            continue
        m = re.search(r"`\((\.L_x_\d+)\)", insn)
        if not m or m.group(1) not in where or where[m.group(1)] > i:
            continue
        start = where[m.group(1)]
        body = [_opcode(x) for _, x in listing[start : i + 1]]
        n_mma = sum(op.startswith("HGMMA") for op in body)
        if n_mma:
            loops.append((start, i, body, n_mma))
    inner = [lp for lp in loops if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    out = []
    for _start, _end, body, n_mma in sorted(inner):
        real = [op for op in body if op != "NOP"]
        tiles = max(1, round(n_mma / hgmma_per_tile))
        out.append({
            "instructions": len(real),
            "hgmma": n_mma,
            "tiles_per_iteration": tiles,
            "instructions_per_tile": round(len(real) / tiles, 1),
            "global_loads": sum(op.startswith(("LDG", "LDGSTS")) for op in real),
            "tma_loads": sum(op.startswith("UTMALDG") for op in real),
            "mufu_ex2": sum(op.startswith("MUFU.EX2") for op in real),
            "fmul": sum(op == "FMUL" or op.startswith("FMUL.") for op in real),
            "ffma": sum(op == "FFMA" or op.startswith("FFMA.") for op in real),
            "local_memory": sum(op.startswith(("LDL", "STL")) for op in real),
        })  # fmt: skip
    return out


def hot_loop(rep: dict) -> dict | None:
    """The cheapest softmax loop (issues exp2) per tile: the whole-block loop of ours, the main loop of the
    baseline (the compiler emits more than one copy of a pipelined loop)."""
    loops = [lp for lp in rep.get("loops", []) if lp["mufu_ex2"] > 0]
    return min(loops, key=lambda lp: lp["instructions_per_tile"]) if loops else None


def analyse(kernel, hgmma_per_tile: int) -> dict:
    listing = sass_listing(kernel.asm["cubin"])
    ops = [_opcode(x) for _, x in listing]
    rep = ptxas_report(kernel.asm["ptx"])
    rep.update(
        shared_bytes=kernel.metadata.shared,
        wgmma=any(op.startswith("HGMMA") for op in ops),
        tma=any(op.startswith("UTMALDG") for op in ops),
        sass_instructions=len(ops),
        local_memory_instructions=sum(op.startswith(("LDL", "STL")) for op in ops),
        loops=inner_loops(listing, hgmma_per_tile),
    )
    return rep


# -- the variants -------------------------------------------------------------------------

_PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
        "DV": "*bf16", "Lse": "*fp32", "Delta": "*fp32", "Rows": "*i32", "Idx": "*i32", "Mid": "*i32",
        "NElem": "*i32", "NMask": "*i32", "NAll": "*i32", "Valid": "*u8", "Masks": "*u8", "KeyValid": "*u8", "QSel": "*u8", "KGroup": "*i32",
        "QOrder": "*i32"}  # fmt: skip


def _per_tile(role: str, bm: int, bn: int) -> int:
    """wgmma instructions one tile needs per warpgroup (K step 16): fwd QK^T (K=D) + PV (K=BLOCK_N)."""
    if role == "fwd":
        return HEAD_DIM // 16 + bn // 16
    if role == "dkdv":  # kq^T (K=D), dv += p^T do (K=BLOCK_M), dp^T = v do^T (K=D), dk += ds^T q (K=BLOCK_M)
        return 2 * (HEAD_DIM // 16) + 2 * (bm // 16)
    return 2 * (HEAD_DIM // 16) + bn // 16  # dq: qk^T (K=D), dp = do v^T (K=D), dq += ds k (K=BLOCK_N)


def variants(quick: bool):
    kernels = tk.KERNELS
    flag_sets = [("kernel-order", dict(GATHER=False, HAS_KV=False, HAS_QSEL=False)),
                 ("gather", dict(GATHER=True, HAS_KV=False, HAS_QSEL=False))]  # fmt: skip
    # Per-query selection (VMoBA's query-tile path) in both orders, every config shipped for it:
    # its selection loads are the per-tile extra the selection layout decides.
    extra = [("gather+key-valid", dict(GATHER=True, HAS_KV=True, HAS_QSEL=False)),
             ("gather+query-select", dict(GATHER=True, HAS_KV=False, HAS_QSEL=True)),
             ("kernel-order+query-select", dict(GATHER=False, HAS_KV=False, HAS_QSEL=True))]  # fmt: skip
    for role, (fn, space) in kernels.items():
        for label, flags in flag_sets + extra:
            # the configs shipped for this path
            configs = tk.candidates(space, HEAD_DIM, BLOCK, 2, flags["GATHER"], flags["HAS_QSEL"])
            if label == "gather+key-valid" or quick:
                configs = configs[:1]
            for i, cfg in enumerate(configs):
                yield role, fn, cfg, label, flags, i == 0


def compile_ours(role, fn, cfg, flags):
    consts = dict(HEAD_DIM=HEAD_DIM, BLOCK=BLOCK, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PREC="tf32", **flags)
    if "USE_TMA" in fn.arg_names:  # the contiguous kernel-order path reads K/V tiles through TMA descriptors
        consts["USE_TMA"] = not flags["GATHER"]
    if "MASK_TMA" in fn.arg_names:  # element masks through TMA wherever TMA exists (sm_90)
        consts["MASK_TMA"] = True
    if "NEG_SCALE" in fn.arg_names:
        consts["NEG_SCALE"] = False
    return compile_kernel(fn, _PTR, ("sm_scale",), consts, cfg.num_warps, cfg.num_stages)


# The key-block-major kernels (VMoBA's default path, ``vidsparse.kernels.keyblock_triton``) at
# the launch shape they ship: packed 128-row query tiles, 64-key sub-tiles (bf16), the module's
# warps and dK/dV row step. Config "MxN": query rows x keys per step (dK/dV: SUB_M x BLOCK_N).
# Forward and dQ in both key sources: rows gathered by index ("key-block", no TMA) and tensor
# descriptors ("key-block+tma": the launch on Hopper for every partition, reading the caller's
# K/V where each group is one run of caller rows, else the group-major copy). Their loops:
# whole sub-tiles (no mask), then the masked tail. dK/dV loads its keys once per program, by
# caller row or, reading the copy, by kernel position ("key-block+copy").
_KB_PTR = {**_PTR, "OP": "*fp32", "LP": "*fp32", "DQP": "*fp32", "KRows": "*i32", "TileBH": "*i32",
           "TileGroup": "*i32", "Span": "*i32", "TileFirst": "*i32", "TileCount": "*i32", "Lead": "*i32",
           "KStart": "*i32"}  # fmt: skip


def keyblock_variants():
    from vidsparse.kernels import keyblock as kb
    from vidsparse.kernels import keyblock_triton as kt

    bm, bn, warps, stages = kb.DEFAULT_BLOCK_M, kb.DEFAULT_BLOCK_N, kt.NUM_WARPS, 3
    sub = min(bm, kt.DKDV_SUB_M)
    for role, fn in kt.KERNELS.items():
        for tma in (False, True):
            for has_kv in (False, True):
                consts = dict(HEAD_DIM=HEAD_DIM, BLOCK_M=bm, BLOCK_N=bn, HAS_KV=has_kv, PREC="tf32")
                rows = bm
                if role == "dkdv":
                    consts["SUB_M"] = rows = sub
                    consts["KV_KERNEL_ORDER"] = tma  # the copy exists exactly when TMA is on
                else:
                    consts["KV_TMA"] = tma
                if role == "fwd":
                    consts["NEG_SCALE"] = False
                source = ("+copy" if role == "dkdv" else "+tma") if tma else ""
                label = "key-block" + source + ("+key-valid" if has_kv else "")
                yield role, fn, consts, label, f"{rows}x{bn}/w{warps}/s{stages}", warps, stages, rows, bn


def compile_baseline(cfg):
    consts = dict(HEAD_DIM=HEAD_DIM, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    ptrs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16"}
    return compile_kernel(tutorial_fwd_baseline, ptrs, ("sm_scale",), consts, cfg.num_warps, cfg.num_stages)


def run(quick: bool, log=print) -> dict:
    rows = []
    fwd_configs = tk.candidates(tk.KERNELS["fwd"][1], HEAD_DIM, BLOCK, 2)
    baseline = {}
    for cfg in fwd_configs[:1] if quick else fwd_configs:
        t0 = time.time()
        k = compile_baseline(cfg)
        rep = analyse(k, _per_tile("fwd", cfg.block_m, cfg.block_n))
        key = f"{cfg.block_m}x{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"
        baseline[key] = rep
        rows.append(
            {
                "kernel": "tutorial-06-fwd (transcribed baseline)",
                "variant": "tma",
                "config": key,
                "default": False,
                **rep,
            }
        )
        log(f"baseline {key}: {rep['registers']} regs, spill {rep['spill_store_bytes']}, "
            f"loop {[lp['instructions_per_tile'] for lp in rep['loops']]} ({time.time() - t0:.1f} s)")  # fmt: skip
    for role, fn, cfg, label, flags, default in variants(quick):
        t0 = time.time()
        key = f"{cfg.block_m}x{cfg.block_n}/w{cfg.num_warps}/s{cfg.num_stages}"
        try:
            k = compile_ours(role, fn, cfg, flags)
            rep = analyse(k, _per_tile(role, cfg.block_m, cfg.block_n))
        except Exception as exc:  # record, keep going
            rep = {"error": " ".join(str(exc).split())[:400]}
        row = {"kernel": role, "variant": label, "config": key, "default": default, **rep}
        if role == "fwd" and key in baseline and hot_loop(rep) and hot_loop(baseline[key]):
            row["hot_loop_instructions_per_tile"] = hot_loop(rep)["instructions_per_tile"]
            row["baseline_hot_loop_instructions_per_tile"] = hot_loop(baseline[key])["instructions_per_tile"]
            row["whole_loop_vs_baseline"] = round(
                row["hot_loop_instructions_per_tile"] / row["baseline_hot_loop_instructions_per_tile"], 3
            )
        rows.append(row)
        log(f"{role:4s} {label:20s} {key:18s} {rep.get('registers')} regs, spill {rep.get('spill_store_bytes')}, "
            f"wgmma {rep.get('wgmma')}, tma {rep.get('tma')}, loops {[lp['instructions_per_tile'] for lp in rep.get('loops', [])]}"
            f"{' vs base ' + str(row.get('whole_loop_vs_baseline')) if 'whole_loop_vs_baseline' in row else ''} "
            f"({time.time() - t0:.1f} s)")  # fmt: skip
    for role, fn, consts, label, key, warps, stages, rows_per_step, bn in keyblock_variants():
        t0 = time.time()
        try:
            k = compile_kernel(fn, _KB_PTR, ("sm_scale",), consts, warps, stages)
            rep = analyse(k, _per_tile(role, rows_per_step, bn))
        except Exception as exc:  # record, keep going
            rep = {"error": " ".join(str(exc).split())[:400]}
        rows.append({"kernel": f"kb-{role}", "variant": label, "config": key, "default": True, **rep})
        log(f"kb-{role:4s} {label:20s} {key:18s} {rep.get('registers')} regs, spill {rep.get('spill_store_bytes')}, "
            f"loops {[lp['instructions_per_tile'] for lp in rep.get('loops', [])]} ({time.time() - t0:.1f} s)")  # fmt: skip
    from vidsparse.benchmeta import git_commit

    commit, dirty = git_commit()
    return {
        "schema": "vidsparse.offline_compile/1",
        "target": "sm_90a (GPUTarget('cuda', 90, 32))",
        "triton": triton.__version__,
        "ptxas": subprocess.run([_ptxas(), "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1],
        "git_commit": commit,
        "git_dirty": dirty,
        "head_dim": HEAD_DIM,
        "plan_block": BLOCK,
        "dtype": "bfloat16",
        "launch_hints": LAUNCH_HINTS,
        "note": "loops = innermost SASS loops issuing wgmma, in program order; for fwd/dq the first is the masked "
        "loop and the last real one the whole-block loop; for kb-fwd/kb-dq the first is the whole sub-tile loop and "
        "the second the masked tail. Entries after those (e.g. the baseline's 694 / 437) are mbarrier-wait slow paths "
        "placed after the exit that branch back into a loop, not loops of their own. The baseline is our "
        "transcription of Triton's 06-fused-attention forward inner loop (not the tutorial file itself)."
        + (
            " Compiled with the divisibility hints a real launch gives (16-byte aligned pointers, strides that are "
            "multiples of 16: see DIVISIBLE_INTS)."
            if LAUNCH_HINTS
            else " Compiled without launch hints."
        ),
        "results": rows,
    }


def markdown(rep: dict) -> str:
    lines = [
        "# Offline sm_90 compile of the vidsparse Triton kernels",
        "",
        f"triton {rep['triton']}, {rep['ptxas']}, commit `{rep['git_commit'][:12]}`{' (dirty)' if rep['git_dirty'] else ''}; "
        f"head dim {rep['head_dim']}, plan block {rep['plan_block']}, {rep['dtype']}. {rep['note']}",
        "",
        "| kernel | variant | config | regs | spill st/ld B | smem KB | wgmma | TMA | loop insts/tile (masked .. whole) | loop global loads | whole vs baseline |",
        "|---|---|---|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in rep["results"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | error: {r['error'][:80]} ||||||||")
            continue
        loops = " / ".join(str(lp["instructions_per_tile"]) for lp in r["loops"]) or "-"
        loads = " / ".join(str(lp["global_loads"]) for lp in r["loops"]) or "-"
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']}{' (default)' if r['default'] else ''} | "
                     f"{r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{'yes' if r['wgmma'] else 'no'} | {'yes' if r['tma'] else 'no'} | {loops} | {loads} | "
                     f"{r.get('whole_loop_vs_baseline', '')} |")  # fmt: skip
    if rep.get("before"):
        before = rep["before"]
        label = before.get("label") or "before this branch's kernel changes"
        lines += ["", f"## Before: {label}", "",
                  f"Commit `{before.get('git_commit', '?')[:12]}`, same harness"
                  f"{' and launch hints' if before.get('launch_hints') else ''}: the rows whose registers, spills or "
                  "loops differ now (* changed, - gone).", "",
                  "| kernel | variant | config | regs | spill st B | loop insts/tile | loop global loads |",
                  "|---|---|---|---:|---:|---|---|"]  # fmt: skip
        now = {(r["kernel"], r["variant"], r["config"]): r for r in rep["results"] if "error" not in r}

        def figures(r: dict) -> tuple:
            return (r["registers"], r["spill_store_bytes"], [lp["instructions_per_tile"] for lp in r["loops"]])

        changed = 0
        for r in before["results"]:
            if "error" in r:
                continue
            loops = " / ".join(str(lp["instructions_per_tile"]) for lp in r["loops"]) or "-"
            loads = " / ".join(str(lp["global_loads"]) for lp in r["loops"]) or "-"
            after = now.get((r["kernel"], r["variant"], r["config"]))
            if after is not None and figures(after) == figures(r):
                continue
            mark = "*" if after is not None else "-"
            changed += 1
            lines.append(
                f"| {r['kernel']} | {r['variant']}{mark} | {r['config']} | {r['registers']} | {r['spill_store_bytes']} | "
                f"{loops} | {loads} |"
            )
        if not changed:
            lines[-2:] = ["Every row of that run compiles to the same registers, spills and loops now."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "offline_sm90.json"), help="JSON path (.md beside)"
    )
    p.add_argument("--quick", action="store_true", help="default configs only")
    p.add_argument("--before", default=None, help="a JSON of an earlier run to embed as 'before'")
    p.add_argument("--before-label", default=None, help="what the 'before' run was (Markdown heading)")
    p.add_argument("--no-launch-hints", action="store_true", help="compile without the launch's divisibility hints")
    args = p.parse_args(argv)
    global LAUNCH_HINTS
    LAUNCH_HINTS = not args.no_launch_hints
    rep = run(args.quick, log=lambda m: print(m, flush=True))
    if args.before:
        rep["before"] = json.loads(Path(args.before).read_text())
        rep["before"].pop("before", None)
        if args.before_label:
            rep["before"]["label"] = args.before_label
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(rep), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
